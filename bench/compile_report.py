"""Compile report: what every Triton launch of vhist compiles to on sm_90 (static, no GPU).

Runs the real launchers with every Triton launch recorded instead of run
(vhist.tools.launches; CPU tensors, nothing executes): the bench suites' layers
(bench/suites/, triton provider, every mode) and each model's training step (forward +
backward at batch 128 and the model's default size, bf16 autocast, channels_last, as
bench/models.py runs it). Then it compiles each distinct launch for sm_90 with Triton's
runtime specialization, for every autotune config the autotuner could pick
(vhist.tools.compile_report), and reports per variant: kernel, op, layer, dtype, config,
grid and programs per SM (132 SMs), registers, spilled bytes, shared memory, resident
blocks and warps per SM, matrix instruction (wgmma / mma.sync / none), global-memory
access kinds (tma, cp.async.<bits>, ld.<bits>), and for GEMM kernels the pipelined main
loops and pipeline fills per program. Every figure is static ("static, sm_90 compile"):
it describes the compiled code, not its speed.

Compiles are cached on disk ($VHIST_COMPILE_CACHE, default ~/.cache/vhist/compile_report)
and run one at a time.

    python bench/compile_report.py [--models resnet50,mobilenet_v2,alexnet,vgg16,inception_v3]
        [--ops conv,batch_norm,depthwise,local_response_norm] [--layers 'layer1.*'] [--dtypes bf16]
        [--max-configs N] [--out DIR]
"""
import argparse
import contextlib
import datetime
import fnmatch
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    sys.exit("compile_report.py compiles for sm_90: run it without TRITON_INTERPRET=1 (no GPU is needed)")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vhist  # noqa: E402
from common import git_sha  # noqa: E402
from vhist.tools import compile_report as report  # noqa: E402
from vhist.tools.launches import record_launches  # noqa: E402

SUITE_OPS = ("conv", "batch_norm", "depthwise", "local_response_norm", "bn_prologue", "layer_orders", "layer_norm",
             "bias_gelu", "attention")
MODELS = ("resnet50", "mobilenet_v2", "alexnet", "vgg16", "inception_v3")
MODEL_BATCH = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GEMM_KERNELS = ("_conv2d_fwd_kernel", "_conv2d_bwd_dgrad_kernel", "_conv2d_bwd_wgrad_kernel")
# FlashAttention-2's tile GEMMs: in fp16 / bf16 they should compile to wgmma (BLOCK_M of the
# forward >= 64: one warpgroup's tile).
ATTENTION_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")
# Elementwise / streaming kernels whose channels_last rows should load 16 bytes per thread.
STREAMING_KERNELS = ("_bn_fwd_stats_kernel", "_bn_fwd_apply_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_dx_kernel",
                     "_lrn_fwd_kernel", "_lrn_bwd_kernel", "_depthwise_fwd_kernel", "_depthwise_bwd_input_kernel",
                     "_depthwise_bwd_weight_reduce_kernel", "_depthwise_bwd_kernel")
COLUMNS = ["kernel", "op", "layer", "dtype", "config", "programs", "programs_per_sm", "regs", "spill_bytes", "shared",
           "blocks_per_sm", "warps_per_sm", "mma", "access", "pipelined_loops", "fills_per_program", "flags"]
LIMIT_SMEM_KB = report.SMEM_PER_BLOCK // 1024


