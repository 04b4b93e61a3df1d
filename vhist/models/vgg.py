"""VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015): configurations A, A-LRN, B, D and E of the paper's Table 1, and
the BatchNorm variants (a later addition, as in torchvision).

Module names follow torchvision's ``torchvision.models.vgg`` (``features.<i>``,
``avgpool``, ``classifier.<i>``), so its state_dicts load with ``strict=True``. Each
biased conv directly followed by ReLU runs as one conv op with a ReLU epilogue; in the
``_bn`` variants the conv keeps its bias (as torchvision's does) and is followed by the
vhist BatchNorm2d: conv + BN statistics run as one op, and in training on the triton
backend the BN + ReLU of a conv followed by another conv run in that conv's prologue
(:func:`vhist.ops.conv_bn_deferred`), the others in one apply pass before the pooling.
``vgg11_lrn`` (A-LRN) puts a LocalResponseNorm with AlexNet's
parameters (k=2, n=5, alpha=1e-4, beta=0.75, as the paper's section 2.2 specifies) after the first
conv's ReLU; it has no torchvision counterpart.

Small inputs: five 2×2 max-pools take 32 px to 1×1. For ``image_size < 64`` the head is
the usual CIFAR-VGG one: global average pool to 1×1 (instead of torchvision's adaptive
pool to 7×7, which would copy the one pixel 49 times) and 512-wide hidden layers
(``Linear(512, 512)``, ``Linear(512, 512)``, ``Linear(512, num_classes)``) instead of
4096; the convolutional stack is unchanged. From 64 px up, the ImageNet head is used.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from vhist import nn as vnn
from vhist.models._common import SequentialClassifierNet, check_image_size, deferred_pairs, init_conv_bn, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import gaussian_, generic_init

CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
SMALL_BELOW = 64
IMAGE_SIZE = 224


def make_layers(cfg, batch_norm: bool = False, lrn: bool = False, channel_divisor: int = 1) -> nn.Sequential:
    """torchvision's ``features`` layout: [conv, (BN,) ReLU] per conv, MaxPool2d(2) per "M";
    with ``lrn``, an AlexNet LRN after the first ReLU (configuration A-LRN)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        v = scaled(v, channel_divisor)
        layers.append(vnn.Conv2d(in_channels, v, 3, padding=1))
        if batch_norm:
            layers.append(vnn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        if lrn and in_channels == 3:
            layers.append(vnn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(SequentialClassifierNet):
    """VGG with torchvision's layout.

    Args:
        features: the convolutional stack from :func:`make_layers`.
        num_classes: classifier outputs.
        image_size: input resolution (224 by default); ``< 64`` selects the CIFAR head.
        dropout: dropout probability in the two hidden FC layers (0.5 in the paper).
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, image_size: int = 224,
                 dropout: float = 0.5, channel_divisor: int = 1):
        super().__init__()
        check_image_size("vgg", image_size, 32)
        self.small_input = image_size < SMALL_BELOW
        self.features = features
        last = scaled(512, channel_divisor)
        if self.small_input:
            pool, hidden, flat = 1, scaled(512, channel_divisor), last
        else:
            pool, hidden, flat = 7, scaled(4096, channel_divisor), last * 49
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))
        init_conv_bn(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def init_weights(self, scheme: str) -> None:
        """``paper``: section 3.1, "weights from a normal distribution with the zero mean and
        10^-2 variance", biases 0, read as std 0.01 (the N(0, 0.01) of AlexNet's
        Caffe-era training that the paper builds on; a literal std of 0.1 multiplies the
        activations' scale by 0.1 * sqrt(fan_in / 2), 1.7 to 4.8, at every conv); the paper initialized
        its deeper nets from net A's layers, which this does not do; BN (1, 0) in the
        ``_bn`` variants. The default is torchvision's (= ``modern``)."""
        if scheme == "paper":
            gaussian_(self, 0.01)
        else:
            generic_init(self, scheme)

    def prologue_pairs(self) -> int:
        """The (conv, BN) pairs whose BN + ReLU run in the next conv's prologue."""
        return deferred_pairs(self.features)


def _vgg(cfg: str, batch_norm: bool, num_classes: int, image_size: Optional[int], lrn: bool = False,
         channel_divisor: int = 1, **kwargs) -> VGG:
    features = make_layers(CFGS[cfg], batch_norm, lrn, channel_divisor)
    return VGG(features, num_classes, image_size or IMAGE_SIZE, channel_divisor=channel_divisor, **kwargs)


_PAPER = '(Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015)'


def _entrypoint(name: str, cfg: str, batch_norm: bool, lrn: bool, doc: str):
    def entry(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> VGG:
        return _vgg(cfg, batch_norm, num_classes, image_size, lrn=lrn, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{doc} {_PAPER}."
    return register_model(entry, image_size=IMAGE_SIZE, small_below=SMALL_BELOW)


_BN = "with BatchNorm after every conv (Ioffe & Szegedy 2015), configuration"
# name: (configuration, batch_norm, lrn, docstring)
_VARIANTS = {
    "vgg11": ("A", False, False, "VGG-11, configuration A"),
    "vgg11_lrn": ("A", False, True, "VGG-11 with LRN, configuration A-LRN"),
    "vgg13": ("B", False, False, "VGG-13, configuration B"),
    "vgg16": ("D", False, False, "VGG-16, configuration D"),
    "vgg19": ("E", False, False, "VGG-19, configuration E"),
    "vgg11_bn": ("A", True, False, f"VGG-11 {_BN} A"),
    "vgg13_bn": ("B", True, False, f"VGG-13 {_BN} B"),
    "vgg16_bn": ("D", True, False, f"VGG-16 {_BN} D"),
    "vgg19_bn": ("E", True, False, f"VGG-19 {_BN} E"),
}
for _name, _variant in _VARIANTS.items():
    globals()[_name] = _entrypoint(_name, *_variant)
