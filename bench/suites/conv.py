"""Conv layers: fused conv + BatchNorm + ReLU (ResNet-50, Inception-v3) and conv + bias +
ReLU (AlexNet, VGG-16), training fwd+bwd and eval fwd, bf16 and fp32, channels_last.

Baselines on the same inputs: "torch" is eager F.conv2d -> F.batch_norm -> F.relu
(cuDNN, channels_last, cudnn.benchmark=True set by the runner), "torch_compile" is
torch.compile of the same function. FLOPs count the convolution only (2 per
multiply-add): the forward, plus dgrad and wgrad in training (no dgrad for the first
layer of a network, whose input needs no gradient).
"""
import torch
import torch.nn.functional as F

import vhist
from vhist import reference
from vhist.ops.conv import conv_geometry

from common import Case, case_grid

# (name, C_in, C_out, kernel (kh, kw), stride, padding, input size (h, w)): every distinct
# conv of torchvision's ResNet-50 (v1.5: stride on the 3x3) at 224 px.
RESNET50_LAYERS = [
    ("stem.7x7", 3, 64, (7, 7), 2, 3, (224, 224)),
    ("layer1.0.conv1", 64, 64, (1, 1), 1, 0, (56, 56)),
    ("layer1.conv1", 256, 64, (1, 1), 1, 0, (56, 56)),
    ("layer1.conv2", 64, 64, (3, 3), 1, 1, (56, 56)),
    ("layer1.conv3/downsample", 64, 256, (1, 1), 1, 0, (56, 56)),
    ("layer2.0.conv1", 256, 128, (1, 1), 1, 0, (56, 56)),
    ("layer2.0.conv2", 128, 128, (3, 3), 2, 1, (56, 56)),
    ("layer2.0.downsample", 256, 512, (1, 1), 2, 0, (56, 56)),
    ("layer2.conv1", 512, 128, (1, 1), 1, 0, (28, 28)),
    ("layer2.conv2", 128, 128, (3, 3), 1, 1, (28, 28)),
    ("layer2.conv3", 128, 512, (1, 1), 1, 0, (28, 28)),
    ("layer3.0.conv1", 512, 256, (1, 1), 1, 0, (28, 28)),
    ("layer3.0.conv2", 256, 256, (3, 3), 2, 1, (28, 28)),
    ("layer3.0.downsample", 512, 1024, (1, 1), 2, 0, (28, 28)),
    ("layer3.conv1", 1024, 256, (1, 1), 1, 0, (14, 14)),
    ("layer3.conv2", 256, 256, (3, 3), 1, 1, (14, 14)),
    ("layer3.conv3", 256, 1024, (1, 1), 1, 0, (14, 14)),
    ("layer4.0.conv1", 1024, 512, (1, 1), 1, 0, (14, 14)),
    ("layer4.0.conv2", 512, 512, (3, 3), 2, 1, (14, 14)),
    ("layer4.0.downsample", 1024, 2048, (1, 1), 2, 0, (14, 14)),
    ("layer4.conv1", 2048, 512, (1, 1), 1, 0, (7, 7)),
    ("layer4.conv2", 512, 512, (3, 3), 1, 1, (7, 7)),
    ("layer4.conv3", 512, 2048, (1, 1), 1, 0, (7, 7)),
]
# Inception-v3's factorized convs: 1x7 / 7x1 at 17x17 (Mixed_6b-e), 1x3 / 3x1 at 8x8 (Mixed_7b-c).
INCEPTION_V3_LAYERS = [
    ("Mixed_6b.1x7", 128, 128, (1, 7), 1, (0, 3), (17, 17)),
    ("Mixed_6b.7x1", 128, 192, (7, 1), 1, (3, 0), (17, 17)),
    ("Mixed_6c.1x7", 160, 160, (1, 7), 1, (0, 3), (17, 17)),
    ("Mixed_6c.7x1", 160, 192, (7, 1), 1, (3, 0), (17, 17)),
    ("Mixed_6e.1x7", 192, 192, (1, 7), 1, (0, 3), (17, 17)),
    ("Mixed_6e.7x1", 192, 192, (7, 1), 1, (3, 0), (17, 17)),
    ("Mixed_7b.1x3", 384, 384, (1, 3), 1, (0, 1), (8, 8)),
    ("Mixed_7b.3x1", 384, 384, (3, 1), 1, (1, 0), (8, 8)),
]
# Layers without BatchNorm: conv + bias + ReLU.
ALEXNET_VGG16_LAYERS = [
    ("alexnet.conv1", 3, 64, (11, 11), 4, 2, (224, 224)),
    ("vgg16.conv1_1", 3, 64, (3, 3), 1, 1, (224, 224)),
    ("vgg16.conv1_2", 64, 64, (3, 3), 1, 1, (224, 224)),
    ("vgg16.conv2_1", 64, 128, (3, 3), 1, 1, (112, 112)),
    ("vgg16.conv2_2", 128, 128, (3, 3), 1, 1, (112, 112)),
    ("vgg16.conv3_1", 128, 256, (3, 3), 1, 1, (56, 56)),
    ("vgg16.conv3_2", 256, 256, (3, 3), 1, 1, (56, 56)),
    ("vgg16.conv4_1", 256, 512, (3, 3), 1, 1, (28, 28)),
    ("vgg16.conv4_2", 512, 512, (3, 3), 1, 1, (28, 28)),
    ("vgg16.conv5_x", 512, 512, (3, 3), 1, 1, (14, 14)),
]
SMALL_LAYERS = [  # interpreter correctness pass
    ("tiny.3x3", 3, 4, (3, 3), 1, 1, (6, 6)),
    ("tiny.1x7", 4, 5, (1, 7), 1, (0, 3), (5, 7)),
    ("tiny.11x11s4", 2, 3, (11, 11), 4, 2, (15, 15)),
]
MODES = ("train fwd+bwd", "eval fwd")


