"""Compile recorded launches for sm_90 and read what the GPU would run off the output.

:func:`compile_variant` compiles one (launch, config) pair of a
:class:`~vhist.tools.launches.LaunchRecord` through the kernel's own
``JITFunction.run(..., warmup=True)`` under a stand-in driver that reports an sm_90
target (``GPUTarget("cuda", 90, 32)``) and launches nothing. The kernel's binder
therefore applies exactly the specialization Triton's runtime applies on an H100 (the
same code path: pointer alignment to 16 bytes, ints divisible by 16, ints equal to 1
folded to constants), on stand-in arguments that reproduce each recorded argument's
type, alignment and value. This path exists unchanged in Triton 3.6 and 3.9.

:func:`analyze` reads, from the cubin (``cuobjdump`` shipped in Triton's nvidia
backend), the registers per thread, local memory (spills and stack) and every
instruction; from the metadata the shared memory; from the TTGIR the software-pipelined
loops and the loops around them. Everything here is static: it describes the code, not
its speed.

Results are cached on disk (``$VHIST_COMPILE_CACHE`` or ``~/.cache/vhist/compile_report``)
keyed by the kernel's source hash (Triton's ``cache_key``, which covers the functions it
calls), the Triton version, the argument specialization, the constexprs and the config.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from typing import Optional

import torch

from vhist.tools.launches import LaunchConfig, LaunchRecord

ANALYSIS_VERSION = 1
SM90_SMS = 132
# sm_90 limits (CUDA C Programming Guide, compute capability 9.0).
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024  # the most one block can opt into
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REG_ALLOC_UNIT = 256  # registers, per warp
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8,
                "i1": torch.bool}


class _Pointer:
    """A stand-in tensor for the binder: a dtype and a data pointer whose alignment is
    the recorded one (Triton specializes on ``data_ptr() % 16`` only)."""

    def __init__(self, dtype: torch.dtype, aligned16: bool):
        self.dtype = dtype
        self._ptr = 0 if aligned16 else 8

    def data_ptr(self) -> int:
        return self._ptr


class _Sm90Driver:
    """The three calls ``JITFunction.run`` makes of the active driver before launching."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        # A key of its own, so that a real device 0 in the same process never finds
        # these (unloaded) kernels in its cache.
        return "vhist-compile-report-sm90"

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def sm90_driver():
    """Makes a stand-in sm_90 driver the active Triton driver for the block, so that
    ``JITFunction`` binders and compiles see an sm_90 target without a GPU."""
    from triton.runtime import driver

    previous = driver._active
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = previous


