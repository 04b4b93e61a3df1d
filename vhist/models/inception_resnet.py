"""Inception-ResNet-v1 and -v2 (Szegedy et al., "Inception-v4, Inception-ResNet and the
Impact of Residual Connections on Learning", AAAI 2017).

Residual Inception blocks: parallel conv branches are concatenated, projected back to the
block's input width by a linear 1×1 conv (with bias, no BN: the paper puts no BN on top
of summations), scaled by a factor in 0.1–0.3 (section 3.3, "Scaling of the Residuals"),
added to the identity shortcut and passed through ReLU. The shortcuts are identities, as
in the paper, never 1×1 projections. Every other conv is conv + BN + ReLU in one fused op.

v2 (Figs. 3, 16, 7, 17, 18, 19): module names follow timm's
``timm.models.inception_resnet_v2`` (``conv2d_1a`` ... ``mixed_5b``, ``repeat`` /
``repeat_1`` / ``repeat_2`` of ``Block35`` / ``Block17`` / ``Block8``, the final
``block8`` without ReLU, ``conv2d_7b``, ``classif``), so its state_dicts load with
``strict=True``. The default scales are timm's / TF-slim's (0.17, 0.10, 0.20) for the
35/17/8 grids; the final ``block8`` has scale 1 and no ReLU, as there.

v1 (Figs. 14, 10, 7, 11, 12, 13, 15): the same naming scheme; stem ending in a 3×3/2 conv
to 256 channels (``conv2d_4b``); 5× Block35 (32-wide branches, 256 channels), Reduction-A
with (k, l, m, n) = (192, 192, 256, 384), 10× Block17 (128-wide, 896 channels),
Reduction-B, 5× Block8 (192-wide, 1792 channels), average pool, dropout, FC. There is
no canonical reference implementation. Figure 15 lists 5× Inception-ResNet-C; like the
widely used FaceNet implementation of v1 (D. Sandberg's ``inception_resnet_v1``) and
TF-slim's v2 (whose layout timm keeps), we end with one more Block8 with scale 1 and no
ReLU (``block8``) before pooling. Parameter count (1000 classes): 24,357,096 with it (the
issue's "about 24.4M"), 22,756,328 with ``final_block=False`` (the figures alone);
tests/test_models.py re-derives both numbers from the widths in Figs. 10-14 by hand.

Small inputs: for ``image_size < 75`` the stem is reduced as in every Inception model of
this zoo: the first conv has stride 1 and padding 1, and the valid stride-1 3×3 stem
convs (``conv2d_2a``, ``conv2d_4a``) get padding 1; pools, stride-2 convs and reductions
are unchanged. At 32 px the 35/17/8 grids become 7/3/1. Parameter counts do not change.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from vhist import nn as vnn
from vhist.models._common import DropPath, check_image_size, drop_path_rates, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import inception_init

SMALL_BELOW = 75
IMAGE_SIZE = 299
Scales = Union[float, Sequence[float]]


def conv_block(cin: int, cout: int, kernel_size, stride=1, padding=0) -> vnn.ConvBNAct:
    """timm's BasicConv2d (``conv`` without bias, ``bn`` eps=1e-3, ReLU), fused."""
    return vnn.ConvBNAct(cin, cout, kernel_size, stride, padding, eps=1e-3)


