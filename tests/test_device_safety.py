"""Several devices in one process (issue 22 item 7): every launch plan and scratch set is
keyed by the device, and every Triton launch runs with its tensors' device current.

Without a GPU, two devices are the CPU and the meta device: the launchers run on both
with launches recorded instead of run (vhist.tools.launches; meta tensors have
addresses too), and every recorded launch must take all its tensors from one device.
The GPU test runs the ops on cuda:1 while cuda:0 is current."""
import pytest
import torch

import vhist
from vhist.ops import launch_cache

from conftest import DEVICE
from utils import assert_close, run_recording_script

RECORD_SCRIPT = r"""
import importlib, json, torch
from vhist.ops import launch_cache
# The modules (vhist.ops.batch_norm and others are also the ops' names).
bn_ops, conv_ops, dw_ops, lrn_ops = (importlib.import_module(f"vhist.ops.{name}") for name in
                                     ("batch_norm", "conv", "depthwise", "local_response_norm"))
from vhist.kernels import local_response_norm as lrn_kernels
from vhist.tools.launches import record_launches

def t(*shape, device):
    x = torch.empty(*shape, device=device)
    return x.to(memory_format=torch.channels_last) if len(shape) == 4 else x

def layers(device):
    # Depthwise (3x3, the fused op's passes and the plain op's), batch 2: statistics
    # partials, the weight gradient's partials and merge levels are scratch.
    x, w = t(2, 16, 12, 12, device=device), torch.empty(16, 1, 3, 3, device=device)
    geom = dw_ops.depthwise_geometry(x.shape, w.shape, 1, 1, 1)
    y, partials = dw_ops.FUSED_PASSES.forward_with_stats(x, w, geom)
    stats = torch.empty(16, device=device), torch.empty(16, device=device)
    mean, rstd = bn_ops.bn_finalize(*partials, *stats, 0.1, 1e-5)
    bn_ops.bn_grad_sums(t(*y.shape, device=device), y, mean, rstd, *stats, 1e-5, activation=1,
                        want_dweight=True, want_dbias=True)
    dw_ops.FUSED_PASSES.grad_input_and_weight(t(*y.shape, device=device), x, w, geom)
    dw_ops.FUSED_PASSES.grad_input(t(*y.shape, device=device), x, w, geom)
    dw_ops.FUSED_PASSES.grad_weight(t(*y.shape, device=device), x, w, geom)
    # Dense conv (3x3 and the RGB stem path), forward with statistics, dgrad, wgrad.
    for c_in in (8, 3):
        x, w = t(2, c_in, 12, 12, device=device), t(16, c_in, 3, 3, device=device)
        geom = conv_ops.FUSED_PASSES.geometry(x.shape, w.shape, [1, 1], [1, 1, 1, 1], [1, 1], 1)
        y, partials = conv_ops.FUSED_PASSES.forward_with_stats(x, w, geom)
        conv_ops.FUSED_PASSES.grad_input(t(*y.shape, device=device), x, w, geom)
        conv_ops.FUSED_PASSES.grad_weight(t(*y.shape, device=device), x, w, geom)
    # LRN forward and backward.
    x = t(2, 16, 12, 12, device=device)
    lrn_ops._launch(lrn_kernels.lrn_fwd, (x, torch.empty_like(x)), 5, 1e-4, 0.75, 2.0, x)
    lrn_ops._launch(lrn_kernels.lrn_bwd, (x, torch.empty_like(x), torch.empty_like(x)), 5, 1e-4, 0.75, 2.0, x)

with record_launches() as rec:
    for device in ("cpu", "meta"):
        with rec.scope(device=device):
            layers(device)
    # Every plan in a launch cache: the keys it is stored under.
    plans = []
    for cache in launch_cache._CACHES:
        for key, value in cache.items():
            launches = [v for v in (value if isinstance(value, tuple) else (value,))
                        if isinstance(v, launch_cache.Launch) or hasattr(v, "scratch")]
            if launches:
                plans.append(dict(kind=type(launches[0]).__name__, key=str(key),
                                  devices=sorted({str(k) for k in key if isinstance(k, torch.device)})))
out = [dict(kernel=r.kernel, labelled=r.labels.get("device"),
            devices=sorted({a.device for a in r.pointers()})) for r in rec.records]
print(json.dumps(dict(launches=out, plans=plans)))
"""


@pytest.fixture(scope="module")
def recorded():
    return run_recording_script(RECORD_SCRIPT)


