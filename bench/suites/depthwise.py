"""Depthwise conv2d at every distinct depthwise layer of MobileNetV1 and MobileNetV2
(batch 128, 224 px, channels_last, bf16 and fp32).

Modes: "fwd", "bwd-input" (input gradient alone), "bwd-weight" (weight gradient alone)
and "fwd+bwd" (forward, then both gradients). Providers: ``triton`` and ``cuda`` call
vhist's custom ops directly; ``torch`` is eager cuDNN (channels_last, cudnn.benchmark
on: F.conv2d(groups=C) and aten.convolution_backward with the same output mask);
``torch_compile`` is torch.compile of the same functions.

Bytes are the minimal traffic of each mode (the ``gbps`` column), every tensor moved once: fwd reads x and
writes y; bwd-input reads dy and writes dx; bwd-weight reads dy and x; fwd+bwd moves
x, y (forward), dy, x again and dx (backward). The weights (C*9 elements) are counted
too but are negligible. fused_depthwise_bn_act (depthwise -> BN -> ReLU6) runs "train
fwd+bwd" and "eval fwd"; its minimal traffic is x + y in eval and 3x + 3y in training
(forward: x, y; backward: dy, x, the saved conv output, dx; weights not counted). The
triton rows of "fwd", "fwd+bwd" and "train fwd+bwd" also report ``gbps_design``: the bytes
vhist's kernels move by design (bench/common.design_bytes), partials included.
"""
import torch
import torch.nn.functional as F

import vhist  # noqa: F401  (registers the custom ops)
from vhist import reference
from vhist.ops.depthwise import depthwise_geometry

from common import Case, case_grid

# (name, channels, input size, stride), 3x3, padding 1. MobileNetV1 (Howard et al.,
# 2017, Table 1): dw1..dw13, dw7-dw11 share one shape.
MOBILENET_V1 = [
    ("v1.dw1", 32, 112, 1), ("v1.dw2", 64, 112, 2), ("v1.dw3", 128, 56, 1), ("v1.dw4", 128, 56, 2),
    ("v1.dw5", 256, 28, 1), ("v1.dw6", 256, 28, 2), ("v1.dw7-11", 512, 14, 1), ("v1.dw12", 512, 14, 2),
    ("v1.dw13", 1024, 7, 1),
]
# MobileNetV2 (Sandler et al., 2018, Table 2), expansion 6: the depthwise conv of each
# inverted residual works on the expanded channels. features.1 (32 ch, 112 px, s1) has
# the shape of v1.dw1 and is not repeated.
MOBILENET_V2 = [
    ("v2.features2", 96, 112, 2), ("v2.features3", 144, 56, 1), ("v2.features4", 144, 56, 2),
    ("v2.features5-6", 192, 28, 1), ("v2.features7", 192, 28, 2), ("v2.features8-11", 384, 14, 1),
    ("v2.features12-13", 576, 14, 1), ("v2.features14", 576, 14, 2), ("v2.features15-17", 960, 7, 1),
]
LAYERS = MOBILENET_V1 + MOBILENET_V2
MODES = ("fwd", "bwd-input", "bwd-weight", "fwd+bwd")
# fused_depthwise_bn_act (MobileNet's dw -> BN -> ReLU6) in training and eval.
FUSED_MODES = ("train fwd+bwd", "eval fwd")
# The traffic modes (vhist.tools.traffic) of the modes that have them: the single-gradient
# modes and eval run launches no traffic mode describes.
TRAFFIC_MODES = {"fwd": ("forward",), "fwd+bwd": ("forward", "backward")}


def _conv_args(channels, size, stride):
    geom = depthwise_geometry((1, channels, size, size), (channels, 1, 3, 3), stride, 1, 1)
    return geom, [stride, stride], list(geom.padding), [1, 1]


