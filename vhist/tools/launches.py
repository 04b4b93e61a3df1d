"""Record every Triton kernel launch instead of running it.

Inside :func:`record_launches`, ``JITFunction.run`` (plain ``kernel[grid](...)`` launches
and those under ``triton.heuristics``) and ``Autotuner.run`` (``triton.autotune``) are
replaced by a recorder: each launch becomes a :class:`LaunchRecord` holding the kernel,
its grid, every argument (tensors as shape, strides, dtype and 16-byte alignment; ints
with the two properties Triton's runtime specializes on, divisibility by 16 and
equality to 1), the constexprs, and for autotuned kernels every config the autotuner
could pick after its own pruning, each with its grid. Nothing is compiled or run, so
the launchers can be driven with CPU tensors at full size on a machine without a GPU
(outputs stay uninitialized; only shapes, strides, dtypes and alignment matter).

Two things are adjusted for the duration, both so that the launchers behave as they
would on the GPU the records stand for:

* the triton backend's guard against CPU tensors outside the interpreter
  (``vhist.kernels._config.INTERPRETED`` and ``vhist.ops._dispatch.triton_cpu_ready``)
  is lifted: no CPU tensor reaches a kernel;
* every ``sm_count`` / ``_sm_count`` helper of the loaded ``vhist`` modules returns
  ``sm_count`` (default 132, an H100/H200 SXM), since grids, split counts and chunkings
  are sized from it.

Each record keeps the pointer arguments with their shapes and dtypes and a host
timestamp, so the same records serve per-launch host-cost and per-pointer traffic
estimates.
"""
from __future__ import annotations

import contextlib
import importlib
import functools
import inspect
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

H100_SM_COUNT = 132


@dataclass(frozen=True)
class ArgRecord:
    """One non-constexpr kernel argument as the launch passed it.

    ``kind`` is ``"pointer"`` (a tensor), ``"int"``, ``"float"``, ``"bool"`` or
    ``"none"``. Pointers carry ``shape``, ``strides`` (elements), ``dtype``,
    ``itemsize``, ``storage_offset``, ``aligned16`` (data pointer divisible by 16) and
    ``device`` (e.g. ``"cuda:1"``); ints carry ``value``, ``div16`` and ``eq1``.
    """

    name: str
    kind: str
    value: Any = None
    shape: Optional[tuple] = None
    strides: Optional[tuple] = None
    dtype: Optional[str] = None
    itemsize: int = 0
    storage_offset: int = 0
    aligned16: bool = False
    device: Optional[str] = None
    div16: bool = False
    eq1: bool = False

    @property
    def specialization(self) -> str:
        """Triton's runtime key for this argument: ``*<dtype>[:16]`` for a pointer,
        ``1``, ``i32:16``/``i64:16`` or ``i32``/``i64`` for an int, the type otherwise."""
        if self.kind == "pointer":
            return f"*{self.dtype}" + (":16" if self.aligned16 else "")
        if self.kind == "int":
            if self.eq1:
                return "1"
            width = "i32" if -2**31 <= self.value < 2**31 else "i64"
            return width + (":16" if self.div16 else "")
        return self.kind

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "spec": self.specialization}
        if self.kind == "pointer":
            out.update(shape=list(self.shape), strides=list(self.strides), dtype=self.dtype,
                       itemsize=self.itemsize, storage_offset=self.storage_offset, aligned16=self.aligned16,
                       device=self.device)
        elif self.value is not None:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class LaunchConfig:
    """Compile options of one candidate: its constexprs and launch options."""

    kwargs: tuple  # ((name, value), ...) constexprs the config sets
    num_warps: int = 4
    num_stages: int = 3
    num_ctas: int = 1
    maxnreg: Optional[int] = None

    def options(self) -> dict:
        out = {"num_warps": self.num_warps, "num_stages": self.num_stages, "num_ctas": self.num_ctas}
        if self.maxnreg is not None:
            out["maxnreg"] = self.maxnreg
        return out

    def label(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{blocks} w{self.num_warps} s{self.num_stages}".strip()


@dataclass
class LaunchRecord:
    """One recorded launch: the kernel, its arguments and the configs it may run with.

    ``candidates`` pairs each config that can be picked with its grid; a plain launch
    has exactly one candidate. ``labels`` are those of the enclosing
    :meth:`LaunchRecorder.scope` calls (op, layer, ...).
    """

    kernel: str
    fn: Any  # the JITFunction
    args: list[ArgRecord]
    constexprs: dict
    candidates: list[tuple[LaunchConfig, tuple]]
    autotuned: bool
    labels: dict = field(default_factory=dict)
    t_ns: int = 0

    def pointers(self) -> list[ArgRecord]:
        """The tensor arguments, in signature order."""
        return [a for a in self.args if a.kind == "pointer"]

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "labels": dict(self.labels), "autotuned": self.autotuned,
                "args": [a.to_json() for a in self.args],
                "constexprs": {k: _jsonable(v) for k, v in self.constexprs.items()},
                "candidates": [{"config": c.label(), "grid": list(g)} for c, g in self.candidates]}


