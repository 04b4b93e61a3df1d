"""Pure-PyTorch references: the ``torch`` backend of every op, and what the tests and
benchmarks compare the kernels against. Nothing here imports vhist kernels."""
from vhist.reference.batch_norm import batch_norm

__all__ = ["batch_norm"]
