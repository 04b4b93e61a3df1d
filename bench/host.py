"""Host cost of a training step: what vhist's Python costs before its kernels start (no GPU).

For each model, one training step (forward, cross-entropy, backward, SGD with momentum
0.9) runs on the triton backend with CPU tensors and every Triton launch recorded instead
of run (:func:`vhist.tools.launches.record_launches`: nothing is compiled or executed).
The same run then times Triton's own per-launch binding on the launches it captured.
Reported per model:

* ``step_ms``: host wall time of the step, less the recorder's own time (everything
  inside the patched launch entry points, the autotuner's config pruning included,
  which a GPU runs once per tuning key, not per launch);
* ``launches`` and ``custom_op_calls`` per step (the ``vhist::*`` ops, counted in a
  separate untimed step under a dispatch mode);
* ``vhist_ms`` and ``vhist_us_per_launch``: time spent inside vhist's ops (every public
  op of :mod:`vhist.ops` called from outside vhist, and the ``backward`` of every vhist
  autograd Function), less the recorder's time inside them: checks, geometry, dispatch,
  custom-op calls, allocation, grids and the launchers' own arithmetic;
* ``triton_bind_ms`` and ``triton_bind_us_per_launch``: on the arguments of each launch,
  timed first thing in the recorder's entry point, before the recorder describes the
  launch (inside the step, so under the same cache state and machine load as vhist's own
  code, as a GPU launch would run straight after it), what ``JITFunction.run`` does before the driver
  launch: the driver's device and stream queries, the kernel's generated binder (argument
  binding and runtime specialization), the cache-key lookup and the grid evaluation, for
  the config the autotuner would run (its own dispatch and the C launch itself are not
  counted, so this is a lower bound of Triton's cost); ``triton_bind_loop_us_per_launch``
  is the same over the captured launches replayed in a tight loop (warm caches, best of
  three passes);
* ``optimizer_ms``: the SGD update alone (timed apart: on a CPU it includes the update's
  arithmetic, which a GPU does asynchronously).

On CPU tensors the autotuned kernels' on-disk pick lookup
(``kernels/_config.py``, CUDA only) is not exercised; it keeps its picks in memory
after the first lookup of each key.

Only host work is timed: the inputs are batch 2 at each model's smallest input size that
keeps its full architecture (the registry's ``small_below``, 64 for the ViT), in fp32
(no autocast: its weight casts would be CPU copies of every weight, each step), so the
CPU compute of the aten ops outside vhist (pooling, linear, loss) is small, and vhist's
kernels never run. Launch counts and the launchers' work do not depend on the
spatial size, except where a grid or split count does (the SM count seen is 132, an
H100/H200). The first step (autotune shortlists, caches) is not timed; each figure is
the best of ``--repeat`` steps, each with Python's cyclic garbage collector paused (Triton's binding: the best of three passes), since the
load of a shared machine only ever adds time. Times are those of this machine, whose load they
follow: compare vhist and Triton figures of the same run only.

``--floor`` measures the least host time a Python autograd op can take for the same
launches: every conv of AlexNet and of the ViT (plain convs, with bias and ReLU epilogue,
no BatchNorm) runs :class:`FloorConv2d`, an autograd Function that calls the conv's
launchers and nothing else (no checks, dispatch, custom-op layer or autocast). Same
launches, same columns (``ops`` says ``floor``), written as ``host_floor_*``.

Outputs bench/results/host_<device>_<date>.{json,csv} (bench/common.py) and, per model,
the ten host functions with the largest own time (cProfile of one step, the
recorder's frames left out).

    python bench/host.py [--models resnet50,mobilenet_v2] [--repeat 5] [--quick] [--floor] [--out DIR]
"""
import argparse
import cProfile
import contextlib
import functools
import gc
import os
import pstats
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    sys.exit("host.py records launches instead of running them: run it without TRITON_INTERPRET=1 (no GPU needed)")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vhist  # noqa: E402
import vhist.nn.functional  # noqa: E402
import vhist.ops  # noqa: E402
from common import metadata, report  # noqa: E402
from vhist.ops.common import ACTIVATION_CODES, to_channels_last  # noqa: E402
from vhist.ops.conv import conv_backward, conv_fwd_launch, conv_geometry  # noqa: E402
from vhist.tools.compile_report import sm90_driver  # noqa: E402
from vhist.tools.launches import launch_kwargs, record_launches  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "alexnet", "inception_v3", "vit_small_patch16")
QUICK_MODELS = ("alexnet",)
FLOOR_MODELS = ("alexnet", "vit_small_patch16")  # their vhist convs are all plain (no BatchNorm)
BATCH = 2
COLUMNS = ["model", "ops", "image_size", "launches", "custom_op_calls", "step_ms", "vhist_ms", "triton_bind_ms",
           "vhist_us_per_launch", "triton_bind_us_per_launch", "triton_bind_loop_us_per_launch", "vhist_over_triton",
           "optimizer_ms", "target_met"]


