"""fp64 gradcheck of every vhist op on its Triton kernels (through the interpreter on
CPU, compiled on CUDA)."""
import pytest
import torch
from torch.autograd import gradcheck

import vhist

from conftest import DEVICE

F64 = dict(device=DEVICE, dtype=torch.float64)

BATCH_NORM_CASES = [
    # (shape, memory format, training, affine)
    ((3, 2, 3, 4), "contiguous", True, True),
    ((3, 2, 3, 4), "channels_last", True, True),
    ((3, 2, 3, 4), "contiguous", True, False),
    ((3, 2, 3, 4), "channels_last", False, True),
    ((3, 2, 3, 4), "contiguous", False, False),
    ((5, 3), "contiguous", True, True),       # (N, C)
    ((2, 3, 5), "contiguous", False, True),   # (N, C, L)
]


@pytest.mark.parametrize("case", BATCH_NORM_CASES, ids=str)
def test_batch_norm_gradcheck(case, triton_backend):
    shape, fmt, training, affine = case
    c = shape[1]
    x = torch.randn(shape, **F64)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(c, **F64, requires_grad=True) if affine else None
    bias = torch.randn(c, **F64, requires_grad=True) if affine else None
    running_mean, running_var = torch.randn(c, **F64), torch.rand(c, **F64) + 0.5

    def fn(x, weight, bias):
        # Fresh running stats per call: gradcheck evaluates fn many times.
        return vhist.ops.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                                    training, 0.1, 1e-5)

    assert gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4)
