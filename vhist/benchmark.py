"""``vhist benchmark``: inference and training throughput of zoo models, the user-facing
form of bench/models.py (as timm's ``benchmark.py`` is timm's).

Providers, in the same run and on the same batch: ``triton`` / ``cuda`` (vhist's
backends), ``torch`` (the torch backend in eager mode, the baseline), ``torch_compile``
(``torch.compile`` of the torch-backend model) and ``triton+graph`` / ``torch+graph``
(the step captured in one CUDA graph and replayed, so that the host's Python is out of
it; training captures forward, backward and the SGD update as ``vhist train
--cuda-graph`` does). Inference runs the eval model under ``torch.no_grad``; a training
step is forward + cross-entropy + backward + SGD (momentum 0.9). Each row is timed with
``triton.testing.do_bench`` (median and 20th/80th percentiles after warm-up); a batch
that runs out of memory is halved and retried. Without a GPU nothing is timed: one
step of each model at 32 px runs on the CPU's torch backend (a smoke pass) and its rows
carry no timings.
"""
from __future__ import annotations

import csv
import datetime
import fnmatch
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

PROVIDERS = ("triton", "cuda", "torch", "torch_compile", "triton+graph", "torch+graph")
BENCHES = ("inference", "train", "both")
COLUMNS = ["model", "bench", "provider", "batch", "image_size", "ms", "ms_p20", "ms_p80", "img_per_s",
           "peak_mem_gb", "first_step_s", "speedup_vs_torch", "status"]
SMOKE_SIZE, SMOKE_BATCH = 32, 2


def git_sha() -> str:
    """The checkout's HEAD commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(amp: bool, channels_last: bool) -> dict:
    """Device, versions, git sha, date and the run's settings, stored with every result."""
    import triton

    import vhist

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu (no GPU: smoke pass, no timings)",
            "vhist": vhist.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "git_sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "amp": "bf16" if amp else "off", "channels_last": channels_last}


def make_fn(name: str, provider: str, bench: str, batch: int, device: str, image_size: Optional[int],
            amp: bool, channels_last: bool) -> tuple[Callable[[], object], int]:
    """A zero-argument inference call or training step of ``name`` on ``provider``, and
    its input size."""
    import vhist
    from vhist.models.stats import default_image_size

    torch.manual_seed(0)
    model = vhist.create_model(name, image_size=image_size).to(device)
    size = image_size or default_image_size(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train(bench == "train")
    backend = "torch" if provider == "torch_compile" else provider.removesuffix("+graph")
    forward = torch.compile(model) if provider == "torch_compile" else model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp)
    if bench == "inference":
        def fn():
            with vhist.use_backend(backend), autocast, torch.no_grad():
                return forward(x)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def fn():
            opt.zero_grad(set_to_none=True)
            with vhist.use_backend(backend), autocast:
                loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        if provider.endswith("+graph"):
            return graphed_train_step(fn, x, y, opt, backend, autocast, forward), size
    if provider.endswith("+graph"):
        return graphed_inference(fn), size
    return fn, size


def graphed_inference(eager: Callable[[], object]) -> Callable[[], object]:
    """The forward captured in a CUDA graph after warm-up runs on a side stream (the first
    call captures); each call replays it on the same static input."""
    graph = None

    def run():
        nonlocal graph
        if graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    eager()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                eager()
        graph.replay()

    return run


def graphed_train_step(eager_step, x, y, opt, backend: str, autocast, forward):
    """The whole training step (forward, backward, SGD update) in one CUDA graph, with
    :class:`vhist.train.graph.CapturedStep` and the update of ``vhist train --cuda-graph``;
    the first call runs one eager step (autotuning, momentum buffers), then captures."""
    import vhist
    from vhist.train.graph import CapturedStep, GraphOptimizerStep

    update = captured = None

    def captured_step(x, y):
        opt.zero_grad(set_to_none=True)
        with vhist.use_backend(backend), autocast:
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        update()
        return loss.detach()

    def run():
        nonlocal captured, update
        if captured is None:
            eager_step()
            update = GraphOptimizerStep(opt)
            update.refresh()
            captured = CapturedStep(captured_step, (x, y), warmup=2, before_replay=update.refresh)
        return captured(x, y)

    return run


def time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile in ms, after do_bench's warm-up."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def bench_one(name: str, provider: str, bench: str, batch: int, image_size: Optional[int], amp: bool,
              channels_last: bool) -> dict:
    """One timed row on the GPU; the batch is halved and retried while it runs out of memory."""
    row = {"model": name, "bench": bench, "provider": provider}
    while True:
        try:
            fn, size = make_fn(name, provider, bench, batch, "cuda", image_size, amp, channels_last)
            row.update(batch=batch, image_size=size)
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()  # compiles (torch.compile, Triton kernels), autotunes, captures graphs
            torch.cuda.synchronize()
            row["first_step_s"] = time.perf_counter() - start
            torch.cuda.reset_peak_memory_stats()
            median, p20, p80 = time_ms(fn)
            row.update(ms=median, ms_p20=p20, ms_p80=p80, img_per_s=batch / median * 1e3,
                       peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30, status="ok")
            return row
        except torch.cuda.OutOfMemoryError:
            fn = None
            torch.cuda.empty_cache()
            if batch == 1:
                row["status"] = "out of memory at batch 1"
                return row
            print(f"{name} {bench} {provider}: out of memory at batch {batch}; retrying at {batch // 2}", flush=True)
            batch //= 2
        except Exception as err:  # a provider that fails is reported in its row, not hidden
            row["status"] = f"{type(err).__name__}: {err}"[:300]
            return row
        finally:
            torch.cuda.empty_cache()


