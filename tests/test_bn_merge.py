"""The BatchNorm statistics merge and gradient-sum merge (kernels/batch_norm.py): a tree
of fan-in ``heuristics.BN_MERGE_GROUP`` over thousands of partials against float64, its
bitwise determinism, and (from the recorded launches of the real layers, nothing run)
its parallelism at every ResNet-50, MobileNetV2 and Inception-v3 BN at batch 128."""
import pytest
import torch

from vhist.ops import heuristics
from vhist.ops.batch_norm import bn_finalize, bn_merge_sums

from conftest import DEVICE
from utils import assert_close, run_recording_script

MERGE_CASES = [
    (1, 1),      # a single partial: no merge level
    (64, 3),     # exactly one group: finalize only
    (65, 3),     # one partial past a group: one level of 2 groups
    (3000, 2),   # thousands of partials: one level of 47 groups
    (5000, 5),   # two levels (5000 -> 79 -> 2), non-power-of-two channels
]


def _partials(num, c, offset=1000.0):
    """Per-partial (count, mean, M2) of random data with |mean| >> std (where E[x^2]-E[x]^2
    would cancel), in float64, and the float64 statistics of the whole."""
    gen = torch.Generator().manual_seed(num * 31 + c)
    counts = torch.randint(1, 9, (num,), generator=gen).double()
    # Each partial's mean and M2 are exact for its own data: draw them per partial.
    means = offset + torch.randn(num, c, generator=gen, dtype=torch.float64) * 2.0
    m2 = torch.rand(num, c, generator=gen, dtype=torch.float64) * counts[:, None] * 4.0
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    full_m2 = m2.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
    return counts, means, m2, mean, full_m2 / total, full_m2 / (total - 1)


@pytest.mark.parametrize("num, c", MERGE_CASES, ids=str)
def test_bn_finalize_many_partials(num, c, triton_backend):
    counts, means, m2, mean_ref, var_ref, unbiased_ref = _partials(num, c)
    f32 = dict(device=DEVICE, dtype=torch.float32)
    running_mean, running_var = torch.full((c,), 0.5, **f32), torch.full((c,), 2.0, **f32)
    mean, rstd = bn_finalize(means.to(**f32), m2.to(**f32), counts.to(**f32), running_mean, running_var,
                             0.1, 1e-5)
    assert len(heuristics.bn_merge_levels(num)) == (0 if num <= 64 else 1 if num <= 4096 else 2)
    # fp32 partials of a mean near 1e3: a few ulps of 1e3 (6e-5 each); the variance (~4)
    # inherits the rounding of the deviations, ~1e-4 relative.
    assert_close(mean.double(), mean_ref, name="mean", atol=5e-4, rtol=0)
    assert_close(rstd.double(), 1 / (var_ref + 1e-5).sqrt(), name="rstd", atol=0, rtol=2e-4)
    assert_close(running_mean.double(), 0.9 * 0.5 + 0.1 * mean_ref, name="running_mean", atol=5e-5, rtol=0)
    assert_close(running_var.double(), 0.9 * 2.0 + 0.1 * unbiased_ref, name="running_var", atol=0, rtol=2e-4)


@pytest.mark.parametrize("num, c", MERGE_CASES, ids=str)
def test_bn_merge_sums_many_partials(num, c, triton_backend):
    gen = torch.Generator().manual_seed(num + c)
    part_dy = torch.randn(num, c, generator=gen, dtype=torch.float64)
    part_dy_xhat = torch.randn(num, c, generator=gen, dtype=torch.float64) + 3.0
    sum_dy, sum_dy_xhat, grad_weight, grad_bias = bn_merge_sums(
        part_dy.float().to(DEVICE), part_dy_xhat.float().to(DEVICE), torch.float32, torch.float64)
    # fp32 sums of up to 5000 O(1) terms: a few ulps of the partial sums' magnitude (~1e2).
    assert_close(sum_dy.double(), part_dy.float().double().sum(0), name="sum_dy", atol=1e-3, rtol=0)
    assert_close(sum_dy_xhat.double(), part_dy_xhat.float().double().sum(0), name="sum_dy_xhat", atol=1e-2, rtol=0)
    assert grad_weight.dtype == torch.float32 and grad_bias.dtype == torch.float64
    assert torch.equal(grad_weight, sum_dy_xhat) and torch.equal(grad_bias, sum_dy.double())
    # In the sums' dtype the parameter gradient is the sum tensor itself (one write, one allocation).
    assert grad_weight is sum_dy_xhat and grad_bias is not sum_dy