class _OpCounter(TorchDispatchMode):
    """Counts the ``vhist::*`` custom-op calls that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == "vhist":
            self.calls += 1
        return func(*args, **(kwargs or {}))


class HostTimer:
    """Accumulates the host time spent inside vhist's ops and inside the launch recorder.

    Wraps, for the duration of :meth:`installed`, every public op of :mod:`vhist.ops`
    wherever a ``vhist`` module bound it, and the ``backward`` of every vhist autograd
    Function; only the outermost vhist frame is timed. The recorder's entry points
    (``JITFunction.run``, ``Autotuner.run``, ``Heuristics.run`` as patched) are timed
    too, so that their time can be taken out, and each launch's call is kept for
    :func:`triton_binding_ns`.
    """

    def __init__(self, recorder, extra_spans=(), extra_functions=()):
        self.recorder = recorder
        self.extra_spans = extra_spans  # (owner, attribute) of further vhist entry points to time
        self.extra_functions = extra_functions  # further autograd Functions whose backward to time
        self.depth = 0
        self.vhist_ns = 0
        self.record_ns = 0
        self.outside = 0  # launches made outside a timed vhist frame (must stay 0)
        self.bind_ns = 0  # Triton's binding of each launch, timed as it reaches the recorder
        self.calls = []  # (JITFunction, args, kwargs, grid) per launch: bind_once_ns arguments

    def _span(self, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.vhist_ns += time.perf_counter_ns() - start
                self.depth -= 1

        return timed

    def _recorder_span(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.record_ns += time.perf_counter_ns() - start

        return timed

    @contextlib.contextmanager
    def installed(self):
        saved = []
        public = {name: getattr(vhist.ops, name) for name in vhist.ops.__all__ if callable(getattr(vhist.ops, name))
                  and not isinstance(getattr(vhist.ops, name), type)}
        for modname, module in list(sys.modules.items()):
            if module is None or not modname.startswith("vhist"):
                continue
            for name, fn in public.items():
                if getattr(module, name, None) is fn:
                    saved.append((module, name, fn))
                    setattr(module, name, self._span(fn))
        functions = {cls for modname, module in list(sys.modules.items())
                     if module is not None and modname.startswith("vhist.ops")
                     for cls in vars(module).values()
                     if isinstance(cls, type) and issubclass(cls, torch.autograd.Function)
                     and cls.__module__.startswith("vhist.") and "backward" in cls.__dict__}
        for owner, attr in self.extra_spans:
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, self._span(getattr(owner, attr)))
        for cls in {*functions, *self.extra_functions}:
            saved.append((cls, "backward", cls.__dict__["backward"]))
            cls.backward = staticmethod(self._span(cls.__dict__["backward"].__func__))
        original = self.recorder._record

        def record(fn, args, kwargs, configs, autotuned, heuristics=()):
            # Triton's binding of this very launch, timed first, as a GPU launch would run it
            # straight after vhist's code: under the same cache state and machine load, before
            # the recorder's own description of the launch touches its arguments.
            bind_call = (fn, args, launch_kwargs(args, kwargs, configs[0], heuristics), kwargs["grid"])
            with sm90_driver():
                self.bind_ns += bind_once_ns(*bind_call)
            original(fn, args, kwargs, configs, autotuned, heuristics)
            self.calls.append(bind_call)
            self.outside += not self.depth

        self.recorder._record = record
        # The recorder's time is everything inside the patched launch entry points,
        # the autotuner's config pruning included (on a GPU it runs once per key).
        import triton.runtime.autotuner as autotuner
        import triton.runtime.jit as jit

        for owner in (jit.JITFunction, autotuner.Autotuner, autotuner.Heuristics):
            saved.append((owner, "run", owner.run))
            owner.run = self._recorder_span(owner.run)
        try:
            yield self
        finally:
            del self.recorder._record
            for owner, name, value in reversed(saved):
                setattr(owner, name, value)

    def reset(self):
        self.vhist_ns = self.record_ns = self.outside = self.bind_ns = 0
        self.calls = []


@functools.lru_cache(maxsize=None)
def run_knob_names() -> tuple:
    """The compilation knobs this triton's ``JITFunction.run`` adds to a launch's options
    (triton 3.6 has no ``fpsan_homomorphic_casts``; 3.9 adds it)."""
    from triton import knobs

    return tuple(name for name in ("instrumentation_mode", "fpsan_homomorphic_casts")
                 if hasattr(knobs.compilation, name))


def bind_once_ns(fn, args, kwargs, grid) -> int:
    """Host ns of Triton's launch path before the driver call for one launch of ``fn`` with
    ``args`` and the keyword arguments ``kwargs`` (:func:`vhist.tools.launches.launch_kwargs`)
    (see the module docstring); the stand-in sm_90 driver must be active."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key

    names = run_knob_names()
    start = time.perf_counter_ns()
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  **{name: getattr(knobs.compilation, name) for name in names})
    device = driver.active.get_current_device()
    driver.active.get_current_stream(device)
    kernel_cache, key_cache, _, _, binder = fn.device_caches[device]
    bound, specialization, options = binder(*args, **kwargs)
    kernel_cache.get(compute_cache_key(key_cache, specialization, options))
    if callable(grid):
        grid(bound)
    return time.perf_counter_ns() - start


