"""bench/kernels.py: its CPU correctness pass covers every public op of vhist.ops."""
import importlib.util
import os

import vhist.ops

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
