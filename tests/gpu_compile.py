"""Compiles every vhist Triton kernel for sm_90 without a GPU (run as a script by
tests/test_triton_gpu_compile.py, in a process without TRITON_INTERPRET).

The interpreter never runs Triton's compiler, so type errors in lowering, illegal
tl.dot shapes or a tile that needs more shared memory than an H100 block can have
would first show on a GPU. This compiles each kernel, in every dtype it is launched
with, through the whole pipeline (TTIR, TTGIR, LLVM, PTX, cubin with Triton's ptxas),
for the interpreter's config and for every autotune config of the GEMM kernels, and
checks the shared memory of the configs that launch everywhere.

Prints one line per compiled variant and "compiled N variants" last.
"""
import concurrent.futures
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import vhist.kernels.batch_norm as bn
import vhist.kernels.conv as conv
import vhist.kernels.depthwise as dw
import vhist.kernels.local_response_norm as lrn
from vhist.ops.depthwise import FWD_BLOCK_P

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 227 * 1024  # bytes of shared memory one block can opt into
DATA_TYPES = {"bf16": tl.float32, "fp16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
FLOATS = {"eps", "momentum", "inv_count", "alpha_over_n", "beta", "k"}
# Pointers in the accumulation dtype (statistics, partial sums); parameters are fp32.
ACC_POINTERS = {"PartMean", "PartM2", "PartCount", "Mean", "Rstd", "PartSumDy", "PartSumDyXhat", "SumDy",
                "SumDyXhat", "PartDW", "PartDB", "Part"}
PARAM_POINTERS = {"RunningMean", "RunningVar", "W", "B", "Bias", "DW", "DB"}


def compile_kernel(fn, n_pointers, dtype, constexprs, num_warps=4, num_stages=3, param_pointers=PARAM_POINTERS):
    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif i < n_pointers:
            kind = acc if p.name in ACC_POINTERS else ("fp32" if p.name in param_pointers and dtype != "fp64"
                                                        else dtype)
            signature[p.name] = "*" + kind
        else:
            signature[p.name] = "fp32" if p.name in FLOATS else "i32"
    names = fn.arg_names
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs and p.default is p.empty]
    assert not missing, f"{fn.__name__}: constexprs not given: {missing}"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    assert ".entry" in compiled.asm["ptx"], fn.__name__
    return compiled.metadata.shared


