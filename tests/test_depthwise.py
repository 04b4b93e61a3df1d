"""Depthwise conv2d (and the fused depthwise + BN + activation op) on the triton and cuda
backends against PyTorch's F.conv2d(groups=C)."""
import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.ops.depthwise import weight_chunks, depthwise_geometry

from conftest import DEVICE, HAS_GPU
from utils import assert_autocast_matches_torch, assert_close, assert_low_precision_results

CASES = [
    # (N, C_in, H, W, multiplier, kernel, stride, padding, dilation)
    (2, 3, 5, 5, 1, 3, 1, 1, 1),            # minimal 3x3, stride 1
    (2, 3, 7, 7, 1, 3, 2, 1, 1),            # stride 2 (MobileNet downsampling)
    (1, 4, 7, 6, 1, 5, 1, 2, 1),            # 5x5, N = 1, H != W
    (2, 2, 9, 9, 1, 7, 2, 3, 1),            # 7x7, stride 2
    (2, 3, 7, 7, 1, 3, 1, 2, 2),            # dilation 2
    (2, 3, 5, 6, 2, 3, 1, 1, 1),            # multiplier 2
    (1, 3, 7, 9, 1, 5, 1, "same", 1),       # 'same' (symmetric)
    (2, 2, 6, 5, 1, (4, 3), 1, "same", 1),  # 'same' with an even kernel: asymmetric padding
    (2, 3, 6, 7, 1, 3, (2, 1), "valid", 1),  # 'valid', anisotropic stride
    (3, 5, 5, 5, 3, 3, 1, (0, 2), (1, 2)),  # odd channels, multiplier 3, anisotropic pad/dilation
]
# fp32 sums of at most KH*KW*MULT (forward, input grad) or N*OH*OW (weight grad) terms,
# in another order than PyTorch's.
FWD_TOL = dict(atol=1e-5, rtol=1e-5)
BWD_TOL = dict(atol=5e-5, rtol=5e-5)


def _kernel(k):
    return k if isinstance(k, tuple) else (k, k)


def make_case(case, fmt="channels_last", dtype=torch.float32, bias=True):
    n, c, h, w, mult, k, stride, padding, dilation = case
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=dtype)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c * mult, 1, *_kernel(k), device=DEVICE, dtype=dtype)
    b = torch.randn(c * mult, device=DEVICE, dtype=dtype) if bias else None
    return x, weight, b, dict(stride=stride, padding=padding, dilation=dilation)


def run(backend, x, weight, bias, conv, grad_seed=1):
    """Output and (grad_input, grad_weight, grad_bias) on ``backend`` (torch: F.conv2d)."""
    xi, wi = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    bi = bias.detach().clone().requires_grad_() if bias is not None else None
    with vhist.use_backend(backend):
        y = vhist.ops.depthwise_conv2d(xi, wi, bi, **conv)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    inputs = [t for t in (xi, wi, bi) if t is not None]
    return y, torch.autograd.grad(y, inputs, grad_out)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_depthwise_conv2d_fwd(case, fmt):
    x, weight, bias, conv = make_case(case, fmt)
    with vhist.use_backend("triton"):
        y = vhist.ops.depthwise_conv2d(x, weight, bias, **conv)
    y_ref = F.conv2d(x, weight, bias, groups=x.shape[1], **conv)
    assert_close(y, y_ref, name=f"output[{fmt}]", **FWD_TOL)
    expected_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format), "the output keeps the input's memory format"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_depthwise_conv2d_bwd(case, fmt):
    x, weight, bias, conv = make_case(case, fmt, bias=case[4] != 3)
    _, grads = run("triton", x, weight, bias, conv)
    _, grads_ref = run("torch", x, weight, bias, conv)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}[{fmt}]", **BWD_TOL)
    assert grads[0].stride() == x.stride(), "grad_input keeps the input's memory format"


