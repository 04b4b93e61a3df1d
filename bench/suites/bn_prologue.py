"""Conv → BN → ReLU → conv → BN → ReLU pairs whose first BN + ReLU run in the second
conv's prologue (vhist.ops.conv_bn_deferred), at the layer pairs of ResNet-50's
bottlenecks and VGG-16-BN (batch 128, 224 px, channels_last), training fwd+bwd.

Providers: ``triton`` (the deferred producer, then the consumer's fused op),
``triton_no_prologue`` (the same two layers as two fused conv + BN + ReLU ops: the
first writes its normalized output), ``torch`` (eager F.conv2d → F.batch_norm → F.relu,
twice; cuDNN, channels_last, cudnn.benchmark on) and ``torch_compile`` of the same.
FLOPs count the two convolutions (forward, dgrad and wgrad).
"""
import torch
import torch.nn.functional as F

import vhist
from vhist.ops.conv import conv_geometry

from common import Case, case_grid, max_chain_error

# (name, C_in, C_mid, C_out, (k1, k2), stride of the second conv, input size, conv bias).
PAIRS = [
    ("resnet50.layer1.conv1+conv2", 256, 64, 64, (1, 3), 1, 56, False),
    ("resnet50.layer2.conv2+conv3", 128, 128, 512, (3, 1), 1, 28, False),
    ("resnet50.layer3.0.conv1+conv2", 512, 256, 256, (1, 3), 2, 28, False),
    ("resnet50.layer4.conv1+conv2", 2048, 512, 512, (1, 3), 1, 7, False),
    ("vgg16_bn.conv3_1+conv3_2", 128, 256, 256, (3, 3), 1, 56, True),
]
SMALL_PAIRS = [("tiny.1x1+3x3", 5, 6, 7, (1, 3), 2, 6, False), ("tiny.3x3+3x3.bias", 4, 6, 5, (3, 3), 1, 5, True)]
MODE = "train fwd+bwd"


def _make(batch, pair, dtype, device):
    _, c_in, c_mid, c_out, (k1, k2), _, size, bias = pair
    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(device=device, generator=gen)
    x = torch.randn(batch, c_in, size, size, dtype=dtype, **kw).to(memory_format=torch.channels_last)
    w1 = (torch.randn(c_mid, c_in, k1, k1, dtype=dtype, **kw) / (c_in * k1 * k1) ** 0.5)
    w2 = (torch.randn(c_out, c_mid, k2, k2, dtype=dtype, **kw) / (c_mid * k2 * k2) ** 0.5)
    b1 = torch.randn(c_mid, dtype=dtype, **kw) if bias else None
    bn = [(torch.rand(c, **kw) + 0.5, torch.randn(c, **kw)) for c in (c_mid, c_out)]
    return x, w1.to(memory_format=torch.channels_last), b1, w2.to(memory_format=torch.channels_last), bn


def _chain(provider, stride):
    def eager(x, w1, b1, g1, be1, w2, g2, be2):
        y = F.relu(F.batch_norm(F.conv2d(x, w1, b1, 1, w1.shape[-1] // 2), None, None, g1, be1, True))
        return F.relu(F.batch_norm(F.conv2d(y, w2, None, stride, w2.shape[-1] // 2), None, None, g2, be2, True))

    def vhist_chain(x, w1, b1, g1, be1, w2, g2, be2):
        with vhist.use_backend("triton"):
            if provider == "triton":
                y = vhist.ops.conv_bn_deferred(x, w1, g1, be1, None, None, bias=b1, padding=w1.shape[-1] // 2)
            else:  # two fused ops, the first writing its normalized output (pairs without a conv bias)
                y = vhist.ops.fused_conv_bn_act(x, w1, g1, be1, None, None, padding=w1.shape[-1] // 2)
            return vhist.ops.fused_conv_bn_act(y, w2, g2, be2, None, None, stride=stride,
                                                padding=w2.shape[-1] // 2)

    if provider == "torch":
        return eager
    if provider == "torch_compile":
        return torch.compile(eager, dynamic=False)
    return vhist_chain


def _leaves(x, w1, b1, w2, bn):
    return [t.detach().clone().requires_grad_() for t in (x, w1, b1, *bn[0], w2, *bn[1]) if t is not None]


def _call(fn, leaves, has_bias):
    x, w1, *rest = leaves
    b1 = rest.pop(0) if has_bias else None
    g1, be1, w2, g2, be2 = rest
    return fn(x, w1, b1, g1, be1, w2, g2, be2)


def _providers(x, w1, b1, w2, bn, stride, device):
    names = ["triton", "torch", "torch_compile"] + (["triton_no_prologue"] if b1 is None else [])
    grad_out = None
    providers = {}
    for name in names:
        fn, leaves = _chain(name, stride), _leaves(x, w1, b1, w2, bn)
        if grad_out is None:  # sized by the first provider's output (recorded, not run, in the compile report)
            with torch.no_grad():
                grad_out = torch.randn_like(_call(fn, leaves, b1 is not None))
        providers[name] = (lambda fn=fn, leaves=leaves: torch.autograd.grad(
            _call(fn, leaves, b1 is not None), leaves, grad_out))
    return providers


def _check(x, w1, b1, w2, bn, stride):
    """Max abs difference of the triton chain against eager: output and every gradient."""
    def run(name):
        leaves = _leaves(x, w1, b1, w2, bn)
        return _call(_chain(name, stride), leaves, b1 is not None), leaves

    return max_chain_error(run)


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small`` gives tiny shapes for the interpreter's correctness pass;
    ``keep(layer, dtype)`` selects cases before any tensor is made."""
    batch = 2 if small else 128
    for pair, dtype in case_grid(SMALL_PAIRS if small else PAIRS, small, keep):
        name, c_in, c_mid, c_out, (k1, k2), stride, size, _ = pair
        x, w1, b1, w2, bn = _make(batch, pair, dtype, device)
        g1 = conv_geometry("conv", x.shape, w1.shape, 1, k1 // 2, 1, 1)
        g2 = conv_geometry("conv", (batch, c_mid, size, size), w2.shape, stride, k2 // 2, 1, 1)
        yield Case(op="conv_bn_deferred", layer=name, shape=tuple(x.shape), dtype=dtype, layout="channels_last",
                   mode=MODE, providers=_providers(x, w1, b1, w2, bn, stride, device),
                   flops=3 * (g1.flops() + g2.flops()),
                   check=lambda a=(x, w1, b1, w2, bn, stride): _check(*a), tolerance=1e-3)
