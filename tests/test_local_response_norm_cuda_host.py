"""The CUDA LRN kernels' numerics without a GPU.

csrc/local_response_norm/local_response_norm_kernel.cu keeps each phase of a block's
work (the tile copy into shared memory, the window sums, the stores) in __host__
__device__ functions. tests/csrc_host/ builds them with nvcc into a host shared
library whose loops play the blocks, with the launchers' tile sizes and vector widths,
and this test checks them against F.local_response_norm. The binding
(.cpp), the launch configuration and the GPU itself are tested by the gpu-marked tests
in test_local_response_norm.py. Skipped only when nvcc is absent outside CI.
"""
import ctypes
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from utils import assert_close, build_host_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "csrc_host", "local_response_norm_host.cu")
lrn_module = importlib.import_module("vhist.ops.local_response_norm")

CASES = [
    # (shape, size, memory format); the vector width follows from the contiguous axis
    ((2, 6, 3, 4), 5, "contiguous"),      # S = 12: 128-bit NCHW rows
    ((2, 6, 3, 4), 4, "channels_last"),   # even window; C = 6: scalar
    ((2, 5, 4), 2, "contiguous"),         # 3-D
    ((2, 3, 2, 3), 7, "contiguous"),      # size > C, odd S: scalar
    ((1, 1, 3, 3), 1, "contiguous"),      # C = 1, size 1
    ((2, 4, 2, 3, 2), 3, "channels_last"),  # 5-D, C = 4: 128-bit channel rows
    ((2, 40, 3, 3), 5, "channels_last"),  # C = 40
    ((1, 60, 2, 2), 11, "contiguous"),    # large window
    ((2, 96, 5, 5), 5, "channels_last"),  # AlexNet's C = 96: 21 positions per tile, 3 tiles
    ((3, 256, 3, 3), 5, "contiguous"),    # AlexNet's C = 256: 8 positions per tile, last one partial
    ((1, 2500, 1, 2), 5, "channels_last"),  # more channels than a tile's 2048 elements: 1 position
]


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_library(HARNESS, tmp_path_factory.mktemp("lrn_host"))
    i64, dbl, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.vhist_lrn_fwd_host.argtypes = [i32, ptr, ptr] + [i64] * 6 + [i32, dbl, dbl, dbl]
    lib.vhist_lrn_bwd_host.argtypes = [i32, ptr, ptr, ptr] + [i64] * 6 + [i32, dbl, dbl, dbl]
    return lib


def _code(dtype):
    return {torch.float32: 0, torch.float64: 3}[dtype]


def _expected_vec(x):
    """The vector width the launcher picks: 16 bytes of elements when the contiguous axis
    (channels for channels-last, positions for NCHW) is a multiple of it."""
    _, c, s, _, stride_c, _ = lrn_module.lrn_geometry(x)
    v = 16 // x.element_size()
    return v if (c if stride_c == 1 else s) % v == 0 else 1


def host_fwd(lib, x, size, alpha, beta, k):
    y = torch.empty_like(x)
    vec = lib.vhist_lrn_fwd_host(_code(x.dtype), x.data_ptr(), y.data_ptr(), *lrn_module.lrn_geometry(x), size,
                                 alpha, beta, k)
    assert vec == _expected_vec(x)
    return y


def host_bwd(lib, dy, x, size, alpha, beta, k):
    dx = torch.empty_like(x)
    vec = lib.vhist_lrn_bwd_host(_code(x.dtype), x.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                                 *lrn_module.lrn_geometry(x), size, alpha, beta, k)
    assert vec == _expected_vec(x)
    return dx


def _input(shape, fmt, dtype):
    x = torch.randn(shape, dtype=dtype) * 1.5
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_local_response_norm_cuda_host_fwd_bwd(host_lib, case, dtype):
    shape, size, fmt = case
    params = (2.0, 0.75, 1.0)
    x = _input(shape, fmt, dtype)
    dy = torch.empty_like(x).copy_(torch.randn(shape, dtype=dtype))  # x's strides, as the binding requires
    xr = x.clone().requires_grad_()
    y_ref = F.local_response_norm(xr, size, *params)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    assert_close(host_fwd(host_lib, x, size, *params), y_ref.detach(), name="output", **tol)
    bwd_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    assert_close(host_bwd(host_lib, dy, x, size, *params), dx_ref, name="grad_input", **bwd_tol)


def test_local_response_norm_cuda_host_cancellation(host_lib):
    """Huge activations leaving the window: direct window sums keep fp32 close to fp64."""
    x = torch.randn(2, 40, 1, 3) * 0.01
    x[:, 6] = 300.0
    x[:, 25] = -500.0
    dy = torch.randn_like(x)
    x64 = x.double().requires_grad_()
    y64 = F.local_response_norm(x64, 5, 1e-2, 0.75, 1.0)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close(host_fwd(host_lib, x, 5, 1e-2, 0.75, 1.0).double(), y64.detach(), name="output",
                 atol=1e-7, rtol=1e-5)
    assert_close(host_bwd(host_lib, dy, x, 5, 1e-2, 0.75, 1.0).double(), dx64, name="grad_input",
                 atol=1e-7, rtol=1e-4)
