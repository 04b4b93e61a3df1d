"""The depthwise weight gradient (pixels outside, taps inside; two-stage, deterministic)
on the triton backend against an fp64 reference, at the issue's shape list, both
layouts, with and without the activation mask, and gradchecked in fp64."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import vhist
import vhist.kernels.depthwise as dw_kernels
from vhist.ops.depthwise import depthwise_geometry

from conftest import DEVICE
from static_sm90 import run_static
from utils import assert_close

CASES = [
    # (N, C_in, H, W, multiplier, kernel, stride, padding, dilation)
    (1, 1, 3, 3, 1, 3, 1, 1, 1),       # minimal
    (2, 3, 7, 7, 1, 3, 1, 1, 1),       # 3x3, stride 1
    (2, 3, 8, 7, 1, 3, 2, 1, 1),       # stride 2, H != W
    (1, 4, 9, 9, 1, 5, 1, 2, 1),       # 5x5
    (2, 2, 11, 10, 1, 7, 2, 3, 1),     # 7x7, stride 2
    (2, 3, 9, 9, 1, 3, 1, 2, 2),       # dilation 2
    (2, 3, 6, 5, 2, 3, 2, 1, 1),       # multiplier 2, stride 2
    (1, 5, 7, 9, 1, (5, 3), (2, 1), (2, 0), (1, 2)),  # odd sizes, anisotropic everything
    (2, 16, 24, 24, 1, 3, 1, 1, 1),    # C = 16 (128-bit NHWC rows), 1152 pixels: 3 chunks of 384 on a CPU device
]
# dw sums N*OH*OW fp32 products per tap, in another order than the fp64 reference.
TOL = dict(atol=5e-5, rtol=5e-5)


def _kernel(k):
    return k if isinstance(k, tuple) else (k, k)


def _inputs(case, fmt, dtype=torch.float32):
    n, c, h, w, mult, k, stride, padding, dilation = case
    fmt_t = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt_t)
    weight = torch.randn(c * mult, 1, *_kernel(k), device=DEVICE, dtype=dtype)
    geom = depthwise_geometry(x.shape, weight.shape, stride, padding, dilation)
    dy = torch.randn(n, c * mult, geom.oh, geom.ow, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt_t)
    return x, weight, dy, geom


def _reference(x, weight, dy, geom, mask=None):
    """(dw, db) in fp64 through F.conv2d's autograd; ``mask`` gates dy (activation)."""
    x64, w64 = x.double(), weight.double().requires_grad_()
    b64 = torch.zeros(weight.shape[0], dtype=torch.float64, device=x.device, requires_grad=True)
    top, bottom, left, right = geom.padding
    y = F.conv2d(F.pad(x64, (left, right, top, bottom)), w64, b64, geom.stride, 0, geom.dilation, x.shape[1])
    g = dy.double() if mask is None else torch.where(mask, dy.double(), 0.0)
    return torch.autograd.grad(y, (w64, b64), g)


def _run(x, weight, dy, geom, output=None, activation=0):
    return torch.ops.vhist.depthwise_conv2d_bwd_weight(dy, output, x, list(weight.shape), list(geom.stride),
                                                       list(geom.padding), list(geom.dilation), activation, 0.01, True)


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_depthwise_weight_grad(case, fmt):
    x, weight, dy, geom = _inputs(case, fmt)
    dw, db = _run(x, weight, dy, geom)
    dw_ref, db_ref = _reference(x, weight, dy, geom)
    assert_close(dw.double(), dw_ref, name="grad_weight", **TOL)
    assert_close(db.double(), db_ref, name="grad_bias", **TOL)