def test_depthwise_conv2d_bwd_grad_layout_differs(triton_backend):
    """A channels_last input whose upstream gradient arrives contiguous, a non-contiguous
    weight view, and only the weight requiring grad."""
    x, weight, _, conv = make_case(CASES[1])
    weight_t = weight.detach().transpose(2, 3).clone().transpose(2, 3).requires_grad_()
    y = vhist.ops.depthwise_conv2d(x, weight_t, None, **conv)
    grad_out = torch.randn(y.shape, device=DEVICE)  # contiguous
    (dw,) = torch.autograd.grad(y, weight_t, grad_out)
    w_ref = weight.detach().clone().requires_grad_()
    (dw_ref,) = torch.autograd.grad(F.conv2d(x, w_ref, None, groups=x.shape[1], **conv), w_ref, grad_out)
    assert_close(dw, dw_ref, name="grad_weight", **BWD_TOL)


def test_depthwise_conv2d_determinism(triton_backend):
    """The weight gradient is a fixed-order two-stage reduction: bitwise reproducible."""
    case = (2, 4, 13, 12, 1, 3, 1, 1, 1)  # 312 output pixels: more than one chunk
    assert weight_chunks(2 * 13 * 12, 4, torch.device(DEVICE))[1] > 1 or HAS_GPU
    x, weight, bias, conv = make_case(case)
    first = run("triton", x, weight, bias, conv)
    second = run("triton", x, weight, bias, conv)
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