def smoke_row(name: str, bench: str) -> dict:
    """One untimed step at 32 px, batch 2, on the CPU's torch backend: finite output or not."""
    fn, size = make_fn(name, "torch", bench, SMOKE_BATCH, "cpu", SMOKE_SIZE, False, False)
    out = fn()
    ok = bool(torch.isfinite(out).all())
    return {"model": name, "bench": bench, "provider": "torch", "batch": SMOKE_BATCH, "image_size": size,
            "status": "ok (untimed)" if ok else "FAIL: non-finite output"}


def resolve_models(spec: str) -> list[str]:
    """Comma-separated names or shell patterns, in the order given."""
    import vhist

    names: list[str] = []
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        matched = [n for n in vhist.list_models() if fnmatch.fnmatch(n, pattern)]
        if not matched:
            vhist.models.model_config(pattern)  # an unknown name: the registry's message
            raise ValueError(f"no model matches {pattern!r}; `vhist models` lists them all")
        names += [n for n in matched if n not in names]
    return names


def write_results(path: str | Path, meta: dict, rows: list[dict]) -> Path:
    """``.json`` (metadata and rows) or ``.csv`` (one row per result, metadata repeated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return path
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(meta) + COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
    return path


def print_table(rows: list[dict]) -> None:
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def run_benchmark(models: str, bench: str, batch_size: int, providers: list[str], amp: bool,
                  channels_last: bool, image_size: Optional[int], results_file: Optional[str]) -> list[dict]:
    """The rows of every (model, bench, provider); printed as a table, written when asked."""
    if bench not in BENCHES:
        raise ValueError(f"--bench must be one of {', '.join(BENCHES)}, got {bench!r}")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise ValueError(f"unknown providers {unknown}; choose from {', '.join(PROVIDERS)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if results_file and Path(results_file).suffix not in (".json", ".csv"):
        raise ValueError(f"--results-file must end in .json or .csv, got {Path(results_file).name!r}")
    names = resolve_models(models)
    benches = ["inference", "train"] if bench == "both" else [bench]
    meta = metadata(amp, channels_last)
    rows = []
    if not torch.cuda.is_available():
        print("No CUDA device: nothing is timed. Smoke pass: one step of each model at "
              f"{SMOKE_SIZE} px, batch {SMOKE_BATCH}, on the CPU's torch backend.", flush=True)
        rows = [smoke_row(name, b) for name in names for b in benches]
    else:
        torch.backends.cudnn.benchmark = True
        for name in names:
            for b in benches:
                group = [bench_one(name, p, b, batch_size, image_size, amp, channels_last) for p in providers]
                base = next((r["ms"] for r in group if r["provider"] == "torch" and "ms" in r), None)
                for r in group:
                    if base is not None and "ms" in r and r["provider"] != "torch":
                        r["speedup_vs_torch"] = base / r["ms"]
                rows += group
    print_table(rows)
    if results_file:
        print("wrote", write_results(results_file, meta, rows))
    if any(r["status"].startswith("FAIL") for r in rows):
        raise ValueError("a smoke step gave a non-finite output")
    return rows


def _run(args) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    run_benchmark(args.models, args.bench, args.batch_size, providers, args.amp, args.channels_last,
                  args.image_size, args.results_file)
    return 0


def add_benchmark_parser(commands):
    """``vhist benchmark --models ... --bench inference|train|both ...``."""
    p = commands.add_parser("benchmark", help="inference / training throughput of zoo models per provider",
                            description="Inference and training throughput (img/s, step time, peak memory) of zoo "
                                        "models per provider: vhist's triton and cuda backends, torch eager, "
                                        "torch.compile, and CUDA-graph replays (triton+graph, torch+graph). A batch "
                                        "that runs out of memory is halved and retried. Without a GPU nothing is "
                                        "timed: one step per model runs at 32 px on the CPU (a smoke pass).")
    p.add_argument("--models", default="resnet50", help="comma-separated names or shell patterns "
                                                        "(default: resnet50)")
    p.add_argument("--bench", default="both", help="inference, train or both (default: both)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size, halved on out-of-memory (default: 64)")
    p.add_argument("--providers", default="triton,torch,torch_compile",
                   help=f"comma-separated, from {', '.join(PROVIDERS)} (default: triton,torch,torch_compile)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs and weights")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: each model's)")
    p.add_argument("--results-file", default=None, help="write the rows and metadata to FILE.json or FILE.csv")
    p.set_defaults(run=_run)
    return p
