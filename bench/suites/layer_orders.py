"""The layer orders of issue 23 beyond conv -> BN -> act, training fwd+bwd, channels_last:
conv -> GELU -> BN (``vhist.ops.fused_conv_act_bn``: ConvMixer's pointwise layer,
Trockman & Kolter 2022) and BN -> ReLU -> conv on a tensor no single conv produced
(``vhist.ops.batch_norm_deferred`` applied in the consuming conv's prologue: a
DenseNet-121 layer's concatenated input, Huang et al. 2017).

Providers: ``triton`` (the vhist op, then for the BN-first order the consumer's fused op
taking the deferred input), ``torch`` (eager F.conv2d / F.batch_norm / activation; cuDNN,
channels_last, cudnn.benchmark on) and ``torch_compile`` of the same. FLOPs count the
convolutions (forward, dgrad and wgrad).
"""
import torch
import torch.nn.functional as F

import vhist
from vhist.ops.conv import conv_geometry

from common import Case, case_grid, max_chain_error

# (name, order, C_in, C_out, kernel, input size, activation); batch 128 at 224 px.
LAYERS = [
    ("convmixer_768_32.pointwise", "conv_act_bn", 768, 768, 1, 32, "gelu"),
    ("densenet121.denseblock1.denselayer6.conv1", "bn_act_conv", 224, 128, 1, 56, "relu"),
    ("densenet121.denseblock3.denselayer24.conv1", "bn_act_conv", 992, 128, 1, 14, "relu"),
]
SMALL_LAYERS = [("tiny.conv_act_bn", "conv_act_bn", 5, 6, 3, 6, "gelu"),
                ("tiny.bn_act_conv", "bn_act_conv", 6, 5, 3, 5, "relu")]
MODE = "train fwd+bwd"
ACT = {"gelu": F.gelu, "relu": F.relu}


def _make(batch, layer, dtype, device):
    _, order, c_in, c_out, k, size, _ = layer
    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(device=device, generator=gen)
    x = torch.randn(batch, c_in, size, size, dtype=dtype, **kw).to(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, k, k, dtype=dtype, **kw) / (c_in * k * k) ** 0.5).to(
        memory_format=torch.channels_last)
    c_bn = c_out if order == "conv_act_bn" else c_in
    bn = (torch.rand(c_bn, **kw) + 0.5, torch.randn(c_bn, **kw))
    return x, w, bn


def _chain(provider, order, activation, k):
    act = ACT[activation]

    def eager(x, w, gamma, beta):
        if order == "conv_act_bn":
            return F.batch_norm(act(F.conv2d(x, w, None, 1, k // 2)), None, None, gamma, beta, True)
        return F.conv2d(act(F.batch_norm(x, None, None, gamma, beta, True)), w, None, 1, k // 2)

    def vhist_chain(x, w, gamma, beta):
        with vhist.use_backend("triton"):
            if order == "conv_act_bn":
                return vhist.ops.fused_conv_act_bn(x, w, gamma, beta, None, None, padding=k // 2,
                                                   activation=activation)
            y = vhist.ops.batch_norm_deferred(x, gamma, beta, None, None, activation=activation)
            return vhist.ops.conv2d(y, w, padding=k // 2)

    if provider == "torch":
        return eager
    if provider == "torch_compile":
        return torch.compile(eager, dynamic=False)
    return vhist_chain


def _leaves(x, w, bn):
    return [t.detach().clone().requires_grad_() for t in (x, w, *bn)]


def _providers(x, w, bn, order, activation, k):
    grad_out = None
    providers = {}
    for name in ("triton", "torch", "torch_compile"):
        fn, leaves = _chain(name, order, activation, k), _leaves(x, w, bn)
        if grad_out is None:  # sized by the first provider's output (recorded, not run, in the compile report)
            with torch.no_grad():
                grad_out = torch.randn_like(fn(*leaves))
        providers[name] = (lambda fn=fn, leaves=leaves: torch.autograd.grad(fn(*leaves), leaves, grad_out))
    return providers


def _check(x, w, bn, order, activation, k):
    """Max abs difference of the triton chain against eager: output and every gradient."""
    def run(name):
        leaves = _leaves(x, w, bn)
        return _chain(name, order, activation, k)(*leaves), leaves

    return max_chain_error(run)


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small`` gives tiny shapes for the interpreter's correctness pass;
    ``keep(layer, dtype)`` selects cases before any tensor is made."""
    batch = 2 if small else 128
    for layer, dtype in case_grid(SMALL_LAYERS if small else LAYERS, small, keep):
        name, order, c_in, c_out, k, size, activation = layer
        x, w, bn = _make(batch, layer, dtype, device)
        g = conv_geometry("conv", x.shape, w.shape, 1, k // 2, 1, 1)
        op = "fused_conv_act_bn" if order == "conv_act_bn" else "batch_norm_deferred"
        yield Case(op=op, layer=name, shape=tuple(x.shape), dtype=dtype, layout="channels_last", mode=MODE,
                   providers=_providers(x, w, bn, order, activation, k), flops=3 * g.flops(),
                   check=lambda a=(x, w, bn, order, activation, k): _check(*a), tolerance=1e-3)
