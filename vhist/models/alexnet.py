"""AlexNet as in the paper (Krizhevsky, Sutskever & Hinton, "ImageNet Classification
with Deep Convolutional Neural Networks", NeurIPS 2012), not torchvision's variant.

Paper version (``alexnet``): 227 px input (the paper's "224" does not give its 55×55
first map), two towers, i.e. conv2, conv4 and conv5 see only the 48/192/192 channels of
their own GPU (``groups=2``) while conv3 and the FC layers connect across towers; ReLU;
LocalResponseNorm (k=2, n=5, alpha=1e-4, beta=0.75, section 3.3: with torch's alpha/n
convention that is ``LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)``) after the ReLUs
of conv1 and conv2; overlapping max-pools 3/2 (section 3.4); dropout 0.5 before fc6 and
fc7 (section 4.2); 96-256-384-384-256 convs, 4096-4096 FC. Initialization as section 5:
weights N(0, 0.01), biases 1 in conv2, conv4, conv5 and the hidden FC layers, 0 elsewhere.
``alexnet_single_tower`` is the same net with ``groups=1`` everywhere (62,378,344 params).

Layout: ``features.<i>`` / ``classifier.<i>`` in torchvision's order (no torchvision
counterpart with these shapes exists). Each conv + ReLU runs as one conv op with a ReLU
epilogue; LRN runs on the vhist LRN op.

Small inputs: for ``image_size < 128`` conv1 becomes 5×5, stride 1, padding 2 (the
reduced first layer of the cuda-convnet CIFAR-10 nets) instead of 11×11 stride 4; the rest
is unchanged and fc6 takes the 256·s·s features of the final s×s map (s = 3 at 32 px;
s = 6 at 227 px).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from vhist import nn as vnn
from vhist.models._common import SequentialClassifierNet, check_image_size, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import generic_init

SMALL_BELOW = 128
IMAGE_SIZE = 227


def _pool(size: int) -> int:
    return (size - 3) // 2 + 1


class AlexNet(SequentialClassifierNet):
    """AlexNet.

    Args:
        num_classes: classifier outputs.
        image_size: input resolution (227 by default); ``< 128`` selects the small stem.
        towers: 2 for the paper's two-GPU connectivity, 1 for a single tower.
        dropout: dropout probability before fc6 and fc7.
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 227, towers: int = 2, dropout: float = 0.5,
                 channel_divisor: int = 1):
        super().__init__()
        check_image_size("alexnet", image_size, 16)
        if towers not in (1, 2):
            raise ValueError(f"alexnet: towers must be 1 or 2, got {towers}")
        c1, c2, c3, c4, c5, fc = (scaled(c, channel_divisor) for c in (96, 256, 384, 384, 256, 4096))
        self.small_input = image_size < SMALL_BELOW
        if self.small_input:
            conv1 = vnn.Conv2d(3, c1, 5, 1, 2)
            size = image_size
        else:
            conv1 = vnn.Conv2d(3, c1, 11, 4)
            size = (image_size - 11) // 4 + 1
        size = _pool(_pool(_pool(size)))  # conv2..conv5 keep the size ("same" padding)
        lrn = dict(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)
        self.features = nn.Sequential(
            conv1, nn.ReLU(inplace=True), vnn.LocalResponseNorm(**lrn), nn.MaxPool2d(3, 2),
            vnn.Conv2d(c1, c2, 5, padding=2, groups=towers), nn.ReLU(inplace=True), vnn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(3, 2),
            vnn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            vnn.Conv2d(c3, c4, 3, padding=1, groups=towers), nn.ReLU(inplace=True),
            vnn.Conv2d(c4, c5, 3, padding=1, groups=towers), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c5 * size * size, fc), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes))
        self._init_paper()

    def init_weights(self, scheme: str) -> None:
        """``paper``: section 5 (weights N(0, 0.01), biases 1 in conv2, conv4, conv5 and the
        hidden FC layers). ``modern``: Kaiming-normal convs (fan_out, ReLU, as
        torchvision's CNNs), Kaiming-normal (fan_in, ReLU) hidden FC layers, whose
        N(0, 0.01) in the generic scheme would shrink the signal about 14x over fc6 and
        fc7 (0.01 * sqrt(fan_in / 2) per layer), the output layer N(0, 0.01), zero biases.
        ``torch``: PyTorch's layer defaults. With the paper's scheme the net sits at
        chance for many epochs under Adam-type recipes (bench/NOTES.md, issue 26); the
        default is the paper's."""
        if scheme == "paper":
            self._init_paper()
            return
        generic_init(self, scheme)
        if scheme == "modern":
            for m in [m for m in self.classifier if isinstance(m, nn.Linear)][:-1]:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def _init_paper(self) -> None:
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        ones = {convs[1], convs[3], convs[4], linears[0], linears[1]}
        for m in convs + linears:
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.constant_(m.bias, 1.0 if m in ones else 0.0)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def alexnet(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> AlexNet:
    """AlexNet, two towers (Krizhevsky et al., "ImageNet Classification with Deep CNNs", NeurIPS 2012)."""
    return AlexNet(num_classes, image_size or IMAGE_SIZE, towers=2, **kwargs)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def alexnet_single_tower(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> AlexNet:
    """AlexNet in one tower (Krizhevsky et al., "ImageNet Classification with Deep CNNs", NeurIPS 2012)."""
    return AlexNet(num_classes, image_size or IMAGE_SIZE, towers=1, **kwargs)
