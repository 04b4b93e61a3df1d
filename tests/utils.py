"""Comparison helpers that say where and by how much a result is off, the nvcc
host build of the CUDA kernels' per-thread code, and the runner of scripts that record
launches."""
import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import vhist


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """``torch.testing.assert_close`` that also reports the largest absolute and relative
    error and the index where each occurs."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as err:
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        abs_err = (a - e).abs()
        rel_err = abs_err / e.abs().clamp_min(1e-12)
        at_abs = tuple(int(i) for i in torch.unravel_index(abs_err.argmax(), a.shape))
        at_rel = tuple(int(i) for i in torch.unravel_index(rel_err.argmax(), a.shape))
        raise AssertionError(
            f"{name}: max abs err {abs_err.max().item():.3e} at {at_abs}, "
            f"max rel err {rel_err.max().item():.3e} at {at_rel}\n{err}") from None


def max_error(actual, reference) -> float:
    return (actual.detach().double() - reference.detach().double()).abs().max().item()


def assert_low_precision_close(ours, theirs, reference, *, factor, name="tensor", floor=1e-6):
    """The three-way rule for fp16/bf16: our error against an fp32 (or fp64) reference is
    at most ``factor`` times PyTorch's own error in the same low precision."""
    ours_err, theirs_err = max_error(ours, reference), max_error(theirs, reference)
    assert ours_err <= factor * theirs_err + floor, (
        f"{name}: our max error {ours_err:.3e} > {factor} x PyTorch's {theirs_err:.3e}")


def assert_low_precision_results(ours, theirs, reference, *, grad_names=None, factor=2, grad_factor=3):
    """The three-way rule on whole runs, each ``(output, gradients)``: the output within
    ``factor`` and every gradient within ``grad_factor`` times PyTorch's own error, the
    gradients named ``grad_<name>`` after ``grad_names`` or else ``grad_<index>``."""
    assert_low_precision_close(ours[0], theirs[0], reference[0], factor=factor, name="output")
    names = range(len(ours[1])) if grad_names is None else grad_names
    for name, g, g_theirs, g_ref in zip(names, ours[1], theirs[1], reference[1]):
        assert_low_precision_close(g, g_theirs, g_ref, factor=grad_factor, name=f"grad_{name}")


def assert_autocast_matches_torch(fn, inputs, device):
    """An op chain under fp16 autocast, on the triton backend against the torch one.

    ``fn(*leaves)`` gets fresh copies of ``inputs`` that require grad and returns the
    chain's outputs. On both backends every output must be fp16 and every leaf's gradient
    of the last output's sum fp32; triton's outputs must match torch's within 1e-2 and
    its gradients within atol 5e-2, rtol 2e-2.
    """
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with vhist.use_backend(backend), torch.autocast(device, dtype=torch.float16):
            outputs = fn(*leaves)
        assert [y.dtype for y in outputs] == [torch.float16] * len(outputs)
        grads = torch.autograd.grad(outputs[-1].float().sum(), leaves)
        assert [g.dtype for g in grads] == [torch.float32] * len(leaves)
        results.append((outputs, grads))
    (outputs, grads), (outputs_ref, grads_ref) = results
    for i, (y, y_ref) in enumerate(zip(outputs, outputs_ref)):
        assert_close(y.float(), y_ref.float(), name=f"output_{i}", atol=1e-2, rtol=1e-2)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, name="grad", atol=5e-2, rtol=2e-2)


def build_host_library(harness: str, out_dir) -> ctypes.CDLL:
    """Builds a tests/csrc_host/*.cu harness (the __host__ __device__ code of a CUDA
    kernel, driven by host loops) into a shared library with nvcc and loads it.

    Skips the calling test only when nvcc is absent outside CI; under CI=true that fails.
    """

    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail("CI is set but nvcc was not found")
        pytest.skip("nvcc not found (outside CI)")
    out = os.path.join(str(out_dir), os.path.basename(harness).replace(".cu", ".so"))
    proc = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17",
                           "-gencode=arch=compute_80,code=sm_80", "-o", out, harness],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ctypes.CDLL(out)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recording_script(script: str, *args: str, timeout: int = 600):
    """Runs ``script`` (Python source) in a process without TRITON_INTERPRET (recording
    launches needs compiled, not interpreted, Triton; nothing is launched) from the
    repository root, and returns the JSON its last stdout line prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def one_thread():
    """One intra-op thread (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    CPU-bound checks share the CI's 2 cores, where oversubscribed threads are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
