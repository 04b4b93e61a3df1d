"""The fused conv + BatchNorm + activation op and its modules, triton backend against the
eager composition F.conv2d -> F.batch_norm (+ residual) -> activation."""
import copy

import pytest
import torch

import vhist
from vhist.nn import ConvBNAct
from vhist.ops import launch_cache
from vhist.ops.conv import conv_fwd_launch, conv_geometry, stats_config

from conftest import DEVICE
from utils import assert_autocast_matches_torch, assert_close, assert_low_precision_results

CASES = [
    # (input shape, weight shape, stride, padding, dilation, groups)
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1),            # 3x3, minimal
    ((1, 4, 6, 7), (5, 4, 1, 1), 1, 0, 1, 1),            # 1x1, batch 1, odd sizes
    ((2, 4, 7, 6), (6, 2, 3, 3), 2, 1, 1, 2),            # groups=2, stride 2
    ((1, 2, 15, 15), (3, 2, 11, 11), 4, 2, 1, 1),        # AlexNet conv1: 11x11 stride 4
    ((2, 3, 7, 7), (4, 3, 1, 7), 1, (0, 3), 1, 1),       # Inception 1x7
    ((2, 3, 7, 7), (4, 3, 7, 1), 1, "same", 1, 1),       # Inception 7x1, 'same'
    ((2, 2, 6, 6), (3, 2, 5, 5), 1, "valid", 1, 1),      # 5x5 'valid'
    ((2, 2, 9, 9), (3, 2, 3, 3), 2, 2, 2, 1),            # dilation combined with stride
    ((2, 3, 3, 3), (4, 3, 3, 3), 1, 0, 1, 1),            # 1x1 output (2 values per channel)
    ((3, 2, 7, 7), (3, 2, 3, 3), 1, 1, 1, 1),            # 147 rows: several statistics tiles
]
FWD_TOL = dict(atol=1e-4, rtol=1e-4)
BWD_TOL = dict(atol=5e-4, rtol=5e-4)


def case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case)


def make(case, dtype=torch.float32, channels_last=False):
    shape, wshape, stride, padding, dilation, groups = case
    kw = dict(device=DEVICE, dtype=dtype)
    x = torch.randn(shape, **kw)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(wshape, **kw) / (wshape[1] * wshape[2] * wshape[3]) ** 0.5
    c = wshape[0]
    f32 = dict(device=DEVICE, dtype=torch.float32 if dtype != torch.float64 else dtype)
    bn = (torch.rand(c, **f32) + 0.5, torch.randn(c, **f32) * 0.5, torch.randn(c, **f32) * 0.1,
          torch.rand(c, **f32) + 0.5)
    return x, w, bn, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def run_both(x, w, bn, kwargs, training=True, activation="relu", residual=None, backends=("triton", "torch"),
             backward=True):
    """(output, gradients, running_mean, running_var) per backend; gradients of input,
    weight, bn_weight, bn_bias[, residual]."""
    results = []
    for backend in backends:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn[0], bn[1])]
        res = residual.detach().clone().requires_grad_() if residual is not None else None
        rm, rv = bn[2].clone(), bn[3].clone()
        with vhist.use_backend(backend):
            y = vhist.ops.fused_conv_bn_relu(*leaves, rm, rv, **kwargs, training=training, momentum=0.1,
                                             eps=1e-5, activation=activation, residual=res)
        grads = ()
        if backward:
            grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
            grads = torch.autograd.grad(y, leaves + ([res] if res is not None else []), grad_out)
        results.append((y, grads, rm, rv))
    return results


