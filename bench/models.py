"""Model benchmark: training-step throughput of every zoo model on every backend.

One training step is forward + cross-entropy + backward + SGD (momentum 0.9) update, at
the model's default input size, under bf16 autocast with channels_last inputs and
weights. Providers, in the same run and on the same batch:

* ``triton``: every vhist op on the triton backend;
* ``cuda``: the cuda backend (models using an op without a CUDA kernel report that op's
  NotImplementedError: the backend does not apply to them);
* ``torch``: the torch backend in eager mode (the baseline);
* ``torch_compile``: ``torch.compile`` of the torch-backend model;
* ``triton+graph`` and ``torch+graph``: the triton and torch providers with the whole
  step captured in one CUDA graph and replayed (vhist.train.graph, as
  ``vhist train --cuda-graph`` runs it), so that the host's Python is out of the step;
* ``triton+compile``: ``torch.compile(model, backend="vhist")`` on the triton backend
  (vhist.convert's rewrite on each captured graph, Inductor for the rest).

For each it reports the wall time of the first step (compilation and autotuning: Triton
kernels are tuned over per-shape shortlists, or not at all with ``VHIST_AUTOTUNE=0``, and
tuned picks are reused from the on-disk cache, see kernels/_config.py), the median step time (``triton.testing.do_bench`` after warm-up,
with 20th/80th percentiles), images/s, peak allocated memory, and the speedups over
``torch`` and ``torch_compile``; rows go to bench/results/ as JSON and CSV with the
device, versions, git sha and date (bench/common.py). Without a GPU nothing is timed: a
smoke pass runs one training step of two small models at 32 px on the torch backend and
writes nothing.

    python bench/models.py [--models 'resnet*'] [--batch 128] [--providers triton,torch]
    python bench/models.py --models torchvision:resnet50,torchvision:efficientnet_b0 --batch 128

A ``torchvision:NAME`` or ``timm:NAME`` model (that package installed) runs converted by
``vhist.convert`` on the vhist providers and as the library builds it on ``torch`` and
``torch_compile``; ``triton+compile`` compiles the unconverted model with the ``vhist``
backend.
"""
import argparse
import fnmatch
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vhist  # noqa: E402
from common import MODEL_PROVIDERS, metadata, print_table, report, time_ms, write_results  # noqa: E402
from vhist.benchmark import graphed_train_step  # noqa: E402
from vhist.convert.external import build, is_external  # noqa: E402
from vhist.models.stats import default_image_size  # noqa: E402

COLUMNS = ["model", "provider", "batch", "image_size", "first_step_s", "ms", "ms_p20", "ms_p80", "img_per_s", "peak_mem_gb",
           "speedup_vs_torch", "speedup_vs_torch_compile", "error"]
SMOKE_MODELS = ("resnet18", "mobilenet_v2")


def make_step(name: str, provider: str, batch: int, device: str = "cuda", image_size=None):
    """A zero-argument training step of ``name`` on ``provider``, and its input size."""
    torch.manual_seed(0)
    # A torchvision:NAME / timm:NAME model runs converted (vhist.convert) on the triton and
    # cuda providers, as the library builds it on the torch ones (the baseline) and for
    # triton+compile (the vhist backend converts each captured graph).
    model = build(name, image_size=image_size, converted=provider in ("triton", "cuda", "triton+graph"))
    model = model.to(device)
    size = image_size or default_image_size(model)
    channels_last = device == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    graphed = provider.endswith("+graph")
    backend = "torch" if provider == "torch_compile" else provider.removesuffix("+graph").removesuffix("+compile")
    if provider == "torch_compile":
        forward = torch.compile(model)
    elif provider.endswith("+compile"):
        from vhist.convert.dynamo import prime

        prime(device)
        forward = torch.compile(model, backend="vhist")
    else:
        forward = model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with vhist.use_backend(backend), autocast:
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if graphed:
        return graphed_train_step(step, x, y, opt, backend, autocast, forward), size
    return step, size


def bench_model(name: str, providers, batch: int) -> list[dict]:
    rows, times = [], {}
    for provider in providers:
        row = {"model": name, "provider": provider, "batch": batch, "dtype": "bf16-autocast",
               "layout": "channels_last"}
        try:
            step, size = make_step(name, provider, batch)
            row["image_size"] = size
            # The first step compiles (torch.compile, Triton kernels) and autotunes, outside
            # the timed region; its wall time is the cost a first run pays.
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            row["first_step_s"] = time.perf_counter() - start
            torch.cuda.reset_peak_memory_stats()
            median, p20, p80 = time_ms(step)
            row.update(ms=median, ms_p20=p20, ms_p80=p80, img_per_s=batch / median * 1e3,
                       peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
            times[provider] = median
        except Exception as err:  # a provider that fails is reported, not hidden
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        torch.cuda.empty_cache()
    for row in rows:
        for base in ("torch", "torch_compile"):
            if "ms" in row and base in times and row["provider"] != base:
                row[f"speedup_vs_{base}"] = times[base] / row["ms"]
    return rows


def smoke_pass() -> int:
    print("No CUDA device: timings need a GPU, so nothing is measured or written here.")
    print(f"Smoke pass only: one training step of {', '.join(SMOKE_MODELS)} at 32 px, batch 2, "
          "torch backend on CPU.\n")
    failures = 0
    for name in SMOKE_MODELS:
        step, size = make_step(name, "torch", batch=2, device="cpu", image_size=32)
        loss = step().item()
        ok = torch.isfinite(torch.tensor(loss)).item()
        failures += not ok
        print(f"{name:<16} {size} px  loss {loss:.4f}  {'ok' if ok else 'FAIL (non-finite loss)'}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="*", help="comma-separated names or shell patterns (default: all)")
    parser.add_argument("--batch", type=int, default=64, choices=[64, 128])
    parser.add_argument("--providers", default=",".join(MODEL_PROVIDERS), help=f"from: {', '.join(MODEL_PROVIDERS)}")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    names = sorted({n for pat in args.models.split(",") if pat.strip()
                    for n in vhist.list_models() if fnmatch.fnmatch(n, pat.strip())})
    names += [pat.strip() for pat in args.models.split(",") if is_external(pat.strip())]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in MODEL_PROVIDERS]
    if not names or unknown:
        parser.error(f"no model matches {args.models!r}" if not names else f"unknown providers {unknown}")
    if not torch.cuda.is_available():
        return smoke_pass()

    torch.backends.cudnn.benchmark = True
    meta = metadata()
    rows = []
    for name in names:
        rows.extend(bench_model(name, providers, args.batch))
        print_table(rows[-len(providers):], COLUMNS)
        write_results("models", meta, rows, args.out)  # a run stopped at its cap keeps these
    report("models", meta, rows, COLUMNS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
