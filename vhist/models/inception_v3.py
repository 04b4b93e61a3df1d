"""Inception-v3 (Szegedy et al., "Rethinking the Inception Architecture for Computer
Vision", CVPR 2016): 299 px, factorized 7×7 into 1×7/7×1, grid reductions with parallel
stride-2 branches, and the auxiliary classifier on the 17×17 grid.

Module names follow torchvision's ``torchvision.models.inception`` (``Conv2d_1a_3x3``,
``Mixed_5b.branch1x1``, ``AuxLogits.conv0`` ... ``fc``), so its state_dicts load with
``strict=True``; every ``BasicConv2d`` (``conv``, ``bn`` with eps=1e-3, ReLU) is one fused
conv + BN + ReLU op. ``transform_input`` (torchvision's re-normalisation for Google's
ported weights) is not reproduced: outputs match torchvision's model built with
``transform_input=False``.

Auxiliary classifier: ``aux_logits`` defaults to False here (torchvision's default is
True), so that every zoo model returns a (B, num_classes) tensor; with
``aux_logits=True`` the model holds ``AuxLogits`` (27,161,264 params instead of
23,834,568; load torchvision's default checkpoints this way) and, in training mode,
returns ``InceptionOutputs(logits, aux_logits)`` as torchvision does; in eval mode it
returns the logits.

Small inputs: for ``image_size < 75`` (torchvision's minimum) the stem is reduced the way
this zoo reduces every Inception stem: ``Conv2d_1a_3x3`` has stride 1 and padding 1, and
the valid 3×3 convs ``Conv2d_2a_3x3`` and ``Conv2d_4a_3x3`` get padding 1; both max-pools
and all grid reductions stay. At 32 px the 35/17/8 grids become 7/3/1. The auxiliary head
pools its input to 5×5 adaptively when the grid is smaller than 17×17 (its 5×5 conv
needs at least 5×5). Parameter counts do not change.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vhist import nn as vnn
from vhist.models._common import check_image_size, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import inception_init

InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])
SMALL_BELOW = 75
IMAGE_SIZE = 299


def BasicConv2d(cin: int, cout: int, kernel_size, stride=1, padding=0) -> vnn.ConvBNAct:
    """torchvision's BasicConv2d (``conv`` without bias, ``bn`` eps=1e-3, ReLU), fused."""
    return vnn.ConvBNAct(cin, cout, kernel_size, stride, padding, eps=1e-3)