@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
def test_depthwise_weight_grad_activation_mask(fmt, activation):
    """dy gated by the activation's gradient, read from the forward output."""
    x, weight, dy, geom = _inputs(CASES[2], fmt)
    output = (torch.randn(dy.shape, device=DEVICE) * 4).contiguous(memory_format=torch.contiguous_format)
    mask = (output > 0) & (output < 6) if activation == 2 else output > 0
    dw, db = _run(x, weight, dy, geom, output, activation)
    dw_ref, db_ref = _reference(x, weight, dy, geom, mask)
    assert_close(dw.double(), dw_ref, name="grad_weight", **TOL)
    assert_close(db.double(), db_ref, name="grad_bias", **TOL)


def test_depthwise_weight_grad_deterministic():
    """Fixed tiling and chunking: bitwise equal between runs."""
    x, weight, dy, geom = _inputs(CASES[-1], "channels_last")
    first, second = _run(x, weight, dy, geom), _run(x, weight, dy, geom)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_depthwise_weight_grad_tiling():
    """The accumulator is [next_pow2(KH*KW), BLOCK_P, BLOCK_C], WGRAD_TILE elements, wide
    along channels for NHWC and along pixels for NCHW."""
    assert dw_kernels.weight_grad_tiling(3, 3, True) == (8, 32, 4)
    assert dw_kernels.weight_grad_tiling(7, 7, True) == (2, 32, 4)
    assert dw_kernels.weight_grad_tiling(3, 3, False) == (64, 4, 4)
    for kh, kw in ((3, 3), (5, 5), (7, 7), (1, 11), (31, 31)):
        for cl in (True, False):
            block_p, block_c, _ = dw_kernels.weight_grad_tiling(kh, kw, cl)
            taps = 1 << (kh * kw - 1).bit_length()
            assert taps * block_p * block_c == max(dw_kernels.WGRAD_TILE, taps)


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=str)
def test_depthwise_weight_grad_gradcheck(case, fmt, triton_backend):
    """fp64 gradcheck of the weight and bias gradients alone (the input held fixed)."""
    x, weight, _, geom = _inputs(case, fmt, torch.float64)
    bias = torch.randn(weight.shape[0], device=DEVICE, dtype=torch.float64)
    _, _, _, _, _, _, stride, padding, dilation = case

    def fn(weight, bias):
        return vhist.ops.depthwise_conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation)

    assert gradcheck(fn, (weight.requires_grad_(), bias.requires_grad_()), eps=1e-6, atol=1e-6, rtol=1e-5,
                     fast_mode=True)


def test_depthwise_weight_grad_sm90_vector_loads():
    """Static, sm_90 compile (no GPU) of the launcher's launches at MobileNetV2's
    144-channel 56x56 layer (3x3) and a 7x7 layer, channels_last fp32, with runtime
    specialization: the dy and x tiles load with 128-bit accesses, nothing spills."""
    figures = run_static("depthwise-check")
    assert len(figures) == 2
    for fig in figures:
        assert fig["ld_global_v4"] >= 8 and fig["ld_global_v4"] > 4 * fig["ld_global_scalar"], fig
        assert fig["local_bytes"] == 0, fig


# ----------------------------------------------------------------------------- one-pass backward


def _reference_all(x, weight, dy, geom, mask=None):
    """(dx, dw, db) in fp64 through F.conv2d's autograd; ``mask`` gates dy (activation)."""
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = torch.zeros(weight.shape[0], dtype=torch.float64, device=x.device, requires_grad=True)
    top, bottom, left, right = geom.padding
    y = F.conv2d(F.pad(x64, (left, right, top, bottom)), w64, b64, geom.stride, 0, geom.dilation, x.shape[1])
    g = dy.double() if mask is None else torch.where(mask, dy.double(), 0.0)
    return torch.autograd.grad(y, (x64, w64, b64), g)


