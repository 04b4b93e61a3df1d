"""Helpers shared by the kernel files: interpreter detection and autotuning."""
import os

import triton

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the mode of every kernel
# in this package is fixed when the package is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def autotune(configs, key, **kwargs):
    """``triton.autotune`` on a GPU; the first config, fixed, under the interpreter.

    The interpreter has no device timer to tune with, and running every config there
    would only slow the CPU tests down.
    """
    if INTERPRETED:
        fixed = configs[0].kwargs
        return triton.heuristics({name: (lambda _args, v=value: v) for name, value in fixed.items()})
    return triton.autotune(configs=configs, key=key, **kwargs)
