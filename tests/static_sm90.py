"""Static sm_90 compile of the LRN and depthwise weight-gradient Triton kernels at the
launches their launchers make (no GPU needed).

Builds each launch's signature with Triton's runtime specialization (an int equal to 1
becomes a constant; pointers and ints divisible by 16 carry tt.divisibility 16, as
torch's allocations and the launch-time specialization give them), compiles it for
GPUTarget("cuda", 90, 32), and reads off the PTX the global load/store widths and the
warp shuffles, and from the cubin the registers, the stack/local bytes (spills) and the
number of SASS instructions.

    python tests/static_sm90.py            # prints one JSON line per launch

Run without TRITON_INTERPRET. tests/test_local_response_norm.py and
tests/test_depthwise_cuda_host.py run it and assert the 128-bit loads.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def _specialize(fn, args: dict, constexprs: dict):
    """ASTSource for ``fn`` called with ``args`` (name -> tensor dtype for pointers,
    python int/float otherwise) and ``constexprs``."""
    names = fn.arg_names
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            consts[(i,)] = constexprs[p.name]
            continue
        value = args[p.name]
        if isinstance(value, torch.dtype):
            signature[p.name] = PTR[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or isinstance(value, float):
            signature[p.name] = "fp32"
        elif value == 1:
            signature[p.name] = "constexpr"
            consts[(i,)] = 1
        else:
            signature[p.name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    assert list(signature) == names
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _resources(cubin: bytes) -> dict:
    """Registers, spill bytes (cuobjdump's resource usage) and the static SASS
    instruction count of the compiled kernel."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return {"registers": int(regs.group(1)), "stack_bytes": int(stack.group(1)), "local_bytes": int(local.group(1)),
            "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass))}


def compile_launch(name, fn, args, constexprs, num_warps) -> dict:
    """Compiles one launch and returns its static figures."""
    compiled = triton.compile(_specialize(fn, args, constexprs), target=TARGET, options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"ld\.global(?:\.[a-z0-9_]+)*", ptx)
    stores = re.findall(r"st\.global(?:\.[a-z0-9_]+)*", ptx)
    return {"launch": name, "num_warps": num_warps,
            "ld_global_v4": sum(".v4" in x for x in loads), "ld_global_v2": sum(".v2" in x for x in loads),
            "ld_global_scalar": sum(".v" not in x for x in loads),
            "st_global_v4": sum(".v4" in x for x in stores), "st_global_scalar": sum(".v" not in x for x in stores),
            "shfl": len(re.findall(r"shfl\.sync", ptx)), "shared_bytes": compiled.metadata.shared,
            **_resources(compiled.asm["cubin"])}


# AlexNet's LRN layers at batch 128, and one NCHW shape whose rows are 16-byte aligned
# (AlexNet's 55x55 and 27x27 rows are odd-length: no aligned vector exists there).
LRN_SHAPES = ((128, 96, 55, 55), (128, 256, 27, 27), (128, 96, 56, 56))
LRN_CHECK = (((128, 96, 55, 55), "channels_last"), ((128, 96, 56, 56), "nchw"))


def lrn_launches(check: bool = False):
    """The launches of vhist.ops.local_response_norm (fwd and bwd), fp32 and bf16; with
    ``check`` only the fp32 launches of LRN_CHECK."""
    import vhist.kernels.local_response_norm as lrn
    from vhist.ops.local_response_norm import lrn_geometry, tile_channels, window_bounds

    for shape in LRN_SHAPES:
        for fmt in (torch.channels_last, torch.contiguous_format):
            for dtype in (torch.float32, torch.bfloat16):
                layout = "channels_last" if fmt == torch.channels_last else "nchw"
                if check and ((shape, layout) not in LRN_CHECK or dtype != torch.float32):
                    continue
                x = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=fmt)
                n, c, s, sn, sc, ss = lrn_geometry(x)
                block_c = tile_channels(c)
                lo, hi = window_bounds(5)
                config = lrn.CONFIGS[0]
                base = dict(N=n, C=c, S=s, stride_xn=sn, stride_xc=sc, stride_xs=ss, alpha_over_n=1e-4, beta=0.75,
                            k=2.0)
                consts = dict(LO=lo, HI=hi, ACC=tl.float32, BLOCK_C=block_c, FULL_C=block_c == c, **config.kwargs)
                tag = f"{shape} {layout} {str(dtype)[6:]} TILE={config.kwargs['TILE']}"
                yield (f"lrn_fwd {tag}", lrn._lrn_fwd_kernel, dict(base, X=dtype, Y=dtype), consts,
                       config.num_warps)
                yield (f"lrn_bwd {tag}", lrn._lrn_bwd_kernel, dict(base, X=dtype, DY=dtype, DX=dtype), consts,
                       config.num_warps)