def test_depthwise_conv2d_compile(triton_backend):
    """torch.compile(fullgraph=True) traces the three custom ops and matches eager."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x, weight, bias):
        return vhist.ops.depthwise_conv2d(x, weight, bias, stride=2, padding=1).relu()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x, weight, bias, _ = make_case(CASES[1])
    outs = []
    for fn in (block, compiled):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        y = fn(xi, wi, bi)
        outs.append((y, torch.autograd.grad(y, (xi, wi, bi), torch.ones_like(y))))
    assert_close(outs[1][0], outs[0][0], name="output", **FWD_TOL)
    for g_c, g in zip(outs[1][1], outs[0][1]):
        assert_close(g_c, g, name="grad", **BWD_TOL)


# ----------------------------------------------------------------------------- bad input


def _bad_input_cases():
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = torch.randn(4, 1, 3, 3, device=DEVICE)
    ok = dict(input=x, weight=w, bias=None, stride=1, padding=1, dilation=1)
    return [
        ("dense weight", dict(ok, weight=torch.randn(4, 4, 3, 3, device=DEVICE)), ValueError, "not depthwise"),
        ("3-D weight", dict(ok, weight=torch.randn(4, 3, 3, device=DEVICE)), ValueError, "not depthwise"),
        ("multiplier mismatch", dict(ok, weight=torch.randn(6, 1, 3, 3, device=DEVICE)), ValueError,
         "multiplier mismatch"),
        ("stride 0", dict(ok, stride=0), ValueError, "stride must be >= 1"),
        ("stride (1, 0)", dict(ok, stride=(1, 0)), ValueError, "stride must be >= 1"),
        ("dilation 0", dict(ok, dilation=0), ValueError, "dilation must be >= 1"),
        ("negative padding", dict(ok, padding=-1), ValueError, "padding must be >= 0"),
        ("unknown padding", dict(ok, padding="full"), ValueError, "'same' or 'valid'"),
        ("same with stride 2", dict(ok, padding="same", stride=2), ValueError, "needs stride 1"),
        ("padding triple", dict(ok, padding=(1, 1, 1)), ValueError, "padding must be an int or a pair"),
        ("empty output", dict(ok, input=torch.randn(2, 4, 2, 2, device=DEVICE), padding=0), ValueError,
         "output would be empty"),
        ("3-D input", dict(ok, input=torch.randn(4, 6, 6, device=DEVICE)), ValueError, "4-D input"),
        ("bias shape", dict(ok, bias=torch.randn(3, device=DEVICE)), ValueError, "bias must have shape"),
        ("dtype mismatch", dict(ok, weight=w.double()), TypeError, "one dtype"),
        ("integer input", dict(ok, input=x.to(torch.int32)), TypeError, "dtype"),
        ("mixed devices", dict(ok, bias=torch.randn(4, device="meta")), ValueError, "one device"),
    ]


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda case: case[0])
def test_depthwise_conv2d_bad_input(case, backend):
    """Every backend rejects bad arguments with the same clear error, before dispatch."""
    _, kwargs, error, message = case
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.depthwise_conv2d(**kwargs)


def test_depthwise_geometry_same_padding():
    geom = depthwise_geometry((1, 2, 6, 5), (2, 1, 4, 3), 1, "same", 1)
    assert geom.padding == (1, 2, 1, 1) and (geom.oh, geom.ow) == (6, 5)


@pytest.mark.parametrize("op", ["depthwise", "conv"])
def test_geometry_pair_arguments(op):
    """Dense and depthwise convs normalize stride/padding/dilation alike: an int, a
    1-tuple and a 2-tuple; bools and triples are rejected."""
    from vhist.ops.conv import conv_geometry

    def geometry(stride, padding, dilation):
        if op == "conv":
            return conv_geometry("conv2d", (1, 2, 9, 9), (2, 2, 3, 3), stride, padding, dilation, 1)
        return depthwise_geometry((1, 2, 9, 9), (2, 1, 3, 3), stride, padding, dilation)

    g = geometry((2,), [1], (1, 2))
    assert (g.stride, g.padding, g.dilation) == ((2, 2), (1, 1, 1, 1), (1, 2)) and (g.oh, g.ow) == (5, 4)
    assert geometry(2, 1, 1) == geometry((2, 2), (1, 1), [1])
    for bad in (True, (1, 1, 1), 1.0):
        with pytest.raises(ValueError, match="stride must be an int or a pair"):
            geometry(bad, 1, 1)


# ----------------------------------------------------------------------------- fused op

FUSED_CASES = [
    # (N, C_in, H, W, multiplier, kernel, stride, padding, activation, residual)
    (2, 3, 6, 6, 1, 3, 1, 1, "relu6", False),   # MobileNet dw-BN-ReLU6
    (2, 3, 7, 7, 1, 3, 2, 1, "relu", False),    # stride 2
    (1, 2, 7, 5, 2, 5, 1, "same", None, True),  # multiplier 2, no activation, residual
    (3, 4, 5, 5, 1, 3, 1, 1, "relu6", True),    # residual before ReLU6
]


# The inputs whose gradients run_fused returns, in order (the residual only where a case has one).
FUSED_GRAD_NAMES = ("input", "weight", "bn_weight", "bn_bias", "residual")


def run_fused(backend, case, training, fmt="channels_last", dtype=torch.float32):
    """Output, gradients (input, weight, gamma, beta[, residual]) and running stats."""
    n, c, h, w, mult, k, stride, padding, activation, has_res = case
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, h, w, generator=gen).to(DEVICE, dtype) * 2 + 0.5
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c * mult, 1, k, k, generator=gen).to(DEVICE, dtype)
    gamma = (torch.rand(c * mult, generator=gen) + 0.5).to(DEVICE)
    beta = torch.randn(c * mult, generator=gen).to(DEVICE)
    running_mean = torch.randn(c * mult, generator=gen).to(DEVICE)
    running_var = (torch.rand(c * mult, generator=gen) + 0.5).to(DEVICE)
    oh = (h + 2 * padding - k) // stride + 1 if padding != "same" else h
    ow = (w + 2 * padding - k) // stride + 1 if padding != "same" else w
    residual = (torch.randn(n, c * mult, oh, ow, generator=gen) * 3).to(DEVICE, dtype) if has_res else None
    inputs = [t.requires_grad_() for t in (x, weight, gamma, beta)] + ([residual.requires_grad_()] if has_res else [])
    with vhist.use_backend(backend):
        y = vhist.ops.fused_depthwise_bn_act(x, weight, gamma, beta, running_mean, running_var, stride=stride,
                                             padding=padding, training=training, momentum=0.1, eps=1e-5,
                                             activation=activation, residual=residual)
    grad_out = (torch.randn(y.shape, generator=gen) * 4).to(y)
    return y, torch.autograd.grad(y, inputs, grad_out), running_mean, running_var


def assert_fused_matches_torch(case, training, *, output_tol, var_tol, grad_tol):
    """:func:`run_fused` on the triton backend against the torch one: the output, the
    running variance and every gradient. Returns both runs for a test's own checks."""
    ours, ref = run_fused("triton", case, training), run_fused("torch", case, training)
    assert_close(ours[0], ref[0], name="output", **output_tol)
    assert_close(ours[3], ref[3], name="running_var", **var_tol)
    for name, g, g_ref in zip(FUSED_GRAD_NAMES, ours[1], ref[1]):
        assert_close(g, g_ref, name=f"grad_{name}", **grad_tol)
    return ours, ref


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_depthwise_bn_act_fwd_bwd(case, training):
    """Against F.relu6(F.batch_norm(F.conv2d(..., groups=C)) + residual) with running stats."""
    ours, ref = assert_fused_matches_torch(case, training, output_tol=dict(atol=2e-5, rtol=1e-5),
                                           var_tol=dict(atol=1e-6, rtol=1e-6), grad_tol=BWD_TOL)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(ours[2], ref[2], name="running_mean", atol=1e-6, rtol=1e-6)


