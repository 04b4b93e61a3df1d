"""LayerNorm at ViT-S/B widths (batch 256 x 197 tokens), with and without the residual
add folded in, and ConvNeXt's channels-last LayerNorm2d.

Bytes per call are the minimum traffic: forward reads x (and r) and writes y (and s);
forward+backward adds the backward's reads of x (the sum s with a residual) and dy and
its write of dx (the weight, bias and the (M,) statistics are negligible at these
shapes). The same byte count is used for every provider, so GB/s compares times.
"""
import torch

import vhist
from vhist import reference

from common import Case, case_grid

# (name, form, rows, width): ViT's pre-norm LayerNorms and one ConvNeXt-T stage-1 norm.
LAYERS = [
    ("vit_s.ln", "plain", 256 * 197, 384),
    ("vit_s.add_ln", "residual", 256 * 197, 384),
    ("vit_b.ln", "plain", 256 * 197, 768),
    ("vit_b.add_ln", "residual", 256 * 197, 768),
    ("wide.8192", "plain", 4096, 8192),
    ("convnext_t.ln2d", "2d", (128, 96, 56, 56), 96),
]
SMALL = [("tiny", "plain", 6, 24), ("tiny-add", "residual", 5, 10), ("tiny-2d", "2d", (2, 12, 3, 3), 12)]
# Activation-sized passes: forward x -> y (residual: x, r -> s, y); backward x, dy -> dx
# (residual: s, dy, ds -> dx).
PASSES = {"plain": {"fwd": 2, "fwd+bwd": 5}, "2d": {"fwd": 2, "fwd+bwd": 5},
          "residual": {"fwd": 4, "fwd+bwd": 8}}
OPS = {"plain": "layer_norm", "residual": "add_layer_norm", "2d": "layer_norm_2d"}


def _inputs(form, rows, width, dtype, device):
    if form == "2d":
        x = torch.randn(rows, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return (x,)
    x = torch.randn(rows, width, device=device, dtype=dtype)
    return (x, torch.randn_like(x)) if form == "residual" else (x,)


def _fn(form, width, weight, bias, backend=None):
    def call(*xs):
        if form == "2d":
            return vhist.ops.layer_norm_2d(xs[0], weight, bias, 1e-6)
        if form == "residual":
            return vhist.ops.add_layer_norm(xs[0], xs[1], (width,), weight, bias, 1e-6)
        return vhist.ops.layer_norm(xs[0], (width,), weight, bias, 1e-6)

    if backend is None:
        return call

    def on(*xs):
        with vhist.use_backend(backend):
            return call(*xs)
    return on


def _torch(form, width, weight, bias):
    def call(*xs):
        if form == "2d":
            return reference.layer_norm_2d(xs[0], weight, bias, 1e-6)
        if form == "residual":
            return reference.add_layer_norm(xs[0], xs[1], (width,), weight, bias, 1e-6)
        return reference.layer_norm(xs[0], (width,), weight, bias, 1e-6)
    return call


def _providers(xs, fns, backward, params=()):
    """Calls of each provider; backward: the gradients of the inputs and ``params`` (the
    weight and bias, which require grad in that mode) for a ones upstream gradient."""
    if not backward:
        return {name: (lambda fn=fn: fn(*xs)) for name, fn in fns.items()}
    leaves = [x.detach().requires_grad_() for x in xs]

    def step(fn):
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, [*leaves, *params], [torch.ones_like(o) for o in out])
    return {name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small``: tiny shapes for the interpreter's correctness pass."""
    for (name, form, rows, width), dtype, mode in case_grid(SMALL if small else LAYERS, small, keep, ("fwd", "fwd+bwd")):
        xs = _inputs(form, rows, width, dtype, device)
        backward = mode == "fwd+bwd"
        weight = (torch.rand(width, device=device, dtype=dtype) + 0.5).requires_grad_(backward)
        bias = torch.randn(width, device=device, dtype=dtype).requires_grad_(backward)
        torch_fn = _torch(form, width, weight, bias)
        fns = {"triton": _fn(form, width, weight, bias, "triton"), "torch": torch_fn,
               "torch_compile": torch.compile(torch_fn, dynamic=False)}
        yield Case(op=OPS[form], layer=name, shape=tuple(xs[0].shape), dtype=dtype,
                   layout="channels_last" if form == "2d" else "contiguous", mode=mode,
                   providers=_providers(xs, fns, backward, (weight, bias) if backward else ()),
                   bytes=PASSES[form][mode] * xs[0].numel() * xs[0].element_size(),
                   check=lambda xs=xs, f=fns, b=backward, p=(weight, bias): _check(xs, f, b, p), tolerance=1e-4)


def _check(xs, fns, backward, params):
    """Max abs difference between the triton and torch providers (outputs, and the input,
    weight and bias gradients of a ones upstream gradient when ``backward``)."""
    results = []
    for name in ("triton", "torch"):
        out = _providers([x.clone() for x in xs], {name: fns[name]}, backward, params if backward else ())[name]()
        if not backward:
            out = out if isinstance(out, tuple) else (out,)
        results.append(out)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))