class _Residual(nn.Module):
    """relu(drop_path(scale · up(cat(branches))) + x): the residual join shared by all
    blocks (``drop_path``: stochastic depth, identity unless set)."""

    scale: float
    relu: bool
    drop_path: DropPath

    def _join(self, branches: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = self.drop_path(self.conv2d(torch.cat(branches, 1)) * self.scale) + x
        return torch.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return f"scale={self.scale}, relu={self.relu}"


class Block35(_Residual):
    """35×35 residual block: v2 Fig. 16 (320 wide), v1 Fig. 10 (256 wide)."""

    def __init__(self, cin: int, widths: tuple, scale: float = 1.0, relu: bool = True, drop_path: float = 0.0):
        super().__init__()
        b0, b1, (b2a, b2b, b2c) = widths
        self.scale, self.relu, self.drop_path = scale, relu, DropPath(drop_path)
        self.branch0 = conv_block(cin, b0, 1)
        self.branch1 = nn.Sequential(conv_block(cin, b1, 1), conv_block(b1, b1, 3, padding=1))
        self.branch2 = nn.Sequential(conv_block(cin, b2a, 1), conv_block(b2a, b2b, 3, padding=1),
                                     conv_block(b2b, b2c, 3, padding=1))
        self.conv2d = vnn.Conv2d(b0 + b1 + b2c, cin, 1)

    def forward(self, x):
        return self._join([self.branch0(x), self.branch1(x), self.branch2(x)], x)


class _FactorizedBlock(_Residual):
    """A residual block whose second branch is a 1×1, then a 1×K and K×1 pair."""

    K = 7

    def __init__(self, cin: int, widths: tuple, scale: float = 1.0, relu: bool = True, drop_path: float = 0.0):
        super().__init__()
        b0, (b1a, b1b, b1c) = widths
        k, p = self.K, self.K // 2
        self.scale, self.relu, self.drop_path = scale, relu, DropPath(drop_path)
        self.branch0 = conv_block(cin, b0, 1)
        self.branch1 = nn.Sequential(conv_block(cin, b1a, 1), conv_block(b1a, b1b, (1, k), padding=(0, p)),
                                     conv_block(b1b, b1c, (k, 1), padding=(p, 0)))
        self.conv2d = vnn.Conv2d(b0 + b1c, cin, 1)

    def forward(self, x):
        return self._join([self.branch0(x), self.branch1(x)], x)


class Block17(_FactorizedBlock):
    """17×17 residual block: v2 Fig. 17 (1088 wide), v1 Fig. 11 (896 wide); 1×7 and 7×1."""

    K = 7


class Block8(_FactorizedBlock):
    """8×8 residual block: v2 Fig. 19 (2080 wide), v1 Fig. 13 (1792 wide); 1×3 and 3×1."""

    K = 3


class Mixed_5b(nn.Module):
    """v2's 35×35 Inception-A (no residual) between stem and the Block35s (timm/TF-slim)."""

    def __init__(self, d: int = 1):
        super().__init__()
        c192, c48, c64, c96 = (scaled(c, d) for c in (192, 48, 64, 96))
        self.branch0 = conv_block(c192, c96, 1)
        self.branch1 = nn.Sequential(conv_block(c192, c48, 1), conv_block(c48, c64, 5, padding=2))
        self.branch2 = nn.Sequential(conv_block(c192, c64, 1), conv_block(c64, c96, 3, padding=1),
                                     conv_block(c96, c96, 3, padding=1))
        self.branch3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv_block(c192, c64, 1))

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class Mixed_6a(nn.Module):
    """Reduction-A (Fig. 7): 3×3/2 to n; 1×1 k → 3×3 l → 3×3/2 m; max-pool."""

    def __init__(self, cin: int, k: int, l: int, m: int, n: int):
        super().__init__()
        self.branch0 = conv_block(cin, n, 3, 2)
        self.branch1 = nn.Sequential(conv_block(cin, k, 1), conv_block(k, l, 3, padding=1), conv_block(l, m, 3, 2))
        self.branch2 = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class Mixed_7a(nn.Module):
    """Reduction-B (v2 Fig. 18, v1 Fig. 12): three 1×1 → (3×3) → 3×3/2 branches, max-pool."""

    def __init__(self, cin: int, c256: int, out0: int, out1: int, mid2: int, out2: int):
        super().__init__()
        self.branch0 = nn.Sequential(conv_block(cin, c256, 1), conv_block(c256, out0, 3, 2))
        self.branch1 = nn.Sequential(conv_block(cin, c256, 1), conv_block(c256, out1, 3, 2))
        self.branch2 = nn.Sequential(conv_block(cin, c256, 1), conv_block(c256, mid2, 3, padding=1),
                                     conv_block(mid2, out2, 3, 2))
        self.branch3 = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


def _scales(scale: Scales) -> tuple[float, float, float]:
    scales = (scale,) * 3 if isinstance(scale, (int, float)) else tuple(scale)
    if len(scales) != 3 or not all(isinstance(s, (int, float)) and 0 < s <= 1 for s in scales):
        raise ValueError(f"residual_scale must be a float or 3 floats in (0, 1] (the paper uses 0.1-0.3), "
                         f"got {scale!r}")
    return scales


# Per version: residual blocks per grid, the grids' widths (35, 17, 8), and the branch
# widths of each stage (v2: Figs. 16-19 and timm's layout; v1: Figs. 10-13).
_LAYOUTS = {
    2: {"blocks": (10, 20, 9), "widths": (320, 1088, 2080), "b35": (32, 32, (32, 48, 64)),
        "m6a": (256, 256, 384, 384), "b17": (192, (128, 160, 192)), "m7a": (256, 384, 288, 288, 320),
        "b8": (192, (192, 224, 256))},
    1: {"blocks": (5, 10, 5), "widths": (256, 896, 1792), "b35": (32, 32, (32, 32, 32)),
        "m6a": (192, 192, 256, 384), "b17": (128, (128, 128, 128)), "m7a": (256, 384, 256, 256, 256),
        "b8": (192, (192, 192, 192))},
}


