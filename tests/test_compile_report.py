"""The compile report (bench/compile_report.py) on a few real layers, compiled for sm_90
without a GPU: the properties every launchable variant must have (static, sm_90 compile).

Runs in subprocesses without TRITON_INTERPRET (the report compiles; nothing launches).
A small subset keeps it to a couple of minutes on a cold cache: one 3x3 conv layer with
BatchNorm (forward, dgrad, wgrad, BN kernels, eval), one depthwise layer, one LRN layer,
one conv pair with BN + ReLU in the second conv's prologue (bench suite bn_prologue), bf16,
the first two autotune candidates of each launch.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = ["--models", "none", "--ops", "conv,batch_norm,depthwise,local_response_norm,bn_prologue",
          "--layers", "layer2.conv2,v2.features4,alexnet.lrn2,resnet50.layer1.conv1+conv2", "--dtypes", "bf16",
          "--max-configs", "2", "--quiet"]
SMEM_LIMIT = 227 * 1024
GEMM = ("_conv2d_fwd_kernel", "_conv2d_bwd_dgrad_kernel", "_conv2d_bwd_wgrad_kernel")


def _env(tmp):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VHIST_COMPILE_CACHE"] = os.environ.get("VHIST_COMPILE_CACHE", str(tmp / "cache"))
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile_report")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_report.py"), *SUBSET,
                           "--out", str(tmp)], capture_output=True, text=True, env=_env(tmp), timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip(f"Triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp / "compile_report.json") as f:
        return json.load(f)


def _rows(report, kernels=None):
    rows = [r for r in report["rows"] if kernels is None or r["kernel"] in kernels]
    assert rows, f"no variants of {kernels}"
    return rows


def _where(rows):
    return [f"{r['kernel']} [{r['config']}] {r['op']} {r['layer']}" for r in rows]


def test_compile_report_prologue_variants_keep_the_pipeline(report):
    """The forward and wgrad with the BN + ReLU prologue (issue 15 item 4): compiled,
    wgmma, one pipelined loop, one fill per program (the spill and wgmma rules above
    cover them too)."""
    rows = [r for r in _rows(report, ("_conv2d_fwd_kernel", "_conv2d_bwd_wgrad_kernel"))
            if r["op"].startswith("conv_bn_stats")]
    assert {r["kernel"] for r in rows} == {"_conv2d_fwd_kernel", "_conv2d_bwd_wgrad_kernel"}
    for r in rows:
        assert r["mma"] == "wgmma" and r["pipelined_loops"] == 1 and r["fills_per_program"] == 1, r


def test_compile_report_covers_every_kernel_of_the_subset(report):
    kernels = {r["kernel"] for r in report["rows"]}
    for name in ("_conv2d_fwd_kernel", "_conv2d_bwd_dgrad_kernel", "_conv2d_bwd_wgrad_kernel",
                 "_conv2d_bwd_wgrad_reduce_kernel", "_bn_fwd_stats_kernel", "_bn_fwd_finalize_kernel",
                 "_bn_fwd_apply_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_finalize_kernel", "_bn_bwd_dx_kernel",
                 "_depthwise_fwd_kernel", "_depthwise_bwd_input_kernel", "_depthwise_bwd_kernel", "_lrn_fwd_kernel",
                 "_lrn_bwd_kernel"):
        assert name in kernels, name
    assert not [r for r in report["rows"] if "error" in r], _where([r for r in report["rows"] if "error" in r])
    assert report["meta"]["kind"] == "static, sm_90 compile"


def test_compile_report_no_launchable_variant_uses_local_memory(report):
    """No spill, no stack frame, no local load or store, under every supported triton
    (issue 22 item 3: triton 3.6's ptxas gave _bn_bwd_reduce_kernel at BLOCK_C=64 and
    _depthwise_bwd_kernel at MobileNetV2's 144-channel stride-2 layer an 8-byte frame)."""
    local = [r for r in _rows(report) if r["fits_smem"] and (r["spill_bytes"] or r["stack_bytes"] or r["ldl"]
                                                             or r["stl"])]
    assert not local, _where(local)
    # The variants that had one under triton 3.6 are in the subset.
    assert [r for r in _rows(report, ("_bn_bwd_reduce_kernel",)) if r["config"].startswith("BLOCK_C=64,BLOCK_S=32")]
    assert [r for r in _rows(report, ("_depthwise_bwd_kernel",)) if r["layer"] == "v2.features4"]


def test_compile_report_every_variant_fits_shared_memory(report):
    too_big = [r for r in _rows(report) if r["shared"] > SMEM_LIMIT]
    assert not too_big, _where(too_big)
    assert all(r["fits_smem"] for r in report["rows"])


def test_compile_report_low_precision_gemms_use_wgmma(report):
    rows = [r for r in _rows(report, GEMM) if r["dtype"] in ("bf16", "fp16") and r["BLOCK_M"] >= 64]
    assert rows
    assert not [r for r in rows if r["mma"] != "wgmma"], _where([r for r in rows if r["mma"] != "wgmma"])


def test_compile_report_gemm_pipeline_structure(report):
    # 3x3 conv: the forward and dgrad run one pipelined loop over (tap, channel block)
    # and the wgrad one over positions: one fill per program each (issue 15).
    for kernel, fills in (("_conv2d_fwd_kernel", 1), ("_conv2d_bwd_dgrad_kernel", 1), ("_conv2d_bwd_wgrad_kernel", 1)):
        for r in _rows(report, (kernel,)):
            assert r["pipelined_loops"] == 1 and r["fills_per_program"] == fills, (kernel, r["config"], r)
            assert any(kind.startswith("cp.async.128") or kind == "tma" for kind in r["access"]), r


def _aligned_channels_last(report, kernels):
    rows = [r for r in _rows(report, kernels) if r["rows_aligned16"]]
    missing = set(kernels) - {r["kernel"] for r in rows}
    assert not missing, f"no aligned channels_last launch of {sorted(missing)}"
    return rows


def test_compile_report_bn_and_depthwise_load_16_bytes_on_aligned_channels_last_rows(report):
    kernels = ("_bn_fwd_stats_kernel", "_bn_fwd_apply_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_dx_kernel",
               "_depthwise_fwd_kernel", "_depthwise_bwd_input_kernel", "_depthwise_bwd_weight_reduce_kernel",
               "_depthwise_bwd_kernel")
    narrow = [r for r in _aligned_channels_last(report, kernels) if "ld.128" not in r["access"]]
    assert not narrow, _where(narrow)


def test_compile_report_lrn_loads_16_bytes_on_aligned_channels_last_rows(report):
    narrow = [r for r in _aligned_channels_last(report, ("_lrn_fwd_kernel", "_lrn_bwd_kernel"))
              if "ld.128" not in r["access"]]
    assert not narrow, _where(narrow)


RECORD_SCRIPT = r"""
import torch, triton, triton.language as tl
from vhist.tools.launches import record_launches
from vhist.tools.compile_report import compile_variant

@triton.jit
def _scale_kernel(X, Y, n, stride, ONE: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + o * stride, tl.load(X + o * stride, mask=o < n) * 2, mask=o < n)

x = torch.empty(64, dtype=torch.float16)
with record_launches() as rec:
    _scale_kernel[(4,)](x, x[1:], 48, 1, ONE=1, BLOCK=16, num_warps=2)
(r,) = rec.records
print([a.specialization for a in r.args], r.constexprs, r.candidates[0][0].num_warps, r.candidates[0][1])
ttir = compile_variant(r, r.candidates[0][0]).asm["ttir"]
head = [l for l in ttir.splitlines() if "tt.func" in l][0]
print(head.count("tt.divisibility"), "stride" in head)
"""


def test_launch_recorder_records_runtime_specialization(tmp_path):
    script = tmp_path / "record_scale.py"  # @triton.jit needs its source in a file
    script.write_text(RECORD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    specs, compiled = proc.stdout.strip().splitlines()[-2:]
    # x is 16-byte aligned, x[1:] is not; 48 is divisible by 16; the stride 1 becomes a constant.
    assert specs == "['*fp16:16', '*fp16', 'i32:16', '1'] {'ONE': 1, 'BLOCK': 16} 2 (4, 1, 1)", specs
    # Compiled as Triton's runtime would: divisibility on X and n only, the stride folded away.
    assert compiled == "2 False", compiled
