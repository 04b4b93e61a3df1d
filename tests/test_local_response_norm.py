"""Local Response Normalization on the triton (and, on a GPU, cuda) backend against
PyTorch's F.local_response_norm."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.nn import LocalResponseNorm

from conftest import DEVICE, HAS_GPU
from static_sm90 import run_static
from utils import assert_close, assert_low_precision_close

# The module (vhist.ops re-exports a function of the same name).
lrn_module = importlib.import_module("vhist.ops.local_response_norm")
KERNEL_BACKENDS = ["triton", "cuda"] if HAS_GPU else ["triton"]

CASES = [
    # (shape, size)
    ((2, 6, 3, 4), 5),     # AlexNet's window, odd: symmetric
    ((2, 6, 3, 4), 4),     # even window: PyTorch pads (2, 1), asymmetric
    ((2, 5, 4), 2),        # 3-D (N, C, L), smallest even window
    ((2, 4, 3, 3), 1),     # size 1: the channel alone
    ((2, 3, 2, 3), 7),     # size > C: every window clipped on both sides
    ((1, 1, 3, 3), 3),     # C = 1, N = 1
    ((2, 4, 2, 3, 2), 3),  # 5-D
    ((3, 5, 1, 1), 5),     # H = W = 1: channels contiguous, N folded into S
    ((1, 18, 2, 3), 5),    # C not a power of two: padding channels in the tile
    ((1, 24, 2, 2), 11),   # large window
    ((2, 8, 3, 5), 5),     # C a power of two (no padding channels); odd S
    ((1, 3, 2, 2), 40),    # size far wider than the tile: shifts clipped to BLOCK_C - 1
]
# (alpha, beta, k): PyTorch's defaults (the scale is ~1), and a strong normalization
# where the window sum dominates k.
PARAMS = [(1e-4, 0.75, 1.0), (2.0, 0.75, 1.0)]
# exp(-beta*log(s)) instead of pow, and window sums in another order: a few fp32 ulps.
FWD_TOL = dict(atol=1e-6, rtol=1e-5)
BWD_TOL = dict(atol=1e-5, rtol=1e-5)


def memory_formats(shape):
    return ["contiguous", "channels_last"] if len(shape) in (4, 5) else ["contiguous"]


def make_input(shape, fmt, dtype=torch.float32, scale=1.5):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * scale
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def run_both(x, size, params, backend="triton", backward=True):
    """Output (and input gradient) through vhist on ``backend`` and through
    F.local_response_norm, on copies of ``x`` and the same upstream gradient."""
    results = []
    for name in (backend, "torch"):
        xi = x.detach().clone().requires_grad_(backward)
        with vhist.use_backend(name):
            y = vhist.ops.local_response_norm(xi, size, *params)
        if not backward:
            results.append((y, None))
            continue
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        (dx,) = torch.autograd.grad(y, xi, grad_out)
        results.append((y, dx))
    return results


@pytest.mark.parametrize("params", PARAMS, ids=["default", "strong"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_local_response_norm_fwd(case, params):
    shape, size = case
    for fmt in memory_formats(shape):
        x = make_input(shape, fmt)
        (y, _), (y_ref, _) = run_both(x, size, params, backward=False)
        assert_close(y, y_ref, name=f"output[{fmt}]", **FWD_TOL)
        assert y.stride() == x.stride(), "the output must keep the input's memory format"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_local_response_norm_bwd(case):
    shape, size = case
    for fmt in memory_formats(shape):
        x = make_input(shape, fmt)
        (_, dx), (_, dx_ref) = run_both(x, size, PARAMS[1])
        assert_close(dx, dx_ref, name=f"grad_input[{fmt}]", **BWD_TOL)
        assert dx.stride() == x.stride()


def test_local_response_norm_bwd_cancellation(triton_backend):
    """A few huge activations next to small ones: a running sum of squares would keep
    the huge squares' rounding error after they leave the window; the direct window
    sums keep fp32 close to fp64."""
    x = torch.randn(2, 24, 1, 3, device=DEVICE) * 0.01
    x[:, 6] = 300.0  # leaves the windows of channels >= 9 (size 5), before the periodic re-sum
    x[:, 18] = -500.0
    x = x.requires_grad_()
    y = vhist.ops.local_response_norm(x, 5, 1e-2, 0.75, 1.0)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = F.local_response_norm(x64, 5, 1e-2, 0.75, 1.0)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    assert_close(y.double(), y64, name="output", atol=1e-7, rtol=1e-5)
    assert_close(dx.double(), dx64, name="grad_input", atol=1e-7, rtol=1e-4)


def test_local_response_norm_grad_layout_differs_from_input(triton_backend):
    """A channels_last input whose upstream gradient arrives contiguous."""
    x = make_input((2, 5, 3, 4), "channels_last").requires_grad_()
    y = vhist.ops.local_response_norm(x, 3, 2.0, 0.75, 1.0)
    grad_out = torch.randn(y.shape, device=DEVICE)
    (dx,) = torch.autograd.grad(y, x, grad_out)
    x_ref = x.detach().clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.local_response_norm(x_ref, 3, 2.0, 0.75, 1.0), x_ref, grad_out)
    assert_close(dx, dx_ref, name="grad_input", **BWD_TOL)


def test_local_response_norm_non_dense_input(triton_backend):
    """A strided view is copied once at the op boundary and still matches."""
    x = make_input((2, 8, 4, 6), "contiguous")[:, ::2, :, 1:5]
    with vhist.use_backend("triton"):
        y = vhist.ops.local_response_norm(x, 3, 2.0, 0.75, 1.0)
    assert_close(y, F.local_response_norm(x, 3, 2.0, 0.75, 1.0), name="output", **FWD_TOL)


def test_local_response_norm_fp16(triton_backend):
    """fp16 loads and stores with fp32 accumulation: within fp16 rounding of the fp32
    result (PyTorch's CPU LRN has no fp16 kernel, so no three-way rule here; the GPU
    test below applies it)."""
    x = make_input((2, 6, 3, 3), "channels_last", dtype=torch.float16).requires_grad_()
    y = vhist.ops.local_response_norm(x, 5, 2.0, 0.75, 1.0)
    grad_out = torch.randn(y.shape, device=DEVICE, dtype=torch.float16)
    (dx,) = torch.autograd.grad(y, x, grad_out)
    x32 = x.detach().float().requires_grad_()
    y32 = F.local_response_norm(x32, 5, 2.0, 0.75, 1.0)
    (dx32,) = torch.autograd.grad(y32, x32, grad_out.float())
    assert y.dtype == dx.dtype == torch.float16
    assert_close(y.float(), y32, name="output", atol=1e-3, rtol=1e-3)
    assert_close(dx.float(), dx32, name="grad_input", atol=2e-3, rtol=2e-3)


def test_local_response_norm_determinism(triton_backend):
    def run(x):
        xi = x.detach().clone().requires_grad_()
        y = vhist.ops.local_response_norm(xi, 5, *PARAMS[1])
        return y, torch.autograd.grad(y, xi, torch.ones_like(y) + x)[0]

    for fmt in ("contiguous", "channels_last"):
        x = make_input((1, 17, 1, 2), fmt)
        first, second = run(x), run(x)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_local_response_norm_empty_input(triton_backend):
    x = torch.randn(0, 4, 3, 3, device=DEVICE)
    y = vhist.ops.local_response_norm(x, 3)
    assert y.shape == x.shape


def test_local_response_norm_geometry():
    """channels_last folds N into S (stride C between positions); NCHW keeps rows."""
    x = torch.empty(128, 96, 55, 55, device="meta")
    assert lrn_module.lrn_geometry(x) == (128, 96, 55 * 55, 96 * 55 * 55, 55 * 55, 1)
    x = x.to(memory_format=torch.channels_last)
    assert lrn_module.lrn_geometry(x) == (1, 96, 128 * 55 * 55, 0, 1, 96)
    assert lrn_module.window_bounds(5) == (2, 2) and lrn_module.window_bounds(4) == (2, 1)


def test_local_response_norm_wide_rows(triton_backend):
    """More channels than the interpreter's TILE (2048): one position per tile."""
    x = make_input((1, 2100, 1, 2), "channels_last")
    (y, dx), (y_ref, dx_ref) = run_both(x, 5, PARAMS[1])
    assert_close(y, y_ref, name="output", **FWD_TOL)
    assert_close(dx, dx_ref, name="grad_input", **BWD_TOL)


