"""vhist ops: each one dispatches to the active backend (see :mod:`vhist.backend`).

Importing this package registers the ``vhist::*`` custom ops with ``torch.library``.
"""
from vhist.ops.batch_norm import BatchNormFunction, batch_norm

__all__ = ["BatchNormFunction", "batch_norm"]
