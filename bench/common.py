"""Shared benchmark machinery: providers, timing, device peaks, results files.

A suite (bench/suites/<op>.py) yields :class:`Case` objects. Each case names the bytes
or FLOPs that one call moves or does, and gives one zero-argument callable per provider,
all on the same inputs. On a GPU every provider is timed with ``triton.testing.do_bench``
(median after warm-up) in the same run; without one, only a correctness pass runs.
"""
from __future__ import annotations

import csv
import datetime
import itertools
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch

# Datasheet peaks (dense, no sparsity) by device-name substring:
# HBM GB/s, bf16/fp16 tensor TFLOP/s, fp32 TFLOP/s without TF32, TF32 TFLOP/s.
DEVICE_PEAKS = {
    "H100 PCIe": dict(hbm_gbps=2000, bf16_tflops=756, fp32_tflops=51, tf32_tflops=378),
    "H100": dict(hbm_gbps=3350, bf16_tflops=989, fp32_tflops=67, tf32_tflops=494),
    "H200": dict(hbm_gbps=4800, bf16_tflops=989, fp32_tflops=67, tf32_tflops=494),
    "A100": dict(hbm_gbps=2039, bf16_tflops=312, fp32_tflops=19.5, tf32_tflops=156),
}

LAYOUTS = ("channels_last", "contiguous")  # the memory formats of the suites that time both
PROVIDERS = ("triton", "cuda", "torch", "torch_compile")
# bench/models.py adds whole-step CUDA-graph replays of the triton and torch providers.
MODEL_PROVIDERS = PROVIDERS + ("triton+graph", "torch+graph")
# torch.compile(model, backend="vhist"): vhist.convert's rewrite on each captured graph, Inductor for the rest.
MODEL_PROVIDERS += ("triton+compile",)


@dataclass
class Case:
    """One benchmark row: an op at one shape, dtype, layout and mode."""

    op: str
    layer: str
    shape: tuple
    dtype: torch.dtype
    layout: str
    mode: str  # "fwd", "fwd+bwd", "eval", ...
    providers: dict[str, Callable[[], object]]
    bytes: int = 0  # bytes one call must move (memory-bound ops)
    flops: int = 0  # FLOPs of one call (compute-bound ops)
    check: Callable[[], float] | None = None  # correctness pass: returns max error
    tolerance: float = 0.0
    extra: dict = field(default_factory=dict)
    # The triton provider's traffic by design: vhist.tools.traffic.op_traffic's arguments
    # (op, shape, and conv / channels_last / dtype / activation as that op takes them) and
    # "modes", the traffic modes ("forward", "backward") one call of the case runs.
    traffic: dict | None = None


def design_bytes(case: Case) -> int | None:
    """Bytes the triton provider of ``case`` moves by design: every read and write its
    registered ops' launches make, from the kernels' declared pointer roles
    (:mod:`vhist.tools.traffic`, launches recorded, nothing run), partials and weights
    included, summed over the case's traffic modes; None for a case without a spec."""
    if case.traffic is None:
        return None
    from vhist.tools.traffic import op_traffic

    spec = dict(case.traffic)
    op, shape, modes = spec.pop("op"), spec.pop("shape"), spec.pop("modes")
    total = 0
    for mode in modes:
        t = op_traffic(op, mode, shape, **spec)
        total += t.activation_bytes + t.other_bytes
    return total


def case_grid(layers: Iterable[tuple], small: bool, keep: Optional[Callable[[str, torch.dtype], bool]],
              *inner: Iterable) -> Iterator[tuple]:
    """The grid a suite's ``cases`` walks: ``(layer, dtype, *one item of each inner)`` for
    every layer row (its name first), dtype (float32 alone for the interpreter's ``small``
    pass, else bfloat16 then float32) and combination of the ``inner`` iterables (layouts,
    modes, ...), in that nesting order. ``keep(name, dtype)``, when given, drops a layer at
    a dtype before its cases are made."""
    dtypes = [torch.float32] if small else [torch.bfloat16, torch.float32]
    for layer in layers:
        for dtype in dtypes:
            if keep is None or keep(layer[0], dtype):
                yield from itertools.product([layer], [dtype], *inner)


