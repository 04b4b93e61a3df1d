"""A static model of the conv forward GEMM: predicted fraction of bf16 peak per layer.

A MODEL, not a measurement. It reads the compile report's JSON (bench/compile_report.py,
static, sm_90 compile) and, for every conv layer of the bench suites (ResNet-50,
Inception-v3, AlexNet / VGG-16 at batch 128, bf16), takes the config the launcher runs
without tuning (the first of the shape's shortlist; the BN-statistics forward always
runs it) with its compiled occupancy, and multiplies five factors:

* tile: useful multiply-adds over the ones the tiles issue (M, N and K rounded up to
  BLOCK_M, BLOCK_N and whole K blocks per tap; the stem's K counts its 16 padded channels);
* waves: programs over (waves x resident program slots of 132 SMs);
* fill: K steps over (K steps + (stages - 1) / resident programs per SM), one pipeline
  fill per program, hidden in part by the other programs on the SM;
* shared memory: wgmma reads both operands from shared memory, (BLOCK_M + BLOCK_N) x
  BLOCK_K x 2 bytes per BLOCK_M x BLOCK_N x BLOCK_K multiply-adds, at 128 bytes per clock
  per SM against 2048 bf16 multiply-adds per clock per SM (989 TFLOP/s at 132 SMs and
  1.83 GHz): a cap of min(1, BLOCK_M x BLOCK_N / (32 x (BLOCK_M + BLOCK_N)));
* HBM: the time to move input, weight and output once at the device's bandwidth bounds
  the time from below.

Left out: L2 traffic, the epilogue, the per-step address arithmetic, instruction issue
and clock throttling; so the figures are upper bounds to hold a GPU run against, and a
tuned Hopper GEMM reaching 0.7-0.8 of peak is the usual ceiling in practice.

    python bench/conv_model.py --report bench/results/compile_report.json [--device H100]
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DEVICE_PEAKS  # noqa: E402
from vhist.kernels.conv import STEM_CHANNELS  # noqa: E402
from suites.conv import ALEXNET_VGG16_LAYERS, INCEPTION_V3_LAYERS, RESNET50_LAYERS  # noqa: E402

SMS = 132
BATCH = 128
BYTES = 2  # bf16
SMEM_BYTES_PER_CLOCK = 128
MACS_PER_CLOCK = 2048


def layer_gemm(c_in, c_out, kernel, stride, padding, size):
    """(M, N, taps, channels per tap as the kernel sees them, useful MACs, HBM bytes) of
    one layer's forward at batch 128."""
    kh, kw = kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    oh = (size[0] + 2 * ph - kh) // stride + 1
    ow = (size[1] + 2 * pw - kw) // stride + 1
    m = BATCH * oh * ow
    channels = STEM_CHANNELS if c_in <= 4 else c_in
    macs = m * c_out * kh * kw * c_in
    hbm = BYTES * (BATCH * size[0] * size[1] * channels + c_out * kh * kw * channels + m * c_out)
    return m, c_out, kh * kw, channels, macs, hbm


def predict(gemm, config, blocks_per_sm, peaks):
    """The model's factors and predicted fraction of peak for one layer and config."""
    m, n, taps, channels, macs, hbm = gemm
    bm, bn, bk, stages = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_stages"]
    steps = taps * math.ceil(channels / bk)
    tiles_m, tiles_n = math.ceil(m / bm), math.ceil(n / bn)
    tile = macs / (tiles_m * bm * tiles_n * bn * steps * bk)
    programs, slots = tiles_m * tiles_n, SMS * blocks_per_sm
    waves = programs / (math.ceil(programs / slots) * slots)
    fill = steps / (steps + (stages - 1) / blocks_per_sm)
    smem = min(1.0, bm * bn * SMEM_BYTES_PER_CLOCK / (BYTES * (bm + bn) * MACS_PER_CLOCK))
    compute = tile * waves * fill * smem
    t_peak = 2 * macs / (peaks["bf16_tflops"] * 1e12)
    t_hbm = hbm / (peaks["hbm_gbps"] * 1e9)
    fraction = t_peak / max(t_peak / compute, t_hbm)
    return {"tile": tile, "waves": waves, "fill": fill, "smem": smem, "hbm_bound": t_hbm > t_peak / compute,
            "programs_per_sm": programs / SMS, "k_steps": steps, "fraction_of_peak": fraction}


def forward_rows(report):
    """The heuristic (first shortlisted) forward config of every suite layer, from the
    compile report's ``eval fwd`` launches (the same config the training forward runs)."""
    picked = {}
    for row in report["rows"]:
        if row["kernel"] == "_conv2d_fwd_kernel" and row.get("mode") == "eval fwd" and row.get("dtype") == "bf16" \
                and "error" not in row and row["layer"] not in picked:
            picked[row["layer"]] = row
    return picked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "compile_report.json"))
    parser.add_argument("--device", default="H100", choices=sorted(DEVICE_PEAKS))
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    picked = forward_rows(report)
    peaks = DEVICE_PEAKS[args.device]
    print(f"MODEL (not measured): predicted fraction of {args.device} bf16 peak ({peaks['bf16_tflops']} TFLOP/s) "
          f"of the conv forward, batch 128, from the compile report of git {report['meta']['git_sha'][:10]} "
          "(static, sm_90 compile)")
    print(f"{'layer':22s} {'config':34s} {'prog/SM':>7s} {'tile':>5s} {'waves':>5s} {'fill':>5s} {'smem':>5s} "
          f"{'bound':>5s} {'model':>5s}")
    rows = []
    for name, c_in, c_out, kernel, stride, padding, size in RESNET50_LAYERS + INCEPTION_V3_LAYERS \
            + ALEXNET_VGG16_LAYERS:
        row = picked.get(name)
        if row is None:
            continue
        out = predict(layer_gemm(c_in, c_out, kernel, stride, padding, size), row, row["blocks_per_sm"], peaks)
        rows.append({"layer": name, "config": row["config"], "blocks_per_sm": row["blocks_per_sm"], **out})
        print(f"{name:22s} {row['config']:34s} {out['programs_per_sm']:7.1f} {out['tile']:5.2f} {out['waves']:5.2f} "
              f"{out['fill']:5.2f} {out['smem']:5.2f} {'hbm' if out['hbm_bound'] else 'mma':>5s} "
              f"{out['fraction_of_peak']:5.2f}")
    if not rows:
        print("the report has no bf16 'eval fwd' conv launches: run bench/compile_report.py --ops conv first")
        return 1
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kind": "model (static, sm_90 compile + analytic factors)", "device": args.device,
                       "git_sha": report["meta"]["git_sha"], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
