"""bench/host.py --quick: one AlexNet training step with every launch recorded instead of
run, in a subprocess without TRITON_INTERPRET (nothing launches, no GPU is needed).

The counts are AlexNet's by construction: 5 convs (with bias, no BatchNorm) and 2 LRNs.
Launches: the first conv's input needs no gradient, so it makes forward + wgrad + the dw
and db reductions (4); each other conv adds dgrad (5 each, 20); each LRN one forward and
one backward (4): 28. Custom-op calls: one forward and one backward op per conv and per
LRN: 14.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_quick_counts_and_timings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [f for f in os.listdir(tmp_path) if f.startswith("host_") and f.endswith(".json")]
    assert len(files) == 1, files
    with open(tmp_path / files[0]) as f:
        data = json.load(f)
    (row,) = data["rows"]
    assert row["model"] == "alexnet"
    assert row["launches"] == 28
    assert row["custom_op_calls"] == 14
    for key in ("step_ms", "vhist_ms", "triton_bind_ms", "vhist_us_per_launch", "triton_bind_us_per_launch",
                "triton_bind_loop_us_per_launch", "optimizer_ms"):
        assert row[key] > 0, (key, row[key])
    assert row["vhist_ms"] < row["step_ms"]
    assert row["target_met"] == (row["vhist_ms"] <= row["triton_bind_ms"])
    assert "top host functions" in proc.stdout and "own ms" in proc.stdout
