"""FlashAttention-2 attention on the triton backend against F.scaled_dot_product_attention
(the math backend: on CPU it is the only one, on a GPU it is selected explicitly)."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import vhist

from conftest import DEVICE
from utils import assert_close, assert_low_precision_results

attention_module = importlib.import_module("vhist.ops.attention")

CASES = [
    # (batch, heads, LQ, LK, head dim)
    (1, 1, 1, 1, 8),       # minimal: one query, one key
    (2, 2, 7, 7, 16),      # short non-power-of-two sequence
    (1, 2, 7, 1, 32),      # one key
    (1, 1, 5, 9, 64),      # LQ != LK
    (1, 1, 9, 3, 80),      # head dim padded to 128
    (1, 1, 4, 6, 96),
    (1, 1, 3, 5, 128),
    (1, 1, 197, 197, 8),   # ViT's 197 tokens, several blocks with masked tails
    (1, 1, 197, 197, 16),
    (1, 1, 256, 256, 16),  # exactly two forward query blocks, four key blocks
]
FWD_TOL = dict(atol=1e-5, rtol=1e-5)
BWD_TOL = dict(atol=1e-4, rtol=1e-4)


def reference(q, k, v, scale=None):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def run(fn, tensors, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return y, torch.autograd.grad(y, leaves, g)


def triton_attention(q, k, v, scale=None):
    with vhist.use_backend("triton"):
        return vhist.ops.attention(q, k, v, scale=scale)


def compare(tensors, scale=None, fwd_tol=FWD_TOL, bwd_tol=BWD_TOL):
    y, grads = run(lambda q, k, v: triton_attention(q, k, v, scale), tensors)
    y_ref, grads_ref = run(lambda q, k, v: reference(q, k, v, scale), tensors)
    assert_close(y, y_ref, name="output", **fwd_tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close(g, g_ref, name=f"grad_{name}", **bwd_tol)


def make_qkv(b, h, lq, lk, d, dtype=torch.float32):
    return [torch.randn(b, h, n, d, device=DEVICE, dtype=dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_fwd_bwd(case):
    compare(make_qkv(*case))


def test_attention_fused_qkv_views():
    """q, k, v as the permuted slices of one fused projection (non-contiguous, read in
    place), and a custom scale."""
    b, n, h, d = 2, 7, 2, 16
    qkv = torch.randn(b, n, 3 * h * d, device=DEVICE).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    assert not qkv[0].is_contiguous()
    compare([qkv[0], qkv[1], qkv[2]], scale=0.3)
    with vhist.use_backend("triton"):
        y = vhist.ops.attention(qkv[0], qkv[1], qkv[2])
    assert y.transpose(1, 2).reshape(b, n, h * d).data_ptr() == y.data_ptr()  # the heads merge as a view


def test_attention_3d_and_large_logits():
    """(N, L, E) inputs; logits of magnitude ~100 (the online softmax's rescaling)."""
    q, k, v = (torch.randn(2, 9, 8, device=DEVICE) * s for s in (10.0, 10.0, 1.0))
    compare([q, k, v], fwd_tol=dict(atol=1e-5, rtol=1e-4), bwd_tol=dict(atol=1e-3, rtol=1e-3))


def test_attention_fp16(triton_backend):
    """fp16 in and out, fp32 accumulation (P fed to the dot in fp16): within fp16
    rounding of the fp32 math backend on the same fp16 values (the interpreter's bf16
    tl.dot is wrong, so bf16 runs on the GPU only, below)."""
    tensors = [t.half() for t in make_qkv(1, 2, 20, 33, 16)]
    y, grads = run(vhist.ops.attention, tensors)
    y_ref, grads_ref = run(reference, [t.float() for t in tensors])
    assert y.dtype == torch.float16
    assert_close(y.float(), y_ref, name="output", atol=2e-3, rtol=2e-3)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close(g.float(), g_ref, name=f"grad_{name}", atol=1e-2, rtol=1e-2)


def test_attention_nan_propagates(triton_backend):
    q, k, v = make_qkv(1, 1, 3, 4, 8)
    k[0, 0, 2, 0] = float("nan")
    y = vhist.ops.attention(q, k, v)
    assert torch.isnan(y).all() and torch.isnan(reference(q, k, v)).all()


def test_attention_gradcheck(triton_backend):
    """One block (full Jacobian), then several query and key blocks with tails (fp64's
    16 x 16 tiles) in gradcheck's fast mode (random projections: the interpreter is slow)."""
    for case, fast in (((1, 1, 2, 3, 8), False), ((1, 1, 17, 18, 8), True)):
        q, k, v = (t.requires_grad_() for t in make_qkv(*case, dtype=torch.float64))
        assert torch.autograd.gradcheck(lambda q, k, v: vhist.ops.attention(q, k, v), (q, k, v), fast_mode=fast)


def test_attention_determinism(triton_backend):
    tensors = make_qkv(1, 2, 40, 70, 16)
    first, second = run(vhist.ops.attention, tensors), run(vhist.ops.attention, tensors)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_attention_functional_signature(triton_backend):
    q, k, v = make_qkv(1, 2, 5, 6, 8)
    y = vhist.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert_close(y, reference(q, k, v, 0.5), name="output", **FWD_TOL)


def test_attention_blocks():
    """ViT head dim 64 in bf16: 128 x 64 forward tiles; head dim 80 pads to 128."""
    blocks = attention_module.attention_blocks(64, torch.bfloat16)
    assert blocks["fwd"][:2] == (128, 64) and blocks["BLOCK_D"] == 64
    assert attention_module.attention_blocks(80, torch.float16)["BLOCK_D"] == 128
    assert attention_module.attention_blocks(8, torch.float32)["BLOCK_D"] == 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(4, 6, 197, 197, 64), (2, 12, 197, 197, 64), (2, 3, 256, 256, 128)], ids=str)
