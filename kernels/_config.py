"""Helpers shared by the kernel files: interpreter detection and autotuning.

Autotuning on a GPU has three costs this module keeps down:

* **Shortlists by shape.** A GEMM kernel's configs are pruned per launch shape before
  any is compiled: tiles far larger than the problem, the configs the compile report
  (bench/compile_report.py, static, sm_90 compile) found at the register cap with one
  block per SM (``EXCLUDED``), tilings that leave most SMs idle while another fills
  them, and BLOCK_M < 64 (mma.sync, not wgmma) where a wider tile fills the SMs are
  dropped, and so are the depthwise forward tiles that spill on fp32 inputs or with the
  statistics epilogue and the GEMM tiles whose pipeline exceeds a block's shared memory
  at the launch's dtype (fp32 128x128x64 s4); at most ``SHORTLIST`` remain, in the order
  of the config list (a
  preference order).
* **Tuned choices on disk.** The config picked for a (kernel, tuning key, dtypes,
  constexprs) is stored in ``$VHIST_AUTOTUNE_CACHE`` (default
  ``~/.cache/vhist/autotune``), one JSON file per device name and torch/triton
  version, and reused by later processes without benchmarking.
* **No tuning at all.** ``VHIST_AUTOTUNE=0`` launches the first shortlisted config
  (the heuristic choice) directly and never benchmarks, on every supported triton
  (3.6's ``Autotuner.run`` would benchmark even a one-config shortlist); neither does a
  launch under CUDA-graph capture (:class:`TunedKernel`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings

import torch
import triton
from triton.runtime.jit import KernelInterface

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the mode of every kernel
# in this package is fixed when the package is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# VHIST_AUTOTUNE=0: heuristic configs, no benchmarking (read when a kernel is decorated).
AUTOTUNE = os.environ.get("VHIST_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")
SHORTLIST = 4
# GEMM configs the compile report (static, sm_90 compile, bf16, ResNet-50 layer3.0.conv2
# and layer1 1x1 layers) shows at the 255-register cap in the forward or dgrad kernel
# (no spill there, no headroom either) with one 8-warp block per SM; the 128x256x64 s4
# also takes 192 KB of shared memory. (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
EXCLUDED = {(128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (128, 256, 64, 8, 4)}


# Depthwise forward tiles with more than this many output elements per thread spill on
# 4- and 8-byte inputs (static, sm_90 compile, fp32, MobileNetV2's 144-channel 56x56
# layer: BLOCK_C=64 at 4 warps and BLOCK_C=128 at 8 warps, 32 elements per thread, reach
# 255 registers with 23-44 local stores; 16 per thread stay at 106-250 with none). 2-byte
# inputs halve the x registers and do not spill at 32, except with the BN-statistics
# epilogue, which holds the output tile and its deviations as well: BLOCK_C=128 at 8
# warps (32 per thread) reaches 255 registers with a 32-byte stack frame under triton
# 3.6, and BLOCK_C=16 at 2 warps (16 per thread) 168 registers with an 8-byte frame
# under triton 3.9 (static, sm_90 compile, bf16, MobileNetV1/V2's 32-channel 112x112
# layer): with the epilogue, at least 4 warps. The activations of issue 23 in that
# epilogue took BLOCK_C=32 at 4 warps (16 per thread) to 124-177 registers, with an
# 8-byte frame at MobileNetV1's first depthwise layer (168 registers, triton 3.9): with
# the epilogue, 8 per thread (BLOCK_C=32 at 8 warps).
DEPTHWISE_FWD_MAX_ELEMENTS_WIDE = 16
DEPTHWISE_FWD_STATS_MAX_ELEMENTS = 8
DEPTHWISE_FWD_STATS_MIN_WARPS = 4


def _fits_registers(kernel_name: str, config, args: dict) -> bool:
    """False for the configs known to spill at this launch's dtype and epilogue (see above)."""
    if kernel_name != "_depthwise_fwd_kernel":
        return True
    x, block_p = args.get("X"), args.get("BLOCK_P")
    if x is None or block_p is None or (x.element_size() < 4 and not args.get("STATS")):
        return True
    per_thread = block_p * config.kwargs["BLOCK_C"] / (32 * config.num_warps)
    if args.get("STATS"):
        return config.num_warps >= DEPTHWISE_FWD_STATS_MIN_WARPS and per_thread <= DEPTHWISE_FWD_STATS_MAX_ELEMENTS
    return per_thread <= DEPTHWISE_FWD_MAX_ELEMENTS_WIDE


