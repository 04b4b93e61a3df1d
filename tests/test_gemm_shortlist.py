"""The conv weight gradient's shortlist keeps a wgmma tile (BLOCK_M >= 64, a warpgroup's
rows) wherever one fills the GPU, split-K counted (issue 22 item 10), at every dense
conv of the five models of the compile report (batch 128, bf16, channels_last, 132
SMs), from recorded launches: nothing compiles or runs."""
import pytest

from utils import run_recording_script

RECORD_SCRIPT = r"""
import importlib, json
import torch
import vhist
from vhist.nn import functional as VF
from vhist.ops.conv_common import resolve_padding
from vhist.tools.launches import record_launches

conv_ops = importlib.import_module("vhist.ops.conv")
calls = set()
orig = {name: getattr(VF, name) for name in ("fused_conv_bn_act", "conv2d")}

def capture(name):
    def fn(*args, **kwargs):
        x, w = args[0], args[1]
        if name == "conv2d":
            stride, padding, dilation, groups = (list(args[3:7]) + [None] * 4)[:4]
            stride, padding = kwargs.get("stride", stride or 1), kwargs.get("padding", padding or 0)
            dilation, groups = kwargs.get("dilation", dilation or 1), kwargs.get("groups", groups or 1)
        else:
            stride, padding = kwargs.get("stride", 1), kwargs.get("padding", 0)
            dilation, groups = kwargs.get("dilation", 1), kwargs.get("groups", 1)
        if groups != x.shape[1] or w.shape[0] % x.shape[1]:  # dense and grouped convs, not depthwise
            calls.add((tuple(x.shape), tuple(w.shape), str(stride), str(padding), str(dilation), groups))
        return orig[name](*args, **kwargs)
    return fn

for name in orig:
    setattr(VF, name, capture(name))
with vhist.use_backend("torch"), torch.device("meta"):
    for model in ("resnet50", "mobilenet_v2", "alexnet", "inception_v3", "vit_small_patch16"):
        net = vhist.create_model(model).train()
        size = 299 if model == "inception_v3" else 227 if model == "alexnet" else 224
        net(torch.empty(128, 3, size, size))
for name in orig:
    setattr(VF, name, orig[name])

def pair(v):
    v = eval(v) if v[0] in "([" or v.lstrip("-").isdigit() else v
    return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) else (v, v)

def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)

out = []
with record_launches() as rec:
    for x_shape, w_shape, stride, padding, dilation, groups in sorted(calls, key=str):
        stride, dilation, padding = pair(stride), pair(dilation), pair(padding)
        pads = list(resolve_padding("conv", padding, stride, dilation, w_shape[2], w_shape[3]))
        geom = conv_ops.FUSED_PASSES.geometry(x_shape, w_shape, list(stride), pads, list(dilation), groups)
        start = len(rec.records)
        conv_ops.FUSED_PASSES.grad_weight(meta(*geom.out_shape), meta(*x_shape), meta(*w_shape), geom)
        for r in rec.records[start:]:
            if r.kernel == "_conv2d_bwd_wgrad_kernel":
                args = {a.name: a.value for a in r.args if a.kind == "int"}
                out.append(dict(layer=[list(x_shape), list(w_shape), groups], cg_out=args["CG_OUT"],
                                cg_in=args["CG_IN"], candidates=[[dict(c.kwargs)["BLOCK_M"], dict(c.kwargs)["BLOCK_N"],
                                                                  list(g)] for c, g in r.candidates]))
print(json.dumps(dict(calls=len(calls), launches=out)))
"""


def _cdiv(a, b):
    return -(-a // b)


@pytest.fixture(scope="module")
def wgrad_launches():
    return run_recording_script(RECORD_SCRIPT)


def test_wgrad_shortlist_keeps_a_wgmma_tile_where_one_fills_the_gpu(wgrad_launches):
    """The smallest wgmma tile, 64x32, fills half the 132 SMs at most of these layers
    once split-K is counted (taps x splits programs per weight tile); there the shortlist
    must hold a 64-row tile. MobileNetV2's 24- and 32-channel 1x1 convs (C_out = M <= 32)
    kept only 32-row tiles (mma.sync)."""
    calls, launches = wgrad_launches["calls"], wgrad_launches["launches"]
    assert calls >= 40 and len(launches) >= calls, (calls, len(launches))
    missing, small_m = [], 0
    for r in launches:
        _, _, grid = r["candidates"][0]
        programs_64x32 = _cdiv(r["cg_out"], 64) * _cdiv(r["cg_in"], 32) * grid[1] * grid[2]
        small_m += r["cg_out"] <= 32
        if programs_64x32 >= 132 // 2 and not any(m >= 64 for m, _, _ in r["candidates"]):
            missing.append(r)
    assert small_m >= 3, small_m  # the 24- and 32-channel layers are among them
    assert not missing, missing[:5]
