"""bench/kernels.py: its CPU correctness pass covers every public op of vhist.ops, and
its memory-bound cases carry the triton provider's design bytes."""
import importlib.util
import os

import vhist.ops

from utils import run_recording_script

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _kernels_bench():
    # Loaded from its path: the bare name "kernels" is also the repository's kernels/ folder.
    spec = importlib.util.spec_from_file_location("vhist_bench_kernels", os.path.join(BENCH, "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_correctness_pass_lists_every_op():
    bench = _kernels_bench()
    covered = {case.op for case in bench.correctness_cases(list(bench.SUITES))}
    # An alias (fused_conv_bn_relu of fused_conv_bn_act) is the same op: its rows carry the op's own name.
    public_ops = {name for name in vhist.ops.__all__ if name[0].islower() and getattr(vhist.ops, name).__name__ == name}
    assert "fused_conv_bn_act" in public_ops and "fused_conv_bn_relu" not in public_ops
    assert public_ops - covered == set(), f"ops without a correctness row: {sorted(public_ops - covered)}"
    assert covered <= public_ops, sorted(covered - public_ops)
    assert "fused_depthwise_bn_act" in covered


# Recording launches needs compiled (not interpreted) Triton: a subprocess without
# TRITON_INTERPRET builds the tiny cases on the CPU and records their launches.
DESIGN_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from common import design_bytes
from suites import batch_norm, depthwise, local_response_norm
rows = []
for suite in (batch_norm, depthwise, local_response_norm):
    for case in suite.cases("cpu", small=True):
        if case.bytes:
            rows.append(dict(op=case.op, layer=case.layer, mode=case.mode, bytes=case.bytes,
                             design=design_bytes(case)))
print(json.dumps(rows))
"""


def test_design_bytes_of_the_memory_bound_cases():
    """Every memory-bound suite mode that a traffic mode describes reports the triton
    provider's design bytes: at least the minimal bytes of the ``gbps`` column (vhist's
    kernels move every tensor at least once), and the plain depthwise fwd+bwd, at its
    minimal passes, within the weights and partials of it."""
    seen = set()
    for row in run_recording_script(DESIGN_SCRIPT, BENCH):
        described = row["mode"] not in ("eval fwd", "bwd-input", "bwd-weight")
        assert (row["design"] is not None) == described, row
        if row["design"] is None:
            continue
        seen.add((row["op"], row["mode"]))
        assert row["design"] >= row["bytes"], row
        if row["op"] == "depthwise_conv2d" and row["mode"] == "fwd+bwd":
            # 3x + 2y by design and at the minimum; the rest is weights and partials (small).
            assert row["design"] < 1.5 * row["bytes"], row
    assert {("batch_norm", "train fwd+bwd"), ("local_response_norm", "fwd+bwd"), ("depthwise_conv2d", "fwd+bwd"),
            ("fused_depthwise_bn_act", "train fwd+bwd")} <= seen