def test_fused_depthwise_bn_act_contiguous_input(patch_heuristic):
    """NCHW input, and one program covering both pixel tiles (72 pixels), so that the
    epilogue's Chan merge across tiles (a full tile and a partial one) is exercised."""
    patch_heuristic("DEPTHWISE_MAX_STATS_PARTIALS", 1)
    case = FUSED_CASES[0]
    y, grads, rm, _ = run_fused("triton", case, True, fmt="contiguous")
    y_ref, grads_ref, rm_ref, _ = run_fused("torch", case, True, fmt="contiguous")
    assert_close(y, y_ref, name="output", atol=2e-5, rtol=1e-5)
    assert_close(rm, rm_ref, name="running_mean", atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, name="grad", **BWD_TOL)


def test_fused_depthwise_bn_act_determinism(patch_heuristic):
    patch_heuristic("DEPTHWISE_MAX_STATS_PARTIALS", 2)
    case = (2, 4, 13, 12, 1, 3, 1, 1, "relu6", False)  # more than one stats tile and chunk
    first, second = run_fused("triton", case, True), run_fused("triton", case, True)
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


@pytest.mark.parametrize("max_partials", [1024, 2])
def test_fused_depthwise_bn_act_mean_offset(max_partials, patch_heuristic, triton_backend):
    """|mean| >> std in the conv output: the epilogue's per-tile (mean, M2) partials keep
    the variance accurate where E[y^2] - E[y]^2 in fp32 would cancel (one partial per
    tile, or tiles merged inside a program)."""
    patch_heuristic("DEPTHWISE_MAX_STATS_PARTIALS", max_partials)
    x = torch.randn(4, 2, 9, 9, device=DEVICE) + 1000.0
    weight = torch.full((2, 1, 3, 3), 1.0 / 9, device=DEVICE)
    running_mean, running_var = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    vhist.ops.fused_depthwise_bn_act(x, weight, None, None, running_mean, running_var, padding=0,
                                     momentum=1.0, activation=None)
    conv64 = F.conv2d(x.double(), weight.double(), groups=2)
    var_ref = conv64.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True)
    assert_close(running_var.double(), var_ref, name="unbiased variance", atol=0, rtol=1e-3)


def test_fused_depthwise_bn_act_module_routes_depthwise(triton_backend):
    """ConvBNAct with groups == in_channels goes through the fused depthwise op."""
    block = vhist.nn.ConvBNAct(4, 8, 3, stride=2, padding=1, groups=4, activation="relu6").to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, 2, 1, groups=4, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU6()).to(DEVICE)
    ref.load_state_dict({"0.weight": block.conv.weight, **{f"1.{k}": v for k, v in block.bn.state_dict().items()}})
    x = torch.randn(2, 4, 7, 7, device=DEVICE).to(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        block.train(mode == "train")
        ref.train(mode == "train")
        with vhist.use_backend("torch"):
            y_ref = ref(x)
        assert_close(block(x), y_ref, name=f"{mode} output", atol=2e-5, rtol=1e-5)
    assert_close(block.bn.running_var, ref[1].running_var, name="running_var", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 7, 7), (4, 7, 7)], ids=["batched", "unbatched"])
