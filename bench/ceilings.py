"""The device and its two measured ceilings: device-to-device copy bandwidth and an
8192^3 bf16 matmul's TFLOP/s on random data (METHOD: measure them, don't quote them).

Copy: a 2 GiB buffer copied into another, bytes read plus bytes written over the median
of 20 timed copies (CUDA events, after 3 warm-ups). Matmul: torch.matmul of two random
8192x8192 bf16 matrices, 2*8192^3 FLOP over the median of 10 timed products (after 3
warm-ups). ``--dry-run`` runs the same code on the CPU at tiny sizes and measures
nothing (the JSON says so).

    python bench/ceilings.py [--dry-run] [--out DIR]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import metadata  # noqa: E402


def _median_ms(fn, warmup: int, reps: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(dry_run: bool) -> dict:
    """Device metadata plus the two ceilings (or their tiny CPU dry run)."""
    cuda = torch.cuda.is_available() and not dry_run
    device = "cuda" if cuda else "cpu"
    copy_bytes = 2 * 2**30 if cuda else 2**22
    n = 8192 if cuda else 128
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), 3, 20 if cuda else 3, cuda)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: torch.matmul(a, b), 3, 10 if cuda else 3, cuda)
    out = {**metadata(), "dry_run": not cuda,
           "copy_bytes": copy_bytes, "copy_ms": copy_ms, "copy_gbps_read_plus_write": 2 * copy_bytes / copy_ms / 1e6,
           "matmul_n": n, "matmul_ms": mm_ms, "matmul_bf16_tflops": 2 * n ** 3 / mm_ms / 1e9}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(sm_count=props.multi_processor_count, total_memory_gb=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    else:
        out["note"] = "dry run on the CPU at tiny sizes: not a measurement of any GPU"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, measures nothing")
    parser.add_argument("--out", default=None, help="write ceilings.json here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: the ceilings need a GPU (use --dry-run to exercise the code)")
    result = measure(args.dry_run)
    for key in ("device", "torch", "triton", "cuda", "copy_gbps_read_plus_write", "matmul_bf16_tflops"):
        print(f"{key:28s} {result.get(key)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ceilings.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