def _make(batch, c_in, c_out, kernel, dtype, device):
    x = torch.randn(batch, c_in, *kernel[1], device=device, dtype=dtype).to(memory_format=torch.channels_last)
    fan_in = c_in * kernel[0][0] * kernel[0][1]
    w = (torch.randn(c_out, c_in, *kernel[0], device=device, dtype=dtype) / fan_in ** 0.5).to(
        memory_format=torch.channels_last)
    f32 = dict(device=device, dtype=torch.float32)
    bn = (torch.rand(c_out, **f32) + 0.5, torch.randn(c_out, **f32), torch.zeros(c_out, **f32),
          torch.ones(c_out, **f32))
    bias = torch.randn(c_out, device=device, dtype=dtype)
    return x, w, bn, bias


def _fused_fn(backend):
    def fn(x, w, gamma, beta, rm, rv, training, stride, padding):
        if backend is None:
            return reference.fused_conv_bn_act(x, w, gamma, beta, rm, rv, stride=stride, padding=padding,
                                                training=training)
        with vhist.use_backend(backend):
            return vhist.ops.fused_conv_bn_act(x, w, gamma, beta, rm, rv, stride=stride, padding=padding,
                                                training=training)
    return fn


def _conv_fn(backend):
    def fn(x, w, b, stride, padding):
        if backend is None:
            return F.relu(F.conv2d(x, w, b, stride, padding))
        with vhist.use_backend(backend):
            return vhist.ops.conv2d(x, w, b, stride, padding, activation="relu")
    return fn


def _providers(kind, x, w, bn, bias, stride, padding, training, input_grad):
    fns = {"triton": _fused_fn("triton") if kind == "bn" else _conv_fn("triton")}
    fns["torch"] = _fused_fn(None) if kind == "bn" else _conv_fn(None)
    fns["torch_compile"] = torch.compile(fns["torch"], dynamic=False)
    grad_out = None
    providers = {}
    for name, fn in fns.items():
        if kind == "bn":
            params = [x, w, bn[0], bn[1]]

            def call(p, fn=fn):
                return fn(p[0], p[1], p[2], p[3], bn[2], bn[3], training, stride, padding)
        else:
            params = [x, w, bias]

            def call(p, fn=fn):
                return fn(p[0], p[1], p[2], stride, padding)
        if not training:
            providers[name] = (lambda call=call, p=params: call(p))
            continue
        leaves = [t.detach().requires_grad_(i > 0 or input_grad) for i, t in enumerate(params)]
        wanted = [t for t in leaves if t.requires_grad]
        if grad_out is None:
            with torch.no_grad():
                grad_out = torch.randn_like(call(params))
        providers[name] = (lambda call=call, leaves=leaves, wanted=wanted:
                           torch.autograd.grad(call(leaves), wanted, grad_out))
    return providers


def _check(kind, x, w, bn, bias, stride, padding, training):
    """Max abs difference between the triton and torch backends, output and gradients."""
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in ((x, w, bn[0], bn[1]) if kind == "bn" else (x, w, bias))]
        with vhist.use_backend(backend):
            if kind == "bn":
                y = vhist.ops.fused_conv_bn_act(*leaves, bn[2].clone(), bn[3].clone(), stride=stride,
                                                 padding=padding, training=training)
            else:
                y = vhist.ops.conv2d(*leaves, stride, padding, activation="relu")
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y) + y.detach()) if training else ()
        results.append((y, *grads))
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*results))


def cases(device, small=False, keep=None):
    """Benchmark cases; ``small`` gives tiny shapes for the interpreter's correctness pass;
    ``keep(layer, dtype)`` selects cases before any tensor is made."""
    if small:
        groups = [("fused_conv_bn_act", "bn", SMALL_LAYERS), ("conv2d", "bias", SMALL_LAYERS[:1])]
    else:
        groups = [("fused_conv_bn_act", "bn", RESNET50_LAYERS + INCEPTION_V3_LAYERS),
                  ("conv2d", "bias", ALEXNET_VGG16_LAYERS)]
    batch = 2 if small else 128
    for op, kind, layers in groups:
        for (name, c_in, c_out, kernel, stride, padding, size), dtype, mode in case_grid(layers, small, keep, MODES):
            training = mode.startswith("train")
            x, w, bn, bias = _make(batch, c_in, c_out, (kernel, size), dtype, device)
            geom = conv_geometry(op, x.shape, w.shape, stride, padding, 1, 1)
            input_grad = c_in != 3  # a network's first layer needs no input gradient
            flops = geom.flops() * ((3 if input_grad else 2) if training else 1)
            yield Case(
                op=op, layer=name, shape=tuple(x.shape) + tuple(w.shape), dtype=dtype,
                layout="channels_last", mode=mode,
                providers=_providers(kind, x, w, bn, bias, stride, padding, training, input_grad),
                flops=flops,
                check=lambda a=(kind, x, w, bn, bias, stride, padding, training): _check(*a),
                tolerance=1e-3)