# Shared memory one block can opt into on an H100/H200 (sm_90).
SMEM_PER_BLOCK = 227 * 1024


def gemm_pipeline_smem(config, element_size: int) -> int:
    """Bytes of shared memory a GEMM config's software pipeline holds: ``num_stages``
    buffers of an A (BLOCK_M x BLOCK_K) and a B (BLOCK_K x BLOCK_N) tile. The compile
    report (static, sm_90 compile) measures 192 KB for bf16 128x256x64 s4, as this gives;
    fp32 (TF32) doubles it: 128x128x64 s4 takes 256 KB here and 256-330 KB compiled."""
    k = config.kwargs
    return config.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * element_size


def _fits_shared_memory(config, args: dict) -> bool:
    """False for a GEMM config whose pipeline alone exceeds a block's shared memory at
    this launch's operand dtype (such a config cannot launch: fp32 128x128x64 s4)."""
    operand = next((v for v in args.values() if isinstance(v, torch.Tensor)), None)
    return operand is None or gemm_pipeline_smem(config, operand.element_size()) <= SMEM_PER_BLOCK


def _gemm_dims(kernel_name: str, args: dict):
    """(M, N) of the GEMM one program tiles by (BLOCK_M, BLOCK_N), from the size
    arguments; None when they are not there (then no shape pruning happens)."""
    try:
        if kernel_name == "_conv2d_fwd_kernel":
            return args["N"] * args["OH"] * args["OW"], args["CG_OUT"]
        if kernel_name == "_conv2d_bwd_dgrad_kernel":
            return args["N"] * args["H"] * args["W"], args["CG_IN"]
        if kernel_name == "_conv2d_bwd_wgrad_kernel":
            return args["CG_OUT"], args["CG_IN"]
    except KeyError:
        return None
    return None


def _launch_sm_count(args: dict) -> int:
    for value in args.values():
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return torch.cuda.get_device_properties(value.device).multi_processor_count
    return 132  # an H100/H200 SXM: the target the report compiles for


# Kernels whose BN-statistics epilogue (STATS) sums a tile's rows with tl.sum, whose tree
# follows the register layout that the tuned BLOCK_C and num_warps set: with STATS they
# run their first config only, so that the statistics' bits do not depend on a pick.
STATS_EPILOGUE_KERNELS = {"_depthwise_fwd_kernel"}