def test_attention_low_precision(case, dtype):
    """Three-way rule at ViT-S/B shapes against the math backend in fp32."""
    tensors = [t.to(dtype) for t in make_qkv(*case)]
    ours = run(vhist.ops.attention, tensors)
    theirs = run(reference, tensors)
    ref = run(reference, [t.float() for t in tensors])
    assert_low_precision_results(ours, theirs, ref)


@pytest.mark.gpu
def test_attention_tf32_follows_matmul_flag():
    """fp32 with TF32 off matches the math backend closely; with it on, within TF32."""
    tensors = make_qkv(2, 4, 197, 197, 64)
    compare(tensors)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        compare(tensors, fwd_tol=dict(atol=5e-3, rtol=5e-3), bwd_tol=dict(atol=5e-2, rtol=5e-2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


BAD_INPUT = [
    # (name, kwargs, error, message)
    ("mask", dict(attn_mask=torch.ones(3, 4, dtype=torch.bool)), NotImplementedError, "attn_mask"),
    ("dropout", dict(dropout_p=0.1), NotImplementedError, "dropout_p"),
    ("causal", dict(is_causal=True), NotImplementedError, "is_causal"),
    ("gqa", dict(enable_gqa=True), NotImplementedError, "enable_gqa"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: case[0])
def test_attention_unsupported_arguments(case, triton_backend):
    _, kwargs, error, message = case
    q, k, v = make_qkv(1, 1, 3, 4, 8)
    with pytest.raises(error, match=message):
        vhist.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


BAD_SHAPES = [
    # (name, shapes, dtype, message)
    ("2-D", ((3, 8), (4, 8), (4, 8)), torch.float32, "3-D"),
    ("head dims differ", ((1, 1, 3, 8), (1, 1, 4, 16), (1, 1, 4, 16)), torch.float32, "head dim"),
    ("key/value lengths", ((1, 1, 3, 8), (1, 1, 4, 8), (1, 1, 5, 8)), torch.float32, "same sequence length"),
    ("broadcast heads", ((1, 2, 3, 8), (1, 1, 4, 8), (1, 1, 4, 8)), torch.float32, "no broadcasting"),
    ("head dim too large", ((1, 1, 3, 512), (1, 1, 4, 512), (1, 1, 4, 512)), torch.float32, "head dims 1 to 256"),
    ("no keys", ((1, 1, 3, 8), (1, 1, 0, 8), (1, 1, 0, 8)), torch.float32, "at least one key"),
    ("integer", ((1, 1, 3, 8), (1, 1, 4, 8), (1, 1, 4, 8)), torch.int32, "dtype"),
]


@pytest.mark.parametrize("case", BAD_SHAPES, ids=lambda case: case[0])
def test_attention_bad_input(case, triton_backend):
    _, shapes, dtype, message = case
    q, k, v = (torch.ones(s, device=DEVICE, dtype=dtype) for s in shapes)
    with pytest.raises((ValueError, TypeError), match=message):
        vhist.ops.attention(q, k, v)
    with pytest.raises(ValueError, match="share a dtype"):
        vhist.ops.attention(*make_qkv(1, 1, 2, 2, 8)[:2], torch.ones(1, 1, 2, 8, dtype=torch.float64))


def test_attention_compile(triton_backend):
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def block(x, w):
        b, n, _ = x.shape
        qkv = F.linear(x, w).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return vhist.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, 16)

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    tensors = [torch.randn(2, 5, 16, device=DEVICE), torch.randn(48, 16, device=DEVICE) / math.sqrt(16)]
    (y, grads), (y_c, grads_c) = run(block, tensors), run(compiled, tensors)
    assert_close(y_c, y, name="output", **FWD_TOL)
    for g_c, g in zip(grads_c, grads):
        assert_close(g_c, g, name="grad", **BWD_TOL)