def _run_all(x, weight, dy, geom, output=None, activation=0, has_bias=True):
    return torch.ops.vhist.depthwise_conv2d_bwd(dy, output, x, weight, list(geom.stride), list(geom.padding),
                                                list(geom.dilation), activation, 0.01, has_bias)


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_depthwise_input_and_weight_grad_one_pass(case, fmt):
    """``vhist::depthwise_conv2d_bwd`` (dx, dw and db from one gather of dy) against fp64
    autograd of F.conv2d, at the issue's shape list and both layouts; dx keeps x's layout."""
    x, weight, dy, geom = _inputs(case, fmt)
    dx, dw, db = _run_all(x, weight, dy, geom)
    dx_ref, dw_ref, db_ref = _reference_all(x, weight, dy, geom)
    assert dx.shape == x.shape and dx.stride() == x.stride()
    assert_close(dx.double(), dx_ref, name="grad_input", atol=1e-5, rtol=1e-5)
    assert_close(dw.double(), dw_ref, name="grad_weight", **TOL)
    assert_close(db.double(), db_ref, name="grad_bias", **TOL)
    # Without a bias: the same dx and dw (same summation order), no db.
    dx2, dw2, db2 = _run_all(x, weight, dy, geom, has_bias=False)
    assert torch.equal(dx2, dx) and torch.equal(dw2, dw) and db2.numel() == 0


@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=str)
def test_depthwise_input_and_weight_grad_activation_mask(case, activation):
    """dy gated by the activation's gradient, read from the forward output, in both the
    gather (dx, dw) and the bias pass."""
    x, weight, dy, geom = _inputs(case, "channels_last")
    output = (torch.randn(dy.shape, device=DEVICE) * 4).contiguous(memory_format=torch.channels_last)
    mask = (output > 0) & (output < 6) if activation == 2 else output > 0
    got = _run_all(x, weight, dy, geom, output, activation)
    refs = _reference_all(x, weight, dy, geom, mask)
    for g, g_ref, name in zip(got, refs, ("grad_input", "grad_weight", "grad_bias")):
        assert_close(g.double(), g_ref, name=name, **TOL)


