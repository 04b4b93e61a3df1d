"""LayerNorm (+ residual, + the channels-last 2-D form) on the triton backend against
PyTorch's F.layer_norm."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.nn import LayerNorm, LayerNorm2d

from conftest import DEVICE
from utils import assert_close, assert_low_precision_results

ln_module = importlib.import_module("vhist.ops.layer_norm")

CASES = [
    # (input shape, normalized_shape)
    ((2, 3, 8), (8,)),          # power-of-two width, several rows per tile
    ((3, 5, 7), (7,)),          # odd width: padding columns in the tile
    ((1, 1), (1,)),             # minimal: one row of one element (variance 0)
    ((4, 6, 5), (6, 5)),        # two normalized dims
    ((2, 197, 24), (24,)),      # ViT's 197 tokens at a reduced width
    ((3, 384), (384,)),         # ViT-S width
    ((1, 1000), (1000,)),       # wider than one narrow tile, not a power of two
]
# (elementwise_affine, bias)
AFFINE = [(True, True), (True, False), (False, False)]
FWD_TOL = dict(atol=1e-5, rtol=1e-5)
BWD_TOL = dict(atol=1e-4, rtol=1e-4)


def make_params(shape, affine, bias, dtype=torch.float32):
    w = torch.rand(shape, device=DEVICE, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(shape, device=DEVICE, dtype=dtype) if affine and bias else None
    return w, b


def run(fn, backend, tensors, seed=1):
    """``fn(*leaves)`` on ``backend`` and every leaf's gradient for one fixed upstream
    gradient per output."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    with vhist.use_backend(backend):
        outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((y * torch.randn(y.shape, generator=gen).to(y)).sum() for y in outputs)
    live = [t for t in leaves if t is not None]
    return outputs, torch.autograd.grad(loss, live)


def compare(fn, tensors, fwd_tol=FWD_TOL, bwd_tol=BWD_TOL):
    (ys, grads), (ys_ref, grads_ref) = run(fn, "triton", tensors), run(fn, "torch", tensors)
    for i, (y, y_ref) in enumerate(zip(ys, ys_ref)):
        assert_close(y, y_ref, name=f"output_{i}", **fwd_tol)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, name=f"grad_{i}", **bwd_tol)


