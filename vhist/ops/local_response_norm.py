"""Local Response Normalization (Krizhevsky et al., 2012).

Backends: ``torch`` (``F.local_response_norm``). The Triton and CUDA kernels are added
by the LRN work (issue 4).
"""
import torch

from vhist import reference
from vhist.ops._dispatch import dispatch

IMPLS = {"torch": reference.local_response_norm}


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """As ``torch.nn.functional.local_response_norm``."""
    impl = dispatch("local_response_norm", IMPLS, input.device)
    return impl(input, size, alpha, beta, k)