def test_depthwise_input_and_weight_grad_deterministic_and_used_by_autograd():
    """Bitwise equal between runs; and the autograd Function takes this one-pass op when
    both gradients are wanted (same bits as calling it directly)."""
    x, weight, dy, geom = _inputs(CASES[-1], "channels_last")
    first, second = _run_all(x, weight, dy, geom), _run_all(x, weight, dy, geom)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    bias = torch.zeros(weight.shape[0], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with vhist.use_backend("triton"):
        y = vhist.ops.depthwise_conv2d(*leaves, stride=geom.stride, padding=CASES[-1][7], dilation=geom.dilation)
    grads = torch.autograd.grad(y, leaves, dy)
    assert all(torch.equal(g, f) for g, f in zip(grads, first))


@pytest.mark.parametrize("combined", [False, True], ids=["weight_only", "with_input"])
def test_depthwise_weight_grad_merge_tree(monkeypatch, combined):
    """The chunk partials summed in a tree (issue 22 item 10): with the fan-in cut to 2 and
    the SM count to 4, two merge levels then the finalize: 5 -> 3 -> 2 over the 1152
    output pixels (weight only), 6 -> 3 -> 2 over the one-pass kernel's 1352-pixel gather
    grid (the 24x24 input with its padding ring, 26x26); against fp64, and bitwise equal
    between runs."""
    import vhist.ops.depthwise as dw_ops
    from vhist.ops import heuristics, launch_cache

    monkeypatch.setattr(heuristics, "DEPTHWISE_WGRAD_MERGE_GROUP", 2)
    monkeypatch.setattr(dw_ops, "_sm_count", lambda device: 4)
    launch_cache.clear()
    try:
        x, weight, dy, geom = _inputs(CASES[-1], "channels_last")
        args = list(geom.stride), list(geom.padding), list(geom.dilation), 0, 0.01, True
        if combined:
            run = lambda: torch.ops.vhist.depthwise_conv2d_bwd(dy, None, x, weight, *args)[1:]  # noqa: E731
            cache = dw_ops._INPUT_WEIGHT_GRAD_PLANS
        else:
            run = lambda: _run(x, weight, dy, geom)  # noqa: E731
            cache = dw_ops._WEIGHT_GRAD_PLANS
        first, second = run(), run()
        (plan,) = cache.values()
        assert plan.chunks == (6 if combined else 5), plan.chunks
        assert [groups for _, groups in plan.merges] == [3, 2], plan.merges
    finally:
        launch_cache.clear()
    dw_ref, db_ref = _reference(x, weight, dy, geom)
    assert_close(first[0].double(), dw_ref, name="grad_weight", **TOL)
    assert_close(first[1].double(), db_ref, name="grad_bias", **TOL)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_depthwise_weight_grad_merge_levels():
    """The tree's shape is a function of the chunk count: MobileNetV2's 32x112x112 layer at
    batch 128 writes 523 chunk partials on 132 SMs, merged 523 -> 9 -> finalize."""
    from vhist.ops import heuristics
    from vhist.ops.depthwise import weight_chunks

    with pytest.MonkeyPatch.context() as mp:
        import vhist.ops.depthwise as dw_ops

        mp.setattr(dw_ops, "_sm_count", lambda device: 132)
        _, chunks = weight_chunks(128 * 112 * 112, 32, torch.device("cpu"))
    assert chunks == 523
    assert heuristics.merge_levels(chunks, heuristics.DEPTHWISE_WGRAD_MERGE_GROUP) == [523]
    assert heuristics.merge_levels(64, 64) == [] and heuristics.merge_levels(4097, 64) == [4097, 65]


MERGE_RECORD_SCRIPT = r"""
import importlib, json, torch
from vhist.tools.launches import record_launches
dw_ops = importlib.import_module("vhist.ops.depthwise")
out = []
with record_launches() as rec:
    # MobileNetV2's depthwise layers at batch 128 (channels, size, stride), both backward paths.
    for c, hw, s in ((32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (960, 7, 1)):
        x = torch.empty(128, c, hw, hw, device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.empty(c, 1, 3, 3, device="meta", dtype=torch.bfloat16)
        geom = dw_ops.depthwise_geometry(x.shape, w.shape, s, 1, 1)
        dy = torch.empty(128, c, geom.oh, geom.ow, device="meta", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last)
        start = len(rec.records)
        dw_ops.FUSED_PASSES.grad_input_and_weight(dy, x, w, geom)
        dw_ops.FUSED_PASSES.grad_weight(dy, x, w, geom)
        for r in rec.records[start:]:
            if r.kernel in ("_depthwise_bwd_weight_merge_kernel", "_depthwise_bwd_weight_finalize_kernel"):
                args = {a.name: a.value for a in r.args if a.kind == "int"}
                grid = r.candidates[0][1]
                out.append(dict(layer=[c, hw, s], kernel=r.kernel, programs=grid[0] * grid[1] * grid[2],
                                partials=args["num_chunks"], walk=min(args.get("GROUP", args["num_chunks"]),
                                                                      args["num_chunks"])))
print(json.dumps(out))
"""


def test_depthwise_weight_grad_no_serial_merge_at_model_layers():
    """Recorded launches (nothing run) at MobileNetV2's depthwise layers, batch 128, 132
    SMs: every merge or finalize launch walks at most 64 partials per program (the BN
    merge's bound); the 32x112x112 layer's 520 partials (its 114x114 gather grid) take one
    level (3 x 9 programs)."""
    from utils import run_recording_script

    launches = run_recording_script(MERGE_RECORD_SCRIPT)
    assert {r["kernel"] for r in launches} == {"_depthwise_bwd_weight_merge_kernel",
                                              "_depthwise_bwd_weight_finalize_kernel"}
    serial = [r for r in launches if r["walk"] > 64]
    assert not serial, serial[:5]
    first = [r for r in launches if r["layer"] == [32, 112, 1]]
    assert [(r["kernel"][22:27], r["programs"], r["partials"]) for r in first[:2]] == [
        ("merge", 27, 520), ("final", 3, 9)], first