# MobileNetV2's depthwise layers at batch 128 (3x3; stride 2 where it downsamples), and
# 5x5 / 7x7 at one of them (MobileNetV3 / ConvNeXt-style kernels).
DEPTHWISE_SHAPES = (
    # (N, C, H, W, kernel, stride)
    (128, 32, 112, 112, 3, 1), (128, 96, 112, 112, 3, 2), (128, 144, 56, 56, 3, 1),
    (128, 960, 7, 7, 3, 1), (128, 144, 28, 28, 5, 1), (128, 144, 28, 28, 7, 1),
)
DEPTHWISE_CHECK = ((128, 144, 56, 56, 3, 1), (128, 144, 28, 28, 7, 1))


def depthwise_wgrad_launches(check: bool = False):
    """The weight-gradient reduce launches of vhist.ops.depthwise (no bias, no
    activation: the plain conv's backward), channels_last fp32/bf16 and NCHW fp32; with
    ``check`` only the channels_last fp32 launches of DEPTHWISE_CHECK."""
    import vhist.kernels.depthwise as dw
    import vhist.ops.depthwise as ops

    # The chunking depends on the SM count: an H100 SXM's, as no GPU is here.
    ops._sm_count = lambda device: H100_SMS

    for shape in DEPTHWISE_SHAPES:
        n, c, h, w, k, stride = shape
        for fmt, dtype in ((torch.channels_last, torch.float32), (torch.channels_last, torch.bfloat16),
                           (torch.contiguous_format, torch.float32)):
            cl = fmt == torch.channels_last
            if check and (shape not in DEPTHWISE_CHECK or not cl or dtype != torch.float32):
                continue
            x = torch.empty(n, c, h, w, device="meta", dtype=dtype).contiguous(memory_format=fmt)
            geom = ops.depthwise_geometry(x.shape, (c, 1, k, k), stride, k // 2, 1)
            y = torch.empty(n, c, geom.oh, geom.ow, device="meta").contiguous(memory_format=fmt)
            chunk, _ = ops.weight_chunks(n * geom.oh * geom.ow, c, torch.device("cuda"))
            block_p, block_c, num_warps = dw.weight_grad_tiling(k, k, cl)
            names = [p.name for p in dw._depthwise_bwd_weight_reduce_kernel.params if not p.is_constexpr]
            values = [dtype, dtype, dtype, torch.float32, geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh,
                      geom.ow, geom.multiplier, chunk, *y.stride(), *x.stride(), *geom.conv_args()]
            consts = dict(KH=k, KW=k, HAS_BIAS=False, ACTIVATION=0, NEG_SLOPE=0.01, ACC=tl.float32, BLOCK_P=block_p,
                          BLOCK_C=block_c)
            layout = "channels_last" if cl else "nchw"
            yield (f"depthwise_bwd_weight_reduce {shape} {layout} {str(dtype)[6:]} BLOCK_P={block_p} "
                   f"BLOCK_C={block_c}", dw._depthwise_bwd_weight_reduce_kernel, dict(zip(names, values)), consts,
                   num_warps)


def run_static(which: str) -> list[dict]:
    """Runs this script on ``which`` in a process without TRITON_INTERPRET (the tests
    run under the interpreter) and returns its figures."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), which], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(which: str = "all") -> None:
    launches = []
    if which in ("all", "lrn", "lrn-check"):
        launches += list(lrn_launches(check=which == "lrn-check"))
    if which in ("all", "depthwise", "depthwise-check"):
        launches += list(depthwise_wgrad_launches(check=which == "depthwise-check"))
    for launch in launches:
        print(json.dumps(compile_launch(*launch)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
