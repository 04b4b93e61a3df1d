#!/usr/bin/env python3
"""Compile every CUDA source under csrc/ with nvcc (compile only), for sm_80 and sm_90.

The .cu kernel files include no torch header (the torch bindings live in the .cpp
files), so they compile with nvcc alone on a machine whose torch is CPU-only. Any new
csrc/**/*.cu file is picked up by the glob; warnings are errors. The .cpp bindings are
not compiled here: they need torch's CUDA headers (c10/cuda, ATen/cuda), which a CPU
build of torch does not ship; they are compiled by the JIT build on a CUDA machine.

    python scripts/check_csrc.py [--nvcc PATH] [--jobs N]

Exit status 0 when every file compiles, 1 when one fails (its compiler output is
printed), 2 when nvcc is missing or there is nothing to compile.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90")
# torch.utils.cpp_extension compiles .cu files with these macros (no implicit half /
# bfloat16 conversions or operators); the check uses them too so that it accepts
# only what the JIT build accepts.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]
FLAGS = ["-std=c++17", "-O3", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", *TORCH_NVCC_DEFINES]


def sources(root: str = ROOT) -> list[str]:
    """Every .cu file under csrc/, sorted."""
    return sorted(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True))


def compile_one(nvcc: str, source: str, out_dir: str) -> tuple[str, int, str, float]:
    obj = os.path.join(out_dir, os.path.relpath(source, ROOT).replace(os.sep, "_") + ".o")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-c", source, "-o", obj, *gencode, *FLAGS]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode, " ".join(cmd) + "\n" + proc.stdout + proc.stderr, time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not args.nvcc:
        print("check_csrc: nvcc not found (set NVCC or put it on PATH)", file=sys.stderr)
        return 2
    files = sources()
    if not files:
        print("check_csrc: no .cu files under csrc/", file=sys.stderr)
        return 2
    failed = 0
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for source, rc, output, seconds in pool.map(lambda s: compile_one(args.nvcc, s, out_dir), files):
            name = os.path.relpath(source, ROOT)
            if rc == 0:
                print(f"ok    {name} (sm_{', sm_'.join(ARCHS)}; {seconds:.1f}s)")
            else:
                failed += 1
                print(f"FAIL  {name}\n{output}")
    print(f"check_csrc: {len(files) - failed}/{len(files)} CUDA sources compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