@pytest.mark.parametrize("affine", AFFINE, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_norm_fwd_bwd(case, affine):
    shape, normalized = case
    x = torch.randn(shape, device=DEVICE) * 2 + 3  # |mean| > std: no E[x^2] - E[x]^2
    w, b = make_params(normalized, *affine)
    compare(lambda x, w, b: vhist.ops.layer_norm(x, normalized, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_layer_norm_residual(case):
    shape, normalized = case
    x, r = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    w, b = make_params(normalized, True, True)
    compare(lambda x, r, w, b: vhist.ops.add_layer_norm(x, r, normalized, w, b, 1e-6), (x, r, w, b))


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 16, 2, 2)], ids=str)
def test_layer_norm_2d(shape, fmt):
    x = torch.randn(shape, device=DEVICE)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = make_params(shape[1:2], True, True)
    compare(lambda x, w, b: vhist.ops.layer_norm_2d(x, w, b, 1e-6), (x, w, b))
    with vhist.use_backend("triton"):
        y = vhist.ops.layer_norm_2d(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_layer_norm_non_contiguous_input(triton_backend):
    """Strided rows (a slice of wider rows) are read in place; a transposed tensor is
    copied once; both match."""
    base = torch.randn(4, 6, 20, device=DEVICE)
    for x in (base[..., 2:14], base.transpose(0, 1)):
        normalized = x.shape[-1:]
        assert_close(vhist.ops.layer_norm(x, normalized), F.layer_norm(x, normalized), name="output", **FWD_TOL)


def test_layer_norm_wide_rows(triton_backend):
    """The widest rows the issue asks for (8192) and the kernels' cap, one row each."""
    for width in (8192, ln_module.MAX_WIDTH):
        x = torch.randn(1, width, device=DEVICE)
        w, b = make_params((width,), True, True)
        compare(lambda x, w, b: vhist.ops.layer_norm(x, (width,), w, b), (x, w, b), bwd_tol=dict(atol=1e-3, rtol=1e-4))


def test_layer_norm_gradcheck(triton_backend):
    x = torch.randn(3, 2, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: vhist.ops.layer_norm(x, (5,), w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w, b: vhist.ops.add_layer_norm(x, r, (5,), w, b), (x, r, w, b))
    x2 = torch.randn(2, 5, 2, 3, device=DEVICE, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: vhist.ops.layer_norm_2d(x, w, None), (x2, w))


def test_layer_norm_determinism(triton_backend, monkeypatch):
    """Several backward programs (MAX_PARTIALS lowered to force more tiles per program
    and a multi-step second stage): bitwise-equal gradients on every run."""
    monkeypatch.setattr(ln_module, "MAX_PARTIALS", 3)
    from vhist.ops import launch_cache

    launch_cache.clear()
    x = torch.randn(70, 40, device=DEVICE)
    w, b = make_params((40,), True, True)
    first = run(lambda x, w, b: vhist.ops.layer_norm(x, (40,), w, b), "triton", (x, w, b))
    second = run(lambda x, w, b: vhist.ops.layer_norm(x, (40,), w, b), "triton", (x, w, b))
    ref = run(lambda x, w, b: vhist.ops.layer_norm(x, (40,), w, b), "torch", (x, w, b))
    launch_cache.clear()
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    for g, g_ref in zip(first[1], ref[1]):
        assert_close(g, g_ref, name="grad", **BWD_TOL)


def test_layer_norm_partition():
    """ViT-S's rows (256 x 197 tokens at 384): 8-row tiles, at most MAX_PARTIALS programs."""
    assert ln_module.tile_geometry(256 * 197, 384) == (8, 512, 8)
    parts, per_program = ln_module.partition(256 * 197, 384)
    assert parts <= ln_module.MAX_PARTIALS and parts * per_program * 8 >= 256 * 197
    assert ln_module.tile_geometry(1, 8192) == (1, 8192, 16)


def test_layer_norm_fp16(triton_backend):
    """fp16 in and out, statistics in fp32: within fp16 rounding of the fp32 result, and
    the weight gradient in the weight's dtype."""
    x = torch.randn(4, 3, 24, device=DEVICE)
    w, b = make_params((24,), True, True)
    y, grads = run(lambda x, w, b: vhist.ops.layer_norm(x, (24,), w, b), "triton", (x.half(), w.half(), b.half()))
    y32, grads32 = run(lambda x, w, b: F.layer_norm(x, (24,), w, b), "torch", (x.half().float(), w.half().float(),
                                                                                  b.half().float()))
    assert y[0].dtype == torch.float16 and grads[1].dtype == torch.float16
    assert_close(y[0].float(), y32[0], name="output", atol=4e-3, rtol=2e-3)
    assert_close(grads[0].float(), grads32[0], name="grad_input", atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [384, 768])
def test_layer_norm_low_precision(width, dtype):
    """Three-way rule at ViT widths, with and without the residual."""
    x, r = torch.randn(8, 197, width, device=DEVICE), torch.randn(8, 197, width, device=DEVICE)
    w, b = make_params((width,), True, True)
    for fn, tensors in ((lambda x, w, b: vhist.ops.layer_norm(x, (width,), w, b), (x, w, b)),
                        (lambda x, r, w, b: vhist.ops.add_layer_norm(x, r, (width,), w, b), (x, r, w, b))):
        low = [t.to(dtype) for t in tensors]
        ours, theirs = run(fn, "triton", low), run(fn, "torch", low)
        reference = run(fn, "torch", [t.float() for t in low])
        for i in range(len(ours[0])):
            assert_low_precision_results((ours[0][i], ours[1]), (theirs[0][i], theirs[1]),
                                         (reference[0][i], reference[1]))


@pytest.mark.gpu
def test_layer_norm_cuda_autocast_runs_in_fp32():
    """CUDA autocast puts layer_norm on its fp32 list: a bf16 input gives an fp32 output,
    as F.layer_norm's under autocast."""
    x = torch.randn(4, 197, 384, device=DEVICE, dtype=torch.bfloat16)
    w, b = make_params((384,), True, True)
    with torch.autocast("cuda", dtype=torch.bfloat16), vhist.use_backend("triton"):
        y = vhist.ops.layer_norm(x, (384,), w, b)
        y_ref = F.layer_norm(x, (384,), w, b)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref, name="output", **FWD_TOL)


# ----------------------------------------------------------------------------- bad input


BAD_INPUT = [
    # (name, call, error, message)
    ("shape mismatch", lambda: vhist.ops.layer_norm(torch.randn(2, 5), (4,)), ValueError, "trailing dimensions"),
    ("rank too small", lambda: vhist.ops.layer_norm(torch.randn(4), (2, 4)), ValueError, "trailing dimensions"),
    ("weight shape", lambda: vhist.ops.layer_norm(torch.randn(2, 5), (5,), torch.ones(4)), ValueError,
     "weight must have shape"),
    ("integer input", lambda: vhist.ops.layer_norm(torch.ones(2, 5, dtype=torch.int32), (5,)), TypeError, "dtype"),
    ("residual shape", lambda: vhist.ops.add_layer_norm(torch.randn(2, 5), torch.randn(1, 5), (5,)), ValueError,
     "residual must have the input's shape"),
    ("2d rank", lambda: vhist.ops.layer_norm_2d(torch.randn(2, 5, 3)), ValueError, "4-D"),
    ("empty shape", lambda: vhist.ops.layer_norm(torch.randn(2, 5), ()), ValueError, "at least one"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: case[0])
def test_layer_norm_bad_input(case, backend):
    _, call, error, message = case
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        call()


def test_layer_norm_too_wide_and_cuda_backend():
    x = torch.randn(1, ln_module.MAX_WIDTH + 1, device=DEVICE)
    with vhist.use_backend("triton"), pytest.raises(ValueError, match="at most 16384"):
        vhist.ops.layer_norm(x, x.shape[-1:])
    with vhist.use_backend("cuda"), pytest.raises(NotImplementedError, match="no 'cuda' backend"):
        vhist.ops.layer_norm(x, x.shape[-1:])


def test_layer_norm_empty_input(triton_backend):
    x = torch.randn(0, 8, device=DEVICE)
    assert vhist.ops.layer_norm(x, (8,)).shape == (0, 8)


# ----------------------------------------------------------------------------- modules


def test_layer_norm_module_drop_in(triton_backend):
    for kwargs in ({}, {"elementwise_affine": False}, {"bias": False}):
        theirs = torch.nn.LayerNorm((6,), eps=1e-6, **kwargs)
        ours = LayerNorm((6,), eps=1e-6, **kwargs)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert isinstance(ours, torch.nn.LayerNorm) and ours.extra_repr() == theirs.extra_repr()
        x = torch.randn(3, 4, 6, device=DEVICE)
        assert_close(ours(x), theirs(x), name="module output", **FWD_TOL)
    s, y = ours.add_forward(x, x)
    assert_close(y, theirs(x + x), name="add_forward", **FWD_TOL)


def test_add_layer_norm_promotes_dtypes(triton_backend):
    """A bf16 branch added onto an fp32 stream: the sum and output are fp32, as x + r."""
    x, r = torch.randn(3, 8, device=DEVICE, dtype=torch.bfloat16), torch.randn(3, 8, device=DEVICE)
    s, y = vhist.ops.add_layer_norm(x, r, (8,))
    assert s.dtype == y.dtype == torch.float32
    assert_close(y, F.layer_norm(x + r, (8,)), name="output", **FWD_TOL)


def test_layer_norm_2d_module(triton_backend):
    ours = LayerNorm2d(5)
    assert set(ours.state_dict()) == {"weight", "bias"} and ours.eps == 1e-6
    x = torch.randn(2, 5, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ours.weight, ours.bias, 1e-6).permute(0, 3, 1, 2)
    assert_close(ours(x), ref, name="module output", **FWD_TOL)


# ----------------------------------------------------------------------------- compile


def test_layer_norm_compile(triton_backend):
    """torch.compile(fullgraph=True) traces the custom ops (fake kernels, autograd)."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x, r, w, b):
        s, y = vhist.ops.add_layer_norm(x, r, (8,), w, b, 1e-6)
        return s * 2 + vhist.ops.layer_norm(y.relu(), (8,), w, None)

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    tensors = (torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE), *make_params((8,), True, True))
    (y, grads), (y_c, grads_c) = run(block, "triton", tensors), run(compiled, "triton", tensors)
    assert_close(y_c[0], y[0], name="output", **FWD_TOL)
    for g_c, g in zip(grads_c, grads):
        assert_close(g_c, g, name="grad", **BWD_TOL)