def test_depthwise_conv2d_module_routes_depthwise(shape, monkeypatch, triton_backend):
    """vhist.nn.Conv2d with groups == in_channels (multiplier 2) runs the depthwise op,
    forward and backward equal to F.conv2d; a grouped conv that is not depthwise does not."""
    calls = []
    depthwise = vhist.nn.functional.depthwise_conv2d

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return depthwise(*args, **kwargs)

    monkeypatch.setattr(vhist.nn.functional, "depthwise_conv2d", spy)
    conv = vhist.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4).to(DEVICE).double()
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    y_ref = F.conv2d(x, conv.weight, conv.bias, 2, 1, 1, 4)
    assert calls == [(8, 1, 3, 3)]
    assert_close(y, y_ref, name="output", atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(y.sum(), (x, conv.weight, conv.bias))
    grads_ref = torch.autograd.grad(y_ref.sum(), (x, conv.weight, conv.bias))
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad {name}", atol=1e-12, rtol=1e-12)
    vhist.nn.Conv2d(4, 8, 3, groups=2).to(DEVICE).double()(x.detach())
    assert len(calls) == 1, "a grouped, non-depthwise conv must run the dense conv"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_depthwise_bn_act_compile(training, triton_backend):
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x, weight, gamma, beta, running_mean, running_var):
        return vhist.ops.fused_depthwise_bn_act(x, weight, gamma, beta, running_mean, running_var,
                                                stride=1, padding=1, activation="relu6", training=training)

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    params = (torch.randn(3, 1, 3, 3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5,
              torch.randn(3, device=DEVICE))
    outs = []
    for fn in (block, compiled):
        xi, wi, gi, bi = (t.detach().clone().requires_grad_() for t in (x, *params))
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        y = fn(xi, wi, gi, bi, rm, rv)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
        outs.append((y, torch.autograd.grad(y, (xi, wi, gi, bi), grad_out), rm, rv))
    assert_close(outs[1][0], outs[0][0], name="output", **FWD_TOL)
    for g_c, g in zip(outs[1][1], outs[0][1]):
        assert_close(g_c, g, name="grad", **BWD_TOL)
    assert_close(outs[1][2], outs[0][2], name="running_mean", **FWD_TOL)
    assert_close(outs[1][3], outs[0][3], name="running_var", **FWD_TOL)


def _fused_bad_input_cases():
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    ok = dict(input=x, weight=torch.randn(4, 1, 3, 3, device=DEVICE), bn_weight=None, bn_bias=None,
              running_mean=torch.zeros(4, device=DEVICE), running_var=torch.ones(4, device=DEVICE))
    return [
        ("dense weight", dict(ok, weight=torch.randn(4, 2, 3, 3, device=DEVICE)), {}, ValueError, "not depthwise"),
        ("multiplier mismatch", dict(ok, weight=torch.randn(5, 1, 3, 3, device=DEVICE)), {}, ValueError,
         "multiplier mismatch"),
        ("stride 0", ok, dict(stride=0), ValueError, "stride must be >= 1"),
        ("stats channels", dict(ok, running_var=torch.ones(3, device=DEVICE)), {}, ValueError,
         "running_var must have shape"),
        ("activation", ok, dict(activation="elu"), ValueError, "unknown activation"),
        ("residual shape", ok, dict(residual=torch.randn(2, 4, 5, 5, device=DEVICE)), ValueError,
         "residual must have the output's shape"),
        ("eval without stats", dict(ok, running_mean=None, running_var=None), dict(training=False), ValueError,
         "eval mode"),
        ("one value per channel", dict(ok, input=torch.randn(1, 4, 3, 3, device=DEVICE)), {}, ValueError,
         "more than 1 value"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", _fused_bad_input_cases(), ids=lambda case: case[0])
def test_fused_depthwise_bn_act_bad_input(case, backend):
    _, args, kwargs, error, message = case
    stats = [t.clone() if t is not None else None for t in (args["running_mean"], args["running_var"])]
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.fused_depthwise_bn_act(*args.values(), **kwargs)
    for t, before in zip((args["running_mean"], args["running_var"]), stats):
        assert t is None or torch.equal(t, before), "a rejected call must not touch the running statistics"


# ----------------------------------------------------------------------------- GPU only

# (N, C_in, H, W, multiplier, kernel, stride, padding, dilation): MobileNet layers at batch 8.
GPU_CASES = [
    (8, 32, 112, 112, 1, 3, 1, 1, 1),   # MobileNetV1/V2 first depthwise
    (8, 96, 112, 112, 1, 3, 2, 1, 1),   # V2 block 2, stride 2
    (8, 144, 56, 56, 1, 3, 1, 1, 1),
    (8, 576, 14, 14, 1, 3, 1, 1, 1),
    (8, 960, 7, 7, 1, 3, 1, 1, 1),
    (8, 240, 28, 28, 1, 5, 2, 2, 1),    # 5x5 (MnasNet/EfficientNet style)
    (8, 192, 28, 28, 1, 7, 1, 3, 1),    # 7x7 (ConvNeXt style)
    (4, 64, 33, 31, 2, 3, 2, 1, 1),     # multiplier 2, odd sizes
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_depthwise_conv2d_gpu_fp32(case, backend):
    x, weight, bias, conv = make_case(case)
    y, grads = run(backend, x, weight, bias, conv)
    y_ref, grads_ref = run("torch", x, weight, bias, conv)
    assert_close(y, y_ref, name="output", atol=1e-4, rtol=1e-4)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_depthwise_conv2d_gpu_low_precision(case, dtype, backend):
    """Three-way rule: our error against fp32 is at most 2x PyTorch's own error in the
    same dtype (3x for gradients)."""
    x, weight, bias, conv = make_case(case)
    ours = run(backend, x.to(dtype), weight.to(dtype), bias.to(dtype), conv)
    theirs = run("torch", x.to(dtype), weight.to(dtype), bias.to(dtype), conv)
    reference = run("torch", x, weight, bias, conv)
    assert_low_precision_results(ours, theirs, reference, grad_names=("input", "weight", "bias"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_depthwise_conv2d_gpu_determinism(backend):
    x, weight, bias, conv = make_case((32, 144, 56, 56, 1, 3, 1, 1, 1))
    first, second = run(backend, x, weight, bias, conv), run(backend, x, weight, bias, conv)
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


FUSED_GPU_CASES = [
    # (N, C_in, H, W, multiplier, kernel, stride, padding, activation, residual)
    (8, 144, 56, 56, 1, 3, 1, 1, "relu6", False),  # MobileNetV2 features.3
    (8, 96, 112, 112, 1, 3, 2, 1, "relu6", False),  # MobileNetV2 features.2, stride 2
    (8, 512, 14, 14, 1, 3, 1, 1, "relu", True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", FUSED_GPU_CASES, ids=str)
def test_fused_depthwise_bn_act_gpu(case, training):
    assert_fused_matches_torch(case, training, output_tol=dict(atol=1e-4, rtol=1e-4),
                               var_tol=dict(atol=1e-5, rtol=1e-4), grad_tol=dict(atol=2e-3, rtol=1e-3))


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FUSED_GPU_CASES, ids=str)
def test_fused_depthwise_bn_act_gpu_low_precision(case, dtype, training):
    """Three-way rule against the fp32 composition: output 2x, gradients 3x PyTorch's own
    error in the same dtype."""
    ours = run_fused("triton", case, training, dtype=dtype)
    theirs = run_fused("torch", case, training, dtype=dtype)
    reference = run_fused("torch", case, training)
    assert_low_precision_results(ours, theirs, reference, grad_names=FUSED_GRAD_NAMES)


def test_depthwise_autocast():
    """Under autocast the depthwise convs take the autocast dtype, as F.conv2d does, so an
    fp16 activation meets an fp32 weight without error and fp32 leaves get fp32 grads."""
    x = torch.randn(2, 3, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    weight = torch.randn(3, 1, 3, 3, device=DEVICE)
    bn = [torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)]

    def chain(x, weight, gamma, beta):
        h = vhist.ops.depthwise_conv2d(x.half(), weight, padding=1)
        return h, vhist.ops.fused_depthwise_bn_act(h, weight, gamma, beta, torch.zeros(3, device=DEVICE),
                                                   torch.ones(3, device=DEVICE), padding=1)

    assert_autocast_matches_torch(chain, (x, weight, *bn), DEVICE)


def test_depthwise_meta_device():
    """Shape inference on the meta device (as FLOP counting does) runs the torch backend."""
    x = torch.empty(2, 8, 10, 10, device="meta")
    y = vhist.ops.fused_depthwise_bn_act(x, torch.empty(8, 1, 3, 3, device="meta"), None, None, None, None,
                                         stride=2, padding=1)
    assert y.shape == (2, 8, 5, 5) and y.device.type == "meta"
