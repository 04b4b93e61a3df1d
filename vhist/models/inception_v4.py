"""Inception-v4 (Szegedy et al., "Inception-v4, Inception-ResNet and the Impact of
Residual Connections on Learning", AAAI 2017): the stem of Fig. 3, 4× Inception-A,
Reduction-A with (k, l, m, n) = (192, 224, 256, 384), 7× Inception-B, Reduction-B,
3× Inception-C, average pool, dropout, FC (Fig. 9).

Module names follow timm's ``timm.models.inception_v4`` (``features.<i>`` with
``Mixed3a/4a/5a``, ``InceptionA..C``, ``ReductionA/B`` blocks of ``branch<j>``
sub-modules, ``last_linear``), so its state_dicts load with ``strict=True``. Each
``ConvNormAct`` is a :class:`vhist.nn.ConvBNAct` (``conv``, ``bn`` eps=1e-3, ReLU) and
runs as one fused op.

Small inputs: for ``image_size < 75`` the stem is reduced as in every Inception model of
this zoo: the first conv has stride 1 and padding 1, and the valid (unpadded) stride-1
3×3 convs of the stem (``features.1`` and the last conv of each ``Mixed4a`` branch) get
padding 1; the stride-2 convs, pools and reductions are unchanged. At 32 px the 35/17/8
grids become 7/3/1. Parameter counts do not change.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vhist import nn as vnn
from vhist.models._common import check_image_size, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import inception_init

SMALL_BELOW = 75
IMAGE_SIZE = 299


def conv_block(cin: int, cout: int, kernel_size, stride=1, padding=0) -> vnn.ConvBNAct:
    """timm's ConvNormAct (``conv`` without bias, ``bn`` eps=1e-3, ReLU), fused."""
    return vnn.ConvBNAct(cin, cout, kernel_size, stride, padding, eps=1e-3)


def _avgpool_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv_block(cin, cout, 1))


class _Concat(nn.Module):
    """A block whose output is the channel concatenation of its sub-modules' outputs on the
    same input, in the order the sub-modules were assigned (``branch0``, ``branch1``, ...)."""

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.children()], 1)


class Mixed3a(_Concat):
    def __init__(self, d: int = 1):
        super().__init__()
        self.maxpool = nn.MaxPool2d(3, 2)
        self.conv = conv_block(scaled(64, d), scaled(96, d), 3, 2)


class Mixed4a(_Concat):
    def __init__(self, d: int = 1, pad: int = 0):
        super().__init__()
        c64, c96 = scaled(64, d), scaled(96, d)
        self.branch0 = nn.Sequential(conv_block(scaled(160, d), c64, 1), conv_block(c64, c96, 3, padding=pad))
        self.branch1 = nn.Sequential(
            conv_block(scaled(160, d), c64, 1), conv_block(c64, c64, (1, 7), padding=(0, 3)),
            conv_block(c64, c64, (7, 1), padding=(3, 0)), conv_block(c64, c96, 3, padding=pad))


class Mixed5a(_Concat):
    def __init__(self, d: int = 1):
        super().__init__()
        self.conv = conv_block(scaled(192, d), scaled(192, d), 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2)


class InceptionA(_Concat):
    """35×35 module (Fig. 4)."""

    def __init__(self, d: int = 1):
        super().__init__()
        c384, c64, c96 = scaled(384, d), scaled(64, d), scaled(96, d)
        self.branch0 = conv_block(c384, c96, 1)
        self.branch1 = nn.Sequential(conv_block(c384, c64, 1), conv_block(c64, c96, 3, padding=1))
        self.branch2 = nn.Sequential(conv_block(c384, c64, 1), conv_block(c64, c96, 3, padding=1),
                                     conv_block(c96, c96, 3, padding=1))
        self.branch3 = _avgpool_conv(c384, c96)


class ReductionA(_Concat):
    """35→17 reduction (Fig. 7) with (k, l, m, n) = (192, 224, 256, 384)."""

    def __init__(self, d: int = 1):
        super().__init__()
        c384 = scaled(384, d)
        self.branch0 = conv_block(c384, c384, 3, 2)
        self.branch1 = nn.Sequential(conv_block(c384, scaled(192, d), 1),
                                     conv_block(scaled(192, d), scaled(224, d), 3, padding=1),
                                     conv_block(scaled(224, d), scaled(256, d), 3, 2))
        self.branch2 = nn.MaxPool2d(3, 2)


