"""BN-Inception (Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
by Reducing Internal Covariate Shift", ICML 2015): GoogLeNet with BatchNorm after every
conv, each 5×5 replaced by two 3×3 convs, 28×28 modules grown to 10 in all (3a-5b), and
stride-2 reduction modules (3c, 4e) with max-pool pass-through, as in the paper's
appendix table (Figure 5).

Conv biases: the reference parameter count (11,295,240, that of the widely used Caffe
port in Cadene's ``pretrainedmodels``) includes a bias in every conv, although the paper
(section 3.2) notes that a bias before BN is cancelled by the mean subtraction. So by
default (``conv_bias=True``) each layer is a biased vhist conv, the vhist BatchNorm2d and a
ReLU; with ``conv_bias=False`` (11,285,224 params) each layer is one fused
conv + BN + ReLU op. Layout: ``conv1``, ``conv2_reduce``, ``conv2``, ``inception_<id>``
with ``b1x1``, ``b3x3_reduce``/``b3x3``, ``b3x3dbl_reduce``/``b3x3dbl_1``/``b3x3dbl_2``
and ``pool_proj`` branches (each with ``conv`` and ``bn``), ``fc``; no torchvision/timm
model exists.

Small inputs: for ``image_size < 64`` the stem is the CIFAR-style one: ``conv1`` is 3×3,
stride 1, padding 1 (instead of 7×7/2) and the first max-pool is dropped, so 32 px reaches
the 28×28 modules (3a-3c) at 16×16, 4a-4e at 8×8 and 5a-5b at 4×4. Only ``conv1``'s weight
shape changes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vhist import nn as vnn
from vhist.models._common import check_image_size, init_conv_bn, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import inception_init

SMALL_BELOW = 64
IMAGE_SIZE = 224

# Figure 5 of the paper: (#1×1, #3×3 reduce, #3×3, double #3×3 reduce, double #3×3,
# pool, pool proj, stride). #1×1 = 0 and proj = 0 mark the stride-2 modules, whose pool
# branch is a pass-through max-pool.
MODULES = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


class ConvBN(nn.Module):
    """Conv → BatchNorm → ReLU with :class:`vhist.nn.ConvBNAct`'s keys (``conv``, ``bn``).
    Fused into one op when the conv has no bias; a biased conv runs as conv, BN, ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.conv = vnn.Conv2d(cin, cout, kernel_size, stride, padding, bias=bias)
        self.bn = vnn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.bias is None:
            return vnn.conv_bn_act(self.conv, self.bn, x, "relu")
        return torch.relu(self.bn(self.conv(x)))


class InceptionModule(nn.Module):
    """One BN-Inception module: 1×1; 1×1→3×3; 1×1→3×3→3×3; pool(→1×1), concatenated."""

    def __init__(self, cin: int, n1x1: int, n3r: int, n3: int, nd_r: int, nd: int, pool: str, proj: int,
                 stride: int, bias: bool = True):
        super().__init__()
        self.b1x1 = ConvBN(cin, n1x1, 1, bias=bias) if n1x1 else None
        self.b3x3_reduce = ConvBN(cin, n3r, 1, bias=bias)
        self.b3x3 = ConvBN(n3r, n3, 3, stride, 1, bias=bias)
        self.b3x3dbl_reduce = ConvBN(cin, nd_r, 1, bias=bias)
        self.b3x3dbl_1 = ConvBN(nd_r, nd, 3, 1, 1, bias=bias)
        self.b3x3dbl_2 = ConvBN(nd, nd, 3, stride, 1, bias=bias)
        # Padding 1 makes the pool's output size equal the padded stride-2 convs' for
        # every input size (Caffe's ceil-mode pooling agrees only for even sizes).
        self.pool = (nn.AvgPool2d(3, stride, 1, count_include_pad=True) if pool == "avg"
                     else nn.MaxPool2d(3, stride, 1))
        self.pool_proj = ConvBN(cin, proj, 1, bias=bias) if proj else None
        self.out_channels = n1x1 + n3 + nd + (proj or cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.b1x1(x)] if self.b1x1 is not None else []
        outs.append(self.b3x3(self.b3x3_reduce(x)))
        outs.append(self.b3x3dbl_2(self.b3x3dbl_1(self.b3x3dbl_reduce(x))))
        p = self.pool(x)
        outs.append(self.pool_proj(p) if self.pool_proj is not None else p)
        return torch.cat(outs, 1)


class BNInception(nn.Module):
    """BN-Inception.

    Args:
        num_classes: classifier outputs.
        image_size: input resolution (224 by default); ``< 64`` selects the small stem.
        dropout: dropout before the classifier (the paper removes GoogLeNet's dropout;
            0 by default).
        conv_bias: give every conv a bias (the reference count; see the module docstring).
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.0,
                 conv_bias: bool = True, channel_divisor: int = 1):
        super().__init__()
        check_image_size("bn_inception", image_size, 16)
        c = lambda v: scaled(v, channel_divisor)  # noqa: E731
        self.small_input = image_size < SMALL_BELOW
        if self.small_input:
            self.conv1 = ConvBN(3, c(64), 3, 1, 1, bias=conv_bias)
            self.pool1 = nn.Identity()
        else:
            self.conv1 = ConvBN(3, c(64), 7, 2, 3, bias=conv_bias)
            self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2_reduce = ConvBN(c(64), c(64), 1, bias=conv_bias)
        self.conv2 = ConvBN(c(64), c(192), 3, 1, 1, bias=conv_bias)
        self.pool2 = nn.MaxPool2d(3, 2, 1)
        cin = c(192)
        modules = {}
        for name, (n1, n3r, n3, ndr, nd, pool, proj, stride) in MODULES.items():
            m = InceptionModule(cin, c(n1) if n1 else 0, c(n3r), c(n3), c(ndr), c(nd), pool,
                                c(proj) if proj else 0, stride, conv_bias)
            modules[f"inception_{name}"] = m
            cin = m.out_channels
        for name, m in modules.items():
            self.add_module(name, m)
        self.blocks = list(modules)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)

    init_weights = inception_init  # paper: the TF-slim reference code (no paper states one)

    pretrained_keys = dict(first_conv="conv1.conv", classifier="fc")

    def feature_modules(self) -> list[str]:
        return ["conv1", "pool1", "conv2_reduce", "conv2", "pool2", *self.blocks]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(self.conv2_reduce(x)))
        for name in self.blocks:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def bn_inception(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> BNInception:
    """BN-Inception (Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training", ICML 2015)."""
    return BNInception(num_classes, image_size or IMAGE_SIZE, **kwargs)