def variants():
    """(name, fn, n_pointers, dtype, constexprs, warps, stages, must_fit)."""
    for dtype, acc in DATA_TYPES.items():
        bn_first = bn.CHANNELS_CONTIGUOUS_CONFIGS[0].kwargs
        bn_spatial = bn.SPATIAL_CONTIGUOUS_CONFIGS[0].kwargs
        for blocks in (bn_first, bn_spatial):
            yield "bn_fwd_stats", bn._bn_fwd_stats_kernel, 4, dtype, dict(ACC=acc, **blocks)
            yield "bn_fwd_apply", bn._bn_fwd_apply_kernel, 7, dtype, dict(
                RSTD_FROM_VAR=False, HAS_W=True, HAS_B=True, ACC=acc, ACTIVATION=2, HAS_RESIDUAL=True, **blocks)
            yield "bn_bwd_reduce", bn._bn_bwd_reduce_kernel, 9, dtype, dict(
                RSTD_FROM_VAR=False, ACC=acc, ACTIVATION=1, HAS_RESIDUAL=True, HAS_W=True, HAS_B=True, **blocks)
            yield "bn_bwd_dx", bn._bn_bwd_dx_kernel, 11, dtype, dict(
                TRAINING=True, RSTD_FROM_VAR=False, HAS_W=True, ACC=acc, ACTIVATION=2, HAS_RESIDUAL=True,
                HAS_B=True, WRITE_DRES=True, **blocks)
        yield "bn_fwd_finalize", bn._bn_fwd_finalize_kernel, 7, dtype, dict(
            UPDATE_RUNNING=True, ACC=acc, BLOCK_C=128, BLOCK_K=16)
        yield "bn_bwd_finalize", bn._bn_bwd_finalize_kernel, 6, dtype, dict(
            WRITE_DW=True, WRITE_DB=True, ACC=acc, BLOCK_C=128, BLOCK_K=16)

        fp64 = dtype == "fp64"
        gemm_configs = conv.FP64_CONFIGS if fp64 else conv.GEMM_CONFIGS
        precision = "ieee" if dtype in ("fp32", "fp64") else "tf32"
        # The interpreter's config must fit everywhere; in bf16 also the largest tiles,
        # which autotuning may pick (or skip, if they run out of resources).
        configs = gemm_configs[:1] + (gemm_configs[-2:] if dtype == "bf16" else [])
        for index, config in enumerate(configs):
            gemm = dict(FMA=fp64, INPUT_PRECISION=precision, ACC=acc, **config.kwargs)
            tune = dict(warps=config.num_warps, stages=config.num_stages, must_fit=index == 0)
            yield "conv2d_fwd", conv._conv2d_fwd_kernel, 8, dtype, dict(
                HAS_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=2, STATS=True, **gemm), tune
            yield "conv2d_bwd_dgrad", conv._conv2d_bwd_dgrad_kernel, 4, dtype, dict(ACTIVATION=1, **gemm), tune
            yield "conv2d_bwd_wgrad", conv._conv2d_bwd_wgrad_kernel, 5, dtype, dict(
                HAS_DBIAS=True, ACTIVATION=1, **gemm), tune
        yield "conv2d_bwd_wgrad_reduce", conv._conv2d_bwd_wgrad_reduce_kernel, 2, dtype, dict(
            ACC=acc, BLOCK=conv.WGRAD_REDUCE_BLOCK)

        for ksize in ((3, 7) if dtype == "bf16" else (3,)):
            taps = dict(KH=ksize, KW=ksize, ACC=acc)
            yield "depthwise_fwd", dw._depthwise_fwd_kernel, 8, dtype, dict(
                HAS_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=2, STATS=True, BLOCK_P=FWD_BLOCK_P, **taps,
                **dw.FWD_CONFIGS[0].kwargs)
            yield "depthwise_bwd_input", dw._depthwise_bwd_input_kernel, 4, dtype, dict(
                ACTIVATION=2, **taps, **dw.BWD_CONFIGS[0].kwargs)
            yield "depthwise_bwd_weight_reduce", dw._depthwise_bwd_weight_reduce_kernel, 4, dtype, dict(
                HAS_BIAS=True, ACTIVATION=2, **taps, **dw.BWD_CONFIGS[0].kwargs)
        yield "depthwise_bwd_weight_finalize", dw._depthwise_bwd_weight_finalize_kernel, 3, dtype, dict(
            KH=3, KW=3, HAS_BIAS=True, ACC=acc, BLOCK_J=128, BLOCK_K=16)

        lrn_consts = dict(SIZE=5, ACC=acc, BLOCK_S=256)
        yield "lrn_fwd", lrn._lrn_fwd_kernel, 2, dtype, lrn_consts
        yield "lrn_bwd", lrn._lrn_bwd_kernel, 3, dtype, lrn_consts


def _compile(index):
    name, fn, n_pointers, dtype, constexprs, *rest = list(variants())[index]
    tune = rest[0] if rest else {}
    shared = compile_kernel(fn, n_pointers, dtype, constexprs, tune.get("warps", 4), tune.get("stages", 3))
    return name, dtype, shared, tune


def main():
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(_compile, range(len(list(variants())))))
    for name, dtype, shared, tune in results:
        print(f"{name:32s} {dtype:5s} shared={shared:7d} B  {tune or ''}")
        if tune.get("must_fit", True) and shared > H100_MAX_SHARED:
            sys.exit(f"{name} ({dtype}) needs {shared} B of shared memory, more than an H100 block has")
    print(f"compiled {len(results)} variants")


if __name__ == "__main__":
    main()