class _OpLabels(TorchDispatchMode):
    """Labels every launch with the vhist custom op (``vhist::<op>``) that makes it, in
    the forward and in the backward alike."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "vhist":
            with self.recorder.scope(op=func._opname if hasattr(func, "_opname") else str(func)):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _no_random_fill():
    """Random inputs as uninitialized tensors: no value ever reaches a kernel while
    launches are recorded, and filling gigabytes of suite inputs would only cost time."""
    saved = {name: getattr(torch, name) for name in ("randn", "rand", "randn_like", "rand_like")}

    def empty(*size, generator=None, **kwargs):
        return torch.empty(*size, **kwargs)

    def empty_like(t, generator=None, **kwargs):
        return torch.empty_like(t, **kwargs)

    torch.randn = torch.rand = empty
    torch.randn_like = torch.rand_like = empty_like
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def record_suites(recorder, ops, layers, dtypes, modes):
    """Records the triton provider of every selected case of the bench suites."""
    import importlib

    for op in ops:
        suite = importlib.import_module(f"suites.{op}")
        cases = suite.cases("cpu", small=False, keep=lambda layer, dtype: (
            (not layers or any(fnmatch.fnmatch(layer, p) for p in layers)) and (not dtypes or dtype in dtypes)))
        while True:
            start = len(recorder.records)
            with _no_random_fill():
                case = next(cases, None)
            # Building a case may run the forward once (to size grad_output): drop those.
            del recorder.records[start:]
            if case is None:
                break
            dtype = str(case.dtype).replace("torch.", "")
            if modes and case.mode not in modes:
                continue
            with recorder.scope(source=f"suite:{op}", layer=case.layer, mode=case.mode, layout=case.layout,
                                shape="x".join(map(str, case.shape)), dtype=_short(dtype)), _no_random_fill():
                case.providers["triton"]()


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(dtype, dtype)


def record_model(recorder, name):
    """Records one training step of ``name`` (batch 128, default size, bf16 autocast,
    channels_last); forward launches are labelled with the innermost module's name."""
    from vhist.models.stats import default_image_size

    torch.manual_seed(0)
    model = vhist.create_model(name).to(memory_format=torch.channels_last).train()
    size = default_image_size(model)
    stack = []

    def pre(module, _inputs, qualname):
        stack.append(recorder.scope(layer=qualname))
        stack[-1].__enter__()

    def post(_module, _inputs, _output):
        stack.pop().__exit__(None, None, None)

    handles = []
    for qualname, module in model.named_modules():
        if qualname:
            handles.append(module.register_forward_pre_hook(lambda m, i, q=qualname: pre(m, i, q)))
            handles.append(module.register_forward_hook(post))
    x = torch.empty(MODEL_BATCH, 3, size, size).to(memory_format=torch.channels_last)
    with recorder.scope(source=f"model:{name}", mode="train step", shape=f"{MODEL_BATCH}x3x{size}x{size}"):
        with torch.autocast("cpu", dtype=torch.bfloat16), recorder.scope(mode="train fwd"):
            out = model(x)
        for h in handles:
            h.remove()
        with recorder.scope(layer="(backward)", mode="train bwd"):
            out.float().sum().backward()


def flags(row) -> list[str]:
    """The properties the CI test asserts, as marks on the row (empty when all hold)."""
    out = []
    if "error" in row:
        return ["compile-error"]
    if not row["fits_smem"]:
        out.append(f"smem>{LIMIT_SMEM_KB}KB (never launched)")
    elif uses_local_memory(row):
        out.append("spills")
    if row["kernel"] in GEMM_KERNELS and row["dtype"] in ("bf16", "fp16") and row.get("BLOCK_M", 0) >= 64 \
            and row["mma"] != "wgmma":
        out.append(f"no-wgmma({row['mma']})")
    if row["kernel"] in ATTENTION_KERNELS and row["dtype"] in ("bf16", "fp16") and row["mma"] != "wgmma":
        out.append(f"no-wgmma({row['mma']})")
    if is_aligned_channels_last_stream(row) and "ld.128" not in row["access"]:
        out.append("no-128-bit-loads")
    return out


def uses_local_memory(row) -> bool:
    """Spilled bytes, a stack frame or local-memory loads/stores: a stack frame can hold
    spills that the cubin's spill counter does not report (triton 3.6's ptxas puts one
    register of _bn_bwd_reduce_kernel in an 8-byte frame), and every local access is a
    round trip through L1 in the loop it sits in."""
    return bool(row["spill_bytes"] or row.get("stack_bytes") or row["ldl"] or row["stl"])