class InceptionA(nn.Module):
    """35×35 module (Fig. 5): 1×1, 1×1→5×5, 1×1→3×3→3×3, avg-pool→1×1."""

    def __init__(self, cin: int, pool_features: int, d: int = 1):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, scaled(64, d), 1)
        self.branch5x5_1 = BasicConv2d(cin, scaled(48, d), 1)
        self.branch5x5_2 = BasicConv2d(scaled(48, d), scaled(64, d), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, scaled(64, d), 1)
        self.branch3x3dbl_2 = BasicConv2d(scaled(64, d), scaled(96, d), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(scaled(96, d), scaled(96, d), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35→17 grid reduction (Fig. 10): stride-2 3×3, 1×1→3×3→3×3/2, max-pool."""

    def __init__(self, cin: int, d: int = 1):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, scaled(384, d), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, scaled(64, d), 1)
        self.branch3x3dbl_2 = BasicConv2d(scaled(64, d), scaled(96, d), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(scaled(96, d), scaled(96, d), 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    """17×17 module (Fig. 6): the n×n convs factorized into 1×7 and 7×1 (n = 7)."""

    def __init__(self, cin: int, channels_7x7: int, d: int = 1):
        super().__init__()
        c7, c192 = channels_7x7, scaled(192, d)
        self.branch1x1 = BasicConv2d(cin, c192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17→8 grid reduction: 1×1→3×3/2, 1×1→1×7→7×1→3×3/2, max-pool."""

    def __init__(self, cin: int, d: int = 1):
        super().__init__()
        c192 = scaled(192, d)
        self.branch3x3_1 = BasicConv2d(cin, c192, 1)
        self.branch3x3_2 = BasicConv2d(c192, scaled(320, d), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c192, 1)
        self.branch7x7x3_2 = BasicConv2d(c192, c192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c192, c192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c192, c192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """8×8 module (Fig. 7): expanded filter bank with parallel 1×3 and 3×1 outputs."""

    def __init__(self, cin: int, d: int = 1):
        super().__init__()
        c384 = scaled(384, d)
        self.branch1x1 = BasicConv2d(cin, scaled(320, d), 1)
        self.branch3x3_1 = BasicConv2d(cin, c384, 1)
        self.branch3x3_2a = BasicConv2d(c384, c384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c384, c384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, scaled(448, d), 1)
        self.branch3x3dbl_2 = BasicConv2d(scaled(448, d), c384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, scaled(192, d), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17×17 grid (section 4): 5×5/3 avg-pool, 1×1 conv 128,
    5×5 conv 768, FC."""

    def __init__(self, cin: int, num_classes: int, d: int = 1):
        super().__init__()
        self.conv0 = BasicConv2d(cin, scaled(128, d), 1)
        self.conv1 = BasicConv2d(scaled(128, d), scaled(768, d), 5)
        self.fc = nn.Linear(scaled(768, d), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 5×5/3 pooling leaves >= 5×5 only from a 17×17 grid; smaller grids (small
        # inputs) are pooled to 5×5 directly.
        x = F.avg_pool2d(x, 5, 3) if x.shape[-1] >= 17 and x.shape[-2] >= 17 else F.adaptive_avg_pool2d(x, 5)
        x = self.conv1(self.conv0(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Inception3(nn.Module):
    """Inception-v3 with torchvision's layout.

    Args:
        num_classes: classifier outputs.
        image_size: input resolution (299 by default); ``< 75`` selects the small stem.
        aux_logits: build the auxiliary classifier (see the module docstring).
        dropout: dropout before the classifier (0.5 as torchvision).
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 299, aux_logits: bool = False,
                 dropout: float = 0.5, channel_divisor: int = 1):
        super().__init__()
        check_image_size("inception_v3", image_size, 32)
        d = channel_divisor
        self.small_input = image_size < SMALL_BELOW
        self.aux_logits = aux_logits
        pad = 1 if self.small_input else 0
        self.Conv2d_1a_3x3 = BasicConv2d(3, scaled(32, d), 3, stride=1 if self.small_input else 2, padding=pad)
        self.Conv2d_2a_3x3 = BasicConv2d(scaled(32, d), scaled(32, d), 3, padding=pad)
        self.Conv2d_2b_3x3 = BasicConv2d(scaled(32, d), scaled(64, d), 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = BasicConv2d(scaled(64, d), scaled(80, d), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(scaled(80, d), scaled(192, d), 3, padding=pad)
        self.maxpool2 = nn.MaxPool2d(3, 2)
        self.Mixed_5b = InceptionA(scaled(192, d), scaled(32, d), d)
        self.Mixed_5c = InceptionA(scaled(256, d), scaled(64, d), d)
        self.Mixed_5d = InceptionA(scaled(288, d), scaled(64, d), d)
        self.Mixed_6a = InceptionB(scaled(288, d), d)
        self.Mixed_6b = InceptionC(scaled(768, d), scaled(128, d), d)
        self.Mixed_6c = InceptionC(scaled(768, d), scaled(160, d), d)
        self.Mixed_6d = InceptionC(scaled(768, d), scaled(160, d), d)
        self.Mixed_6e = InceptionC(scaled(768, d), scaled(192, d), d)
        self.AuxLogits = InceptionAux(scaled(768, d), num_classes, d) if aux_logits else None
        self.Mixed_7a = InceptionD(scaled(768, d), d)
        self.Mixed_7b = InceptionE(scaled(1280, d), d)
        self.Mixed_7c = InceptionE(scaled(2048, d), d)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(scaled(2048, d), num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # torchvision's default: truncated normal, std 0.1, cut at ±2 std.
                nn.init.trunc_normal_(m.weight, 0.0, 0.1, -0.2, 0.2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    init_weights = inception_init  # paper: the TF-slim reference code (no paper states one)

    # The auxiliary head's classifier is re-initialized with the main one.
    pretrained_keys = dict(first_conv="Conv2d_1a_3x3.conv", classifier=("fc", "AuxLogits.fc"))

    def feature_modules(self) -> list[str]:
        return ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]

    def filter_state_dict(self, state_dict: dict) -> dict:
        """Without the auxiliary head, a checkpoint's ``AuxLogits.*`` (torchvision's
        weights have them) are dropped, as timm does for this model."""
        if self.AuxLogits is not None:
            return state_dict
        return {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}

    def _to_mixed_6e(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        x = self.maxpool2(x)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        return self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_7c's map (the auxiliary head, which taps Mixed_6e, does not run)."""
        return self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self._to_mixed_6e(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor):
        x = self._to_mixed_6e(x)
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        x = self.forward_head(self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x))))
        return InceptionOutputs(x, aux) if aux is not None else x


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def inception_v3(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> Inception3:
    """Inception-v3 (Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016)."""
    return Inception3(num_classes, image_size or IMAGE_SIZE, **kwargs)