def test_device_every_launch_takes_its_tensors_from_one_device(recorded):
    """The same layers on two devices: each launch's tensors (inputs, outputs, scratch)
    are all on the device of the call. On one shared plan the second device's launches
    got the first's scratch (the depthwise forward's statistics partials)."""
    launches = recorded["launches"]
    by_device = {d: [r["kernel"] for r in launches if r["labelled"] == d] for d in ("cpu", "meta")}
    assert by_device["cpu"] == by_device["meta"] and len(by_device["cpu"]) >= 20, by_device
    assert "_depthwise_bwd_weight_finalize_kernel" in by_device["cpu"]
    mixed = [r for r in launches if r["devices"] != [r["labelled"]]]
    assert not mixed, mixed[:5]


def test_device_every_plan_key_holds_the_device(recorded):
    plans = recorded["plans"]
    assert len(plans) >= 10, plans
    missing = [p for p in plans if len(p["devices"]) != 1]
    assert not missing, missing[:5]


def test_device_scratch_is_per_device():
    """The scratch slot holds the device: the same plan's store gives each device a set
    of its own (on CUDA the default stream's handle is 0 on every device)."""
    store = {}
    sets = {d: launch_cache.scratch(store, torch.empty(1, device=d), lambda d=d: (torch.empty(2, device=d),))
            for d in ("cpu", "meta")}
    assert sets["cpu"][0].device.type == "cpu" and sets["meta"][0].device.type == "meta" and len(store) == 2
    assert launch_cache.scratch(store, torch.empty(1), lambda: (torch.empty(2),)) is sets["cpu"]


class _OnDevice1(torch.Tensor):
    """A CPU tensor that says it lives on CUDA device 1 (what the launch guard reads)."""

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 1


def test_device_launch_runs_with_the_tensors_device_current(monkeypatch):
    """A Launch makes its first tensor's CUDA device current around the launch, and only
    when another one is current (no guard on the usual path)."""
    current, seen = [0], []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    class Kernel:
        def run(self, *args, **kwargs):
            seen.append(current[-1])

    monkeypatch.setattr(launch_cache, "current_cuda_index", lambda: current[-1])
    monkeypatch.setattr(launch_cache, "cuda_device", Guard)
    launch = launch_cache.Launch(Kernel(), (1,), (4,))
    x = torch.empty(4)
    launch(x.as_subclass(_OnDevice1))
    launch(x.as_subclass(_OnDevice1))  # the resolved runner takes the same path
    current[0] = 1
    launch(x.as_subclass(_OnDevice1))
    launch(x)  # a CPU tensor: no guard
    assert seen == [1, 1, 1, 1] and current == [1], seen


@pytest.mark.gpu
def test_device_ops_on_the_second_gpu():
    """The ops on cuda:1 while cuda:0 is current: the results match the reference (a
    launch on the wrong device would fault or read another device's scratch), and the
    current device is unchanged afterwards."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 16, 12, 12, generator=gen).to(dev, memory_format=torch.channels_last)
    w_dw = torch.randn(16, 1, 3, 3, generator=gen).to(dev)
    w = torch.randn(16, 16, 3, 3, generator=gen).to(dev)
    gamma, beta = torch.rand(16, generator=gen).add(0.5).to(dev), torch.randn(16, generator=gen).to(dev)
    cases = {
        "fused_depthwise_bn_act": (lambda x, w: vhist.ops.fused_depthwise_bn_act(
            x, w, gamma, beta, None, None, padding=1), lambda x, w: vhist.reference.fused_depthwise_bn_act(
            x, w, gamma, beta, None, None, padding=1), w_dw),
        "fused_conv_bn_act": (lambda x, w: vhist.ops.fused_conv_bn_act(
            x, w, gamma, beta, None, None, padding=1), lambda x, w: vhist.reference.fused_conv_bn_act(
            x, w, gamma, beta, None, None, padding=1), w),
    }
    for name, (op, ref, weight) in cases.items():
        for _ in range(2):  # the second call reuses the plans and scratch
            xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
            xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
            with vhist.use_backend("triton"):
                y = op(xs, ws)
            y_ref = ref(xr, wr)
            dy = torch.randn(y.shape, generator=gen).to(dev)
            y.backward(dy)
            y_ref.backward(dy)
            assert y.device == dev and torch.cuda.current_device() == 0
            assert_close(y, y_ref, name=f"{name} output", atol=1e-3, rtol=1e-3)
            assert_close(xs.grad, xr.grad, name=f"{name} grad_input", atol=1e-3, rtol=1e-3)
            assert_close(ws.grad, wr.grad, name=f"{name} grad_weight", atol=1e-2, rtol=1e-3)
