"""bench/host.py --quick, and the op-call layer and launch caches it measures.

bench/host.py --quick: one AlexNet training step with every launch recorded instead of
run, in a subprocess without TRITON_INTERPRET (nothing launches, no GPU is needed).

The counts are AlexNet's by construction: 5 convs (with bias, no BatchNorm) and 2 LRNs.
Launches: the first conv is a stem (3 input channels): its input and weight are padded
to 16 channels by one launch each, its input needs no gradient, so it makes the two pads,
forward, wgrad and the dw and db reductions (6); each other conv adds dgrad (5 each,
20); each LRN one forward and one backward (4): 30. Custom-op calls: one forward and one
backward op per conv and per LRN: 14.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_quick_counts_and_timings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [f for f in os.listdir(tmp_path) if f.startswith("host_") and f.endswith(".json")]
    assert len(files) == 1, files
    with open(tmp_path / files[0]) as f:
        data = json.load(f)
    (row,) = data["rows"]
    assert row["model"] == "alexnet" and row["ops"] == "vhist"
    assert row["launches"] == 30
    assert row["custom_op_calls"] == 14
    for key in ("step_ms", "vhist_ms", "triton_bind_ms", "vhist_us_per_launch", "triton_bind_us_per_launch",
                "triton_bind_loop_us_per_launch", "optimizer_ms"):
        assert row[key] > 0, (key, row[key])
    assert row["vhist_ms"] < row["step_ms"]
    assert row["target_met"] == (row["vhist_ms"] <= row["triton_bind_ms"])
    assert "top host functions" in proc.stdout and "own ms" in proc.stdout


def test_eager_op_skips_the_dispatcher_only_in_eager_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from vhist.ops.op_call import REGISTRY, direct_call_allowed

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    op = REGISTRY["vhist::conv2d_fwd"]
    calls = []
    impl = op.impl
    op.impl = lambda *a: calls.append(a) or impl(*a)  # never reached under the mode
    try:
        assert direct_call_allowed()
        x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1)
        with Seen() as seen, torch.device("meta"):
            # Under a dispatch mode the registered op runs (here to its fake, on meta).
            out, _ = op(x.to("meta"), w.to("meta"), None, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, 0, 0.01)
        assert "vhist::conv2d_fwd" in seen.ops and not calls
        assert out.shape == (1, 3, 4, 4)
        # In eager mode the implementation is called directly, with the same arguments.
        op.impl = lambda *a: calls.append(a) or "direct"
        assert op(x, w, None, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, 0) == "direct"
        assert len(calls) == 1 and calls[0][0] is x
    finally:
        op.impl = impl


def test_shape_cached_memoizes_lists_as_tuples_and_never_caches_errors():
    from vhist.ops.launch_cache import clear, shape_cached

    calls = []

    @shape_cached
    def geometry(shape, stride):
        calls.append((shape, stride))
        if stride[0] < 1:
            raise ValueError("stride must be >= 1")
        return shape[0] * stride[0]

    assert geometry((2, 3), [1, 1]) == 2 and geometry((2, 3), [1, 1]) == 2
    assert calls == [((2, 3), (1, 1))]
    for _ in range(2):
        try:
            geometry((2, 3), [0, 1])
        except ValueError:
            pass
    assert len(calls) == 3  # each bad call raised afresh
    clear()
    assert geometry((2, 3), [1, 1]) == 2 and len(calls) == 4


def test_scratch_is_reused_per_thread_and_never_kept_over_the_cap(monkeypatch):
    import threading

    import torch

    from vhist.ops import launch_cache

    store, made = {}, []

    def make(numel=4):
        made.append(numel)
        return (torch.empty(numel), torch.empty(2))

    like = torch.empty(1)
    first = launch_cache.scratch(store, like, make)
    assert launch_cache.scratch(store, like, make) is first and made == [4]
    # Another thread gets a set of its own (the interpreter runs its kernels at once).
    other = []
    thread = threading.Thread(target=lambda: other.append(launch_cache.scratch(store, like, make)))
    thread.start()
    thread.join()
    assert other[0] is not first and made == [4, 4] and len(store) == 2
    # A set over the cap is made every call and never kept.
    big = {}
    monkeypatch.setattr(launch_cache, "SCRATCH_MAX_BYTES", 4 * 4)
    a = launch_cache.scratch(big, like, lambda: make(8))
    b = launch_cache.scratch(big, like, lambda: make(8))
    assert a is not b and not big and made == [4, 4, 8, 8]


def test_reused_partials_give_the_same_statistics_every_call():
    """Two calls of the same BatchNorm and conv + BN shapes reuse their partial buffers
    (statistics partials, merge levels, gradient sums, split-K weight-gradient partials):
    each call's results match the reference, whatever the previous call left there."""
    import torch

    import vhist
    import vhist.ops as ops
    from vhist import reference

    torch.manual_seed(0)
    with vhist.use_backend("triton"):
        for scale in (1.0, -3.0):  # the second call finds the first call's partials in the buffers
            x = (scale * torch.randn(2, 8, 5, 5, dtype=torch.float64)).requires_grad_()
            w = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
            gamma = torch.rand(8, dtype=torch.float64, requires_grad=True)
            beta = torch.randn(8, dtype=torch.float64, requires_grad=True)
            out = ops.fused_conv_bn_act(x, w, gamma, beta, None, None, padding=1)
            ref_inputs = [t.detach().clone().requires_grad_() for t in (x, w, gamma, beta)]
            ref = reference.fused_conv_bn_act(*ref_inputs, None, None, padding=1)
            grad = torch.randn_like(ref)
            torch.testing.assert_close(out, ref)
            grads = torch.autograd.grad(out, (x, w, gamma, beta), grad)
            ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_scratch_on_cuda_is_per_stream_and_fresh_under_graph_capture():
    import torch

    from vhist.ops import launch_cache

    store, made = {}, []

    def make():
        made.append(1)
        return (torch.empty(4, device="cuda"),)

    like = torch.empty(1, device="cuda")
    first = launch_cache.scratch(store, like, make)
    assert launch_cache.scratch(store, like, make) is first and len(made) == 1
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = launch_cache.scratch(store, like, make)
    assert other is not first and len(made) == 2 and len(store) == 2
    # Under capture: fresh tensors from the graph's pool, nothing kept.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launch_cache.scratch(store, like, make)
        captured[0].fill_(1.0)
    assert captured is not first and captured is not other and len(made) == 3 and len(store) == 2


