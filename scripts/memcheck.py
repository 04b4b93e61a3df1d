"""compute-sanitizer memcheck over a few small vhist ops: the GPU run's ``memcheck`` part.

    python scripts/memcheck.py --out DIR [--timeout S]

Finds ``compute-sanitizer`` (on PATH, in ``$CUDA_HOME/bin``, in ``/usr/local/cuda/bin``)
and checks that it works on this machine with a probe (one torch kernel under memcheck):
the sanitizer supports only some driver and runtime pairs, and a sandboxed runtime can
refuse it. Where it works, the ops (``--ops``: conv2d with bias and ReLU, fused
conv+BN+ReLU, batch_norm, fused depthwise+BN+ReLU6, LRN; forward and backward at tiny
shapes on the triton backend, each compared with the torch backend) run under
``compute-sanitizer --tool memcheck``. Where it does not (or without a GPU: the dry run,
through Triton's interpreter) the ops run without it and the sanitizer is reported
"unavailable" with the reason: that is never a failure.

Writes ``DIR/memcheck.json``: ``status`` ("clean", "unavailable": the ops ran without the
sanitizer, "errors", "failed"), ``sanitizer`` ("available" / "unavailable"), ``reason``,
``errors`` (memcheck's error count, None when it did not run), ``ops`` (those that ran).
Exit status 1 only when memcheck reports an error or an op fails or differs from torch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "import torch; x = torch.ones(64, device='cuda'); print('probe', float((x + 1).sum()))"
PROBE_OUTPUT = "probe 128.0"
OPS_DONE = "memcheck ops ran:"


def find_sanitizer() -> str | None:
    """The compute-sanitizer executable, or None."""
    candidates = [shutil.which("compute-sanitizer")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "compute-sanitizer"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def sanitizer_unavailable(sanitizer: str | None, timeout: float) -> str | None:
    """Why memcheck cannot run here (None: it can): no GPU, no executable, or a probe of
    one torch kernel under memcheck that does not come back clean."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if sanitizer is None:
        return "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    try:
        proc = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c",
                               PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"probe under {sanitizer} did not finish: {e}"
    if proc.returncode != 0 or PROBE_OUTPUT not in proc.stdout:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        return f"probe (one torch kernel) under memcheck exited {proc.returncode}: {tail}"
    return None


def error_count(output: str) -> int | None:
    """memcheck's ``ERROR SUMMARY: N errors``, None when absent."""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    return int(found[-1]) if found else None


def run_ops() -> list[str]:
    """Runs each op forward and backward on the triton and the torch backends (fp32, TF32
    off) and compares outputs and gradients; returns the op names."""
    import torch

    import vhist

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def bn(c):  # (affine weight and bias, running mean and var)
        return [rand(c), rand(c)], [rand(c), rand(c).abs() + 0.5]

    def conv_bn(*weight_shape):
        params, buffers = bn(weight_shape[0])
        return [rand(*weight_shape), *params], buffers

    cases = {
        # name: (fn(x, *params, *buffers), x shape, (params, buffers)); buffers are updated in place
        "conv2d": (lambda x, w, b: vhist.ops.conv2d(x, w, b, padding=1, activation="relu"),
                   (2, 8, 6, 6), ([rand(16, 8, 3, 3), rand(16)], [])),
        "fused_conv_bn_act": (lambda x, w, g, b, m, v: vhist.ops.fused_conv_bn_act(x, w, g, b, m, v, padding=1),
                              (2, 8, 6, 6), conv_bn(16, 8, 3, 3)),
        "batch_norm": (lambda x, g, b, m, v: vhist.ops.batch_norm(x, m, v, g, b, training=True),
                       (2, 8, 5, 7), bn(8)),
        "fused_depthwise_bn_act": (lambda x, w, g, b, m, v: vhist.ops.fused_depthwise_bn_act(x, w, g, b, m, v,
                                                                                             padding=1),
                                   (2, 16, 6, 6), conv_bn(16, 1, 3, 3)),
        "local_response_norm": (lambda x: vhist.ops.local_response_norm(x, 5), (2, 8, 5, 5), ([], [])),
    }
    for name, (fn, shape, (params, buffers)) in cases.items():
        x = rand(*shape)
        results = []
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (x, *params)]
            state = [t.clone() for t in buffers]
            with vhist.use_backend(backend):
                out = fn(*leaves, *state)
                grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
                grads = torch.autograd.grad(out, leaves, grad_out)
            results.append((out, *grads, *state))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(OPS_DONE, ", ".join(cases), flush=True)
    return list(cases)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for memcheck.json")
    parser.add_argument("--ops", action="store_true", help="only run the ops (what runs under the sanitizer)")
    parser.add_argument("--probe-timeout", type=float, default=30, help="seconds for the sanitizer probe")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for the ops run")
    args = parser.parse_args(argv)
    if args.ops:
        run_ops()
        return 0
    sanitizer = find_sanitizer()
    reason = sanitizer_unavailable(sanitizer, args.probe_timeout)
    result = {"sanitizer": "unavailable" if reason else "available", "reason": reason, "executable": sanitizer,
              "errors": None, "ops": []}
    cmd = [sys.executable, os.path.abspath(__file__), "--ops"]
    if reason is None:
        cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20", *cmd]
    print(f"[memcheck] sanitizer {result['sanitizer']}" + (f": {reason}" if reason else f" ({sanitizer})"),
          flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"timed out after {args.timeout} s: {e}", None
    print(output[-6000:], flush=True)
    done = [line for line in output.splitlines() if line.startswith(OPS_DONE)]
    result["ops"] = done[-1][len(OPS_DONE):].strip().split(", ") if done else []
    if reason is None:
        result["errors"] = error_count(output)
    result["exit_code"] = code
    ok = code == 0 and bool(done) and not result["errors"]
    # "unavailable": the ops ran (and matched torch) without the sanitizer; not a failure.
    result["status"] = ("clean" if reason is None else "unavailable") if ok else \
        ("errors" if result["errors"] else "failed")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memcheck.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"[memcheck] {result['status']}: sanitizer {result['sanitizer']}, errors {result['errors']}, "
          f"ops {len(result['ops'])}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
