"""Guards of a training run: Ctrl-C handling, NaN detection and the SyncBatchNorm probe,
with the exit codes they lead to."""
from __future__ import annotations

import signal
import sys
import threading

import torch

# 2: an expected error (as the CLI's), 1: a bug (a traceback).
EXIT_OK, EXIT_BUG, EXIT_FAILED, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def expected_errors() -> tuple:
    """The exception types a user causes and can fix (bad arguments, data, checkpoints,
    devices or backends): the CLI reports them in one line with exit code 2."""
    from vhist.backend import BackendUnavailable

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, BackendUnavailable,
            NotImplementedError)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class RunEnded(Exception):
    """A run stops before its last epoch, or ends: its status, exit code and message."""

    def __init__(self, status: str, exit_code: int, message: str = ""):
        super().__init__(message)
        self.status, self.exit_code, self.message = status, exit_code, message


class StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second: raise at once."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nCtrl-C: finishing this step, then saving a resumable checkpoint (press again to abort now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class SyncBNProbe:
    """Checks, on the first training step, that every :class:`vhist.nn.SyncBatchNorm` ran
    its own forward. A model that hands a BatchNorm's tensors to a fused op directly
    (rather than through :func:`vhist.nn.conv_bn_act`, which runs a SyncBatchNorm
    unfused) bypasses the exchange of statistics and would silently train with
    per-process statistics, so it stops instead."""

    def __init__(self, model: torch.nn.Module):
        from vhist.nn import SyncBatchNorm

        self.modules = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
        self.seen: set[int] = set()
        self.done = False
        self.handles = [m.register_forward_pre_hook(lambda mod, _: self.seen.add(id(mod))) for m in self.modules]

    def check(self) -> None:
        """Raises ValueError (once, after the first forward) if a SyncBatchNorm was bypassed."""
        if self.done:
            return
        self.done = True
        for h in self.handles:
            h.remove()
        self.handles = []
        missing = len(self.modules) - len(self.seen)
        if missing:
            raise ValueError(
                f"--sync-bn: {missing} of {len(self.modules)} BatchNorm layers did not run their own forward "
                "(their tensors went to a fused op directly, which cannot synchronize statistics); "
                "run them through the module or vhist.nn.conv_bn_act")