def test_local_response_norm_tile_channels():
    assert lrn_module.tile_channels(96) == 128 and lrn_module.tile_channels(256) == 256
    assert lrn_module.tile_channels(1) == 4 and lrn_module.tile_channels(5) == 8 and lrn_module.tile_channels(lrn_module.MAX_CHANNELS) == 4096


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_local_response_norm_too_many_channels(backend):
    """A position's channels must fit in one tile; the torch backend has no limit."""
    x = torch.randn(1, lrn_module.MAX_CHANNELS + 1, 1, 1, device=DEVICE)
    with vhist.use_backend(backend), pytest.raises(ValueError, match="at most 4096 channels"):
        vhist.ops.local_response_norm(x, 3)
    with vhist.use_backend("torch"):
        assert vhist.ops.local_response_norm(x, 3).shape == x.shape


# ----------------------------------------------------------------------------- bad input


BAD_INPUT = [
    # (name, input, size, error, message)
    ("rank 2", torch.randn(4, 3), 3, ValueError, "3-D or higher"),
    ("rank 1", torch.randn(6), 3, ValueError, "3-D or higher"),
    ("size 0", torch.randn(2, 3, 4), 0, ValueError, "size must be >= 1"),
    ("negative size", torch.randn(2, 3, 4), -2, ValueError, "size must be >= 1"),
    ("float size", torch.randn(2, 3, 4), 2.5, TypeError, "size must be an int"),
    ("integer input", torch.ones(2, 3, 4, dtype=torch.int32), 3, TypeError, "dtype"),
    ("bool input", torch.ones(2, 3, 4, dtype=torch.bool), 3, TypeError, "dtype"),
    ("complex input", torch.ones(2, 3, 4, dtype=torch.complex64), 3, TypeError, "dtype"),
]


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: case[0])
def test_local_response_norm_bad_input(case, backend):
    _, x, size, error, message = case
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.local_response_norm(x.to(DEVICE), size)


