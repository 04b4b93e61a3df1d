"""Batch norm at the distinct BN layers of ResNet-50 (batch 128, 224 px); the correctness
pass also checks sync_batch_norm in a one-process group against batch norm."""
import torch

import vhist
from vhist import reference

from common import LAYOUTS, Case, case_grid

# (channels, spatial size) of every distinct BatchNorm2d in torchvision's ResNet-50.
RESNET50_BN_LAYERS = [
    ("stem", 64, 112),
    ("layer1.conv1/2", 64, 56), ("layer1.conv3", 256, 56),
    ("layer2.0.conv1", 128, 56), ("layer2.conv2", 128, 28), ("layer2.conv3", 512, 28),
    ("layer3.0.conv1", 256, 28), ("layer3.conv2", 256, 14), ("layer3.conv3", 1024, 14),
    ("layer4.0.conv1", 512, 14), ("layer4.conv2", 512, 7), ("layer4.conv3", 2048, 7),
]
# Bytes per activation element that the two-pass algorithm must move (statistics read,
# normalize read + write; backward: reduction reads x and dy, dx reads both and writes).
PASSES = {"train fwd": 3, "train fwd+bwd": 8, "eval fwd": 2}
# The traffic modes (vhist.tools.traffic) of each mode that has them (eval has none).
TRAFFIC_MODES = {"train fwd": ("forward",), "train fwd+bwd": ("forward", "backward")}


def _make(batch, channels, size, dtype, layout, device):
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    f32 = dict(device=device, dtype=torch.float32)
    params = (torch.rand(channels, **f32) + 0.5, torch.randn(channels, **f32))
    stats = (torch.zeros(channels, **f32), torch.ones(channels, **f32))
    return x, params, stats


def _providers(x, params, stats, training, backward):
    weight, bias = params
    grad_out = torch.randn_like(x)
    compiled = torch.compile(reference.batch_norm, dynamic=False)

    def vhist_triton(x, rm, rv, w, b, training):
        with vhist.use_backend("triton"):
            return vhist.ops.batch_norm(x, rm, rv, w, b, training)

    def call(fn):
        if not backward:
            return lambda: fn(x, *stats, weight, bias, training)
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, weight, bias))
        return lambda: torch.autograd.grad(fn(xg, *stats, wg, bg, training), (xg, wg, bg), grad_out)

    return {"triton": call(vhist_triton), "torch": call(reference.batch_norm),
            "torch_compile": call(compiled)}


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small`` gives tiny shapes for the interpreter's correctness pass;
    ``keep(layer, dtype)`` selects cases before any tensor is made."""
    layers = [("tiny", 6, 9), ("tiny-wide", 40, 3)] if small else RESNET50_BN_LAYERS
    batch = 2 if small else 128
    for (name, channels, size), dtype, layout, mode in case_grid(layers, small, keep, LAYOUTS, PASSES):
        x, params, stats = _make(batch, channels, size, dtype, layout, device)
        training, backward = mode.startswith("train"), mode.endswith("bwd")
        yield Case(
            op="batch_norm", layer=name, shape=tuple(x.shape), dtype=dtype, layout=layout,
            mode=mode, providers=_providers(x, params, stats, training, backward),
            bytes=PASSES[mode] * x.numel() * x.element_size(),
            check=lambda x=x, p=params, s=stats, t=training: _check(x, p, s, t),
            tolerance=1e-4,
            traffic=dict(op="batch_norm", shape=tuple(x.shape), modes=TRAFFIC_MODES[mode],
                         channels_last=layout == "channels_last", dtype=dtype) if mode in TRAFFIC_MODES else None)
    if small:
        # Correctness only: one process cannot show what synchronizing costs.
        x, params, stats = _make(batch, 6, 5, torch.float32, "channels_last", device)
        yield Case(op="sync_batch_norm", layer="tiny", shape=tuple(x.shape), dtype=torch.float32,
                   layout="channels_last", mode="train fwd+bwd", providers={},
                   check=lambda: _sync_check(x, params, stats), tolerance=1e-4)


def _sync_check(x, params, stats):
    """sync_batch_norm in a one-process gloo group (CPU correctness pass) against
    single-process batch norm: max abs difference of the output and every gradient."""
    import tempfile

    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        store = tempfile.NamedTemporaryFile(delete=False)
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        results = []
        for fn in (vhist.ops.sync_batch_norm, reference.batch_norm):
            xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, *params))
            with vhist.use_backend("triton"):
                y = fn(xg, *(s.clone() for s in stats), wg, bg, True)
            results.append((y, *torch.autograd.grad(y, (xg, wg, bg), torch.ones_like(y) + xg.detach())))
    finally:
        if own_group:
            dist.destroy_process_group()
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))


def _check(x, params, stats, training):
    """Max abs difference between the triton and torch backends, output and gradients."""
    results = []
    for backend in ("triton", "torch"):
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, *params))
        with vhist.use_backend(backend):
            y = vhist.ops.batch_norm(xg, *(s.clone() for s in stats), wg, bg, training)
        grads = torch.autograd.grad(y, (xg, wg, bg), torch.ones_like(y) + xg.detach())
        results.append((y, *grads))
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))