def shortlist(kernel_name: str, configs: list, args: dict) -> list:
    """The configs worth tuning for this launch (see the module docstring), at most
    ``SHORTLIST``, in the order given; never empty."""
    def spec(c):
        return (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.kwargs.get("BLOCK_K"), c.num_warps,
                c.num_stages)

    kept = [c for c in configs if spec(c) not in EXCLUDED and _fits_registers(kernel_name, c, args)] \
        or list(configs)
    if kernel_name in STATS_EPILOGUE_KERNELS and args.get("STATS"):
        # The first config that fits the epilogue's registers: fixed by the dtype alone.
        return kept[:1]
    dims = _gemm_dims(kernel_name, args)
    if dims is not None:
        m, n = dims
        kept = [c for c in kept if _fits_shared_memory(c, args)] or kept
        # A 64-row tile stays for M <= 32 (the weight gradient of a 24- or 32-channel conv,
        # M = C_out): it is the smallest wgmma tile (a warpgroup's 64 rows).
        fitting = [c for c in kept if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
                   and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(n))]
        kept = fitting or kept[:1]
        # Drop tilings that leave more than half the SMs idle when another fills them;
        # programs are counted off the launch's own grid (split-K and taps included).
        sms = _launch_sm_count(args)
        grid = args.get("grid")

        def programs(c):
            if callable(grid):
                return math.prod(grid({**args, **c.all_kwargs()}))
            return triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"])

        filling = [c for c in kept if programs(c) >= sms // 2]
        # BLOCK_M < 64 compiles to mma.sync, not wgmma (a warpgroup's tile is 64 rows):
        # only where no wgmma tiling fills the SMs.
        wgmma = [c for c in filling if c.kwargs["BLOCK_M"] >= 64]
        kept = wgmma or filling or sorted(kept, key=programs, reverse=True)[:1]
    return kept[:SHORTLIST] if AUTOTUNE else kept[:1]


@functools.lru_cache(maxsize=None)
def _cache_path(device_name: str) -> str:
    root = os.environ.get("VHIST_AUTOTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vhist",
                                                               "autotune"))
    name = f"{device_name}-torch{torch.__version__}-triton{triton.__version__}"
    return os.path.join(root, "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in name) + ".json")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def launch_device(args):
    """The device of a launch's first tensor argument (None without one)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


class TunedKernel(KernelInterface):
    """A ``triton.autotune`` kernel whose picks persist on disk across processes.

    On a CUDA device vhist, not Triton's ``Autotuner.run``, decides when to benchmark:
    never with ``VHIST_AUTOTUNE=0`` or when the shortlist holds one config (triton 3.6's
    ``Autotuner.run`` benchmarks even then, 3.9's does not), never for a key picked
    before (in memory or on disk), and never under CUDA-graph capture (a benchmark
    synchronizes, which breaks the capture: an untuned key there launches the heuristic
    config, with one warning per key, and is tuned at its first launch outside a
    capture). In those cases the kernel runs with the chosen config directly.

    Attribute access falls through to the wrapped ``Autotuner`` (``best_config``,
    ``configs``, ``fn``), so launchers use it as they would the autotuner.
    """

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.picks = {}  # in-memory picks: _memo_key -> triton.Config
        self._key_positions = None  # positions of the tuning keys among the arguments
        self._warned = set()  # _memo_keys launched untuned under CUDA-graph capture

    def _memo_key(self, device, args, kwargs) -> tuple:
        """What :meth:`_key` hashes, as a cheap tuple: the device, the tuning-key
        arguments given by position, every tensor's dtype and the other launch options
        (a constexpr tuning key is among the latter)."""
        positions = self._key_positions
        if positions is None:
            positions = self._key_positions = tuple(i for i, name in enumerate(self.autotuner.arg_names)
                                                    if name in self.autotuner.keys)
        count = len(args)
        return (device, tuple(args[i] for i in positions if i < count),
                tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
                tuple((k, v) for k, v in kwargs.items()
                      if k != "grid" and k != "warmup" and not isinstance(v, torch.Tensor)))

    def __getattr__(self, name):
        return getattr(self.autotuner, name)

    def _key(self, args, kwargs) -> str:
        tuner = self.autotuner
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        key = [repr(named[k]) for k in tuner.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        key += [f"{k}={v}" for k, v in sorted(kwargs.items()) if not hasattr(v, "dtype")]
        configs = hashlib.sha256("|".join(str(c) for c in tuner.configs).encode()).hexdigest()[:12]
        return f"{tuner.base_fn.__name__}|{'|'.join(key)}|{configs}"

    def resolve(self, args, kwargs):
        """``(runner, options)`` such that ``runner.run(*args, **options)`` launches what
        :meth:`run` would for these arguments and for any with the same sizes, strides,
        dtypes and options (a launch plan's, :class:`vhist.ops.launch_cache.Launch`):
        Triton's autotuner where it decides (one config, or not a CUDA device), the
        kernel with the pick's constexprs once the pick is known; None before that."""
        tuner = self.autotuner
        device = self._picking_device(args)
        if device is None:
            return tuner, kwargs
        pick = self.picks.get(self._memo_key(device, args, kwargs))
        if pick is None:
            return None
        return tuner.fn, {**kwargs, **pick.all_kwargs()}

    def _picking_device(self, args):
        """The launch's CUDA device when vhist picks this kernel's config; None where
        Triton's autotuner decides (a single config, which it never benchmarks, or no
        CUDA tensor: the launch recorder's entry point)."""
        if len(self.autotuner.configs) < 2:
            return None
        device = launch_device(args)
        return device if device is not None and device.type == "cuda" else None

    def shortlisted(self, args, kwargs) -> list:
        """The configs Triton's autotuner would benchmark for this launch (its own
        pruning: :func:`shortlist`), first the heuristic one."""
        tuner = self.autotuner
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            return tuner.prune_configs(dict(kwargs))
        finally:
            tuner.nargs = None

    def run(self, *args, **kwargs):
        tuner = self.autotuner
        device = self._picking_device(args)
        if device is None:
            return tuner.run(*args, **kwargs)
        # The pick of a key is read from disk once per process, then kept in memory: a
        # file read per launch would cost more host time than the launch itself.
        memo_key = self._memo_key(device, args, kwargs)
        pick = self.picks.get(memo_key)
        if pick is None:
            pick = self._untuned_pick(device, memo_key, args, kwargs)
            if pick is None:
                return self._tune(device, memo_key, args, kwargs)
        tuner.best_config = pick
        return tuner.fn.run(*args, **kwargs, **pick.all_kwargs())

    def _untuned_pick(self, device, memo_key, args, kwargs):
        """The config of a key not in memory that needs no benchmark, or None (then
        :meth:`_tune`): the first shortlisted one with tuning off or a one-config
        shortlist, the pick stored on disk, or under CUDA-graph capture the first
        shortlisted one, not kept (the key is tuned at its first uncaptured launch)."""
        configs = self.shortlisted(args, kwargs)
        if not AUTOTUNE or len(configs) == 1:
            self.picks[memo_key] = configs[0]
            return configs[0]
        key = self._key(args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        stored = _load(_cache_path(torch.cuda.get_device_name(device))).get(key)
        if stored is not None:
            pick = triton.Config(stored["kwargs"], num_warps=stored["num_warps"], num_stages=stored["num_stages"])
            self.picks[memo_key] = pick
            return pick
        if torch.cuda.is_current_stream_capturing():
            if memo_key not in self._warned:
                self._warned.add(memo_key)
                warnings.warn(f"vhist: {self.autotuner.base_fn.__name__} first launched under CUDA-graph capture with "
                              f"an untuned key; it runs the heuristic config {configs[0]} there (a benchmark "
                              f"would break the capture). Launch once before capturing to tune it.",
                              stacklevel=3)
            return configs[0]
        return None

    def _tune(self, device, memo_key, args, kwargs):
        """Benchmarks the shortlist through Triton's autotuner (which launches the pick)
        and stores the pick in memory and on disk."""
        tuner = self.autotuner
        ret = tuner.run(*args, **kwargs)
        best = self.picks[memo_key] = tuner.best_config
        path = _cache_path(torch.cuda.get_device_name(device))
        key = self._key(args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        entries = _load(path)
        entries[key] = {"kwargs": best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
        return ret


def tuned_kernel(fn, configs, key, **kwargs) -> TunedKernel:
    """``fn`` (a ``triton.jit`` function) under ``triton.autotune`` over per-launch
    shortlists (:func:`shortlist`), wrapped in a :class:`TunedKernel`."""
    def prune(candidates, named_args, **launch_kwargs):
        return shortlist(fn.__name__, candidates, {**named_args, **launch_kwargs})

    tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **kwargs)(fn)
    return TunedKernel(tuner)


def autotune(configs, key, **kwargs):
    """``triton.autotune`` over per-shape shortlists with on-disk picks on a GPU; the
    first config, fixed, under the interpreter.

    The interpreter has no device timer to tune with, and running every config there
    would only slow the CPU tests down.
    """
    if INTERPRETED:
        fixed = configs[0].kwargs

        def decorate_interpreted(fn):
            kernel = triton.heuristics({name: (lambda _args, v=value: v) for name, value in fixed.items()})(fn)
            kernel.configs = list(configs)  # what a GPU would tune over (tests run each)
            return kernel

        return decorate_interpreted

    return lambda fn: tuned_kernel(fn, configs, key, **kwargs)
