"""One GPU call that validates and measures everything, within a wall-time budget.

Run through ``bash scripts/gpu_run.sh all [--dry-run]``. Parts, in order of value, each
a subprocess with its own time cap; a part that would not fit in what is left of the
budget is skipped and reported as skipped, never dropped:

1. ``ceilings``: device, versions, measured copy bandwidth and bf16 matmul TFLOP/s;
2. ``correctness``: a curated pytest subset on the GPU (every op and dtype, the
   bf16/fp16 three-way tests, real layer shapes, compiled Triton) and the nvcc build of
   every CUDA kernel (the ``cuda`` backend's own tests build and run the extension);
3. ``memcheck``: ``scripts/memcheck.py``, compute-sanitizer memcheck over a few small
   ops (conv2d, fused conv+BN+ReLU, batch_norm, fused depthwise+BN+ReLU6, LRN, forward
   and backward); where the sanitizer does not work on the machine's runtime it is
   reported "unavailable" (the ops run without it) and the part still passes;
4. ``kernels``: ``bench/kernels.py --quick`` (triton vs eager cuDNN channels_last and
   torch.compile);
5. ``models``: ``bench/models.py`` for resnet50, mobilenet_v2 and alexnet (triton, torch
   eager, the whole step in a CUDA graph for both (``triton+graph``, ``torch+graph``,
   issue 13's targets), torch.compile), with the first step's compile+tune time;
6. ``train``: a short synthetic-data ``vhist train``.

After every part, ``gpu_run.json`` (device, versions, git sha, date, each part's status,
time and results) and ``gpu_run.log`` are rewritten in the output folder, with the
part's own files (``pytest.xml``, ``kernels.json``/``.csv``, ``models.json``/``.csv``):
at most 7 files, so that the device tool brings every one back.

``--dry-run`` runs the same sequence on the CPU through Triton's interpreter at tiny
shapes (CI runs it); nothing it prints is a measurement.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 540  # 9 minutes, the install and every compile included
GPU_TEST_FILES = ["tests/test_local_response_norm.py", "tests/test_depthwise.py", "tests/test_fused_conv_bn_relu.py",
                  "tests/test_conv.py", "tests/test_batch_norm.py", "tests/test_sync_batch_norm.py",
                  "tests/test_gradcheck.py", "tests/test_bn_prologue.py", "tests/test_host.py"]
MODELS = "resnet50,mobilenet_v2,alexnet"


def parts(dry: bool, work: str, py: str) -> list[dict]:
    """Per part: name, cap (seconds), the least time left worth starting it with, its
    commands and environment. A dry run's caps are doubled: the interpreter on a shared
    CI machine is slow, and the sum still fits the budget."""
    interp = {"TRITON_INTERPRET": "1"} if dry else {}
    no_tune = {"VHIST_AUTOTUNE": "0"}
    tests = ([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *GPU_TEST_FILES] if dry else
             [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={work}/pytest.xml",
              "--durations=15", *GPU_TEST_FILES])
    train_data = "synthetic:classes=4,size=32,train=32,test=8" if dry else \
        "synthetic:classes=10,size=64,train=2048,test=256"
    train = [py, "-m", "vhist", "train", "--model", "resnet18", "--data", train_data, "--epochs", "1",
             "--batch-size", "16" if dry else "128", "--out-dir", f"{work}/train", "--run-name", "gpu-run",
             "--workers", "0"] + (["--device", "cpu", "--backend", "torch"] if dry else ["--backend", "triton"])
    return [
        dict(name="ceilings", cap=40, min=15, env=interp,
             cmds=[[py, "bench/ceilings.py", "--out", work] + (["--dry-run"] if dry else [])]),
        dict(name="correctness", cap=135, min=40, env={**interp, **no_tune},
             cmds=[tests] + ([] if dry else [[py, "scripts/check_csrc.py"]])),
        # The probe and the ops under the sanitizer within the cap (compiles included).
        dict(name="memcheck", cap=60, min=30, env={**interp, **no_tune},
             cmds=[[py, "scripts/memcheck.py", "--out", work, "--probe-timeout", "20", "--timeout", "35"]]),
        dict(name="kernels", cap=95, min=40, env=interp,
             cmds=[[py, "bench/kernels.py", "--quick", "--out", work]]),
        dict(name="models", cap=140, min=40, env={**interp, **no_tune},
             cmds=[[py, "bench/models.py", "--models", MODELS, "--batch", "128", "--providers",
                    "triton,torch,triton+graph,torch+graph,torch_compile", "--out", work]]),
        dict(name="train", cap=50, min=20, env={**interp, **no_tune}, cmds=[train]),
    ]


def run_part(part: dict, limit: float, log) -> tuple[str, float, list[int]]:
    """Runs the part's commands in order within ``limit`` seconds; (status, seconds, codes).
    A command past the limit gets SIGINT (pytest and the benches then write what they
    have), then SIGKILL 15 s later."""
    start, codes = time.time(), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part["env"]}
    if "TRITON_INTERPRET" not in part["env"]:
        env.pop("TRITON_INTERPRET", None)
    for cmd in part["cmds"]:
        left = limit - (time.time() - start)
        if left <= 1:
            return "timed out", time.time() - start, codes
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            codes.append(proc.wait(timeout=left))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "timed out", time.time() - start, codes + [proc.returncode]
    return ("ok" if all(c == 0 for c in codes) else "failed"), time.time() - start, codes


def collect(name: str, work: str, out: str, summary: dict) -> None:
    """Copies a part's files into ``out`` under fixed names and reads their key figures."""
    if name == "ceilings" and os.path.exists(f"{work}/ceilings.json"):
        with open(f"{work}/ceilings.json") as f:
            summary["ceilings"] = json.load(f)
    if name == "correctness" and os.path.exists(f"{work}/pytest.xml"):
        shutil.copy(f"{work}/pytest.xml", f"{out}/pytest.xml")
        suites = ET.parse(f"{work}/pytest.xml").getroot()
        suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    for bench in ("kernels", "models"):
        if name != bench:
            continue
        for ext in ("json", "csv"):
            found = sorted(glob.glob(f"{work}/{bench}_*.{ext}"))
            if found:
                shutil.copy(found[-1], f"{out}/{bench}.{ext}")
        if os.path.exists(f"{out}/{bench}.json"):
            with open(f"{out}/{bench}.json") as f:
                summary[f"{bench}_rows"] = len(json.load(f)["rows"])
    if name == "memcheck" and os.path.exists(f"{work}/memcheck.json"):
        with open(f"{work}/memcheck.json") as f:
            summary["memcheck"] = json.load(f)
    if name == "train":
        found = glob.glob(f"{work}/train/*/summary.json")
        if found:
            with open(found[0]) as f:
                summary["train"] = json.load(f)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU at tiny shapes")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else bench/results; a "
                        "temporary folder for --dry-run)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="wall-time budget in seconds")
    parser.add_argument("--only", default="", help="comma-separated part names to run (the others are skipped)")
    args = parser.parse_args(argv)
    t0 = float(os.environ.get("VHIST_GPU_RUN_T0", time.time()))
    out = args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="vhist-gpu-run-dry-") if args.dry_run
                                               else os.path.join(ROOT, "bench", "results"))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vhist-gpu-run-")
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    summary = {"dry_run": args.dry_run, "git_sha": git_sha(), "budget_s": args.budget,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "parts": []}
    if args.dry_run:
        summary["note"] = "dry run on the CPU through Triton's interpreter at tiny shapes: measures nothing"
    with open(f"{out}/gpu_run.log", "a") as log:
        for part in parts(args.dry_run, work, sys.executable):
            left = args.budget - (time.time() - t0) - 5
            if args.dry_run:
                part["cap"] *= 2
            entry = {"part": part["name"], "cap_s": part["cap"]}
            if only and part["name"] not in only:
                entry.update(status="skipped", reason="not in --only")
            elif left < part["min"]:
                entry.update(status="skipped", reason=f"would not fit: {left:.0f} s of the budget left, "
                             f"needs at least {part['min']} s")
            else:
                log.write(f"\n===== {part['name']} (cap {min(part['cap'], left):.0f} s) =====\n")
                log.flush()
                status, seconds, codes = run_part(part, min(part["cap"], left), log)
                entry.update(status=status, seconds=round(seconds, 1), exit_codes=codes)
                collect(part["name"], work, out, summary)
            summary["parts"].append(entry)
            summary["elapsed_s"] = round(time.time() - t0, 1)
            with open(f"{out}/gpu_run.json", "w") as f:
                json.dump(summary, f, indent=1)
            print(f"[gpu_run] {entry['part']:12s} {entry['status']:10s} {entry.get('seconds', '')} "
                  f"{entry.get('reason', '')}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_run] wrote {out}/gpu_run.json and gpu_run.log in {time.time() - t0:.0f} s")
    return 0 if all(p["status"] in ("ok", "skipped") for p in summary["parts"]) and \
        not any(p.get("reason", "").startswith("would not fit") for p in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
