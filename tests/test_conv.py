"""conv2d on the triton backend (implicit-GEMM forward, dgrad, split-K wgrad) against
PyTorch's F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.nn import Conv2d
from vhist.ops.conv import wgrad_launch, conv_geometry, is_stem, pad_channels

from conftest import DEVICE
from utils import assert_close, assert_low_precision_close, assert_low_precision_results

CASES = [
    # (input shape, weight shape, stride, padding, dilation, groups)
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1),            # 3x3, pad 1, minimal
    ((1, 2, 6, 7), (3, 2, 1, 1), 1, 0, 1, 1),            # 1x1, batch 1, odd W
    ((2, 4, 7, 6), (6, 2, 3, 3), 2, 1, 1, 2),            # groups=2 (AlexNet's towers), stride 2
    ((1, 2, 15, 15), (2, 2, 11, 11), 4, 2, 1, 1),        # AlexNet conv1: 11x11 stride 4
    ((1, 3, 9, 9), (2, 3, 7, 7), 2, 3, 1, 1),            # ResNet stem: 7x7 stride 2
    ((2, 2, 6, 6), (3, 2, 5, 5), 1, 2, 1, 1),            # 5x5
    ((1, 3, 7, 7), (4, 3, 1, 7), 1, (0, 3), 1, 1),       # Inception 1x7
    ((1, 3, 7, 7), (4, 3, 7, 1), 1, (3, 0), 1, 1),       # Inception 7x1
    ((1, 2, 5, 5), (3, 2, 1, 3), 1, (0, 1), 1, 1),       # 1x3
    ((1, 2, 5, 5), (3, 2, 3, 1), 1, (1, 0), 1, 1),       # 3x1
    ((2, 3, 6, 6), (2, 3, 3, 3), 1, "same", 2, 1),       # 'same' with dilation 2
    ((2, 3, 6, 5), (2, 3, 2, 2), 1, "same", 1, 1),       # 'same', even kernel: asymmetric pad
    ((1, 2, 6, 6), (3, 2, 3, 3), 1, "valid", 1, 1),      # 'valid'
    ((2, 2, 9, 9), (3, 2, 3, 3), 2, 2, 2, 1),            # dilation combined with stride
    ((1, 3, 3, 3), (4, 3, 3, 3), 1, 0, 1, 1),            # 1x1 output
    ((1, 40, 3, 3), (70, 40, 1, 1), 1, 0, 1, 1),         # several K and N blocks
    ((2, 4, 5, 5), (4, 1, 3, 3), 1, 1, 1, 4),            # one channel per group
]
# fp32 sums of at most a few hundred products in another order than PyTorch's.
FWD_TOL = dict(atol=1e-4, rtol=1e-4)
BWD_TOL = dict(atol=2e-4, rtol=2e-4)


def case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case)


def make(case, dtype=torch.float32, channels_last=False, bias=True):
    shape, wshape, stride, padding, dilation, groups = case
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(wshape, device=DEVICE, dtype=dtype) / (wshape[1] * wshape[2] * wshape[3]) ** 0.5
    b = torch.randn(wshape[0], device=DEVICE, dtype=dtype) if bias else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def run_both(x, w, b, kwargs, activation=None, residual=None, backends=("triton", "torch"), backward=True):
    """Output and gradients (input, weight[, bias][, residual]) per backend."""
    results = []
    for backend in backends:
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, residual)]
        with vhist.use_backend(backend):
            y = vhist.ops.conv2d(*leaves[:3], **kwargs, activation=activation, residual=leaves[3])
        if not backward:
            results.append((y, ()))
            continue
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
        results.append((y, grads))
    return results


@pytest.mark.parametrize("case", [((2, 24, 3, 4), (12, 24, 1, 1), 1, 0, 1, 1),   # 24 -> 12: CH_ALIGN 4 (fp32)
                                  ((1, 12, 4, 3), (24, 12, 3, 3), 1, 1, 1, 1)],  # 12 -> 24, 3x3
                         ids=case_id)
def test_conv2d_channel_aligned(case):
    """Channel counts that are multiples of 4 but not of 16 (MobileNetV2's 24): the
    launchers pass CH_ALIGN > 1 and the kernels assert it (issue 22 item 10); forward
    and every gradient against torch, channels_last."""
    from vhist.ops.conv import channel_align

    x, w, b, kwargs = make(case, channels_last=True)
    cg_in, cg_out = case[1][1], case[1][0]
    x_strides, w_strides = x.stride(), w.to(memory_format=torch.channels_last).stride()
    assert channel_align(torch.float32, (cg_in,), (x_strides, w_strides)) == 4
    (y, grads), (y_ref, grads_ref) = run_both(x, w, b, kwargs, activation="relu")
    assert_close(y, y_ref, name="output", **FWD_TOL)
    for name, g, g_ref in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads_ref):
        assert_close(g, g_ref, name=name, **BWD_TOL)


def test_conv2d_channel_align_rule():
    """CH_ALIGN: the largest power of two up to 16 bytes dividing every channel count and
    row stride of channels-innermost operands; 1 when Triton already sees 16 or when a
    tensor is not channels-innermost."""
    from vhist.ops.conv import channel_align

    cl = lambda c, h, w: (h * w * c, 1, w * c, c)  # noqa: E731  (channels_last strides)
    assert channel_align(torch.bfloat16, (24,), (cl(24, 56, 56),)) == 8
    assert channel_align(torch.float32, (24,), (cl(24, 56, 56),)) == 4
    assert channel_align(torch.bfloat16, (12,), (cl(12, 56, 56),)) == 4
    assert channel_align(torch.bfloat16, (64,), (cl(64, 56, 56),)) == 1   # already visible
    assert channel_align(torch.bfloat16, (24,), (cl(24, 55, 55),)) == 8
    assert channel_align(torch.bfloat16, (3,), (cl(3, 8, 8),)) == 1
    assert channel_align(torch.bfloat16, (24,), ((24 * 9, 9, 3, 1),)) == 1   # NCHW: channels not innermost


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv2d_fwd(case):
    x, w, b, kwargs = make(case, channels_last=case[0][0] == 2)
    (y, _), (y_ref, _) = run_both(x, w, b, kwargs, activation="relu", backward=False)
    assert_close(y, y_ref, name="output", **FWD_TOL)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv2d_bwd(case):
    x, w, b, kwargs = make(case)
    (_, grads), (_, grads_ref) = run_both(x, w, b, kwargs, activation="relu")
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", **BWD_TOL)


STEM_CASES = [
    # (input shape, weight shape, stride, padding, dilation, groups): C_in <= 4
    ((1, 1, 9, 9), (4, 1, 7, 7), 2, 3, 1, 1),            # 1 channel (grayscale), 7x7 stride 2
    ((2, 3, 9, 8), (5, 3, 7, 7), 2, 3, 1, 1),            # RGB ResNet stem, odd sizes
    ((1, 4, 9, 9), (3, 4, 7, 7), 2, 3, 1, 1),            # 4 channels (RGBA)
    ((1, 3, 15, 15), (4, 3, 11, 11), 4, 2, 1, 1),        # AlexNet conv1: 11x11 stride 4
    ((2, 3, 5, 5), (20, 3, 3, 3), 1, 1, 1, 1),           # 3x3, more outputs than one N tile of 16
]


@pytest.mark.parametrize("case", STEM_CASES, ids=case_id)
def test_conv2d_stem(case):
    """The stem path (channels zero-padded to 16 in the forward, a narrow N tile in the
    dgrad): output and all gradients against F.conv2d."""
    x, w, b, kwargs = make(case)
    assert is_stem(conv_geometry("t", x.shape, w.shape, **kwargs), x.dtype)
    (y, grads), (y_ref, grads_ref) = run_both(x, w, b, kwargs, activation="relu")
    assert_close(y, y_ref, name="output", **FWD_TOL)
    for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", **BWD_TOL)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (64, 3, 11, 11), (3, 1, 1, 1)], ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv2d_stem_pad_channels(shape, channels_last):
    """The stem's padding kernel: any input strides in, channels_last out, the real
    channels copied bit for bit and the others zero (uninitialized memory made non-zero
    first, so that a channel left unwritten shows)."""
    x = torch.randn(shape, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.empty(4 * x.numel() * 16, device=DEVICE).fill_(7.0)  # dirty the allocator's free memory
    padded = pad_channels(x, 16)
    assert padded.shape == (shape[0], 16, *shape[2:]) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:, :shape[1]], x) and not padded[:, shape[1]:].any()


@pytest.mark.parametrize("channels", [2, 12])
def test_conv2d_stem_pad_channels_bad_width(channels):
    """A width below C or not a power of two is refused, on every call (nothing cached)."""
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    for _ in range(2):
        with pytest.raises(ValueError, match=f"cannot pad 3 channels to {channels}"):
            pad_channels(x, channels)


def test_conv2d_stem_pad_channels_determinism():
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    assert torch.equal(pad_channels(x, 16), pad_channels(x, 16))


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_conv2d_bwd_epilogues(activation, residual):
    case = ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1)
    x, w, b, kwargs = make(case)
    x = x * 4  # relu6 saturates on part of the output
    res = torch.randn(2, 4, 5, 5, device=DEVICE) if residual else None
    (y, grads), (y_ref, grads_ref) = run_both(x, w, b, kwargs, activation=activation, residual=res)
    assert_close(y, y_ref, name="output", **FWD_TOL)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, name=f"grad_{i}", **BWD_TOL)


@pytest.mark.parametrize("case", [((2, 3, 8, 8), (6, 3, 4, 4), 4, 0, 1, 1), ((2, 5, 6, 6), (4, 5, 3, 3), 1, 1, 1, 1)],
                         ids=["patch-stem", "3x3"])
@pytest.mark.parametrize("want_input_grad", [False, True], ids=["no-dx", "dx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_conv2d_bwd_sliced_grad_read_in_place(case, want_input_grad, dtype, monkeypatch):
    """A ViT's patch embedding: the conv's output is flattened into tokens beside a class
    token, so its gradient is a slice of the tokens' gradient, channels innermost but with
    a batch stride of (tokens + 1) x C. dgrad and wgrad read it through its strides (no
    channels_last copy), every gradient matches F.conv2d's, and a second backward gives
    the same bits."""
    from vhist.ops import common, conv

    x, w, b, kwargs = make(case, dtype=dtype)
    leaves = [t.detach().clone().requires_grad_(rg) for t, rg in ((x, want_input_grad), (w, True), (b, True))]
    refs = [t.detach().clone().requires_grad_(rg) for t, rg in ((x, want_input_grad), (w, True), (b, True))]
    copies = []
    real = common.channels_innermost

    def spy(t):
        out = real(t)
        copies.append(out is not t)
        return out

    monkeypatch.setattr(conv, "channels_innermost", spy)
    with vhist.use_backend("triton"):
        y = vhist.ops.conv2d(*leaves, **kwargs)
    y_ref = F.conv2d(*refs, **kwargs)
    n, c, oh, ow = y.shape
    tokens = torch.randn(n, oh * ow + 1, c, device=DEVICE, dtype=dtype,
                         generator=torch.Generator(DEVICE).manual_seed(2))
    grad = tokens[:, 1:].transpose(1, 2).unflatten(2, (oh, ow))  # (N, C, OH, OW), a slice of the tokens
    assert grad.stride(1) == 1 and not grad.is_contiguous(memory_format=torch.channels_last)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, grad, retain_graph=True)
    again = torch.autograd.grad(y, wanted, grad)
    grads_ref = torch.autograd.grad(y_ref, [t for t in refs if t.requires_grad], grad)
    assert copies == [False, False]
    for g, g_again, g_ref in zip(grads, again, grads_ref):
        assert torch.equal(g, g_again)
        assert_close(g, g_ref, name="grad", **BWD_TOL)


def test_channels_innermost_copies_only_other_layouts():
    from vhist.ops.common import channels_innermost

    t = torch.randn(2, 3, 4, 5)
    sliced = torch.randn(2, 21, 3)[:, 1:].transpose(1, 2).unflatten(2, (4, 5))
    assert channels_innermost(sliced) is sliced
    cl = channels_innermost(t)
    assert cl is not t and cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, t)
    already = t.to(memory_format=torch.channels_last)
    assert channels_innermost(already) is already


def test_conv2d_no_bias_and_unbatched():
    case = ((1, 3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1)
    x, w, _, kwargs = make(case, bias=False)
    (y, grads), (y_ref, grads_ref) = run_both(x, w, None, kwargs)
    assert_close(y, y_ref, name="output", **FWD_TOL)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, name="grad", **BWD_TOL)
    with vhist.use_backend("triton"):
        y3 = vhist.ops.conv2d(x[0], w, None, **kwargs)
    assert_close(y3, F.conv2d(x[0], w, None, **kwargs), name="unbatched", **FWD_TOL)


def test_conv2d_wgrad_split_k():
    """The split-K weight gradient (3 partial buffers, ordered sum) equals the reference
    and is bitwise reproducible."""
    x, w, b, kwargs = make(((2, 3, 9, 9), (4, 3, 3, 3), 1, 1, 1, 1))
    g = conv_geometry("conv2d", x.shape, w.shape, **kwargs)
    dy = torch.randn(g.out_shape, device=DEVICE).to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    dw, db = wgrad_launch(dy, None, xc, w.shape, w.dtype, g, 0, True, True, split=3)
    dw2, db2 = wgrad_launch(dy, None, xc, w.shape, w.dtype, g, 0, True, True, split=3)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)
    dw_ref = torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=1, padding=1)
    assert_close(dw, dw_ref, name="grad_weight", **BWD_TOL)
    assert_close(db, dy.sum((0, 2, 3)), name="grad_bias", **BWD_TOL)


def test_conv2d_determinism(triton_backend):
    x, w, b, kwargs = make(((2, 4, 7, 6), (6, 2, 3, 3), 2, 1, 1, 2))
    first, second = (run_both(x, w, b, kwargs, activation="relu", backends=("triton",))[0] for _ in range(2))
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


def test_conv2d_fp16():
    """fp16 through the tl.dot path: three-way rule against an fp32 reference."""
    case = ((2, 8, 6, 6), (8, 8, 3, 3), 1, 1, 1, 1)
    x, w, b, kwargs = make(case)
    y32 = F.conv2d(x, w, b, **kwargs)
    with vhist.use_backend("triton"):
        y = vhist.ops.conv2d(x.half(), w.half(), b.half(), **kwargs)
    assert y.dtype == torch.float16
    assert_low_precision_close(y, F.conv2d(x.half().float(), w.half().float(), b.half().float(), **kwargs).half(),
                               y32, factor=2.0, name="fp16 output", floor=2e-3)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    return [
        # (name, input, weight, kwargs, error, message)
        ("channel mismatch", x, torch.randn(6, 3, 3, 3, device=DEVICE), {}, ValueError, "expects 3 input channels"),
        ("groups mismatch", x, torch.randn(6, 4, 3, 3, device=DEVICE), dict(groups=2), ValueError, "expects 8 input"),
        ("groups not dividing", x, torch.randn(5, 2, 3, 3, device=DEVICE), dict(groups=2), ValueError, "divisible"),
        ("kernel larger than input", x, torch.randn(6, 4, 9, 9, device=DEVICE), dict(padding=1), ValueError, "larger"),
        ("negative padding", x, w, dict(padding=-1), ValueError, "non-negative"),
        ("same with stride", x, w, dict(padding="same", stride=2), ValueError, "strided"),
        ("unknown padding", x, w, dict(padding="full"), ValueError, "'same' or 'valid'"),
        ("zero stride", x, w, dict(stride=0), ValueError, "stride must be positive"),
        ("rank 5 input", x[None], w, {}, ValueError, "4-D input"),
        ("dtype mismatch", x, w.double(), {}, TypeError, "same dtype"),
        ("integer input", x.int(), w, {}, TypeError, "dtype"),
        ("bad activation", x, w, dict(activation="elu"), ValueError, "unknown activation"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_conv2d_bad_input(case, backend):
    _, x, w, kwargs, error, message = case
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.conv2d(x, w, **kwargs)


# ----------------------------------------------------------------------------- module, compile


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(1, 3), stride=2, padding="valid", bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect", groups=2),
], ids=["3x3", "1x3_valid", "reflect_groups"])
def test_conv2d_module_drop_in(kwargs, triton_backend):
    ref = torch.nn.Conv2d(4, 6, **kwargs).to(DEVICE)
    ours = Conv2d(4, 6, **kwargs).to(DEVICE)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    assert_close(ours(x), ref(x), name="output", **FWD_TOL)


def test_conv2d_compile(triton_backend):
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def fn(x, w, b):
        return vhist.ops.conv2d(x, w, b, stride=2, padding=1, activation="relu")

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    x, w, b, _ = make(((2, 3, 6, 6), (4, 3, 3, 3), 2, 1, 1, 1))
    outs = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = f(*leaves)
        outs.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y))))
    assert_close(outs[1][0], outs[0][0], name="output", **FWD_TOL)
    for g_c, g in zip(outs[1][1], outs[0][1]):
        assert_close(g_c, g, name="grad", **BWD_TOL)


# ----------------------------------------------------------------------------- GPU only

GPU_CASES = [
    # (input shape, weight shape, stride, padding, dilation, groups)
    ((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1),       # ResNet-50 layer1 3x3
    ((8, 256, 56, 56), (128, 256, 1, 1), 2, 0, 1, 1),    # ResNet-50 strided 1x1
    ((8, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, 1),       # ResNet-50 stem
    ((8, 3, 227, 227), (96, 3, 11, 11), 4, 0, 1, 1),     # AlexNet conv1
    ((8, 96, 27, 27), (256, 48, 5, 5), 1, 2, 1, 2),      # AlexNet conv2, two towers
    ((8, 128, 17, 17), (128, 128, 1, 7), 1, (0, 3), 1, 1),  # Inception-v3 1x7
    ((8, 128, 17, 17), (192, 128, 7, 1), 1, (3, 0), 1, 1),  # Inception-v3 7x1
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_conv2d_low_precision(case, dtype):
    """Three-way rule: our error against fp32 is at most 2x PyTorch's own (3x for grads)."""
    x, w, b, kwargs = make(case, channels_last=True)
    ref = run_both(x, w, b, kwargs, activation="relu", backends=("torch",))[0]
    ours, theirs = run_both(x.to(dtype), w.to(dtype), b.to(dtype), kwargs, activation="relu")
    assert_low_precision_results(ours, theirs, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_conv2d_fp32_layer_shapes(case):
    x, w, b, kwargs = make(case, channels_last=True)
    (y, grads), (y_ref, grads_ref) = run_both(x, w, b, kwargs, activation="relu")
    assert_close(y, y_ref, name="output", atol=1e-3, rtol=1e-3)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, name=f"grad_{i}", atol=5e-2, rtol=1e-3)


# ----------------------------------------------------------------------------- launch heuristics


def test_conv2d_wgrad_heuristics_assert_configs(monkeypatch):
    """The split-K weight gradient rounds splits to WGRAD_POSITION_ALIGN positions, which
    every BLOCK_K of the GEMM configs must divide; a config that breaks it is caught."""
    import triton

    from vhist.kernels import conv as conv_kernels
    from vhist.ops import heuristics

    heuristics.check_kernel_configs.__wrapped__()  # the shipped configs pass
    assert heuristics.wgrad_positions_per_split(1000, 3) == (384, 3)
    bad = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 48}, num_warps=4)
    monkeypatch.setattr(conv_kernels, "GEMM_CONFIGS", [*conv_kernels.GEMM_CONFIGS, bad])
    with pytest.raises(AssertionError, match="BLOCK_K=48"):
        heuristics.check_kernel_configs.__wrapped__()
