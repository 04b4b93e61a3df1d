"""Backend selection for every op in :mod:`vhist.ops`.

Three backends exist:

* ``triton``: vhist's Triton kernels. Compiled on CUDA tensors; on CPU tensors they run
  through Triton's interpreter, which must be switched on with ``TRITON_INTERPRET=1``
  before ``triton`` is first imported.
* ``cuda``: vhist's CUDA C++ kernels from ``csrc/``, for the ops that have them.
* ``torch``: a plain PyTorch composition, which is also the reference the tests and
  benchmarks compare against.

The backend is chosen, in order of precedence, by the innermost :func:`use_backend`
context, the ``VHIST_BACKEND`` environment variable, and finally the device of the
input: ``triton`` for CUDA tensors, ``torch`` for CPU tensors. An op never falls back
to another backend: if it has no kernel for the chosen one it raises
:class:`NotImplementedError`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch

BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "VHIST_BACKEND"

# Innermost use_backend() last. A plain list rather than a ContextVar: torch.compile can
# read (and guard on) a module-level list, not a ContextVar.
_backend_stack: list[str] = []


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here: no CUDA, or Triton without its interpreter on CPU."""


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown vhist backend {name!r} (from {source}); valid backends: {', '.join(BACKENDS)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the ``with`` block on backend ``name``.

    Args:
        name: one of ``"triton"``, ``"cuda"``, ``"torch"``.

    Raises:
        ValueError: for an unknown backend name.
    """
    _backend_stack.append(_validate(name, "use_backend()"))
    try:
        yield name
    finally:
        _backend_stack.pop()


def _requested() -> tuple[str | None, str]:
    if _backend_stack:
        return _backend_stack[-1], "use_backend() context"
    env = os.environ.get(ENV_VAR)
    if env:
        return _validate(env.strip().lower(), f"${ENV_VAR}"), f"${ENV_VAR}"
    return None, "default"


def resolve_backend(device: torch.device) -> str:
    """The backend an op with inputs on ``device`` runs on."""
    name, _ = _requested()
    if name is not None:
        return name
    return "triton" if device.type == "cuda" else "torch"


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter in this process.

    Triton decides when it is imported: its ``@triton.jit`` library functions become
    interpreted or compiled functions then, and setting ``TRITON_INTERPRET`` afterwards
    does not change them. This reads that decision (the variable only while Triton is
    not imported yet).
    """
    if "triton" not in sys.modules:
        return _env_interpret()
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sigmoid, InterpretedFunction)


def backend_info() -> dict:
    """What backend is active, why, and what this process can run.

    Returns:
        A dict with the requested backend (``None`` when the per-device default
        applies), where the choice came from, the defaults per device, whether Triton is
        interpreted (as decided when Triton was imported), whether CUDA is available,
        and whether the CUDA C++ extensions (the ``cuda`` backend) can be built here
        (``cuda_extension``). An invalid ``$VHIST_BACKEND`` is reported under ``error``
        instead of raised.
    """
    try:
        name, source = _requested()
        error = None
    except ValueError as exc:
        name, source, error = None, f"${ENV_VAR}", str(exc)
    info = {
        "backend": name,
        "source": source,
        "default_cuda": "triton",
        "default_cpu": "torch",
        "triton_interpret": triton_interpreted(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_extension": _cuda_extension_status(),
    }
    if error is not None:
        info["error"] = error
    return info


def _cuda_extension_status() -> dict:
    from vhist.ops._cuda_ext import status

    return status()