def triton_binding_ns(calls) -> int:
    """:func:`bind_once_ns` summed over ``calls`` (its arguments, one tuple per launch) in a
    tight loop, best of three passes after one warm-up pass (warm caches: a lower bound)."""
    best = None
    with sm90_driver():
        for _ in range(4):
            total = sum(bind_once_ns(*call) for call in calls)
            best = total if best is None else min(best, total)
    return best


class FloorConv2d(torch.autograd.Function):
    """The host-cost floor of a conv2d op (``--floor``): an autograd Function that calls
    the conv's launchers (:func:`vhist.ops.conv.conv_fwd_launch` and
    :func:`~vhist.ops.conv.conv_backward`: their cached plan per key, the allocation of
    what they return, the launches) and nothing else: no argument checks, no backend
    dispatch, no custom-op layer, no autocast."""

    @staticmethod
    def forward(ctx, input, weight, bias, geometry, activation):
        out, _ = conv_fwd_launch(input, weight, bias, None, geometry, activation, stats=False)
        ctx.save_for_backward(input, weight, out if activation else None)
        ctx.geometry, ctx.activation = geometry, activation
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight, out = ctx.saved_tensors
        want_dx, want_dw, want_db = ctx.needs_input_grad[:3]
        dx, dw, db, _, _ = conv_backward(grad, input, weight, out, ctx.geometry, ctx.activation, want_dx, want_dw,
                                         want_db)
        return dx, dw, db, None, None


def floor_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
                 residual=None):
    """:func:`vhist.nn.functional.conv2d` on :class:`FloorConv2d` (``--floor``)."""
    if residual is not None:
        raise NotImplementedError("--floor stands in for convs without a residual epilogue")
    geometry = conv_geometry("conv2d", input.shape, weight.shape, stride, padding, dilation, groups)
    return FloorConv2d.apply(to_channels_last(input), weight, bias, geometry, ACTIVATION_CODES[activation])


@contextlib.contextmanager
def floor_convs():
    """Every :class:`vhist.nn.Conv2d` call goes to :func:`floor_conv2d` for the block;
    yields the :class:`HostTimer` arguments that time it."""
    saved = vhist.nn.functional.conv2d
    vhist.nn.functional.conv2d = floor_conv2d
    try:
        yield dict(extra_spans=[(vhist.nn.functional, "conv2d")], extra_functions=[FloorConv2d])
    finally:
        vhist.nn.functional.conv2d = saved


def make_step_parts(name: str):
    """``(model, input, labels, size)`` of ``name`` in training mode: batch 2 at the
    smallest size that keeps the full architecture, fp32, channels_last."""
    torch.manual_seed(0)
    config = vhist.models.model_config(name)
    size = max(config.small_below, 32)
    size += -size % 16 if name.startswith("vit") else 0
    model = vhist.create_model(name, image_size=size).to(memory_format=torch.channels_last).train()
    x = torch.randn(BATCH, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,))
    return model, x, y, size


