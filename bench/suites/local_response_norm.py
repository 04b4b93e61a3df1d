"""Local Response Normalization at AlexNet's two LRN layers (batch 128) and one larger case.

Bytes per call are the minimum traffic of any implementation, which is also
exactly what vhist's kernels move (they save nothing between forward and backward):
forward reads x and writes y (2 passes over the activation); forward+backward adds the
backward's reads of x and dy and its write of dx (5 passes). PyTorch's composition
moves several times more; its GB/s figure is computed with the same byte count, so the
column compares times, not the traffic each provider really generates.
"""
import torch

import vhist
from vhist import reference

from common import LAYOUTS, Case, case_grid

# (name, channels, spatial size) at batch 128; AlexNet uses size=5, alpha=1e-4 (paper's
# constant, times 5 in PyTorch's convention), beta=0.75, k=2.
LAYERS = [
    ("alexnet.lrn1", 96, 55),   # after conv1
    ("alexnet.lrn2", 256, 27),  # after conv2
    ("large", 256, 56),         # a wider, larger activation (GoogLeNet-like stem scale)
]
SIZE, ALPHA, BETA, K = 5, 5e-4, 0.75, 2.0
PASSES = {"fwd": 2, "fwd+bwd": 5}
TRAFFIC_MODES = {"fwd": ("forward",), "fwd+bwd": ("forward", "backward")}  # vhist.tools.traffic's


def _make(batch, channels, spatial, dtype, layout, device):
    x = torch.randn(batch, channels, spatial, spatial, device=device, dtype=dtype).relu_() * 10
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


def _on(backend):
    def fn(x):
        with vhist.use_backend(backend):
            return vhist.ops.local_response_norm(x, SIZE, ALPHA, BETA, K)
    return fn


def _torch(x):
    return reference.local_response_norm(x, SIZE, ALPHA, BETA, K)


def _providers(x, backward, with_cuda):
    fns = {"triton": _on("triton")}
    if with_cuda:
        fns["cuda"] = _on("cuda")
    fns["torch"] = _torch
    fns["torch_compile"] = torch.compile(_torch, dynamic=False)
    if not backward:
        return {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    xg = x.detach().requires_grad_()
    grad_out = torch.randn_like(x)
    return {name: (lambda fn=fn: torch.autograd.grad(fn(xg), xg, grad_out)) for name, fn in fns.items()}


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small`` gives tiny shapes for the interpreter's correctness pass;
    ``keep(layer, dtype)`` selects cases before any tensor is made."""
    layers = [("tiny", 7, 3), ("tiny-wide", 20, 2)] if small else LAYERS
    batch = 2 if small else 128
    with_cuda = device == "cuda"
    for (name, channels, spatial), dtype, layout, mode in case_grid(layers, small, keep, LAYOUTS, PASSES):
        x = _make(batch, channels, spatial, dtype, layout, device)
        yield Case(
            op="local_response_norm", layer=name, shape=tuple(x.shape), dtype=dtype, layout=layout,
            mode=mode, providers=_providers(x, mode == "fwd+bwd", with_cuda),
            bytes=PASSES[mode] * x.numel() * x.element_size(),
            check=lambda x=x, b=(mode == "fwd+bwd"): _check(x, b), tolerance=1e-4,
            extra={"size": SIZE},
            traffic=dict(op="local_response_norm", shape=tuple(x.shape), modes=TRAFFIC_MODES[mode],
                         channels_last=layout == "channels_last", dtype=dtype))


def _check(x, backward):
    """Max abs difference between the triton and torch backends (output, and the input
    gradient when ``backward``)."""
    results = []
    for backend in ("triton", "torch"):
        xg = x.detach().clone().requires_grad_(backward)
        y = _on(backend)(xg)
        out = [y]
        if backward:
            out += list(torch.autograd.grad(y, xg, torch.ones_like(y) + xg.detach()))
        results.append(out)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))
