"""Batch norm on the triton backend against PyTorch's F.batch_norm."""
import copy

import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.nn import BatchNorm2d
from vhist.ops.batch_norm import channel_geometry

from conftest import DEVICE
from utils import assert_close, assert_low_precision_results

SHAPES = [
    (2, 3, 4, 5),     # minimal 4-D
    (3, 5, 7, 9),     # odd sizes everywhere
    (1, 4, 6, 6),     # N = 1
    (8, 6, 1, 1),     # H = W = 1
    (5, 1, 3, 3),     # C = 1
    (7, 3),           # (N, C), as after a Linear
    (4, 3, 10),       # (N, C, L)
    (2, 3, 2, 3, 4),  # 5-D
    (4, 3, 40, 60),   # N*H*W = 9600: several reduction chunks per channel
]
# fp32 sums of up to ~1e4 terms in another order than PyTorch's: a few ulps of the
# O(1) normalized output; the gradients add one more reduction.
FWD_TOL = dict(atol=2e-5, rtol=1e-5)
BWD_TOL = dict(atol=1e-4, rtol=1e-4)


def memory_formats(shape):
    formats = ["contiguous"]
    if len(shape) in (4, 5):
        formats.append("channels_last")
    return formats


def make_input(shape, fmt, dtype=torch.float32, scale=2.0, offset=0.5):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * scale + offset
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def make_params(c, dtype=torch.float32, affine=True):
    kw = dict(device=DEVICE, dtype=dtype)
    weight = torch.randn(c, **kw) if affine else None
    bias = torch.randn(c, **kw) if affine else None
    running_mean, running_var = torch.randn(c, **kw), torch.rand(c, **kw) + 0.5
    return weight, bias, running_mean, running_var