class InceptionResNet(nn.Module):
    """Inception-ResNet-v1 or -v2.

    Args:
        version: 1 or 2.
        num_classes: classifier outputs.
        image_size: input resolution (299 by default); ``< 75`` selects the small stem.
        residual_scale: scale of the residual branches, one float or one per grid
            (35, 17, 8); default (0.17, 0.10, 0.20).
        dropout: dropout before the classifier (the paper keeps 0.8, i.e. drops 0.2).
        num_blocks: residual blocks per grid: (10, 20, 9) for v2 (plus the final
            ``block8``), (5, 10, 5) for v1; fewer only to make tests fast.
        final_block: v1 only: end with the extra linear Block8 (scale 1, no ReLU) of
            the common implementations (see the module docstring); v2 always has it.
        drop_path_rate: stochastic depth of the residual blocks, rising linearly from 0
            in the first Block35 to this in the last residual block (Huang et al. 2016).
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, version: int = 2, num_classes: int = 1000, image_size: int = 299,
                 residual_scale: Scales = (0.17, 0.10, 0.20), dropout: float = 0.2,
                 num_blocks: Optional[Sequence[int]] = None, final_block: bool = True, drop_path_rate: float = 0.0,
                 channel_divisor: int = 1):
        super().__init__()
        if version == 2 and not final_block:
            raise ValueError("inception_resnet_v2 always ends with its linear block8 (timm's layout)")
        if version not in (1, 2):
            raise ValueError(f"inception_resnet: version must be 1 or 2, got {version}")
        check_image_size(f"inception_resnet_v{version}", image_size, 32)
        s35, s17, s8 = _scales(residual_scale)
        self.version = version
        self.small_input = image_size < SMALL_BELOW
        c = lambda v: scaled(v, channel_divisor)  # noqa: E731
        pad = 1 if self.small_input else 0
        self.conv2d_1a = conv_block(3, c(32), 3, 1 if self.small_input else 2, padding=pad)
        self.conv2d_2a = conv_block(c(32), c(32), 3, padding=pad)
        self.conv2d_2b = conv_block(c(32), c(64), 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, 2)
        self.conv2d_3b = conv_block(c(64), c(80), 1)
        self.conv2d_4a = conv_block(c(80), c(192), 3, padding=pad)
        layout = _LAYOUTS[version]
        n35, n17, n8 = num_blocks or layout["blocks"]
        w35, w17, w8 = (c(w) for w in layout["widths"])
        cs = lambda t: tuple(cs(v) if isinstance(v, tuple) else c(v) for v in t)  # noqa: E731
        if version == 2:
            self.maxpool_5a = nn.MaxPool2d(3, 2)
            self.mixed_5b = Mixed_5b(channel_divisor)
        else:
            self.conv2d_4b = conv_block(c(192), c(256), 3, 2)
        rates = iter(drop_path_rates(drop_path_rate, n35 + n17 + n8 + int(final_block)))
        self.repeat = nn.Sequential(*[Block35(w35, cs(layout["b35"]), s35, drop_path=next(rates))
                                      for _ in range(n35)])
        self.mixed_6a = Mixed_6a(w35, *cs(layout["m6a"]))
        self.repeat_1 = nn.Sequential(*[Block17(w17, cs(layout["b17"]), s17, drop_path=next(rates))
                                        for _ in range(n17)])
        self.mixed_7a = Mixed_7a(w17, *cs(layout["m7a"]))
        self.repeat_2 = nn.Sequential(*[Block8(w8, cs(layout["b8"]), s8, drop_path=next(rates)) for _ in range(n8)])
        self.block8 = Block8(w8, cs(layout["b8"]), 1.0, relu=False, drop_path=next(rates)) if final_block else None
        if version == 2:
            self.conv2d_7b = conv_block(w8, c(1536), 1)
        num_features = c(1536) if version == 2 else w8
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(dropout)
        self.classif = nn.Linear(num_features, num_classes)

    init_weights = inception_init  # paper: the TF-slim reference code (no paper states one)

    pretrained_keys = dict(first_conv="conv2d_1a.conv", classifier="classif")

    def feature_modules(self) -> list[str]:
        return ["conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "maxpool_5a",
                "mixed_5b", "conv2d_4b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2", "block8",
                "conv2d_7b"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x)))
        if self.version == 2:
            x = self.mixed_5b(self.maxpool_5a(x))
        else:
            x = self.conv2d_4b(x)
        x = self.repeat_2(self.mixed_7a(self.repeat_1(self.mixed_6a(self.repeat(x)))))
        if self.block8 is not None:
            x = self.block8(x)
        if self.version == 2:
            x = self.conv2d_7b(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = self.head_drop(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.classif(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def inception_resnet_v1(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> InceptionResNet:
    """Inception-ResNet-v1 (Szegedy et al., "Inception-v4, Inception-ResNet and ...", AAAI 2017)."""
    return InceptionResNet(1, num_classes, image_size or IMAGE_SIZE, **kwargs)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def inception_resnet_v2(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> InceptionResNet:
    """Inception-ResNet-v2 (Szegedy et al., "Inception-v4, Inception-ResNet and ...", AAAI 2017)."""
    return InceptionResNet(2, num_classes, image_size or IMAGE_SIZE, **kwargs)