def _providers(mode, x, w, dy, stride):
    c = x.shape[1]
    geom, stride_l, pad_l, dil_l = _conv_args(c, x.shape[2], stride)
    vh = torch.ops.vhist
    cl = True

    def aten_bwd(mask):
        return lambda dy, x, w: torch.ops.aten.convolution_backward(
            dy, x, w, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], c, mask)

    def eager_fwd(x, w):
        return F.conv2d(x, w, None, stride, 1, 1, c)

    if mode == "fwd":
        fns = {
            "triton": lambda: vh.depthwise_conv2d_fwd(x, w, None, None, stride_l, pad_l, dil_l, 0, 0.01),
            "cuda": lambda: vh.depthwise_conv2d_cuda_fwd(x, w, None, None, stride_l, pad_l, dil_l, 0, 0.01),
            "torch": lambda: eager_fwd(x, w),
        }
        compiled = torch.compile(eager_fwd, dynamic=False)
        fns["torch_compile"] = lambda: compiled(x, w)
        return fns
    if mode == "bwd-input":
        size = list(x.shape)
        fn = aten_bwd([True, False, False])
        compiled = torch.compile(fn, dynamic=False)
        return {
            "triton": lambda: vh.depthwise_conv2d_bwd_input(dy, None, w, size, cl, stride_l, pad_l, dil_l, 0, 0.01),
            "cuda": lambda: vh.depthwise_conv2d_cuda_bwd_input(dy, None, w, size, cl, stride_l, pad_l, dil_l, 0,
                                                               0.01),
            "torch": lambda: fn(dy, x, w),
            "torch_compile": lambda: compiled(dy, x, w),
        }
    if mode == "bwd-weight":
        wsize = list(w.shape)
        fn = aten_bwd([False, True, False])
        compiled = torch.compile(fn, dynamic=False)
        return {
            "triton": lambda: vh.depthwise_conv2d_bwd_weight(dy, None, x, wsize, stride_l, pad_l, dil_l, 0, 0.01,
                                                             False),
            "cuda": lambda: vh.depthwise_conv2d_cuda_bwd_weight(dy, None, x, wsize, stride_l, pad_l, dil_l, 0, 0.01,
                                                                  False),
            "torch": lambda: fn(dy, x, w),
            "torch_compile": lambda: compiled(dy, x, w),
        }
    # fwd+bwd through autograd on each backend
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def with_backend(backend):
        def run():
            with vhist.use_backend(backend):
                y = vhist.ops.depthwise_conv2d(xg, wg, None, stride, 1)
            return torch.autograd.grad(y, (xg, wg), dy)
        return run

    compiled = torch.compile(eager_fwd, dynamic=False)
    return {"triton": with_backend("triton"), "cuda": with_backend("cuda"), "torch": with_backend("torch"),
            "torch_compile": lambda: torch.autograd.grad(compiled(xg, wg), (xg, wg), dy)}