def _out_shape(x, w, kwargs):
    return conv_geometry("t", x.shape, w.shape, **kwargs).out_shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_conv_bn_relu_fwd(case, training):
    x, w, bn, kwargs = make(case, channels_last=case[0][0] == 2)
    (y, _, rm, rv), (y_ref, _, rm_ref, rv_ref) = run_both(x, w, bn, kwargs, training, backward=False)
    assert_close(y, y_ref, name="output", **FWD_TOL)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(rm, rm_ref, name="running_mean", **FWD_TOL)
    assert_close(rv, rv_ref, name="running_var", **FWD_TOL)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_conv_bn_relu_bwd(case):
    x, w, bn, kwargs = make(case)
    (_, grads, _, _), (_, grads_ref, _, _) = run_both(x, w, bn, kwargs, True)
    for name, g, g_ref in zip(("input", "weight", "bn_weight", "bn_bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", **BWD_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_fused_conv_bn_relu_bwd_residual(activation, training):
    """Residual added before the activation (ResNet block); relu6 saturates (outputs
    scaled up) so both ends of its mask are exercised."""
    case = ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1)
    x, w, bn, kwargs = make(case)
    bn = (bn[0] * 4, bn[1], bn[2], bn[3])
    residual = torch.randn(_out_shape(x, w, kwargs), device=DEVICE) * 2
    (y, grads, rm, rv), (y_ref, grads_ref, rm_ref, rv_ref) = run_both(
        x, w, bn, kwargs, training, activation, residual)
    if activation == "relu6":
        assert (y_ref == 6).any() and (y_ref == 0).any()
    assert_close(y, y_ref, name="output", **FWD_TOL)
    for name, g, g_ref in zip(("input", "weight", "bn_weight", "bn_bias", "residual"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", **BWD_TOL)
    assert_close(rm, rm_ref, name="running_mean", **FWD_TOL)


def test_fused_conv_bn_relu_no_affine_no_running_stats(triton_backend):
    x, w, _, kwargs = make(CASES[0])
    y = vhist.ops.fused_conv_bn_relu(x, w, None, None, None, None, **kwargs)
    with vhist.use_backend("torch"):
        y_ref = vhist.ops.fused_conv_bn_relu(x, w, None, None, None, None, **kwargs)
    assert_close(y, y_ref, name="output", **FWD_TOL)


def test_fused_conv_bn_relu_stats_mean_offset(triton_backend):
    """Conv outputs with |mean| >> std: the per-tile (count, mean, M2) partials keep the
    variance where E[x^2] - E[x]^2 in fp32 would lose it."""
    x = torch.randn(3, 2, 7, 7, device=DEVICE) * 0.01 + 100.0
    w = torch.ones(3, 2, 3, 3, device=DEVICE) * 10
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    vhist.ops.fused_conv_bn_relu(x, w, None, None, rm, rv, padding=0, momentum=1.0)
    conv = torch.nn.functional.conv2d(x.double(), w.double())
    var_ref = conv.transpose(0, 1).reshape(3, -1).var(dim=1)
    assert_close(rv.double(), var_ref, name="unbiased variance", atol=0, rtol=1e-2)


def test_fused_conv_bn_relu_stats_tiles(triton_backend):
    """The conv epilogue writes one (count, mean, M2) partial per row tile."""
    x, w, _, kwargs = make(CASES[-1])
    g = conv_geometry("t", x.shape, w.shape, **kwargs)
    out, (part_mean, part_m2, part_count, tiles) = conv_fwd_launch(
        x.to(memory_format=torch.channels_last), w, None, None, g, 0, stats=True)
    assert tiles > 1
    assert part_count[:tiles].sum().item() == g.n * g.oh * g.ow
    rows = out.permute(0, 2, 3, 1).reshape(-1, g.c_out)
    first = rows[: int(part_count[0].item())]
    assert_close(part_mean[0], first.mean(0), name="tile mean", **FWD_TOL)
    assert_close(part_m2[0], ((first - first.mean(0)) ** 2).sum(0), name="tile M2", **FWD_TOL)


def test_fused_conv_bn_relu_stats_independent_of_tuning(triton_backend, monkeypatch):
    """The statistics forward runs the shape's fixed config and never asks the autotuner:
    with the tuned forward kernels replaced by ones that fail, the training step gives
    the same bits, and the number of partials is the one of stats_config's BLOCK_M."""
    from vhist.kernels import conv as kernels

    x, w, bn, kwargs = make(CASES[-1])
    g = conv_geometry("t", x.shape, w.shape, **kwargs)
    first = run_both(x, w, bn, kwargs, backends=("triton",))[0]

    class Untunable:
        def __getitem__(self, grid):
            raise AssertionError("the statistics forward went through the autotuned kernel")

        def run(self, *args, **kwargs):
            raise AssertionError("the statistics forward went through the autotuned kernel")

    monkeypatch.setattr(kernels, "conv2d_fwd", (Untunable(), Untunable()))
    launch_cache.clear()  # launches cached by the first run hold the kernels they were built with
    try:
        second = run_both(x, w, bn, kwargs, backends=("triton",))[0]
    finally:
        launch_cache.clear()
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    _, (_, _, part_count, tiles) = conv_fwd_launch(x.to(memory_format=torch.channels_last), w, None, None, g, 0,
                                                    stats=True)
    block_m = stats_config(g, x).kwargs["BLOCK_M"]
    assert tiles == part_count.numel() == -(-g.n * g.oh * g.ow // block_m)


def test_fused_conv_bn_relu_determinism(triton_backend):
    x, w, bn, kwargs = make(CASES[-1])
    res = torch.randn(_out_shape(x, w, kwargs), device=DEVICE)
    first, second = (run_both(x, w, bn, kwargs, residual=res, backends=("triton",))[0] for _ in range(2))
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_fused_conv_bn_relu_autocast():
    """Under autocast the conv runs in the autocast dtype (as F.conv2d does), BN
    parameters stay fp32, and the fp32 leaves get fp32 gradients."""
    x, w, bn, kwargs = make(CASES[0])

    def chain(x, w, gamma, beta):
        y = vhist.ops.fused_conv_bn_relu(x, w, gamma, beta, bn[2].clone(), bn[3].clone(), **kwargs)
        return y, vhist.ops.conv2d(y, torch.full((2, 4, 1, 1), 0.5, device=DEVICE))

    assert_autocast_matches_torch(chain, (x, w, bn[0], bn[1]), DEVICE)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    return [
        # (name, input, weight, kwargs, error, message)
        ("channel mismatch", x, torch.randn(6, 3, 3, 3, device=DEVICE), {}, ValueError, "input channels"),
        ("groups mismatch", x, w, dict(groups=2), ValueError, "expects 8 input"),
        ("kernel larger than input", x, torch.randn(6, 4, 7, 7, device=DEVICE), {}, ValueError, "larger"),
        ("negative padding", x, w, dict(padding=(1, -1)), ValueError, "non-negative"),
        ("same with stride", x, w, dict(padding="same", stride=(1, 2)), ValueError, "strided"),
        ("bn channels", x, torch.randn(5, 4, 3, 3, device=DEVICE), {}, ValueError, r"shape \(5,\)"),
        ("residual shape", x, w, dict(residual=torch.randn(2, 6, 5, 5, device=DEVICE)), ValueError, "residual"),
        ("one value per channel", x[:1], torch.randn(6, 4, 6, 6, device=DEVICE), {}, ValueError,
         "more than 1 value"),
        ("bad activation", x, w, dict(activation="tanh"), ValueError, "unknown activation"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_fused_conv_bn_relu_bad_input(case, backend):
    _, x, w, kwargs, error, message = case
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    gamma, beta = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.fused_conv_bn_relu(x, w, gamma, beta, rm, rv, **kwargs)
    assert torch.equal(rm, torch.zeros(6, device=DEVICE)) and torch.equal(rv, torch.ones(6, device=DEVICE)), \
        "a rejected call must not touch the running statistics"


def test_fused_conv_bn_relu_bad_input_eval_without_stats():
    x, w = torch.randn(2, 4, 6, 6, device=DEVICE), torch.randn(6, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="eval mode"):
        vhist.ops.fused_conv_bn_relu(x, w, None, None, None, None, training=False)


# ----------------------------------------------------------------------------- modules, compile


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1, activation="relu"),
    dict(kernel_size=3, stride=2, padding=1, groups=2, activation="relu6"),
    dict(kernel_size=(1, 3), padding="same", activation=None),
], ids=["3x3_relu", "3x3_s2_g2_relu6", "1x3_same_linear"])
def test_conv_bn_act_module_drop_in(kwargs, triton_backend):
    """ConvBNAct loads the state_dict of nn.Sequential(Conv2d, BatchNorm2d, act) unchanged,
    matches it in training (running statistics included) and in eval, and never
    mutates its parameters in eval."""
    activation = kwargs.pop("activation")
    act = {"relu": torch.nn.ReLU(), "relu6": torch.nn.ReLU6(), None: torch.nn.Identity()}[activation]
    ref = torch.nn.Sequential(torch.nn.Conv2d(4, 6, bias=False, **kwargs), torch.nn.BatchNorm2d(6), act).to(DEVICE)
    ours = ConvBNAct(4, 6, **kwargs, activation=activation).to(DEVICE)
    state = {k.replace("0.", "conv.").replace("1.", "bn."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    assert sorted(ours.state_dict()) == sorted(state)
    for step in range(2):
        x = torch.randn(2, 4, 6, 6, device=DEVICE)
        assert_close(ours(x), ref(x), name=f"train step {step}", **FWD_TOL)
    for key, value in ref.state_dict().items():
        mapped = key.replace("0.", "conv.").replace("1.", "bn.")
        assert_close(ours.state_dict()[mapped], value, name=key, **FWD_TOL)
    ours.eval()
    ref.eval()
    before = copy.deepcopy(ours.state_dict())
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    assert_close(ours(x), ref(x), name="eval", **FWD_TOL)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"eval mutated {key}"


def test_fused_conv_bn_relu_compile(triton_backend):
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x, w, gamma, beta, rm, rv, res):
        return vhist.ops.fused_conv_bn_relu(x, w, gamma, beta, rm, rv, padding=1, residual=res)

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x, w, bn, _ = make(CASES[0], channels_last=True)
    res = torch.randn(2, 4, 5, 5, device=DEVICE)
    outs = []
    for fn in (block, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn[0], bn[1], res)]
        rm, rv = bn[2].clone(), bn[3].clone()
        y = fn(*leaves[:4], rm, rv, leaves[4])
        outs.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y)), rm, rv))
    assert_close(outs[1][0], outs[0][0], name="output", **FWD_TOL)
    for g_c, g in zip(outs[1][1], outs[0][1]):
        assert_close(g_c, g, name="grad", **BWD_TOL)
    assert_close(outs[1][2], outs[0][2], name="running_mean", **FWD_TOL)
    assert_close(outs[1][3], outs[0][3], name="running_var", **FWD_TOL)


