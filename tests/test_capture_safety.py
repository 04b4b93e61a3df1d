"""A training step of each listed model is CUDA-graph capture-safe (checked on a CPU).

In a subprocess without TRITON_INTERPRET, every Triton launch is recorded instead of run
(vhist.tools.launches; the triton backend, tiny sizes, nothing executes). Per model, a
first step (forward, cross-entropy, backward, gradient clipping and the update that
``vhist train --cuda-graph`` captures: :class:`vhist.train.graph.GraphOptimizerStep`,
SGD with momentum, Nesterov and weight decay) runs freely; the second runs under
:class:`vhist.train.graph.CaptureGuard`, which fails on host synchronizations, copies
between devices and data-dependent shapes (vhist's ops followed into their launchers),
and must leave every module attribute, parameter, buffer and optimizer state tensor as
the first step left it. The guard itself is tested to catch each kind.
"""
import os
import subprocess
import sys

import pytest
import torch

from vhist.train.graph import CaptureGuard, CaptureUnsafe, check_same_state, state_signature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("resnet50", "mobilenet_v2", "alexnet", "inception_v3", "vit_small_patch16")

SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import vhist
from host import make_step_parts
from vhist.tools.launches import record_launches
from vhist.train.graph import CaptureGuard, GraphOptimizerStep, check_same_state, state_signature

for name in sys.argv[2:]:
    model, x, y, size = make_step_parts(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    with record_launches() as rec, vhist.use_backend("triton"):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            update()
        update = opt.step  # the first step creates the momentum buffers, as the eager steps do
        step()
        update = GraphOptimizerStep(opt)
        before = state_signature(model, opt)
        start = len(rec.records)
        with CaptureGuard():
            step()
        check_same_state(before, state_signature(model, opt))
        print(name, size, len(rec.records) - start, "launches: capture-safe", flush=True)
"""


def test_training_steps_are_capture_safe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, "bench"), *MODELS],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.endswith("capture-safe")]
    assert [line.split()[0] for line in lines] == list(MODELS)
    assert all(int(line.split()[2]) > 0 for line in lines)


# SCRIPT on a model with two SyncBatchNorm layers, in one of two gloo processes (rank and
# port from the environment).
SYNC_BN_SCRIPT = r"""
import os
import sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import host
import vhist

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                        rank=int(os.environ["RANK"]), world_size=2)


def sync_bn_net(name):
    torch.manual_seed(0)
    model = vhist.nn.convert_sync_batchnorm(torch.nn.Sequential(
        vhist.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        vhist.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)))
    assert sum(isinstance(m, vhist.nn.SyncBatchNorm) for m in model.modules()) == 2
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    return model.to(memory_format=torch.channels_last), x, torch.tensor([0, 2]), 8


host.make_step_parts = sync_bn_net
""" + SCRIPT


def test_sync_batch_norm_step_is_capture_safe():
    """A training step of a model with two SyncBatchNorm layers on two gloo processes
    (launches recorded, as above): no host synchronization, the statistics exchanged."""
    from train_helpers import free_port

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MASTER_PORT"] = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SYNC_BN_SCRIPT, os.path.join(ROOT, "bench"), "sync_bn_net"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(rank)})
             for rank in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        line = out.strip().splitlines()[-1]
        assert line.startswith("sync_bn_net") and line.endswith("capture-safe") and int(line.split()[2]) > 0, line


@pytest.mark.parametrize("bad, match", [
    # (the step, what the guard names)
    (lambda t: t.sum().item(), "_local_scalar_dense"),
    (lambda t: torch.nonzero(t), "nonzero"),
    (lambda t: t[t > 0], "boolean mask"),
    (lambda t: t.to("meta"), "a copy from cpu to meta"),
])
def test_capture_guard_catches(bad, match):
    t = torch.randn(8)
    with pytest.raises(CaptureUnsafe, match=match), CaptureGuard():
        bad(t)


def test_state_check_catches_a_new_buffer():
    model = torch.nn.Linear(2, 2)
    before = state_signature(model)
    model.register_buffer("extra", torch.zeros(1))
    with pytest.raises(CaptureUnsafe, match="extra"):
        check_same_state(before, state_signature(model))


@pytest.mark.parametrize("nesterov, weight_decay, dampening", [(False, 0.0, 0.0), (True, 1e-2, 0.0),
                                                               (False, 1e-2, 0.5)])
def test_graph_sgd_update_matches_torch_sgd(nesterov, weight_decay, dampening):
    from vhist.train.graph import GraphOptimizerStep

    torch.manual_seed(0)
    ref = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, dampening=dampening)
    opt_ref, opt_ours = torch.optim.SGD(ref, **kw), torch.optim.SGD(ours, **kw)
    update = None
    for step in range(4):
        grads = [torch.randn_like(p) for p in ref]
        for group_params, opt in ((ref, opt_ref), (ours, opt_ours)):
            for p, g in zip(group_params, grads):
                p.grad = g.clone()
            opt.param_groups[0]["lr"] = 0.1 / (step + 1)  # as the schedule sets it
        opt_ref.step()
        if step == 0:
            opt_ours.step()  # the eager step before capture creates the momentum buffers
            update = GraphOptimizerStep(opt_ours)
        else:
            update.refresh()
            update()
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