def device_peaks(device_name: str) -> dict | None:
    for key, peaks in DEVICE_PEAKS.items():
        if key in device_name:
            return peaks
    return None


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata() -> dict:
    import triton

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, no timings)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "vhist_autotune": os.environ.get("VHIST_AUTOTUNE", "1"),
    }


def time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile in ms, after do_bench's warm-up."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def measure(case: Case, peaks: dict | None) -> list[dict]:
    """Times every provider of ``case``; one row per provider."""
    rows, times = [], {}
    design = design_bytes(case)
    for provider, fn in case.providers.items():
        try:
            median, p20, p80 = time_ms(fn)
        except Exception as err:  # a provider that fails is reported, not hidden
            rows.append(_row(case, provider, error=f"{type(err).__name__}: {err}"[:300]))
            continue
        times[provider] = median
        row = _row(case, provider, ms=median, ms_p20=p20, ms_p80=p80)
        if case.bytes:
            row["gbps"] = case.bytes / median / 1e6  # against the minimal bytes of any implementation
            if peaks:
                row["pct_peak_bw"] = 100 * row["gbps"] / peaks["hbm_gbps"]
        if design is not None and provider == "triton":
            row["design_bytes"] = design
            row["gbps_design"] = design / median / 1e6  # against what vhist's kernels move by design
        if case.flops:
            row["tflops"] = case.flops / median / 1e9
            if peaks:
                peak = peaks["bf16_tflops"] if case.dtype in (torch.bfloat16, torch.float16) else (
                    peaks["tf32_tflops"] if torch.backends.cudnn.allow_tf32 else peaks["fp32_tflops"])
                row["pct_peak_flops"] = 100 * row["tflops"] / peak
        rows.append(row)
    for row in rows:
        if "ms" in row:
            for base in ("torch", "torch_compile"):
                if base in times and row["provider"] != base:
                    row[f"speedup_vs_{base}"] = times[base] / row["ms"]
    return rows


def _row(case: Case, provider: str, **values) -> dict:
    return {"op": case.op, "layer": case.layer, "shape": "x".join(map(str, case.shape)),
            "dtype": str(case.dtype).replace("torch.", ""), "layout": case.layout,
            "mode": case.mode, "provider": provider, **case.extra, **values}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_results(name: str, meta: dict, rows: list[dict], out_dir: str) -> tuple[str, str]:
    """Writes ``<name>_<device>_<date>.json`` (metadata + rows) and the same rows as CSV."""
    os.makedirs(out_dir, exist_ok=True)
    device = "".join(ch if ch.isalnum() else "-" for ch in meta["device"].split(" (")[0]).strip("-").lower()
    stamp = meta["date"][:19].replace(":", "").replace("-", "")
    base = os.path.join(out_dir, f"{name}_{device}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(meta) + columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **r})
    return base + ".json", base + ".csv"


def report(name: str, meta: dict, rows: list[dict], columns: list[str], out_dir: str) -> None:
    """The end of a run: every row as one table after a blank line, then the results files
    of :func:`write_results` and their paths."""
    print()
    print_table(rows, columns)
    for path in write_results(name, meta, rows, out_dir):
        print("wrote", path)


def max_chain_error(run, providers=("triton", "torch")) -> float:
    """Max abs difference between two providers' training chains, output and every
    gradient (upstream gradient cos(y)): ``run(provider)`` returns the output and the
    leaves it was computed from."""
    results = []
    for name in providers:
        y, leaves = run(name)
        results.append((y, *torch.autograd.grad(y, leaves, torch.cos(y.detach()))))
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))