def test_local_response_norm_cuda_backend_needs_cuda_tensors():
    with vhist.use_backend("cuda"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        vhist.ops.local_response_norm(torch.randn(2, 3, 4), 3)


@pytest.mark.skipif(HAS_GPU, reason="checks the error on machines without CUDA")
def test_local_response_norm_cuda_extension_unavailable_is_clear():
    from vhist.ops import _cuda_ext

    assert _cuda_ext.unavailable_reason() is not None
    with pytest.raises(RuntimeError, match="cuda backend .*local_response_norm.*use the triton or torch backend"):
        lrn_module._cuda_extension()
    status = vhist.backend_info()["cuda_extension"]
    assert status["buildable"] is False and status["reason"]


# ----------------------------------------------------------------------------- module


def test_local_response_norm_module_drop_in(triton_backend):
    ours, theirs = LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0), torch.nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)
    assert isinstance(ours, torch.nn.LocalResponseNorm)
    assert ours.extra_repr() == theirs.extra_repr()
    x = make_input((2, 7, 3, 3), "channels_last", scale=20.0)
    assert_close(ours(x), theirs(x), name="module output", **FWD_TOL)


# ----------------------------------------------------------------------------- compile


def test_local_response_norm_compile(triton_backend):
    """torch.compile(fullgraph=True) traces the custom ops (fake kernels, autograd)."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x):
        return vhist.ops.local_response_norm(x.relu(), 4, 2.0, 0.75, 1.0) * 2

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = make_input((2, 6, 3, 3), "channels_last")
    outs = []
    for fn in (block, compiled):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi)
        outs.append((y, torch.autograd.grad(y, xi, torch.ones_like(y) + xi.detach())[0]))
    assert_close(outs[1][0], outs[0][0], name="output", **FWD_TOL)
    assert_close(outs[1][1], outs[0][1], name="grad_input", **BWD_TOL)


# ----------------------------------------------------------------------------- AlexNet layers

ALEXNET_LRN_LAYERS = [
    # (shape, size): the two LRN layers of AlexNet (after conv1 and conv2), batch 1
    ((1, 96, 55, 55), 5),
    ((1, 256, 27, 27), 5),
]
# conv1's channel count at reduced spatial size: the interpreter's cost grows with the
# channel loop (about 0.1 s per channel here), so 256 channels run on the GPU only.
ALEXNET_LRN_LAYERS_REDUCED = [((1, 96, 3, 3), 5)]
ALEXNET_PARAMS = (5e-4, 0.75, 2.0)  # the paper's constants in PyTorch's convention


@pytest.mark.parametrize("case", ALEXNET_LRN_LAYERS_REDUCED, ids=str)
def test_local_response_norm_alexnet_channels(case):
    shape, size = case
    x = make_input(shape, "channels_last", scale=30.0)  # post-ReLU-like magnitudes
    (y, dx), (y_ref, dx_ref) = run_both(x, size, ALEXNET_PARAMS)
    assert_close(y, y_ref, name="output", **FWD_TOL)
    assert_close(dx, dx_ref, name="grad_input", **BWD_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", ALEXNET_LRN_LAYERS + [((128, 96, 55, 55), 5), ((2, 64, 9, 11), 4)], ids=str)
def test_local_response_norm_alexnet_layers(case, fmt, backend):
    shape, size = case
    x = make_input(shape, fmt, scale=30.0)
    (y, dx), (y_ref, dx_ref) = run_both(x, size, ALEXNET_PARAMS, backend=backend)
    assert_close(y, y_ref, name="output", atol=1e-5, rtol=1e-5)
    assert_close(dx, dx_ref, name="grad_input", atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_local_response_norm_kernel_backends(case, backend):
    """Every shape case on every kernel backend (the cuda one only exists on a GPU)."""
    shape, size = case
    for fmt in memory_formats(shape):
        x = make_input(shape, fmt)
        (y, dx), (y_ref, dx_ref) = run_both(x, size, PARAMS[1], backend=backend)
        assert_close(y, y_ref, name=f"output[{fmt}]", **FWD_TOL)
        assert_close(dx, dx_ref, name=f"grad_input[{fmt}]", **BWD_TOL)
        assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_local_response_norm_low_precision(fmt, dtype, backend):
    """Three-way rule: our error against fp32 is at most 2x PyTorch's own error in the
    same dtype (3x for the gradient)."""
    x32 = make_input((16, 96, 27, 27), fmt, scale=30.0)
    x = x32.to(dtype)
    ours, theirs = run_both(x, 5, ALEXNET_PARAMS, backend=backend)
    reference = run_both(x.float(), 5, ALEXNET_PARAMS, backend="torch")[1]
    assert_low_precision_close(ours[0], theirs[0], reference[0], factor=2, name="output")
    assert_low_precision_close(ours[1], theirs[1], reference[1], factor=3, name="grad_input")


@pytest.mark.gpu
def test_local_response_norm_backends_agree():
    """triton and cuda implement the same algorithm: results agree to rounding."""
    x = make_input((8, 96, 27, 27), "channels_last", scale=30.0)
    (y_t, dx_t), _ = run_both(x, 5, ALEXNET_PARAMS, backend="triton")
    (y_c, dx_c), _ = run_both(x, 5, ALEXNET_PARAMS, backend="cuda")
    assert_close(y_c, y_t, name="output", atol=1e-6, rtol=1e-6)
    assert_close(dx_c, dx_t, name="grad_input", atol=1e-5, rtol=1e-5)



# ----------------------------------------------------------------------------- static sm_90


def test_local_response_norm_sm90_vector_loads():
    """Static, sm_90 compile (no GPU) of the launches the launcher makes, with runtime
    specialization: channels_last rows (C = 96, 16-byte aligned) and aligned NCHW rows
    (S = 56*56) load and store the tile with 128-bit accesses only, without spills."""
    figures = run_static("lrn-check")
    assert len(figures) == 4
    for fig in figures:
        assert fig["ld_global_v4"] > 0 and fig["ld_global_scalar"] == 0, fig
        assert fig["st_global_v4"] > 0 and fig["st_global_scalar"] == 0, fig
        assert fig["local_bytes"] == 0, fig