class InceptionB(_Concat):
    """17×17 module (Fig. 5)."""

    def __init__(self, d: int = 1):
        super().__init__()
        cin, c192, c224, c256 = scaled(1024, d), scaled(192, d), scaled(224, d), scaled(256, d)
        self.branch0 = conv_block(cin, scaled(384, d), 1)
        self.branch1 = nn.Sequential(conv_block(cin, c192, 1), conv_block(c192, c224, (1, 7), padding=(0, 3)),
                                     conv_block(c224, c256, (7, 1), padding=(3, 0)))
        self.branch2 = nn.Sequential(conv_block(cin, c192, 1), conv_block(c192, c192, (7, 1), padding=(3, 0)),
                                     conv_block(c192, c224, (1, 7), padding=(0, 3)),
                                     conv_block(c224, c224, (7, 1), padding=(3, 0)),
                                     conv_block(c224, c256, (1, 7), padding=(0, 3)))
        self.branch3 = _avgpool_conv(cin, scaled(128, d))


class ReductionB(_Concat):
    """17→8 reduction (Fig. 8)."""

    def __init__(self, d: int = 1):
        super().__init__()
        cin, c192, c256, c320 = scaled(1024, d), scaled(192, d), scaled(256, d), scaled(320, d)
        self.branch0 = nn.Sequential(conv_block(cin, c192, 1), conv_block(c192, c192, 3, 2))
        self.branch1 = nn.Sequential(conv_block(cin, c256, 1), conv_block(c256, c256, (1, 7), padding=(0, 3)),
                                     conv_block(c256, c320, (7, 1), padding=(3, 0)), conv_block(c320, c320, 3, 2))
        self.branch2 = nn.MaxPool2d(3, 2)


class InceptionC(nn.Module):
    """8×8 module (Fig. 6)."""

    def __init__(self, d: int = 1):
        super().__init__()
        cin, c256, c384 = scaled(1536, d), scaled(256, d), scaled(384, d)
        c448, c512 = scaled(448, d), scaled(512, d)
        self.branch0 = conv_block(cin, c256, 1)
        self.branch1_0 = conv_block(cin, c384, 1)
        self.branch1_1a = conv_block(c384, c256, (1, 3), padding=(0, 1))
        self.branch1_1b = conv_block(c384, c256, (3, 1), padding=(1, 0))
        self.branch2_0 = conv_block(cin, c384, 1)
        self.branch2_1 = conv_block(c384, c448, (3, 1), padding=(1, 0))
        self.branch2_2 = conv_block(c448, c512, (1, 3), padding=(0, 1))
        self.branch2_3a = conv_block(c512, c256, (1, 3), padding=(0, 1))
        self.branch2_3b = conv_block(c512, c256, (3, 1), padding=(1, 0))
        self.branch3 = _avgpool_conv(cin, c256)

    def forward(self, x):
        x1 = self.branch1_0(x)
        x2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        return torch.cat([self.branch0(x), self.branch1_1a(x1), self.branch1_1b(x1),
                          self.branch2_3a(x2), self.branch2_3b(x2), self.branch3(x)], 1)


class InceptionV4(nn.Module):
    """Inception-v4 with timm's layout.

    Args:
        num_classes: classifier outputs.
        image_size: input resolution (299 by default); ``< 75`` selects the small stem.
        dropout: dropout before the classifier (the paper keeps 0.8, i.e. drops 0.2).
        num_blocks: Inception-A/B/C repeats, (4, 7, 3) in the paper; fewer only to make
            tests fast (the layout of the remaining blocks is unchanged).
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 299, dropout: float = 0.2,
                 num_blocks: Sequence[int] = (4, 7, 3), channel_divisor: int = 1):
        super().__init__()
        check_image_size("inception_v4", image_size, 32)
        d = channel_divisor
        self.small_input = image_size < SMALL_BELOW
        pad = 1 if self.small_input else 0
        na, nb, nc = num_blocks
        self.features = nn.Sequential(
            conv_block(3, scaled(32, d), 3, 1 if self.small_input else 2, padding=pad),
            conv_block(scaled(32, d), scaled(32, d), 3, padding=pad),
            conv_block(scaled(32, d), scaled(64, d), 3, padding=1),
            Mixed3a(d), Mixed4a(d, pad), Mixed5a(d),
            *[InceptionA(d) for _ in range(na)], ReductionA(d),
            *[InceptionB(d) for _ in range(nb)], ReductionB(d),
            *[InceptionC(d) for _ in range(nc)])
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(dropout)
        self.last_linear = nn.Linear(scaled(1536, d), num_classes)

    init_weights = inception_init  # paper: the TF-slim reference code (no paper states one)

    pretrained_keys = dict(first_conv="features.0.conv", classifier="last_linear")

    def feature_modules(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = self.head_drop(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def inception_v4(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> InceptionV4:
    """Inception-v4 (Szegedy et al., "Inception-v4, Inception-ResNet and the Impact of Residual Connections", AAAI 2017)."""
    return InceptionV4(num_classes, image_size or IMAGE_SIZE, **kwargs)
