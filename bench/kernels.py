"""Kernel benchmark: every vhist op against PyTorch eager and torch.compile.

On a CUDA machine each case is timed for every provider in the same run (median of
triton.testing.do_bench after warm-up, cudnn.benchmark on), printed as a table and
written to bench/results/ as JSON and CSV with the device, versions, git sha and date.
Without a GPU it runs a correctness-only pass at tiny shapes through Triton's
interpreter; timings need a GPU.

    python bench/kernels.py [--ops batch_norm] [--dtype bf16] [--layout channels_last] [--quick]

``--quick`` keeps a few real layers per op (QUICK below; bf16 on a GPU), every mode and
layout: the subset scripts/gpu_run.sh times. Results are rewritten after every case, so
a run stopped at its time cap keeps what it measured.
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_peaks, measure, metadata, print_table, report, write_results  # noqa: E402
from suites import attention  # noqa: E402
from suites import batch_norm  # noqa: E402
from suites import bias_gelu  # noqa: E402
from suites import bn_prologue  # noqa: E402
from suites import conv  # noqa: E402
from suites import depthwise  # noqa: E402
from suites import layer_norm  # noqa: E402
from suites import layer_orders  # noqa: E402
from suites import local_response_norm  # noqa: E402

SUITES = {
    "batch_norm": batch_norm.cases,
    "conv": conv.cases,
    "depthwise": depthwise.cases,
    "local_response_norm": local_response_norm.cases,
    "bn_prologue": bn_prologue.cases,
    "layer_orders": layer_orders.cases,
    "layer_norm": layer_norm.cases,
    "bias_gelu": bias_gelu.cases,
    "attention": attention.cases,
}
# --quick: a few real layers per suite (and the first tiny layer of the correctness pass).
QUICK = {
    "batch_norm": {"layer1.conv3", "layer3.conv2", "tiny"},
    "conv": {"layer1.conv2", "layer3.conv3", "Mixed_6b.1x7", "vgg16.conv3_2", "tiny.3x3"},
    "depthwise": {"v2.features4", "v1.dw7-11", "tiny-s1"},
    "local_response_norm": {"alexnet.lrn1", "tiny"},
    "bn_prologue": {"resnet50.layer1.conv1+conv2", "resnet50.layer3.0.conv1+conv2", "tiny.1x1+3x3"},
    "layer_orders": {"convmixer_768_32.pointwise", "densenet121.denseblock1.denselayer6.conv1", "tiny.conv_act_bn",
                     "tiny.bn_act_conv"},
    "layer_norm": {"vit_s.add_ln", "vit_b.ln", "tiny"},
    "bias_gelu": {"vit_s.mlp", "tiny"},
    "attention": {"vit_s.attn", "vit_b.attn", "tiny"},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["op", "layer", "shape", "dtype", "layout", "mode", "provider", "ms", "gbps", "gbps_design",
           "pct_peak_bw", "tflops", "pct_peak_flops", "speedup_vs_torch", "speedup_vs_torch_compile", "error"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated, from: {', '.join(SUITES)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="only this dtype")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], help="only this layout")
    parser.add_argument("--mode", help="only modes containing this text (e.g. 'fwd+bwd')")
    parser.add_argument("--quick", action="store_true", help="a few real layers per op (QUICK), bf16 on a GPU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in SUITES]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(SUITES)}")

    def keep(op):
        if not args.quick:
            return None
        quick_dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16
        return lambda layer, dtype: layer in QUICK[op] and (dtype == quick_dtype or not torch.cuda.is_available())

    def selected(case):
        return ((args.dtype is None or case.dtype == DTYPES[args.dtype])
                and (args.layout is None or case.layout == args.layout)
                and (args.mode is None or args.mode in case.mode))

    if not torch.cuda.is_available():
        return correctness_pass(ops, selected, keep)

    torch.backends.cudnn.benchmark = True
    meta = metadata()
    peaks = device_peaks(meta["device"])
    rows = []
    for op in ops:
        for case in SUITES[op]("cuda", keep=keep(op)):
            if selected(case) and case.providers:
                rows.extend(measure(case, peaks))
                print_table(rows[-len(case.providers):], COLUMNS)
                write_results("kernels", meta, rows, args.out)
                torch.cuda.empty_cache()
    report("kernels", meta, rows, COLUMNS, args.out)
    return 0


def correctness_cases(ops, selected=lambda case: True, keep=lambda op: None):
    """The cases of the CPU correctness pass: every suite's tiny shapes that have a check."""
    for op in ops:
        for case in SUITES[op]("cpu", small=True, keep=keep(op)):
            if selected(case) and case.check is not None:
                yield case


def correctness_pass(ops, selected, keep=lambda op: None):
    print("No CUDA device: correctness-only pass through Triton's interpreter at tiny shapes.")
    print("Timings need a GPU; none are measured or written here.\n")
    failures, rows = 0, []
    for case in correctness_cases(ops, selected, keep):
        err = case.check()
        ok = err <= case.tolerance
        failures += not ok
        rows.append({"op": case.op, "layer": case.layer, "shape": "x".join(map(str, case.shape)),
                     "dtype": str(case.dtype).replace("torch.", ""), "layout": case.layout,
                     "mode": case.mode, "max_abs_err": err, "status": "ok" if ok else "FAIL"})
    print_table(rows, ["op", "layer", "shape", "dtype", "layout", "mode", "max_abs_err", "status"])
    print(f"\n{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