def _jsonable(value):
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def _torch_dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
             torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
             torch.bool: "i1"}
    if dtype not in names:
        raise TypeError(f"no Triton pointer type for tensor dtype {dtype}")
    return names[dtype]


def describe_arg(name: str, value) -> ArgRecord:
    """The :class:`ArgRecord` of one launch argument."""
    if isinstance(value, torch.Tensor):
        return ArgRecord(name, "pointer", shape=tuple(value.shape), strides=tuple(value.stride()),
                         dtype=_torch_dtype_name(value.dtype), itemsize=value.element_size(),
                         storage_offset=value.storage_offset(), aligned16=value.data_ptr() % 16 == 0,
                         device=str(value.device))
    if isinstance(value, bool):
        return ArgRecord(name, "bool", value=value)
    if isinstance(value, int):
        return ArgRecord(name, "int", value=value, div16=value % 16 == 0, eq1=value == 1)
    if isinstance(value, float):
        return ArgRecord(name, "float", value=value)
    if value is None:
        return ArgRecord(name, "none")
    raise TypeError(f"cannot record kernel argument {name!r} of type {type(value).__name__}")


def _config_of(config) -> LaunchConfig:
    return LaunchConfig(tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages,
                        getattr(config, "num_ctas", 1) or 1, getattr(config, "maxnreg", None))


@functools.lru_cache(maxsize=None)
def _parameters(kernel_fn) -> tuple:
    """The parameters of a ``@triton.jit`` function's Python function (read once per
    kernel: ``inspect.signature`` builds a Parameter object per argument, about 150 µs a
    conv kernel, which would dominate the recorder's own time)."""
    return tuple(inspect.signature(kernel_fn).parameters.values())


def _split(fn, args, kwargs):
    """(non-constexpr ArgRecords, constexpr values, launch options) of a call of ``fn``."""
    params = _parameters(fn.fn)
    names = [p.name for p in params]
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    records, constexprs = [], {}
    for p, kp in zip(params, fn.params):
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: argument {p.name!r} not given")
            bound[p.name] = p.default
        if kp.is_constexpr:
            constexprs[p.name] = bound[p.name]
        else:
            records.append(describe_arg(p.name, bound[p.name]))
    return records, constexprs, options, bound


def launch_kwargs(args: tuple, kwargs: dict, config=None, heuristics=()) -> dict:
    """The keyword arguments the ``JITFunction`` of a launch receives: the launch's own
    (``grid`` and ``warmup`` left out), then those of the autotune ``config`` (None for a
    plain launch), then the values of the ``triton.heuristics`` wrappers, outermost first."""
    call_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    if config is not None:
        call_kwargs.update(config.all_kwargs())
    for heur in heuristics:
        for name, rule in heur.values.items():
            call_kwargs[name] = rule({**dict(zip(heur.arg_names, args)), **call_kwargs})
    return call_kwargs


def _eval_grid(grid, meta) -> tuple:
    g = grid(meta) if callable(grid) else grid
    g = tuple(int(x) for x in g)
    return g + (1,) * (3 - len(g))