def tool(name: str) -> str:
    """Path of ``cuobjdump`` / ``nvdisasm`` from Triton's nvidia backend (else PATH)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    from shutil import which

    found = which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in Triton's backends/nvidia/bin or on PATH")
    return found


def variant_key(record: LaunchRecord, config: LaunchConfig) -> str:
    """Disk-cache key of one compiled variant."""
    import triton

    parts = [ANALYSIS_VERSION, triton.__version__, record.fn.cache_key, "sm_90",
             [a.specialization for a in record.args],
             sorted((k, str(v)) for k, v in record.constexprs.items()),
             [list(map(str, kv)) for kv in config.kwargs], sorted(config.options().items())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def cache_dir() -> str:
    return os.environ.get("VHIST_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vhist",
                                                               "compile_report"))


def compile_variant(record: LaunchRecord, config: LaunchConfig):
    """Compiles one candidate of ``record`` for sm_90; returns the ``CompiledKernel``."""
    args = []
    for a in record.args:
        if a.kind == "pointer":
            args.append(_Pointer(TORCH_DTYPES[a.dtype], a.aligned16))
        else:
            args.append(a.value)
    with sm90_driver():
        return record.fn.run(*args, grid=(1, 1, 1), warmup=True, **record.constexprs, **dict(config.kwargs),
                             **config.options())


_OPCODE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def _width(opcode: str) -> int:
    """Bits per thread of a global load/store opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16)."""
    parts = opcode.split(".")
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


def parse_sass(sass: str) -> dict:
    """Counts of the instructions that matter: matrix, global loads/stores by width,
    cp.async (LDGSTS) by width, TMA, local memory."""
    ops = collections.Counter()
    for line in sass.splitlines():
        m = _OPCODE.match(line)
        if m:
            ops[m.group(1)] += 1
    out = {"hgmma": 0, "hmma": 0, "ldg": collections.Counter(), "stg": collections.Counter(),
           "ldgsts": collections.Counter(), "tma_load": 0, "tma_store": 0, "ldl": 0, "stl": 0}
    for op, n in ops.items():
        head = op.split(".")[0]
        if head in ("HGMMA", "QGMMA", "IGMMA"):
            out["hgmma"] += n
        elif head in ("HMMA", "IMMA", "DMMA"):
            out["hmma"] += n
        elif head == "LDG":
            out["ldg"][_width(op)] += n
        elif head in ("STG", "RED", "ATOMG"):
            out["stg"][_width(op)] += n
        elif head == "LDGSTS":
            out["ldgsts"][_width(op)] += n
        elif head.startswith("UTMALDG") or head.startswith("UBLKCP"):
            out["tma_load"] += n
        elif head.startswith("UTMASTG") or head.startswith("UTMAREDG"):
            out["tma_store"] += n
        elif head == "LDL":
            out["ldl"] += n
        elif head == "STL":
            out["stl"] += n
    for key in ("ldg", "stg", "ldgsts"):
        out[key] = {str(w): n for w, n in sorted(out[key].items(), reverse=True)}
    return out


_FOR = re.compile(r"scf\.for\s+%[\w.]+\s*=\s*(%[\w.]+)\s+to\s+(%[\w.]+)\s+step\s+(%[\w.]+)")
_CONST = re.compile(r"(%[\w.]+)\s*=\s*arith\.constant\s+(-?\d+)\s*:\s*i(?:32|64)")


def parse_loops(ttgir: str) -> list[dict]:
    """The software-pipelined loops of a TTGIR module, each with the (lower, upper, step)
    tokens of the loops around it, outermost first.

    A loop counts as pipelined when Triton's pipeliner rewrote it: a cp.async pipeline
    carries its copies' ``!ttg.async.token`` values through the loop's iter_args, a TMA
    pipeline issues ``ttng.async_tma_copy_global_to_local`` and waits on an mbarrier
    (``ttng.wait_barrier``) in the loop body itself. The drain wait after a pipelined
    loop, which sits in the enclosing loop, does not count. Tokens are integers or
    ``%name`` values (function arguments keep their source names in TTGIR).
    """
    consts = {m.group(1): int(m.group(2)) for m in _CONST.finditer(ttgir)}
    stack, loops = [], []
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}") and stack:
            stack.pop()
        if s.endswith("{"):
            m = _FOR.search(s)
            frame = {"kind": "for" if m else "region", "pipelined": bool(m) and "!ttg.async.token" in s,
                     "tma_copy": False, "tma_wait": False,
                     "bounds": tuple(consts.get(t, t) for t in m.groups()) if m else None}
            stack.append(frame)
            if m:
                loops.append((frame, [f["bounds"] for f in stack[:-1] if f["kind"] == "for"]))
        elif stack:
            loop = next((f for f in reversed(stack) if f["kind"] == "for"), None)
            if loop is not None:
                loop["tma_copy"] |= "ttng.async_tma_copy_global_to_local" in s
                loop["tma_wait"] |= "ttng.wait_barrier" in s
    return [{"bounds": list(frame["bounds"]), "outer": [list(b) for b in outer]}
            for frame, outer in loops if frame["pipelined"] or (frame["tma_copy"] and frame["tma_wait"])]


def pipeline_fills(loops: list[dict], values: dict) -> Optional[int]:
    """Pipeline fills one program does: over the pipelined loops, the product of the trip
    counts of the loops around each (a loop restarted per filter tap fills once per tap).
    ``values`` maps argument names to the recorded ints; None when a bound is computed
    in the kernel (not an argument or constant)."""
    total = 0
    for loop in loops:
        fills = 1
        for lower, upper, step in loop["outer"]:
            lo, hi, st = (v if isinstance(v, int) else values.get(v.lstrip("%")) for v in (lower, upper, step))
            if None in (lo, hi, st):
                return None
            fills *= max(0, math.ceil((hi - lo) / st))
        total += fills
    return total


def resource_usage(cubin: bytes) -> dict:
    """REG / LOCAL / STACK / SHARED of the kernel in ``cubin`` (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"regs": int(fields.get("REG", 0)), "local_bytes": int(fields.get("LOCAL", 0)),
            "stack_bytes": int(fields.get("STACK", 0)), "static_shared": int(fields.get("SHARED", 0)),
            "sass": parse_sass(sass)}


def analyze(compiled) -> dict:
    """Static figures of one ``CompiledKernel`` (value-independent, cacheable)."""
    usage = resource_usage(compiled.asm["cubin"])
    sass = usage.pop("sass")
    md = compiled.metadata
    return {**usage, "shared": int(md.shared), "num_warps": int(md.num_warps), "num_stages": int(md.num_stages),
            "sass": sass, "loops": parse_loops(compiled.asm["ttgir"])}


