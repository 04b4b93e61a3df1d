"""CNN blocks written in plain PyTorch the way torchvision and timm write them (neither
imports beside CI's CPU torch), for the tests of vhist.convert.

Each entry of BLOCKS builds a small classifier (block, pooling, linear head) and gives
its input shape and, per conv, the chain the converter should fuse with it when the
kernels support every activation in it: the conv's report label is ``conv+`` these
steps joined by ``+``, with an unsupported activation dropped (see ``expected_label``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vhist.convert.calls import has_layer_orders
from vhist.ops.common import ACTIVATION_CODES


# ----------------------------------------------------------------------------- torchvision pieces


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation: Sequential(conv, norm, activation)."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=nn.ReLU, inplace=True):
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=inplace) if inplace is not None else activation_layer())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation: 1x1 convs with a bias, a gate that scales the input."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNeXt with groups > 1)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual (ReLU6)."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            Conv2dNormActivation(inp, hidden, 1, activation_layer=nn.ReLU6),
            Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (row mode); p = 0 here, an identity in both modes."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, input):
        if not self.training or self.p == 0.0:
            return input
        keep = 1.0 - self.p
        noise = torch.empty([input.shape[0]] + [1] * (input.ndim - 1), dtype=input.dtype, device=input.device)
        return input * noise.bernoulli_(keep).div_(keep)


class MBConv(nn.Module):
    """torchvision.models.efficientnet.MBConv: SiLU, squeeze-excitation, residual."""

    def __init__(self, cin, expand, kernel, activation=nn.SiLU, se_activation=nn.SiLU, se_gate=nn.Sigmoid):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            Conv2dNormActivation(cin, hidden, 1, activation_layer=activation, inplace=None),
            Conv2dNormActivation(hidden, hidden, kernel, groups=hidden, activation_layer=activation, inplace=None),
            SqueezeExcitation(hidden, max(1, cin // 4), activation=se_activation, scale_activation=se_gate),
            Conv2dNormActivation(hidden, cin, 1, activation_layer=None))
        self.stochastic_depth = StochasticDepth(0.0)

    def forward(self, input):
        result = self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class DenseLayer(nn.Module):
    """torchvision.models.densenet._DenseLayer: BN -> ReLU -> conv on a concatenation."""

    def __init__(self, num_input_features, growth_rate, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.memory_efficient = False

    def bn_function(self, inputs):
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input):
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class DenseBlock(nn.ModuleDict):
    """torchvision.models.densenet._DenseBlock: every layer sees every earlier output."""

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


# ----------------------------------------------------------------------------- timm pieces


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: BatchNorm with the activation inside, its own forward
    (F.batch_norm, the momentum and num_batches_tracked rules written out)."""

    def __init__(self, num_features, act_layer=nn.ReLU, act_kwargs=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = nn.Identity()
        self.act = act_layer(**(act_kwargs or {}))

    def forward(self, x):
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class ConvNormAct(nn.Module):
    """timm.layers.ConvNormAct: conv then BatchNormAct2d."""

    def __init__(self, cin, cout, kernel_size=1, stride=1, act_layer=nn.ReLU, act_kwargs=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = BatchNormAct2d(cout, act_layer=act_layer, act_kwargs=act_kwargs)

    def forward(self, x):
        return self.bn(self.conv(x))


class DarkBlock(nn.Module):
    """timm.models.cspnet.DarkBlock: 1x1 then 3x3 ConvNormAct, shortcut after the activation."""

    def __init__(self, channels, act):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels // 2, 1, **act)
        self.conv2 = ConvNormAct(channels // 2, channels, 3, **act)

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        return x + shortcut


class CrossStage(nn.Module):
    """timm.models.cspnet.CrossStage (LeakyReLU, CSPDarknet): split, blocks on one half, concat."""

    def __init__(self, cin, cout, act=None):
        super().__init__()
        act = act or dict(act_layer=nn.LeakyReLU, act_kwargs=dict(negative_slope=0.1, inplace=True))
        self.conv_exp = ConvNormAct(cin, cout, 1, **act)
        self.blocks = nn.Sequential(DarkBlock(cout // 2, act))
        self.conv_transition_b = ConvNormAct(cout // 2, cout // 2, 1, **act)
        self.conv_transition = ConvNormAct(cout, cout, 1, **act)

    def forward(self, x):
        x = self.conv_exp(x)
        xs, xb = x.split(x.shape[1] // 2, dim=1)
        xb = self.blocks(xb)
        xb = self.conv_transition_b(xb).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class StdConv2d(nn.Conv2d):
    """timm.layers.StdConv2d: weight standardization computed in forward (NFNet, BiT)."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=None, bias=False, eps=1e-6):
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(cin, cout, kernel_size, stride, padding, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSBlock(nn.Module):
    """Weight-standardized convs without a norm (NFNet-style): conv -> act."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = StdConv2d(cin, cout, 3, bias=True)
        self.act1 = nn.ReLU()
        self.conv2 = StdConv2d(cout, cout, 1, bias=True)
        self.act2 = nn.SiLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet-PyTorch's TF-'same' conv: an explicit zero pad computed for the image
    size, then F.conv2d."""

    def __init__(self, cin, cout, kernel_size, stride=1, image_size=None):
        super().__init__(cin, cout, kernel_size, stride, bias=False)
        ih = iw = image_size
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = -(-ih // sh), -(-iw // sw)
        pad_h = max((oh - 1) * sh + (kh - 1) + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) + 1 - iw, 0)
        self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TFSameStem(nn.Module):
    """EfficientNet-PyTorch's stem: TF-'same' conv, BN, swish."""

    def __init__(self, cin, cout, image_size):
        super().__init__()
        self._conv_stem = Conv2dStaticSamePadding(cin, cout, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(cout)
        self._swish = nn.SiLU()

    def forward(self, x):
        return self._swish(self._bn0(self._conv_stem(x)))


def _get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation=(1, 1), value=0):
    """timm.layers.padding.pad_same: TF-'same' padding from the input's size."""
    ih, iw = x.size()[-2:]
    pad_h = _get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = _get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class Conv2dSame(nn.Conv2d):
    """timm.layers.Conv2dSame: dynamic TF-'same' padding (not traceable by torch.fx)."""

    def __init__(self, cin, cout, kernel_size, stride=1):
        super().__init__(cin, cout, kernel_size, stride, 0, bias=False)

    def forward(self, x):
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Residual(nn.Module):
    """ConvMixer's Residual: fn(x) + x."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def conv_mixer_layer(dim, kernel_size):
    """One ConvMixer layer (Trockman & Kolter, 2022; timm's convmixer): conv -> GELU -> BN."""
    return nn.Sequential(
        Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), nn.GELU(),
                               nn.BatchNorm2d(dim))),
        nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))


class SplitStem(nn.Module):
    """A conv whose BatchNorm lives in the next module (DPN, Res2Net)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x)


class SplitBody(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.act(self.bn(x))
        return F.relu(self.bn2(self.conv(x)))


class DataDependent(nn.Module):
    """Control flow on a tensor's value: fx cannot trace it, its children still convert."""

    def __init__(self, c):
        super().__init__()
        self.a = ConvNormAct(c, c, 3)
        self.b = Conv2dNormActivation(c, c, 3)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


# ----------------------------------------------------------------------------- the table


def classifier(body: nn.Module, channels: int, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def _resnet():
    down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return classifier(Bottleneck(4, 2, stride=2, downsample=down), 8)


def _resnext():
    return classifier(Bottleneck(8, 2, groups=2, base_width=64), 8)


BN_RELU = ("BN", "relu")
# name: (build, input shape, {conv: steps})
BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple, dict]] = {
    "resnet_bottleneck": (_resnet, (2, 4, 6, 6), {
        "0.conv1": BN_RELU, "0.conv2": BN_RELU, "0.conv3": ("BN", "relu", "residual"), "0.downsample.0": ("BN",)}),
    "inverted_residual_relu6": (lambda: classifier(InvertedResidual(4, 4, 1, 3), 4), (2, 4, 6, 6), {
        "0.conv.0.0": ("BN", "relu6"), "0.conv.1.0": ("BN", "relu6"), "0.conv.2": ("BN", "residual")}),
    "mbconv_silu_se": (lambda: classifier(MBConv(4, 2, 3), 4), (2, 4, 6, 6), {
        "0.block.0.0": ("BN", "silu"), "0.block.1.0": ("BN", "silu"), "0.block.2.fc1": ("silu",),
        "0.block.2.fc2": ("sigmoid",), "0.block.3.0": ("BN", "residual")}),
    "mobilenetv3_hardswish": (lambda: classifier(MBConv(4, 2, 3, nn.Hardswish, nn.ReLU, nn.Hardsigmoid), 4),
                              (2, 4, 6, 6), {
        "0.block.0.0": ("BN", "hardswish"), "0.block.1.0": ("BN", "hardswish"), "0.block.2.fc1": ("relu",),
        "0.block.2.fc2": ("hardsigmoid",), "0.block.3.0": ("BN", "residual")}),
    "csp_leaky_relu": (lambda: classifier(CrossStage(4, 8), 8), (2, 4, 6, 6), {
        name: ("BN", "leaky_relu(0.1)") for name in (
            "0.conv_exp.conv", "0.blocks.0.conv1.conv", "0.blocks.0.conv2.conv", "0.conv_transition_b.conv",
            "0.conv_transition.conv")}),
    "densenet_layer": (lambda: classifier(DenseBlock(2, 4, 2, 2), 8), (2, 4, 6, 6), {
        "0.denselayer1.conv1": BN_RELU, "0.denselayer1.conv2": (), "0.denselayer2.conv1": BN_RELU,
        "0.denselayer2.conv2": ()}),
    "convmixer_gelu": (lambda: classifier(conv_mixer_layer(4, 3), 4), (2, 4, 6, 6), {
        "0.0.fn.0": ("gelu", "BN"), "0.1": ("gelu", "BN")}),
    "resnext_grouped": (_resnext, (2, 8, 6, 6), {
        "0.conv1": BN_RELU, "0.conv2": BN_RELU, "0.conv3": ("BN", "relu", "residual")}),
    "weight_standardized": (lambda: classifier(WSBlock(4, 6), 6), (2, 4, 6, 6), {
        "0.conv1:conv2d": ("relu",), "0.conv2:conv2d_1": ("silu",)}),
    "tf_same_padding": (lambda: classifier(TFSameStem(3, 6, 8), 6), (2, 3, 8, 8), {
        "0._conv_stem:conv2d": ("BN", "silu")}),
    "split_pair": (lambda: classifier(nn.Sequential(SplitStem(4, 6), SplitBody(6)), 6), (2, 4, 6, 6), {
        "0.0.conv": BN_RELU, "0.1.conv": BN_RELU}),
    "data_dependent": (lambda: classifier(DataDependent(4), 4), (2, 4, 6, 6), {
        "0.a.conv": BN_RELU, "0.b.0": BN_RELU}),
}


def expected_label(steps: tuple) -> tuple[str, Optional[str]]:
    """``(fused, unsupported)``: the report's fused steps for ``steps`` with the kernels'
    activations and layer orders of this run, and the activation the kernels lack (None
    if none). An unsupported activation stays PyTorch's (the rest of its chain is fused
    up to it); an activation before BN (conv -> act -> BN) fuses both only where vhist
    has that order, else the activation alone."""
    acts = [s for s in steps if s not in ("BN", "residual")]
    missing = next((a for a in acts if a.split("(")[0] not in ACTIVATION_CODES), None)
    if acts and "BN" in steps and steps.index(acts[0]) < steps.index("BN"):  # conv -> act -> BN
        if missing is not None:
            return "", missing
        return ("+".join(steps) if has_layer_orders() else acts[0]), None
    return "+".join(s for s in steps if s != missing), missing


__all__ = ["BLOCKS", "Conv2dSame", "expected_label", "classifier"]