def test_launch_kwargs_config_then_heuristics():
    """What the recorder and bench/host.py hand Triton's binder for one launch: the launch's
    own keywords without ``grid`` and ``warmup``, then the autotune config's, then each
    ``triton.heuristics`` value computed from the arguments and what came before."""
    import triton

    from vhist.tools.launches import launch_kwargs

    class Heuristics:  # the two attributes of triton.runtime.autotuner.Heuristics the recorder reads
        arg_names = ["X", "n"]
        values = {"EVEN": lambda nargs: nargs["n"] % nargs["BLOCK"] == 0}

    config = triton.Config({"BLOCK": 32}, num_warps=8, num_stages=2)
    kwargs = {"grid": (1,), "warmup": False, "ACC": "fp32"}
    out = launch_kwargs(("x", 64), kwargs, config, [Heuristics()])
    assert out["ACC"] == "fp32" and out["BLOCK"] == 32 and out["num_warps"] == 8 and out["num_stages"] == 2
    assert out["EVEN"] is True
    assert "grid" not in out and "warmup" not in out
    assert kwargs == {"grid": (1,), "warmup": False, "ACC": "fp32"}  # the launch's own dict is left as it was
    assert launch_kwargs(("x", 48), kwargs, triton.Config({"BLOCK": 32}), [Heuristics()])["EVEN"] is False
    assert launch_kwargs(("x", 48), kwargs) == {"ACC": "fp32"}


def test_host_floor_makes_the_same_launches(tmp_path):
    """bench/host.py --floor --quick: AlexNet's convs on the floor op (launchers and autograd
    only) make the same 30 launches as the real ops; only the LRNs' 4 custom-op calls are
    left."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host.py"), "--quick", "--floor",
                           "--no-profile", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert name.startswith("host_floor_")
    with open(tmp_path / name) as f:
        (row,) = json.load(f)["rows"]
    assert (row["model"], row["ops"], row["launches"], row["custom_op_calls"]) == ("alexnet", "floor", 30, 4)
    assert 0 < row["vhist_ms"] < row["step_ms"]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host.py"), "--floor", "--models", "resnet50"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--floor stands in for plain convs" in bad.stderr
