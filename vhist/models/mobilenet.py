"""MobileNets: V1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications", 2017) and V2 (Sandler et al., "MobileNetV2: Inverted
Residuals and Linear Bottlenecks", CVPR 2018).

Every depthwise conv (``groups == in_channels``) runs on the fused depthwise + BN +
activation op, every other conv + BN (+ activation) on the fused conv op; V2's linear
bottleneck adds its shortcut through the fused op's residual input.

V1: the paper's Table 1 body (3×3/2 conv, 13 depthwise-separable blocks, global average
pool, FC), ReLU after every BN as in the paper, with the width multiplier ``alpha``
(section 4.2: every width becomes ``int(alpha * c)``) and the resolution multiplier as
``image_size`` (224, 192, 160, 128 in the paper). Layout: ``features.0`` is the stem
(``conv``/``bn``), ``features.<i>.dw`` / ``.pw`` the blocks, ``classifier`` the FC; no
torchvision model exists.

V2: torchvision's ``torchvision.models.mobilenetv2`` layout (``features.<i>.conv.<j>``,
``classifier.1``), so its state_dicts load with ``strict=True``; ReLU6; ``width_mult``
with torchvision's rounding to multiples of 8.

Small inputs: for ``image_size < 64`` V1's stem conv has stride 1 (32 px ends at 2×2
instead of 1×1), and V2 uses the usual CIFAR variant: stride 1 in the stem and in the
first stride-2 stage (the 24-channel one), so 32 px ends at 4×4.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vhist import nn as vnn
from vhist.models._common import ConvNormAct, check_image_size, init_conv_bn
from vhist.models._registry import register_model
from vhist.models.initialization import gaussian_, generic_init


def mobilenet_init(model: nn.Module, scheme: str) -> None:
    """``init_weights`` of both MobileNets. ``paper``: the papers state no initialization;
    their released TF-slim code (tensorflow/models ``research/slim/nets/mobilenet_v1.py``
    ``mobilenet_v1_arg_scope`` and ``nets/mobilenet/mobilenet.py`` ``training_scope``)
    draws every conv, the 1x1 logits conv included, from a normal truncated at 2 std with
    std 0.09; BN (1, 0). ``modern`` / ``torch``: :mod:`vhist.models.initialization` (the
    default is torchvision's = ``modern``)."""
    if scheme == "paper":
        gaussian_(model, 0.09, truncated=True)
    else:
        generic_init(model, scheme)

SMALL_BELOW = 64
IMAGE_SIZE = 224


class DepthwiseSeparable(nn.Module):
    """3×3 depthwise conv + BN + ReLU, then 1×1 pointwise conv + BN + ReLU (Fig. 3)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.dw = vnn.ConvBNAct(in_channels, in_channels, 3, stride, 1, groups=in_channels)
        self.pw = vnn.ConvBNAct(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


# (output channels, stride) of the 13 depthwise-separable blocks of V1's Table 1.
V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNetV1.

    Args:
        num_classes: classifier outputs.
        image_size: input resolution (the resolution multiplier; 224 by default).
        alpha: width multiplier (1.0, 0.75, 0.5, 0.25 in the paper).
        dropout: dropout before the classifier (the paper uses none; 0 by default).
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        check_image_size("mobilenet_v1", image_size, 8)
        if alpha <= 0:
            raise ValueError(f"mobilenet_v1: alpha must be > 0, got {alpha}")
        self.small_input = image_size < SMALL_BELOW
        width = int(32 * alpha)
        layers: list[nn.Module] = [vnn.ConvBNAct(3, width, 3, 1 if self.small_input else 2, 1)]
        for c, s in V1_BLOCKS:
            layers.append(DepthwiseSeparable(width, int(c * alpha), s))
            width = int(c * alpha)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    init_weights = mobilenet_init

    pretrained_keys = dict(first_conv="features.0.conv", classifier="classifier")

    def feature_modules(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Rounds to the nearest multiple of ``divisor``, never more than 10% down (the
    rounding of the TF MobileNet code that torchvision reproduces)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """1×1 expansion (ReLU6), 3×3 depthwise (ReLU6), 1×1 linear projection; the shortcut
    (stride 1, same width) is added inside the projection's fused op (Fig. 3b / Table 1)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden, 1, activation="relu6"))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, activation="relu6"),
                   vnn.Conv2d(hidden, oup, 1, bias=False), vnn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in list(self.conv)[:-2]:
            h = layer(h)
        return vnn.conv_bn_act(self.conv[-2], self.conv[-1], h, None,
                               residual=x if self.use_res_connect else None)


# t (expansion), c (channels), n (repeats), s (first stride) of V2's Table 2.
V2_SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's layout.

    Args:
        num_classes: classifier outputs.
        image_size: input resolution (224 by default); ``< 64`` selects the CIFAR strides.
        width_mult: width multiplier (section 6.1), rounded to multiples of 8.
        dropout: dropout before the classifier (0.2 as torchvision).
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224, width_mult: float = 1.0,
                 dropout: float = 0.2):
        super().__init__()
        check_image_size("mobilenet_v2", image_size, 8)
        self.small_input = image_size < SMALL_BELOW
        input_channel = _make_divisible(32 * width_mult)
        last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormAct(3, input_channel, 3, 1 if self.small_input else 2,
                                                 activation="relu6")]
        for i, (t, c, n, s) in enumerate(V2_SETTINGS):
            if self.small_input and i == 1:
                s = 1
            output_channel = _make_divisible(c * width_mult)
            for j in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if j == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvNormAct(input_channel, last_channel, 1, activation="relu6"))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))
        init_conv_bn(self)
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    init_weights = mobilenet_init

    pretrained_keys = dict(first_conv="features.0.0", classifier="classifier.1")

    def feature_modules(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = self.classifier[0](torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return x if pre_logits else self.classifier[1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def mobilenet_v1(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> MobileNetV1:
    """MobileNetV1 (Howard et al., "MobileNets: Efficient CNNs for Mobile Vision Applications", 2017)."""
    return MobileNetV1(num_classes, image_size or IMAGE_SIZE, **kwargs)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def mobilenet_v2(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> MobileNetV2:
    """MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018)."""
    return MobileNetV2(num_classes, image_size or IMAGE_SIZE, **kwargs)