class LaunchRecorder:
    """Collects :class:`LaunchRecord` objects; see :func:`record_launches`."""

    def __init__(self):
        self.records: list[LaunchRecord] = []
        self._labels: list[dict] = []

    @contextlib.contextmanager
    def scope(self, **labels) -> Iterator[None]:
        """Attach ``labels`` (e.g. op="conv2d", layer="layer1.conv2") to the launches
        recorded inside the block; inner scopes add to and override outer ones."""
        self._labels.append(labels)
        try:
            yield
        finally:
            self._labels.pop()

    def current_labels(self) -> dict:
        merged = {}
        for labels in self._labels:
            merged.update(labels)
        return merged

    def _record(self, fn, args, kwargs, configs, autotuned, heuristics=()):
        """Appends the record of one launch of ``fn``; ``configs`` are the autotune
        candidates (``[None]`` for a plain launch), ``heuristics`` the
        ``triton.heuristics`` wrappers whose values to apply."""
        t_ns = time.perf_counter_ns()
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        candidates, constexprs, records = [], {}, []
        for config in configs:
            tuned = set(config.kwargs) if config is not None else set()
            call_kwargs = launch_kwargs(args, kwargs, config, heuristics)
            records, all_constexprs, options, bound = _split(fn, args, call_kwargs)
            launch = LaunchConfig(tuple(sorted((k, v) for k, v in all_constexprs.items() if k in tuned)),
                                  options.get("num_warps", 4), options.get("num_stages", 3),
                                  options.get("num_ctas", 1), options.get("maxnreg"))
            candidates.append((launch, _eval_grid(grid, {**bound, **options})))
            constexprs = {k: v for k, v in all_constexprs.items() if k not in tuned}
        self.records.append(LaunchRecord(fn.__name__, fn, records, constexprs, candidates, autotuned,
                                         self.current_labels(), t_ns))


def _unwrap(kernel):
    """(JITFunction, [Heuristics wrappers outermost first]) under an autotuner."""
    from triton.runtime.autotuner import Heuristics
    from triton.runtime.jit import JITFunction

    heuristics = []
    fn = kernel.fn
    while not isinstance(fn, JITFunction):
        if isinstance(fn, Heuristics):
            heuristics.append(fn)
        fn = fn.fn
    return fn, heuristics


def _patch_sm_count(sm_count: int) -> list[tuple[object, str, object]]:
    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "vhist" or name.startswith("vhist.")):
            continue
        for attr in ("sm_count", "_sm_count"):
            fn = getattr(module, attr, None)
            if inspect.isfunction(fn):
                patched.append((module, attr, fn))
                setattr(module, attr, lambda device, n=sm_count: n)
    return patched


@contextlib.contextmanager
def record_launches(sm_count: int = H100_SM_COUNT) -> Iterator[LaunchRecorder]:
    """Record, instead of run, every Triton launch made inside the block.

    Args:
        sm_count: the SM count the launchers see (grids and splits depend on it).

    Returns:
        A :class:`LaunchRecorder`; its ``records`` fill as launches happen.

    Raises:
        RuntimeError: under ``TRITON_INTERPRET=1``, where kernels run through the
            interpreter and the autotune configs are not visible.
    """
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    import vhist.kernels._config as config
    import vhist.ops._dispatch as dispatch
    from vhist.ops import launch_cache

    if config.INTERPRETED:
        raise RuntimeError("record_launches needs compiled Triton kernels: run without TRITON_INTERPRET=1 "
                           "(no GPU is needed, nothing is launched)")
    # Every kernel module is imported (and so decorated for compiled Triton) before the
    # interpreter flag is lifted below: _config.autotune reads it at decoration time.
    import vhist.kernels

    for module in pkgutil.iter_modules(vhist.kernels.__path__):
        importlib.import_module(f"vhist.kernels.{module.name}")
    recorder = LaunchRecorder()

    def jit_run(self, *args, **kwargs):
        recorder._record(self, args, kwargs, [None], autotuned=False)

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        # prune_configs sees what Autotuner.run gives it: the launch kwargs, grid included.
        configs = self.prune_configs(dict(kwargs)) if len(self.configs) > 1 else list(self.configs)
        fn, heuristics = _unwrap(self)
        recorder._record(fn, args, kwargs, list(configs), autotuned=len(self.configs) > 1, heuristics=heuristics)
        self.nargs = None

    def heuristics_run(self, *args, **kwargs):
        fn, heuristics = _unwrap(self)
        recorder._record(fn, args, kwargs, [None], autotuned=False, heuristics=[self] + heuristics)

    saved = [(jit.JITFunction, "run", jit.JITFunction.run), (autotuner.Autotuner, "run", autotuner.Autotuner.run),
             (autotuner.Heuristics, "run", autotuner.Heuristics.run), (config, "INTERPRETED", config.INTERPRETED),
             (dispatch, "triton_cpu_ready", dispatch.triton_cpu_ready)]
    jit.JITFunction.run = jit_run
    autotuner.Autotuner.run = autotune_run
    autotuner.Heuristics.run = heuristics_run
    config.INTERPRETED = True
    # The dispatcher lets CPU tensors reach the (recorded, never run) triton launchers.
    dispatch.triton_cpu_ready = lambda: True
    saved += _patch_sm_count(sm_count)
    # Cached geometry holds grids and splits sized from the SM count, which changes here.
    launch_cache.clear()
    try:
        yield recorder
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
        launch_cache.clear()