def _bytes(mode, x, y, w):
    xb, yb, wb = x.numel() * x.element_size(), y.numel() * y.element_size(), w.numel() * w.element_size()
    return {"fwd": xb + yb + wb, "bwd-input": yb + xb + wb, "bwd-weight": yb + xb + wb,
            "fwd+bwd": 2 * xb + 2 * yb + xb + 2 * wb}[mode]


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small`` gives tiny shapes for the interpreter's correctness pass;
    ``keep(layer, dtype)`` selects cases before any tensor is made."""
    layers = [("tiny-s1", 6, 9, 1), ("tiny-s2", 5, 8, 2)] if small else LAYERS
    batch = 2 if small else 128
    for (name, channels, size, stride), dtype in case_grid(layers, small, keep):
        for mode in MODES:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, generator=gen)
            x = x.to(memory_format=torch.channels_last)
            w = torch.randn(channels, 1, 3, 3, device=device, dtype=dtype, generator=gen)
            out = (size + 2 - 3) // stride + 1
            dy = torch.randn(batch, channels, out, out, device=device, dtype=dtype, generator=gen)
            dy = dy.to(memory_format=torch.channels_last)
            providers = _providers(mode, x, w, dy, stride)
            if small:
                providers.pop("cuda")
            yield Case(op="depthwise_conv2d", layer=name, shape=tuple(x.shape), dtype=dtype,
                       layout="channels_last", mode=mode, providers=providers, bytes=_bytes(mode, x, dy, w),
                       check=lambda p=providers: _check(p), tolerance=1e-4, extra={"stride": stride},
                       traffic=dict(op="depthwise_conv2d", shape=tuple(x.shape), modes=TRAFFIC_MODES[mode],
                                    conv=dict(c_out=channels, kernel=3, stride=stride, padding=1), dtype=dtype)
                       if mode in TRAFFIC_MODES else None)
        for mode in FUSED_MODES:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, generator=gen)
            x = x.to(memory_format=torch.channels_last)
            w = torch.randn(channels, 1, 3, 3, device=device, dtype=dtype, generator=gen)
            f32 = dict(device=device, dtype=torch.float32)
            bn = (torch.rand(channels, **f32) + 0.5, torch.randn(channels, **f32), torch.zeros(channels, **f32),
                  torch.ones(channels, **f32))
            training = mode.startswith("train")
            providers = _fused_providers(x, w, bn, stride, training)
            x_bytes = x.numel() * x.element_size()
            y_bytes = x_bytes // (stride * stride)
            yield Case(op="fused_depthwise_bn_act", layer=name, shape=tuple(x.shape), dtype=dtype,
                       layout="channels_last", mode=mode, providers=providers,
                       bytes=3 * x_bytes + 3 * y_bytes if training else x_bytes + y_bytes,
                       check=lambda a=(x, w, bn, stride, training): _fused_check(*a), tolerance=1e-3,
                       extra={"stride": stride},
                       traffic=dict(op="fused_depthwise_bn_act", shape=tuple(x.shape), modes=("forward", "backward"),
                                    conv=dict(c_out=channels, kernel=3, stride=stride, padding=1), dtype=dtype,
                                    activation=2) if training else None)


def _fused_fn(backend):
    def fn(x, w, gamma, beta, rm, rv, stride, training):
        if backend is None:
            return reference.fused_depthwise_bn_act(x, w, gamma, beta, rm, rv, stride=stride, padding=1,
                                                    training=training)
        with vhist.use_backend(backend):
            return vhist.ops.fused_depthwise_bn_act(x, w, gamma, beta, rm, rv, stride=stride, padding=1,
                                                    training=training)
    return fn


def _fused_providers(x, w, bn, stride, training):
    """depthwise -> BN -> ReLU6 (MobileNet); training: forward and every gradient."""
    fns = {"triton": _fused_fn("triton"), "torch": _fused_fn(None)}
    fns["torch_compile"] = torch.compile(fns["torch"], dynamic=False)
    if not training:
        return {name: (lambda fn=fn: fn(x, w, *bn, stride, False)) for name, fn in fns.items()}
    leaves = [t.detach().requires_grad_() for t in (x, w, bn[0], bn[1])]
    with torch.no_grad():
        grad_out = torch.randn_like(fns["torch"](x, w, *bn, stride, True))
    return {name: (lambda fn=fn: torch.autograd.grad(fn(*leaves, bn[2], bn[3], stride, True), leaves, grad_out))
            for name, fn in fns.items()}


def _fused_check(x, w, bn, stride, training):
    """Max abs difference between the triton and torch backends (output and gradients)."""
    results = []
    for backend in ("triton", None):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn[0], bn[1])]
        y = _fused_fn(backend)(*leaves, bn[2].clone(), bn[3].clone(), stride, training)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y) + y.detach()) if training else ()
        results.append((y, *grads))
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))


def _check(providers):
    """Max abs difference between the triton and torch providers (every output)."""
    ours, theirs = providers["triton"](), providers["torch"]()
    # aten's convolution_backward returns None for the gradients not asked for, ours an
    # empty bias gradient: compare what both computed, in order.
    ours = [t for t in (ours if isinstance(ours, (tuple, list)) else (ours,)) if t is not None and t.numel()]
    theirs = [t for t in (theirs if isinstance(theirs, (tuple, list)) else (theirs,)) if t is not None and t.numel()]
    assert len(ours) == len(theirs)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs))