def run_both(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Forward and backward through vhist (triton) and PyTorch on copies of the same
    inputs. Returns (ours, theirs), each (output, grads, running_mean, running_var)."""
    results = []
    for backend in ("triton", "torch"):
        xi = x.detach().clone().requires_grad_()
        params = [p.detach().clone().requires_grad_() if p is not None else None for p in (weight, bias)]
        rm, rv = running_mean.clone(), running_var.clone()
        with vhist.use_backend(backend):
            y = vhist.ops.batch_norm(xi, rm, rv, *params, training, momentum, eps)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        inputs = [xi] + [p for p in params if p is not None]
        grads = torch.autograd.grad(y, inputs, grad_out)
        results.append((y, grads, rm, rv))
    return results


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_fwd(shape, training):
    for fmt in memory_formats(shape):
        x = make_input(shape, fmt)
        weight, bias, running_mean, running_var = make_params(shape[1])
        (y, _, rm, rv), (y_ref, _, rm_ref, rv_ref) = run_both(x, weight, bias, running_mean, running_var, training)
        assert_close(y, y_ref, name=f"output[{fmt}]", **FWD_TOL)
        assert y.stride() == x.stride(), "the output must keep the input's memory format"
        assert_close(rm, rm_ref, name="running_mean", **FWD_TOL)
        assert_close(rv, rv_ref, name="running_var", **FWD_TOL)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_bwd(shape, training, affine):
    for fmt in memory_formats(shape):
        x = make_input(shape, fmt)
        weight, bias, running_mean, running_var = make_params(shape[1], affine=affine)
        (_, grads, _, _), (_, grads_ref, _, _) = run_both(x, weight, bias, running_mean, running_var, training)
        for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
            assert_close(g, g_ref, name=f"grad_{name}[{fmt}]", **BWD_TOL)
        assert grads[0].stride() == x.stride()


def test_batch_norm_fwd_without_running_stats():
    x = make_input((4, 3, 5, 5), "contiguous")
    with vhist.use_backend("triton"):
        y = vhist.ops.batch_norm(x, None, None, None, None, True)
    assert_close(y, F.batch_norm(x, None, None, None, None, True), name="output", **FWD_TOL)


def test_batch_norm_bwd_grad_layout_differs_from_input():
    """A channels_last input whose upstream gradient arrives contiguous."""
    x = make_input((3, 4, 5, 6), "channels_last").requires_grad_()
    weight, bias, running_mean, running_var = make_params(4)
    with vhist.use_backend("triton"):
        y = vhist.ops.batch_norm(x, running_mean, running_var, weight, bias, True)
    grad_out = torch.randn(y.shape, device=DEVICE)  # contiguous
    (dx,) = torch.autograd.grad(y, x, grad_out)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.batch_norm(x_ref, None, None, weight, bias, True)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad_out)
    assert_close(dx, dx_ref, name="grad_input", **BWD_TOL)


def test_batch_norm_fwd_mean_offset(triton_backend):
    """|mean| >> std: x = 1000 + randn in fp32 against a float64 reference. E[x^2] - E[x]^2
    in fp32 would lose about 1e6 * 6e-8 = 0.06 of a unit variance here."""
    x = torch.randn(8, 4, 30, 30, device=DEVICE) + 1000.0
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    y = vhist.ops.batch_norm(x, running_mean, running_var, None, None, True, momentum=1.0)
    x64 = x.double()
    y_ref = F.batch_norm(x64, None, None, None, None, True)
    var_ref = x64.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    mean_ref = x64.mean(dim=(0, 2, 3))
    assert_close(running_var.double(), var_ref, name="unbiased variance", atol=0, rtol=2e-5)
    assert_close(running_mean.double(), mean_ref, name="mean", atol=0, rtol=1e-7)
    assert_close(y.double(), y_ref, name="output", atol=2e-4, rtol=0)


def test_batch_norm_determinism(triton_backend):
    shape = (4, 6, 40, 50)  # several chunks per channel
    assert channel_geometry(make_input(shape, "contiguous")).num_chunks > 1
    for fmt in ("contiguous", "channels_last"):
        x = make_input(shape, fmt)
        weight, bias, running_mean, running_var = make_params(shape[1])
        first = run_both(x, weight, bias, running_mean, running_var, True)[0]
        second = run_both(x, weight, bias, running_mean, running_var, True)[0]
        assert torch.equal(first[0], second[0])
        for g1, g2 in zip(first[1], second[1]):
            assert torch.equal(g1, g2)
        assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_batch_norm_geometry_spans_many_programs():
    """A layer with few channels and a large batch is split over many programs."""
    x = torch.empty(128, 64, 112, 112, device="meta").to(memory_format=torch.channels_last)
    geom = channel_geometry(x)
    assert geom.channels_contiguous and geom.num_chunks >= 8
    x = torch.empty(128, 64, 112, 112, device="meta")
    geom = channel_geometry(x)
    assert not geom.channels_contiguous and geom.num_chunks >= 8
    assert geom.n * geom.s == 128 * 112 * 112


# ----------------------------------------------------------------------------- bad input


def _bad_input_cases():
    c = 3
    x = torch.randn(4, c, 5, 5, device=DEVICE)
    ok = dict(input=x, weight=torch.ones(c, device=DEVICE), bias=torch.zeros(c, device=DEVICE))
    return [
        ("rank 1", dict(ok, input=torch.randn(6, device=DEVICE)), ValueError, "2-D to 5-D"),
        ("rank 6", dict(ok, input=torch.randn(2, c, 2, 2, 2, 2, device=DEVICE)), ValueError, "2-D to 5-D"),
        ("weight channels", dict(ok, weight=torch.ones(c + 1, device=DEVICE)), ValueError, "weight must have shape"),
        ("stats channels", dict(ok, running_mean=torch.zeros(c + 1, device=DEVICE)), ValueError, "running_mean must have shape"),
        ("one value per channel", dict(ok, input=torch.randn(1, c, 1, 1, device=DEVICE)), ValueError, "more than 1 value per channel"),
        ("mixed devices", dict(ok, weight=torch.ones(c, device="meta")), ValueError, "one device"),
        ("integer input", dict(ok, input=torch.ones(4, c, 5, 5, dtype=torch.int32, device=DEVICE)), TypeError, "dtype"),
        ("empty batch", dict(ok, input=torch.randn(0, c, 5, 5, device=DEVICE)), ValueError, "empty"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda case: case[0])
def test_batch_norm_bad_input(case, backend):
    _, kwargs, error, message = case
    kwargs = dict(kwargs)
    c = 3
    running_mean = kwargs.pop("running_mean", torch.zeros(c, device=DEVICE))
    running_var = torch.ones(c, device=DEVICE)
    before = running_mean.clone(), running_var.clone()
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.batch_norm(kwargs["input"], running_mean, running_var, kwargs["weight"], kwargs["bias"], True)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1]), \
        "a rejected call must not touch the running statistics"


def test_batch_norm_bad_input_eval_without_running_stats():
    with pytest.raises(ValueError, match="eval mode"):
        vhist.ops.batch_norm(torch.randn(2, 3, device=DEVICE), None, None, training=False)


def test_batch_norm_bad_input_module_unchanged(triton_backend):
    bn = BatchNorm2d(3).to(DEVICE).train()
    state = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError):
        bn(torch.randn(1, 3, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match="4D"):
        bn(torch.randn(2, 3, 4, device=DEVICE))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("kwargs", [
    dict(),                               # default
    dict(momentum=None),                  # cumulative moving average
    dict(affine=False),
    dict(track_running_stats=False),
], ids=["default", "momentum_none", "no_affine", "no_running_stats"])
def test_batch_norm_module_drop_in(kwargs, triton_backend):
    torch_bn = torch.nn.BatchNorm2d(5, **kwargs).to(DEVICE)
    ours = BatchNorm2d(5, **kwargs).to(DEVICE)
    assert list(ours.state_dict()) == list(torch_bn.state_dict())
    if kwargs.get("affine", True):
        with torch.no_grad():
            torch_bn.weight.uniform_(0.5, 1.5)
            torch_bn.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(torch_bn.state_dict(), strict=True)
    for step in range(3):
        x = make_input((4, 5, 6, 7), "channels_last" if step % 2 else "contiguous")
        with vhist.use_backend("torch"):
            y_ref = torch_bn(x)
        y = ours(x)
        assert_close(y, y_ref, name=f"train step {step}", **FWD_TOL)
    for key, value in torch_bn.state_dict().items():
        assert_close(ours.state_dict()[key], value, name=key, **FWD_TOL)
    ours.eval()
    torch_bn.eval()
    x = make_input((2, 5, 3, 3), "contiguous")
    assert_close(ours(x), torch_bn(x), name="eval", **FWD_TOL)


# ----------------------------------------------------------------------------- compile


def test_batch_norm_compile(triton_backend):
    """torch.compile(fullgraph=True) traces the custom ops (fake kernels, mutation of the
    running stats, autograd) and matches eager."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x, weight, bias, running_mean, running_var):
        return vhist.ops.batch_norm(x, running_mean, running_var, weight, bias, True).relu()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = make_input((4, 3, 6, 6), "channels_last")
    weight, bias, running_mean, running_var = make_params(3)
    outs = []
    for fn in (block, compiled):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        rm, rv = running_mean.clone(), running_var.clone()
        y = fn(xi, wi, bi, rm, rv)
        grads = torch.autograd.grad(y, (xi, wi, bi), torch.ones_like(y))
        outs.append((y, grads, rm, rv))
    (y, grads, rm, rv), (y_c, grads_c, rm_c, rv_c) = outs
    assert_close(y_c, y, name="output", **FWD_TOL)
    for g, g_c in zip(grads, grads_c):
        assert_close(g_c, g, name="grad", **BWD_TOL)
    assert_close(rm_c, rm, name="running_mean", **FWD_TOL)
    assert_close(rv_c, rv, name="running_var", **FWD_TOL)


# ----------------------------------------------------------------------------- GPU only

RESNET50_BN_SHAPES = [
    (8, 64, 112, 112),   # stem
    (8, 256, 56, 56),    # layer1 output
    (8, 512, 28, 28),    # layer2 output
    (8, 2048, 7, 7),     # layer4 output
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", RESNET50_BN_SHAPES, ids=str)
def test_batch_norm_low_precision(shape, fmt, dtype):
    """Three-way rule: our error against fp32 is at most 2x PyTorch's own error in the
    same dtype (3x for gradients)."""
    x32 = make_input(shape, fmt)
    weight, bias, running_mean, running_var = make_params(shape[1])
    x = x32.to(dtype)
    ours, theirs = run_both(x, weight, bias, running_mean, running_var, True)
    reference = run_both(x.float(), weight, bias, running_mean, running_var, True)[1]
    assert_low_precision_results(ours, theirs, reference, grad_names=("input", "weight", "bias"))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", RESNET50_BN_SHAPES, ids=str)
def test_batch_norm_fp32_layer_shapes(shape, fmt):
    x = make_input(shape, fmt)
    weight, bias, running_mean, running_var = make_params(shape[1])
    (y, grads, rm, rv), (y_ref, grads_ref, rm_ref, rv_ref) = run_both(x, weight, bias, running_mean, running_var, True)
    assert_close(y, y_ref, name="output", atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, name="grad", atol=1e-3, rtol=1e-3)
    assert_close(rv, rv_ref, name="running_var", atol=1e-5, rtol=1e-4)


def test_batch_norm_bwd_bias_without_weight(triton_backend):
    """F.batch_norm accepts a bias without a weight; its gradient is sum(dy)."""
    x = make_input((3, 4, 5, 5), "contiguous").requires_grad_()
    bias = torch.randn(4, device=DEVICE, requires_grad=True)
    y = vhist.ops.batch_norm(x, None, None, None, bias, True)
    grad_out = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, bias), grad_out)
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    dx_ref, db_ref = torch.autograd.grad(F.batch_norm(x_ref, None, None, None, bias_ref, True), (x_ref, bias_ref),
                                         grad_out)
    assert_close(dx, dx_ref, name="grad_input", **BWD_TOL)
    assert_close(db, db_ref, name="grad_bias", **BWD_TOL)