def is_aligned_channels_last_stream(row) -> bool:
    """A streaming kernel whose tensors are channels_last with 16-byte aligned rows."""
    return row["kernel"] in STREAMING_KERNELS and row.get("rows_aligned16", False)


def rows_aligned16(record) -> bool:
    """Every activation pointer of ``record`` (a 4-D tensor with more than one channel:
    not a depthwise weight) is 16-byte aligned and channels-innermost (stride 1 on dim 1)
    with a row of channels a multiple of 16 bytes."""
    acts = [a for a in record.pointers() if a.shape is not None and len(a.shape) == 4 and a.shape[1] > 1]
    return bool(acts) and all(a.aligned16 and a.strides[1] == 1 and (a.shape[1] * a.itemsize) % 16 == 0
                              for a in acts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models, or 'none'")
    parser.add_argument("--ops", default=",".join(SUITE_OPS), help=f"bench suites from {', '.join(SUITE_OPS)}, "
                        "or 'none'")
    parser.add_argument("--layers", default="", help="only suite layers matching these comma-separated patterns")
    parser.add_argument("--dtypes", default="", help=f"only suite cases of these dtypes ({', '.join(DTYPES)})")
    parser.add_argument("--modes", default="", help="only suite cases of these modes (e.g. 'train fwd+bwd')")
    parser.add_argument("--max-configs", type=int, default=0,
                        help="compile at most this many autotune candidates per launch (0: all)")
    parser.add_argument("--no-cache", action="store_true", help="recompile even when a cached analysis exists")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--quiet", action="store_true", help="print the summary only, not the table")
    parser.add_argument("--summarize", metavar="JSON", help="only write compile_report_summary.md (one row per "
                        "kernel and dtype) from an earlier run's JSON into --out")
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            data = json.load(f)
        path = write_summary_md(data, args.out)
        print(f"wrote {path}")
        return 0

    def listed(text, known, what):
        items = [] if text.strip() == "none" else [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if known is not None and t not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
        return items

    ops = listed(args.ops, SUITE_OPS, "ops")
    models = listed(args.models, vhist.list_models(), "models")
    dtypes = [DTYPES[d] for d in listed(args.dtypes, DTYPES, "dtypes")]
    layers = listed(args.layers, None, "layers")
    modes = listed(args.modes, None, "modes")

    t0 = time.time()
    with record_launches() as recorder, vhist.use_backend("triton"), _OpLabels(recorder):
        for name in models:
            record_model(recorder, name)
        record_suites(recorder, ops, layers, dtypes, modes)
    t_record = time.time() - t0
    print(f"recorded {len(recorder.records)} launches in {t_record:.1f} s", flush=True)

    rows, compiled, cached = [], 0, 0
    meta = {"kind": "static, sm_90 compile", "target": "cuda sm_90 (GPUTarget('cuda', 90, 32)), 132 SMs",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "git_sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv), "launches": len(recorder.records),
            "record_seconds": round(t_record, 1)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compile_report.json")

    def write(complete):
        # Rewritten as it goes, so that a stopped run keeps what it compiled.
        meta.update(compiled=compiled, cached=cached, seconds=round(time.time() - t0, 1), complete=complete)
        with open(path + ".tmp", "w") as f:
            json.dump({"meta": meta, "summary": summarize(rows), "rows": rows}, f, separators=(",", ":"))
        os.replace(path + ".tmp", path)

    for record, config, grid, _key in report.distinct_variants(recorder.records, args.max_configs):
        analysis, hit = report.cached_analysis(record, config, use_cache=not args.no_cache)
        compiled += not hit
        cached += hit
        row = report.variant_row(record, config, grid, analysis)
        row["rows_aligned16"] = rows_aligned16(record)
        row["flags"] = flags(row)
        rows.append(row)
        if len(rows) % 50 == 0:
            write(complete=False)
            print(f"  {len(rows)} variants ({compiled} compiled, {cached} cached), {time.time() - t0:.0f} s",
                  flush=True)
    write(complete=True)
    if not args.quiet:
        print_table(rows)
    print_summary(summarize(rows))
    print(f"wrote {path} ({len(rows)} variants, {compiled} compiled, {cached} from cache, "
          f"{time.time() - t0:.0f} s)")
    return 0


def summarize(rows) -> dict:
    """Counts per flag, with the (kernel, config) pairs that carry each."""
    out = {"variants": len(rows), "kernels": sorted({r["kernel"] for r in rows}), "flags": {}}
    for r in rows:
        for flag in r["flags"]:
            entry = out["flags"].setdefault(flag, {"count": 0, "examples": []})
            entry["count"] += 1
            example = f"{r['kernel']} [{r['config']}] {r['dtype']} {r['op']} {r['layer']}"
            if len(entry["examples"]) < 12 and example not in entry["examples"]:
                entry["examples"].append(example)
    return out


def write_summary_md(data: dict, out_dir: str) -> str:
    """compile_report_summary.md: per kernel and dtype, the ranges over its variants."""
    groups = {}
    for r in data["rows"]:
        if "error" not in r:
            groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    meta = data["meta"]
    lines = [f"# Compile report summary ({meta['kind']})", "",
             f"triton {meta['triton']}, torch {meta['torch']}, git {meta['git_sha'][:10]}, {meta['date']}; "
             f"{meta['launches']} launches recorded, {len(data['rows'])} variant rows"
             + ("" if meta.get("complete") else " (run stopped before every variant was compiled)") + ".", "",
             f"Made with `python bench/compile_report.py {' '.join(meta.get('argv', []))}`.", "",
             "Ranges over every compiled variant (config x launch) of each kernel; no figure here was measured "
             "on a GPU.", "",
             "| kernel | dtype | variants | configs | regs | spill B | shared KB | blocks/SM | mma | access | "
             "pipelined loops | fills/program | flagged |", "|" + "---|" * 13]

    def span(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"

    for (kernel, dtype), rows in sorted(groups.items()):
        flagged = sum(bool(r["flags"]) for r in rows)
        lines.append(" | ".join([
            f"| `{kernel}`", dtype, str(len(rows)), str(len({r["config"] for r in rows})), span([r["regs"] for r in rows]),
            span([r["spill_bytes"] for r in rows]), span([round(r["shared"] / 1024, 1) for r in rows]),
            span([r["blocks_per_sm"] for r in rows]), ",".join(sorted({r["mma"] for r in rows})),
            ",".join(sorted({a for r in rows for a in r["access"]})), span([r["pipelined_loops"] for r in rows]),
            span([r["fills_per_program"] for r in rows]), str(flagged)]) + " |")
    lines += ["", "Flags:", ""]
    for flag, entry in sorted(data["summary"]["flags"].items()) or [("none", {"count": 0, "examples": []})]:
        lines.append(f"- **{flag}**: {entry['count']} variants, e.g. " + "; ".join(entry["examples"][:5]))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compile_report_summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def print_summary(summary) -> None:
    print(f"\n{summary['variants']} variants of {len(summary['kernels'])} kernels (static, sm_90 compile)")
    if not summary["flags"]:
        print("no flags: every launchable variant is free of local memory, fits shared memory, uses wgmma where "
              "required and 128-bit loads on aligned channels_last rows")
    for flag, entry in sorted(summary["flags"].items()):
        print(f"  {flag}: {entry['count']} variants, e.g.")
        for example in entry["examples"][:6]:
            print(f"      {example}")


def print_table(rows) -> None:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.1f}"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return "-" if value is None else str(value)

    table = [[fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


if __name__ == "__main__":
    sys.exit(main())