def make_step(name: str):
    """A training step of ``name`` (:func:`make_step_parts`, SGD with momentum), its
    optimizer and its input size."""
    model, x, y, size = make_step_parts(name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt, size


def measure_model(name: str, repeat: int, profile_top: int = 10, floor: bool = False) -> tuple[dict, str]:
    """The row of ``name`` and its cProfile summary; with ``floor``, its plain convs run
    :func:`floor_conv2d`."""
    step, opt, size = make_step(name)
    with floor_convs() if floor else contextlib.nullcontext({}) as timer_args:
        row, top = _measure(name, step, opt, size, repeat, profile_top, timer_args)
    row["ops"] = "floor" if floor else "vhist"
    return row, top


def _measure(name, step, opt, size, repeat, profile_top, timer_args) -> tuple[dict, str]:
    with record_launches() as recorder, vhist.use_backend("triton"):
        step()  # autotune shortlists, lru caches, Triton binders: not timed
        counter = _OpCounter()
        with counter:
            step()
        samples = []
        with HostTimer(recorder, **timer_args).installed() as timer:
            for _ in range(repeat):
                timer.reset()
                # Records of earlier steps are dropped and the cyclic collector paused: a
                # collection pass over thousands of records would land in a random frame.
                del recorder.records[:]
                gc.collect()
                gc.disable()
                launches = len(recorder.records)
                start = time.perf_counter_ns()
                try:
                    step()
                finally:
                    wall = time.perf_counter_ns() - start
                    gc.enable()
                if timer.outside:
                    raise RuntimeError(f"{name}: {timer.outside} launches outside the timed vhist frames")
                samples.append((wall - timer.record_ns, timer.vhist_ns - timer.record_ns,
                                len(recorder.records) - launches, list(timer.calls), timer.bind_ns))
            calls = samples[-1][3]
        launches = samples[-1][2]
        loop_ns = triton_binding_ns(calls)
        grads = [p for p in opt.param_groups[0]["params"]]
        step()  # leaves gradients to time the optimizer alone
        opt_ns = []
        for p in grads:
            p.grad = torch.zeros_like(p)
        for _ in range(repeat):
            start = time.perf_counter_ns()
            opt.step()
            opt_ns.append(time.perf_counter_ns() - start)
        opt.zero_grad(set_to_none=True)
        profiler = cProfile.Profile()
        profiler.enable()
        step()
        profiler.disable()
    # Best of the timed steps: the load of a shared machine only ever adds to a step.
    step_ms = min(s[0] for s in samples) / 1e6
    vhist_ms = min(s[1] for s in samples) / 1e6
    bind_ms = min(s[4] for s in samples) / 1e6
    loop_ms = loop_ns / 1e6
    row = {"model": name, "batch": BATCH, "image_size": size, "dtype": "fp32", "layout": "channels_last",
           "launches": launches, "custom_op_calls": counter.calls, "step_ms": step_ms, "vhist_ms": vhist_ms,
           "triton_bind_ms": bind_ms, "vhist_us_per_launch": vhist_ms * 1e3 / launches,
           "triton_bind_us_per_launch": bind_ms * 1e3 / launches,
           "triton_bind_loop_us_per_launch": loop_ms * 1e3 / launches, "vhist_over_triton": vhist_ms / bind_ms,
           "optimizer_ms": min(opt_ns) / 1e6, "target_met": vhist_ms <= bind_ms}
    return row, top_functions(profiler, profile_top)


# The recorder's frames (and inspect's, which only it calls) stand in for the driver
# launch and are left out of the profile.
_RECORDER_FILES = (os.path.join("vhist", "tools", "launches.py"), os.sep + "inspect.py", os.path.basename(__file__))


def top_functions(profiler: cProfile.Profile, top: int) -> str:
    """The ``top`` functions with the largest own time, recorder frames left out."""
    stats = pstats.Stats(profiler).stats
    rows = sorted(((tt, nc, ct, key) for key, (_, nc, tt, ct, _) in stats.items()
                   if not any(key[0].endswith(f) or f in key[0] for f in _RECORDER_FILES)), reverse=True)[:top]
    lines = [f"{'calls':>8} {'own ms':>9} {'cum ms':>9}  function"]
    for tt, nc, ct, (file, line, func) in rows:
        where = f"{os.path.relpath(file) if os.path.isabs(file) else file}:{line}({func})"
        lines.append(f"{nc:>8} {tt * 1e3:>9.2f} {ct * 1e3:>9.2f}  {where}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per model (best of)")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)} only, 2 timed steps")
    parser.add_argument("--no-profile", action="store_true", help="skip printing the profiles")
    parser.add_argument("--floor", action="store_true",
                        help=f"plain convs on FloorConv2d (launchers and autograd only): {', '.join(FLOOR_MODELS)}")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    names = list(QUICK_MODELS) if args.quick else [n.strip() for n in args.models.split(",") if n.strip()]
    if args.floor and not args.quick and args.models == parser.get_default("models"):
        names = list(FLOOR_MODELS)
    unknown = [n for n in names if n not in vhist.list_models()]
    if unknown:
        parser.error(f"unknown models {unknown}")
    if args.floor and set(names) - set(FLOOR_MODELS):
        parser.error(f"--floor stands in for plain convs: the models made of them are {', '.join(FLOOR_MODELS)}")
    repeat = 2 if args.quick else max(1, args.repeat)
    meta = metadata()
    meta.update(device=f"cpu host ({os.cpu_count()} cores), launches recorded, not run",
                kind="host cost, launches recorded", sm_count_seen=132)
    rows = []
    for name in names:
        row, top = measure_model(name, repeat, floor=args.floor)
        rows.append(row)
        if not args.no_profile:
            print(f"\n{name}: top host functions (own time, one step)\n{top}")
    report("host_floor" if args.floor else "host", meta, rows, COLUMNS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
