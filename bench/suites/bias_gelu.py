"""Bias + GELU, the ViT MLP's epilogue after fc1 (batch 256 x 197 tokens at ViT-S/B
hidden widths), both approximations.

Bytes per call: forward reads x and writes y (2 passes); forward+backward adds the
backward's reads of x and dy and its write of dx (5 passes); the bias, its gradient and
the gradient's partials are negligible. PyTorch's eager form is two kernels (the add, then GELU) forward.
"""
import torch

import vhist
from vhist import reference

from common import Case, case_grid

# (name, rows, hidden width, approximate)
LAYERS = [
    ("vit_s.mlp", 256 * 197, 1536, "none"),
    ("vit_s.mlp.tanh", 256 * 197, 1536, "tanh"),
    ("vit_b.mlp", 256 * 197, 3072, "none"),
]
SMALL = [("tiny", 5, 12, "none"), ("tiny-tanh", 3, 20, "tanh"), ("tiny-nobias", 4, 7, None)]
PASSES = {"fwd": 2, "fwd+bwd": 5}


def _fns(bias, approximate):
    op, args = ("gelu", (approximate or "none",)) if approximate is None or bias is None else (
        "bias_gelu", (bias, approximate))

    def triton(x):
        with vhist.use_backend("triton"):
            return getattr(vhist.ops, op)(x, *args)

    def torch_ref(x):
        return reference.bias_gelu(x, bias, approximate or "none")
    return op, {"triton": triton, "torch": torch_ref, "torch_compile": torch.compile(torch_ref, dynamic=False)}


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small``: tiny shapes for the interpreter's correctness pass."""
    for (name, rows, width, approximate), dtype, mode in case_grid(SMALL if small else LAYERS, small, keep,
                                                                   ("fwd", "fwd+bwd")):
        x = torch.randn(rows, width, device=device, dtype=dtype) * 2
        backward = mode == "fwd+bwd"
        bias = torch.randn(width, device=device, dtype=dtype).requires_grad_(backward) \
            if approximate is not None else None
        op, fns = _fns(bias, approximate)
        xg = x.detach().requires_grad_()
        grad_out = torch.randn_like(x)
        leaves = [xg] if bias is None or not backward else [xg, bias]
        providers = {name: ((lambda fn=fn: torch.autograd.grad(fn(xg), leaves, grad_out)) if backward
                            else (lambda fn=fn: fn(x))) for name, fn in fns.items()}
        yield Case(op=op, layer=name, shape=tuple(x.shape), dtype=dtype, layout="contiguous", mode=mode,
                   providers=providers, bytes=PASSES[mode] * x.numel() * x.element_size(),
                   check=lambda p=providers, b=backward: _check(p, b), tolerance=1e-5)


def _check(providers, backward):
    ours, theirs = providers["triton"](), providers["torch"]()
    if not backward:
        ours, theirs = (ours,), (theirs,)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs))
