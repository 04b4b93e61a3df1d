"""Traffic by design (vhist.tools.traffic): every op's activation-sized passes per mode,
from the launches its registered ops really make (recorded, nothing run; CPU tensors at
batch-128 layer sizes, never touched), against the README's per-op minimum."""
import json

import pytest

from utils import run_recording_script

# (op, input shape, conv, options), real layers at batch 128.
CASES = [
    ("batch_norm", (128, 64, 56, 56), None, {}),                       # ResNet-50 layer1, channels_last
    ("batch_norm", (128, 256, 14, 14), None, dict(channels_last=False)),  # NCHW
    ("batch_norm", (128, 2048, 7, 7), None, dict(dtype="float32")),
    ("local_response_norm", (128, 96, 55, 55), None, {}),              # AlexNet conv1
    ("local_response_norm", (128, 256, 27, 27), None, dict(channels_last=False)),
    ("depthwise_conv2d", (128, 144, 56, 56), dict(c_out=144, kernel=3, stride=1, padding=1), {}),
    ("depthwise_conv2d", (128, 96, 112, 112), dict(c_out=192, kernel=5, stride=2, padding=2), {}),  # multiplier 2
    ("fused_depthwise_bn_act", (128, 144, 56, 56), dict(c_out=144, kernel=3, stride=2, padding=1),
     dict(activation=2)),                                               # MobileNetV2 block 3, ReLU6
    ("fused_depthwise_bn_act", (128, 960, 7, 7), dict(c_out=960, kernel=3, stride=1, padding=1),
     dict(activation=2, channels_last=False)),
    ("fused_depthwise_bn_act", (128, 32, 112, 112), dict(c_out=32, kernel=3, stride=1, padding=1),
     dict(activation=0, residual=True)),
    ("fused_conv_bn_act", (128, 64, 56, 56), dict(c_out=64, kernel=3, stride=1, padding=1), {}),
    ("fused_conv_bn_act", (128, 256, 56, 56), dict(c_out=512, kernel=1, stride=2, padding=0),
     dict(activation=0)),                                               # a downsample projection
    ("fused_conv_bn_act", (128, 64, 56, 56), dict(c_out=256, kernel=1, stride=1, padding=0),
     dict(residual=True)),                                              # a bottleneck's conv3 + residual
    ("fused_conv_bn_act", (128, 128, 28, 28), dict(c_out=128, kernel=3, stride=1, padding=1, groups=32), {}),
]

SCRIPT = r"""
import json, sys
import torch
from vhist.tools.traffic import ROLES, minimum_passes, op_traffic

cases = json.loads(sys.argv[1])
out = []
for op, shape, conv, options in cases:
    options = dict(options)
    if "dtype" in options:
        options["dtype"] = getattr(torch, options["dtype"])
    for mode in ("forward", "backward"):
        t = op_traffic(op, mode, shape, conv=conv, **options)
        out.append(dict(op=op, shape=shape, mode=mode, options=str(options), passes=t.passes,
                        minimum=minimum_passes(op, mode, bool(options.get("residual")), options.get("activation", 1)),
                        kernels=t.passes_by_kernel(), bytes=t.activation_bytes, other=t.other_bytes))

# Every kernel of vhist.kernels has its pointers' roles declared, and only real arguments.
import importlib, inspect, pkgutil
import vhist.kernels
missing = []
for module in pkgutil.iter_modules(vhist.kernels.__path__):
    mod = importlib.import_module(f"vhist.kernels.{module.name}")
    for name, obj in vars(mod).items():
        if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "arg_names"):
            params = set(obj.arg_names)
            if name not in ROLES:
                missing.append(name)
            else:
                missing += [f"{name}.{a}" for a in ROLES[name] if a not in params]
print(json.dumps(dict(traffic=out, missing=missing)))
"""


@pytest.fixture(scope="module")
def traffic():
    return run_recording_script(SCRIPT, json.dumps(CASES))


def _rows(traffic, op, mode):
    rows = [r for r in traffic["traffic"] if r["op"] == op and r["mode"] == mode]
    assert rows, (op, mode)
    return rows


def _assert_at_minimum(rows):
    off = [(r["shape"], r["options"], r["passes"], r["minimum"], r["kernels"]) for r in rows
           if r["passes"] != r["minimum"]]
    assert not off, off


def test_traffic_roles_declared_for_every_kernel(traffic):
    assert traffic["missing"] == []


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("op", ["batch_norm", "local_response_norm", "fused_depthwise_bn_act", "fused_conv_bn_act"])
def test_traffic_at_minimum(traffic, op, mode):
    _assert_at_minimum(_rows(traffic, op, mode))


def test_traffic_depthwise_conv2d_forward_at_minimum(traffic):
    _assert_at_minimum(_rows(traffic, "depthwise_conv2d", "forward"))


def test_traffic_depthwise_conv2d_backward_at_minimum(traffic):
    _assert_at_minimum(_rows(traffic, "depthwise_conv2d", "backward"))


def test_traffic_depthwise_conv2d_backward_design(traffic):
    """The plain depthwise backward (input and weight gradients wanted, no bias): one
    kernel reads dy and x once and writes dx (was two kernels, each reading dy: 4)."""
    for r in _rows(traffic, "depthwise_conv2d", "backward"):
        assert r["passes"] == 3 and r["kernels"] == ["_depthwise_bwd_kernel: DY:r X:r DX:w"], r


def test_traffic_fused_depthwise_backward_passes(traffic):
    """Issue 14 item 3: the fused depthwise + BN + act backward in 8 passes (25 with the
    former taps-outside weight gradient, 9 with separate input- and weight-gradient
    kernels): sums, dz, then both depthwise gradients from one read of dz."""
    rows = [r for r in _rows(traffic, "fused_depthwise_bn_act", "backward") if "residual" not in r["options"]]
    for r in rows:
        assert r["passes"] == 8 and r["kernels"] == [
            "_bn_bwd_reduce_kernel: DY:r X:r", "_bn_bwd_dx_kernel: DY:r X:r DX:w",
            "_depthwise_bwd_kernel: DY:r X:r DX:w"], r
