"""Bias + GELU (tanh and erf) on the triton backend against F.gelu(x + b)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import vhist
from vhist.nn import GELU

from conftest import DEVICE
from utils import assert_close, assert_low_precision_results

gelu_module = importlib.import_module("vhist.ops.gelu")

CASES = [
    # (input shape)
    (1, 1),           # minimal
    (3, 7),           # odd width: masked columns
    (2, 5, 24),       # 3-D (batch, tokens, hidden)
    (2, 197, 12),     # ViT's 197 tokens at a reduced width
    (2, 1536),        # ViT-S hidden width: three column blocks
]
APPROX = ["none", "tanh"]
FWD_TOL = dict(atol=1e-6, rtol=1e-5)
BWD_TOL = dict(atol=1e-5, rtol=1e-5)


def run(backend, x, b, approximate, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (x, b) if t is not None]
    with vhist.use_backend(backend):
        y = vhist.ops.bias_gelu(leaves[0], leaves[1] if b is not None else None, approximate)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return y, torch.autograd.grad(y, leaves, g)


def compare(x, b, approximate, fwd_tol=FWD_TOL, bwd_tol=BWD_TOL):
    (y, grads), (y_ref, grads_ref) = run("triton", x, b, approximate), run("torch", x, b, approximate)
    assert_close(y, y_ref, name="output", **fwd_tol)
    for name, g, g_ref in zip(("input", "bias"), grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", **bwd_tol)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", CASES, ids=str)
def test_bias_gelu_fwd_bwd(shape, approximate):
    x = torch.randn(shape, device=DEVICE) * 3
    compare(x, torch.randn(shape[-1], device=DEVICE), approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_no_bias(approximate):
    compare(torch.randn(3, 10, device=DEVICE) * 3, None, approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_special_values(approximate):
    """NaN propagates, -inf gives NaN (-inf * 0) and huge inputs saturate as in F.gelu
    (no NaN from exp overflow); +inf gives +inf (torch's CPU erf form gives NaN there,
    its tanh form +inf)."""
    x = torch.tensor([[float("nan"), -float("inf"), 60.0, -60.0, 0.0, float("inf")]], device=DEVICE)
    b = torch.zeros(6, device=DEVICE)
    with vhist.use_backend("triton"):
        y = vhist.ops.bias_gelu(x, b, approximate)
    torch.testing.assert_close(y[:, :5], F.gelu(x[:, :5], approximate=approximate), equal_nan=True)
    assert y[0, 5].item() == float("inf")
    compare(x[:, 2:5], b[2:5], approximate)


def test_bias_gelu_gradcheck(triton_backend):
    for approximate in APPROX:
        x = torch.randn(4, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, device=DEVICE, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, b: vhist.ops.bias_gelu(x, b, approximate), (x, b))


def test_bias_gelu_determinism(triton_backend, monkeypatch):
    """Several row-tile programs (MAX_PARTIALS lowered): bitwise-equal bias gradients."""
    from vhist.ops import launch_cache

    monkeypatch.setattr(gelu_module, "MAX_PARTIALS", 3)
    launch_cache.clear()
    x, b = torch.randn(90, 20, device=DEVICE), torch.randn(20, device=DEVICE)
    first, second = run("triton", x, b, "tanh"), run("triton", x, b, "tanh")
    reference = run("torch", x, b, "tanh")
    launch_cache.clear()
    assert torch.equal(first[1][1], second[1][1]) and torch.equal(first[1][0], second[1][0])
    assert_close(first[1][1], reference[1][1], name="grad_bias", atol=1e-4, rtol=1e-5)


def test_bias_gelu_non_contiguous(triton_backend):
    x = torch.randn(6, 4, 10, device=DEVICE).transpose(0, 1)
    compare(x, torch.randn(10, device=DEVICE), "none")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_low_precision(approximate, dtype):
    x, b = torch.randn(8, 197, 1536, device=DEVICE), torch.randn(1536, device=DEVICE)
    ours = run("triton", x.to(dtype), b.to(dtype), approximate)
    theirs = run("torch", x.to(dtype), b.to(dtype), approximate)
    reference = run("torch", x.to(dtype).float(), b.to(dtype).float(), approximate)
    assert_low_precision_results(ours, theirs, reference)


BAD_INPUT = [
    # (name, input, bias, approximate, error, message)
    ("bias shape", torch.randn(2, 5), torch.randn(4), "none", ValueError, "bias must have shape"),
    ("bias dtype", torch.randn(2, 5), torch.randn(5, dtype=torch.float64), "none", ValueError, "bias dtype"),
    ("approximate", torch.randn(2, 5), None, "sigmoid", ValueError, "approximate must be"),
    ("integer input", torch.ones(2, 5, dtype=torch.int64), None, "none", TypeError, "dtype"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: case[0])
def test_bias_gelu_bad_input(case, backend):
    _, x, b, approximate, error, message = case
    with vhist.use_backend(backend), pytest.raises(error, match=message):
        vhist.ops.bias_gelu(x.to(DEVICE), b.to(DEVICE) if b is not None else None, approximate)


def test_bias_gelu_autocast(triton_backend):
    """Under autocast the fp32 bias takes the bf16 GEMM output's dtype, as addmm's does."""
    x, w, b = torch.randn(4, 6, device=DEVICE), torch.randn(8, 6, device=DEVICE), torch.randn(8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        h = F.linear(x, w)
        y = vhist.ops.bias_gelu(h, b)
        y_ref = F.gelu(F.linear(x, w, b))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y.float(), y_ref.float(), name="output", atol=3e-2, rtol=2e-2)


def test_gelu_module_drop_in(triton_backend):
    for approximate in APPROX:
        ours, theirs = GELU(approximate=approximate), torch.nn.GELU(approximate=approximate)
        assert isinstance(ours, torch.nn.GELU) and ours.extra_repr() == theirs.extra_repr()
        x = torch.randn(3, 9, device=DEVICE) * 3
        assert_close(ours(x), theirs(x), name="module output", **FWD_TOL)
    assert vhist.nn.functional.gelu(torch.empty(0, 3, device=DEVICE)).shape == (0, 3)


def test_bias_gelu_compile(triton_backend):
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def mlp(x, w, b):
        return vhist.ops.bias_gelu(F.linear(x, w), b, "tanh").sum(-1)

    compiled = torch.compile(mlp, fullgraph=True, backend=backend)
    tensors = [torch.randn(2, 3, 4, device=DEVICE), torch.randn(8, 4, device=DEVICE), torch.randn(8, device=DEVICE)]
    outs = []
    for fn in (mlp, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        outs.append((y, torch.autograd.grad(y.sum(), leaves)))
    assert_close(outs[1][0], outs[0][0], name="output", **FWD_TOL)
    for g_c, g in zip(outs[1][1], outs[0][1]):
        assert_close(g_c, g, name="grad", **BWD_TOL)