# ----------------------------------------------------------------------------- GPU only

GPU_CASES = [
    # (input shape, weight shape, stride, padding, dilation, groups)
    ((16, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1),      # ResNet-50 layer1 3x3
    ((16, 64, 56, 56), (256, 64, 1, 1), 1, 0, 1, 1),     # ResNet-50 layer1 expand 1x1
    ((16, 512, 28, 28), (256, 512, 1, 1), 1, 0, 1, 1),   # ResNet-50 layer3 reduce 1x1
    ((16, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, 1),   # ResNet-50 layer3 3x3
    ((16, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, 1),      # ResNet-50 stem
]


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_fused_conv_bn_relu_low_precision(case, dtype, training):
    """Three-way rule: our error against fp32 is at most 2x PyTorch's own (3x for grads)."""
    x, w, bn, kwargs = make(case, channels_last=True)
    ref = run_both(x, w, bn, kwargs, training, backends=("torch",))[0]
    ours, theirs = run_both(x.to(dtype), w.to(dtype), bn, kwargs, training)
    assert_low_precision_results(ours, theirs, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_fused_conv_bn_relu_fp32_layer_shapes(case):
    x, w, bn, kwargs = make(case, channels_last=True)
    res = torch.randn(_out_shape(x, w, kwargs), device=DEVICE)
    (y, grads, rm, rv), (y_ref, grads_ref, rm_ref, rv_ref) = run_both(x, w, bn, kwargs, residual=res)
    assert_close(y, y_ref, name="output", atol=1e-3, rtol=1e-3)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, name=f"grad_{i}", atol=5e-2, rtol=1e-3)
    assert_close(rm, rm_ref, name="running_mean", atol=1e-4, rtol=1e-4)
    assert_close(rv, rv_ref, name="running_var", atol=1e-4, rtol=1e-4)


def test_fused_conv_bn_relu_is_fused_conv_bn_act():
    """``fused_conv_bn_relu`` is the documented alias of ``fused_conv_bn_act``."""
    assert vhist.ops.fused_conv_bn_relu is vhist.ops.fused_conv_bn_act
    assert vhist.nn.functional.fused_conv_bn_relu is vhist.nn.functional.fused_conv_bn_act