def occupancy(regs: int, shared: int, num_warps: int) -> dict:
    """Resident blocks and warps per SM on sm_90 (static estimate from the limits)."""
    per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK) if shared else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // num_warps
    blocks = min(MAX_BLOCKS_PER_SM, by_regs, by_smem, by_warps)
    limiter = min((("regs", by_regs), ("shared", by_smem), ("warps", by_warps), ("blocks", MAX_BLOCKS_PER_SM)),
                  key=lambda kv: kv[1])[0]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps, "occupancy_limiter": limiter}


def matrix_instruction(sass: dict) -> str:
    return "wgmma" if sass["hgmma"] else ("mma.sync" if sass["hmma"] else "none")


def access_kinds(sass: dict) -> list[str]:
    """Global-memory access kinds present, widest first: tma, cp.async.<bits>,
    ld.<bits> (ld.128 is a 16-byte vector load per thread)."""
    kinds = []
    if sass["tma_load"]:
        kinds.append("tma")
    kinds += [f"cp.async.{w}" for w in sass["ldgsts"]]
    kinds += [f"ld.{w}" for w in sass["ldg"]]
    return kinds


def cached_analysis(record: LaunchRecord, config: LaunchConfig, use_cache: bool = True) -> tuple[dict, bool]:
    """(analysis, from_cache) of one variant; compiles on a miss. A compile error is
    returned as ``{"error": ...}`` (and cached, since it depends only on the key)."""
    path = os.path.join(cache_dir(), variant_key(record, config) + ".json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return json.load(f), True
    try:
        result = analyze(compile_variant(record, config))
    except Exception as err:  # reported per variant, never hidden
        if isinstance(err, (FileNotFoundError, subprocess.CalledProcessError)):
            raise
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)
    return result, False


def variant_row(record: LaunchRecord, config: LaunchConfig, grid: tuple, analysis: dict) -> dict:
    """One report row: the launch, the config and the static figures."""
    labels = record.labels
    row = {"kernel": record.kernel, "op": labels.get("op", "?"), "layer": labels.get("layer", "?"),
           "source": labels.get("source", "?"), "mode": labels.get("mode", ""),
           "dtype": labels.get("dtype") or _data_dtype(record), "config": config.label(),
           "num_warps": config.num_warps, "num_stages": config.num_stages,
           # A plain launch (an untuned kernel, or one launched with a config chosen by
           # the launcher) passes its tile sizes as constexprs, not through a config.
           **{k: v for k, v in record.constexprs.items() if k.startswith("BLOCK_")}, **dict(config.kwargs),
           "grid": list(grid), "programs": math.prod(grid), "programs_per_sm": math.prod(grid) / SM90_SMS,
           "specialization": " ".join(a.specialization for a in record.args)}
    if "error" in analysis:
        row["error"] = analysis["error"]
        return row
    sass = analysis["sass"]
    occ = occupancy(analysis["regs"], analysis["shared"], config.num_warps)
    values = {a.name: a.value for a in record.args if a.kind == "int"}
    values.update({k: v for k, v in record.constexprs.items() if isinstance(v, int)})
    fits = analysis["shared"] <= SMEM_PER_BLOCK
    row.update(regs=analysis["regs"], spill_bytes=analysis["local_bytes"], stack_bytes=analysis["stack_bytes"],
               ldl=sass["ldl"], stl=sass["stl"], shared=analysis["shared"], fits_smem=fits, **occ,
               waves=(math.ceil(math.prod(grid) / (SM90_SMS * occ["blocks_per_sm"])) if occ["blocks_per_sm"]
                      else None),
               mma=matrix_instruction(sass), access=access_kinds(sass), ldg=sass["ldg"], ldgsts=sass["ldgsts"],
               stg=sass["stg"], tma_loads=sass["tma_load"], pipelined_loops=len(analysis["loops"]),
               fills_per_program=pipeline_fills(analysis["loops"], values))
    return row


def _data_dtype(record: LaunchRecord) -> str:
    """The dtype of the first pointer argument (the activation the kernel streams)."""
    pointers = record.pointers()
    return pointers[0].dtype if pointers else "-"


def distinct_variants(records: list[LaunchRecord], max_configs: int = 0):
    """Yields (record, config, grid, key) once per distinct compiled variant and launch
    context (op, layer, mode, grid): the same variant at two layers is compiled once and
    reported twice. ``max_configs`` > 0 keeps only the first candidates of each launch."""
    seen = set()
    for record in records:
        for config, grid in record.candidates[:max_configs or None]:
            key = variant_key(record, config)
            context = (key, tuple(grid), record.labels.get("op"), record.labels.get("layer"),
                       record.labels.get("mode"))
            if context in seen:
                continue
            seen.add(context)
            yield record, config, grid, key
