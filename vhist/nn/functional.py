"""Functional API that mirrors ``torch.nn.functional``; every function runs on the
active vhist backend."""
from vhist.ops.batch_norm import batch_norm

__all__ = ["batch_norm"]