def test_bn_merge_determinism(triton_backend):
    num, c = 5000, 3
    counts, means, m2, *_ = _partials(num, c)
    f32 = dict(device=DEVICE, dtype=torch.float32)
    args = means.to(**f32), m2.to(**f32), counts.to(**f32)
    first = bn_finalize(*args, None, None, 0.1, 1e-5)
    second = bn_finalize(*args, None, None, 0.1, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    sums = [bn_merge_sums(args[0], args[1]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(sums[0][:2], sums[1][:2]))


def test_bn_merge_levels():
    group = heuristics.BN_MERGE_GROUP
    assert heuristics.bn_merge_levels(group) == []
    assert heuristics.bn_merge_levels(group + 1) == [group + 1]
    assert heuristics.bn_merge_levels(12544) == [12544, 196]  # -> 4 partials for the finalize
    for num in (1, 63, 64, 65, 4096, 4097, 12544, 10 ** 6):
        remaining = num
        for level in heuristics.bn_merge_levels(num):
            assert level == remaining
            remaining = -(-remaining // group)
        assert remaining <= group


# ----------------------------------------------------------------------------- recorded launches

# Captures every fused conv/depthwise + BN and every standalone BN call of the three
# models (torch backend, meta tensors), then replays each distinct layer's training
# statistics path (conv with the BN epilogue, bn_finalize) and backward sums
# (bn_grad_sums) under record_launches: meta tensors, nothing compiled or run.
RECORD_SCRIPT = r"""
import json, sys
import torch
import vhist
from vhist.nn import functional as VF
from vhist.ops import conv as conv_ops, depthwise as dw_ops
from vhist.ops.batch_norm import bn_finalize, bn_grad_sums, bn_stats_partials
from vhist.ops.conv_common import resolve_padding
from vhist.tools.launches import record_launches

calls = set()
orig = {name: getattr(VF, name) for name in ("fused_conv_bn_act", "fused_depthwise_bn_act", "batch_norm")}

def capture(name):
    def fn(*args, **kwargs):
        x = args[0]
        if name == "batch_norm":
            calls.add((name, tuple(x.shape), None))
        else:
            w = args[1]
            calls.add((name, tuple(x.shape), (tuple(w.shape), tuple(kwargs["stride"]),
                       str(kwargs["padding"]), tuple(kwargs["dilation"]), kwargs.get("groups", x.shape[1]))))
        return orig[name](*args, **kwargs)
    return fn

for name in orig:
    setattr(VF, name, capture(name))
with vhist.use_backend("torch"), torch.device("meta"):
    for model, size in (("resnet50", 224), ("mobilenet_v2", 224), ("inception_v3", 299)):
        net = vhist.create_model(model).train()
        net(torch.empty(128, 3, size, size))
for name in orig:
    setattr(VF, name, orig[name])

def meta(*shape):
    return torch.empty(*shape, device="meta").to(memory_format=torch.channels_last) if len(shape) == 4 \
        else torch.empty(*shape, device="meta")

out = []
with record_launches() as rec:
    for name, shape, conv in sorted(calls, key=str):
        start = len(rec.records)
        if name == "batch_norm":
            y = meta(*shape)
            partials = bn_stats_partials(y)
        else:
            w_shape, stride, padding, dilation, groups = conv
            x, w = meta(*shape), torch.empty(w_shape, device="meta")
            padding = eval(padding) if padding[0] in "([" or padding.isdigit() else padding
            if name == "fused_depthwise_bn_act":
                geom = dw_ops.depthwise_geometry(shape, w_shape, stride, padding, dilation)
                y, partials = dw_ops.FUSED_PASSES.forward_with_stats(x, w, geom)
            else:
                geom = conv_ops.FUSED_PASSES.geometry(shape, w_shape, stride, list(resolve_padding(
                    "conv", padding, stride, dilation, w_shape[2], w_shape[3])), dilation, groups)
                y, partials = conv_ops.FUSED_PASSES.forward_with_stats(x, w, geom)
        c = y.shape[1]
        stats = torch.empty(c, device="meta"), torch.empty(c, device="meta")
        mean, rstd = bn_finalize(*partials, *stats, 0.1, 1e-5)
        bn_grad_sums(meta(*y.shape), y, mean, rstd, stats[0], stats[1], 1e-5, activation=1,
                     want_dweight=True, want_dbias=True)
        for r in rec.records[start:]:
            if r.kernel in ("_bn_fwd_merge_kernel", "_bn_fwd_finalize_kernel", "_bn_bwd_merge_kernel",
                            "_bn_bwd_finalize_kernel"):
                args = {a.name: a.value for a in r.args if a.kind == "int"}
                grid = r.candidates[0][1]
                walk = args["GROUP"] if "GROUP" in args else args["NUM_CHUNKS"]
                out.append(dict(layer=[name, list(shape), str(conv)], kernel=r.kernel, programs=grid[0] * grid[1] * grid[2],
                                partials=args["NUM_CHUNKS"], walk=min(walk, args["NUM_CHUNKS"])))
print(json.dumps(dict(calls=len(calls), launches=out)))
"""


@pytest.fixture(scope="module")
def merge_launches():
    return run_recording_script(RECORD_SCRIPT)


def test_bn_merge_parallel_at_model_layers(merge_launches):
    """Every merge launch at every BN of the three models has >= 132 programs or walks at
    most 64 partials per program (the issue's bound), forward and backward."""
    calls, merge_launches = merge_launches["calls"], merge_launches["launches"]
    layers = {tuple(map(str, r["layer"])) for r in merge_launches}
    assert len(layers) == calls and calls >= 60, (len(layers), calls)  # every distinct BN layer of the three
    assert {r["kernel"] for r in merge_launches} >= {"_bn_fwd_merge_kernel", "_bn_fwd_finalize_kernel",
                                                      "_bn_bwd_merge_kernel", "_bn_bwd_finalize_kernel"}
    serial = [r for r in merge_launches if r["programs"] < 132 and r["walk"] > 64]
    assert not serial, serial[:5]
    # Thousands of partials occur (the stem, the 56x56 layers) and are merged in levels.
    assert max(r["partials"] for r in merge_launches) >= 3000


def test_merge_levels_reuse_their_buffers_across_calls(triton_backend):
    """The merge levels' buffers are scratch kept by the plan (launch_cache.scratch): a
    second merge of the same shape reuses them, over the first merge's values, and is
    still exact."""
    import importlib

    bn_module = importlib.import_module("vhist.ops.batch_norm")  # the module (vhist.ops.batch_norm is the op)
    num, c = 5000, 5  # two levels
    results = []
    for offset in (1000.0, -20.0):
        counts, means, m2, mean_ref, var_ref, _ = _partials(num, c, offset=offset)
        f32 = dict(device=DEVICE, dtype=torch.float32)
        mean, rstd = bn_finalize(means.to(**f32), m2.to(**f32), counts.to(**f32), None, None, 0.1, 1e-5)
        assert_close(mean.double(), mean_ref, name="mean", atol=5e-4, rtol=0)
        assert_close(rstd.double(), 1 / (var_ref + 1e-5).sqrt(), name="rstd", atol=0, rtol=2e-4)
        results.append(mean)
    assert results[0] is not results[1]  # outputs are never scratch
    # The plan's key: (num, c, dtype, device, update_running, momentum, eps).
    (plan,) = [plan for key, plan in bn_module._FINALIZE_PLANS.items() if key[:2] == (num, c) and not key[4]]
    assert len(plan.levels) == 2 and len(plan.scratch) == 1  # one set of level buffers, kept
