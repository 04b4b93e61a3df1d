"""The CUDA depthwise kernels' numerics without a GPU.

csrc/depthwise/depthwise_kernel.cu keeps each thread's work (one output element, one
input-gradient element, one weight-gradient lane's sums of every tap) in __host__
__device__ functions.
tests/csrc_host/depthwise_host.cu builds them with nvcc into a host shared library whose
loops play the kernels' threads and blocks, and this test checks them against F.conv2d
and its gradients, with the same sizes/strides/conv arrays the torch binding passes.
The binding (.cpp), the launch configuration and the GPU itself are tested by the
gpu-marked tests in test_depthwise.py. Skipped only when nvcc is absent outside CI.
"""
import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

from vhist.ops.depthwise import weight_chunks, depthwise_geometry

from utils import assert_close, build_host_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "csrc_host", "depthwise_host.cu")

CASES = [
    # (N, C_in, H, W, multiplier, kernel, stride, padding, dilation, memory format)
    (2, 3, 6, 6, 1, 3, 1, 1, 1, "channels_last"),      # 3x3 specialization
    (2, 3, 7, 7, 1, 3, 2, 1, 1, "contiguous"),         # stride 2
    (1, 4, 9, 8, 1, 5, 1, 2, 1, "channels_last"),      # 5x5
    (2, 2, 9, 9, 1, 7, 2, 3, 1, "channels_last"),      # 7x7
    (2, 3, 6, 5, 2, 3, 1, 2, 2, "channels_last"),      # multiplier 2, dilation 2
    (1, 2, 6, 5, 1, (4, 3), 1, "same", 1, "contiguous"),  # generic size, asymmetric 'same'
    (3, 5, 20, 20, 1, 3, 1, 1, 1, "channels_last"),    # 1200 output pixels: several weight-grad chunks
    (1, 2, 12, 11, 1, (5, 4), 1, 2, 1, "channels_last"),  # generic 20 taps: two weight-grad tap groups
    (2, 3, 9, 8, 2, 5, 2, 2, 2, "contiguous"),         # 5x5, stride 2, dilation 2, multiplier 2, NCHW
]


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_library(HARNESS, tmp_path_factory.mktemp("depthwise_host"))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.vhist_depthwise_fwd_host.argtypes = [ptr] * 9
    lib.vhist_depthwise_bwd_input_host.argtypes = [ptr] * 8
    lib.vhist_depthwise_bwd_weight_host.argtypes = [ptr] * 9 + [i64, i64, i32]
    return lib


def _arrays(geom):
    """The sizes and conv arrays the binding builds (csrc/depthwise/depthwise.cpp)."""
    sizes = torch.tensor([geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier],
                         dtype=torch.int64)
    conv = torch.tensor([geom.kh, geom.kw, *geom.stride, geom.padding[0], geom.padding[2], *geom.dilation],
                        dtype=torch.int32)
    return sizes, conv


def _tap_major(weight):
    """The weight and stride array the binding passes: (KH*KW, C_out), channels innermost,
    indexed with {c_out, unused, kh, kw} strides (csrc/depthwise/depthwise.cpp, tap_major)."""
    c_out, _, _, kw = weight.shape
    return weight.permute(2, 3, 0, 1).contiguous(), torch.tensor([1, 0, kw * c_out, c_out], dtype=torch.int64)


def _strides(*tensors):
    """int64 stride arrays; the caller keeps them alive across the ctypes call."""
    return [torch.tensor(t.stride(), dtype=torch.int64) for t in tensors]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_depthwise_cuda_host(case, host_lib):
    n, c, h, w, mult, k, stride, padding, dilation, fmt = case
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(n, c, h, w)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c * mult, 1, kh, kw)
    bias = torch.randn(c * mult)
    geom = depthwise_geometry(x.shape, weight.shape, stride, padding, dilation)
    sizes, conv = _arrays(geom)
    fmt_t = torch.channels_last if fmt == "channels_last" else torch.contiguous_format

    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    y_ref = F.conv2d(xr, wr, br, stride, padding, dilation, c)
    dy = torch.randn(y_ref.shape).contiguous(memory_format=fmt_t)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (xr, wr, br), dy)

    y = torch.empty(y_ref.shape).contiguous(memory_format=fmt_t)
    xs, ys = _strides(x, y)
    w_tap, ws = _tap_major(weight)
    host_lib.vhist_depthwise_fwd_host(x.data_ptr(), w_tap.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                      sizes.data_ptr(), xs.data_ptr(), ws.data_ptr(), ys.data_ptr(), conv.data_ptr())
    assert_close(y, y_ref.detach(), name="output", atol=1e-5, rtol=1e-5)

    dx = torch.empty(x.shape).contiguous(memory_format=fmt_t)
    dys, dxs = _strides(dy, dx)
    host_lib.vhist_depthwise_bwd_input_host(dy.data_ptr(), w_tap.data_ptr(), dx.data_ptr(), sizes.data_ptr(),
                                            dys.data_ptr(), ws.data_ptr(), dxs.data_ptr(), conv.data_ptr())
    assert_close(dx, dx_ref, name="grad_input", atol=1e-5, rtol=1e-5)

    chunk, chunks = weight_chunks(geom.n * geom.oh * geom.ow, geom.c_out, torch.device("cpu"))
    if case == CASES[6]:
        assert chunks > 1
    dw, db = torch.empty(weight.shape), torch.empty(bias.shape)
    (dws,) = _strides(dw)
    host_lib.vhist_depthwise_bwd_weight_host(dy.data_ptr(), x.data_ptr(), dw.data_ptr(), db.data_ptr(),
                                             sizes.data_ptr(), dys.data_ptr(), xs.data_ptr(), dws.data_ptr(),
                                             conv.data_ptr(), chunk, chunks, 1)
    assert_close(dw, dw_ref, name="grad_weight", atol=5e-5, rtol=5e-5)
    assert_close(db, db_ref, name="grad_bias", atol=5e-5, rtol=5e-5)
