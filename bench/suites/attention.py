"""Attention (non-causal, no mask) at ViT-S/B shapes (batch 256, 197 tokens, head dim
64) and two longer sequences, against every SDPA backend torch has on the machine
(flash, cuDNN, memory-efficient, math), its default choice and Inductor.

FLOPs per call: forward 4 B H LQ LK D (Q K^T and P V); the backward 2.5 times that (S
recomputed, dV, dP, dQ, dK: 5 matmuls of the same size, as FlashAttention-2's paper
counts it, Dao 2023, Section 4.1), so forward+backward 3.5 times the forward.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import vhist

from common import Case, case_grid

# (name, batch, heads, sequence, head dim)
LAYERS = [
    ("vit_s.attn", 256, 6, 197, 64),
    ("vit_b.attn", 256, 12, 197, 64),
    ("seq512", 32, 16, 512, 64),
    ("seq1k.d128", 16, 16, 1024, 128),
]
SMALL = [("tiny", 1, 2, 7, 16), ("tiny-vit", 1, 1, 197, 8)]
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}


def _triton(op):
    def fn(q, k, v):
        with vhist.use_backend("triton"):
            return getattr(vhist.ops, op)(q, k, v)
    return fn


def _pinned(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def _fns(device, op):
    fns = {"triton": _triton(op), "torch": F.scaled_dot_product_attention}
    if device == "cuda":
        fns.update({name: _pinned(backend) for name, backend in SDPA_BACKENDS.items()})
        fns["torch_compile"] = torch.compile(F.scaled_dot_product_attention, dynamic=False)
    return fns


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small``: tiny shapes for the interpreter's correctness pass."""
    for (name, b, h, n, d), dtype, mode in case_grid(SMALL if small else LAYERS, small, keep, ("fwd", "fwd+bwd")):
        # q, k, v as the slices of one fused projection, as the ViT makes them.
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        backward = mode == "fwd+bwd"
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grad_out = torch.randn(b, h, n, d, device=device, dtype=dtype)
        # The ViT's call (torch's signature); one tiny case through vhist.ops.attention.
        op = "attention" if name == "tiny-vit" else "scaled_dot_product_attention"
        fns = _fns(device, op)
        providers = {name: ((lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, grad_out)) if backward
                            else (lambda fn=fn: fn(q, k, v))) for name, fn in fns.items()}
        flops = 4 * b * h * n * n * d * (3.5 if backward else 1)
        yield Case(op=op, layer=name,
                   shape=(b, h, n, d), dtype=dtype, layout="bhld-from-qkv", mode=mode, providers=providers,
                   flops=int(flops), check=lambda p=providers, bw=backward: _check(p, bw), tolerance=1e-4)


def _check(providers, backward):
    ours, theirs = providers["triton"](), providers["torch"]()
    if not backward:
        ours, theirs = (ours,), (theirs,)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs))
