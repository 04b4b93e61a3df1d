"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Module names follow torchvision's ``torchvision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0/.1``, ``fc``), so its state_dicts load with
``strict=True``. Like torchvision (the "ResNet v1.5" variant), the Bottleneck puts its
stride on the 3×3 conv. Each (conv, BN) pair runs as one fused conv + BN + activation op,
and the last pair of every block adds the shortcut through the fused op's residual input:
``relu(bn(conv(x)) + identity)`` in one call.

Small inputs: for ``image_size <= 64`` the stem is that of the paper's CIFAR-10 nets
(section 4.2) at ImageNet widths, as in the common CIFAR ResNet-18/50: ``conv1`` is 3×3,
stride 1, padding 1, and there is no max-pool, so a 32 px input reaches layer4 at 4×4
(the ImageNet stem would leave 1×1).
Only ``conv1``'s weight shape changes (64·3·3·3 instead of 64·3·7·7).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vhist import nn as vnn
from vhist.models._common import DropPath, check_image_size, drop_path_rates, init_conv_bn, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import generic_init, norms_

SMALL_MAX = 64  # image sizes up to this use the CIFAR stem
IMAGE_SIZE = 224


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> vnn.Conv2d:
    return vnn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


def residual_join(conv: vnn.Conv2d, bn: vnn.BatchNorm2d, x: torch.Tensor, identity: torch.Tensor,
                  drop_path: DropPath) -> torch.Tensor:
    """``relu(drop_path(bn(conv(x))) + identity)``: one fused op with the shortcut as its
    residual input, unless stochastic depth is active (training with a drop
    probability), which must scale the branch alone before the sum."""
    if drop_path.training and drop_path.drop_prob > 0:
        return torch.relu(drop_path(vnn.conv_bn_act(conv, bn, x, None)) + identity)
    return vnn.conv_bn_act(conv, bn, x, "relu", residual=identity)


class _Block(nn.Module):
    """A residual block of (conv, BN) pairs ``conv1``/``bn1``, ``conv2``/``bn2``, ... in
    torchvision's order, then ``downsample`` (the shortcut's 1×1 conv + BN, or ``None``
    for the identity) and ``drop_path``. Every pair but the last feeds only the next
    conv: in training (triton backend) it writes its raw conv output and statistics, and
    its BN + ReLU run in the next conv's prologue (:func:`vhist.ops.conv_bn_deferred`);
    otherwise it runs as a fused conv + BN + ReLU. The last joins the shortcut in
    :func:`residual_join`.

    Args:
        convs: ``(in_channels, out_channels, kernel_size, stride)`` of each pair, in order.
        downsample: the shortcut's (conv, BN) Sequential, or ``None``.
        drop_path: stochastic depth probability of the residual branch.
    """

    def __init__(self, convs: Sequence[tuple[int, int, int, int]], downsample: Optional[nn.Sequential],
                 drop_path: float):
        super().__init__()
        for i, (cin, cout, k, stride) in enumerate(convs, 1):
            setattr(self, f"conv{i}", _conv(cin, cout, k, stride))
            setattr(self, f"bn{i}", vnn.BatchNorm2d(cout))
        self.num_pairs = len(convs)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def prologue_pairs(self) -> int:
        """The pairs whose BN + ReLU run in the next conv's prologue (all but the last)."""
        return self.num_pairs - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else vnn.conv_bn_act(
            self.downsample[0], self.downsample[1], x, None)
        pairs = [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.num_pairs + 1)]
        for conv, bn in pairs[:-1]:
            # Feeds only the next conv: its BN + ReLU run in that conv's prologue (training).
            x = vnn.conv_bn_act(conv, bn, x, "relu", defer=True)
        return residual_join(*pairs[-1], x, identity, self.drop_path)


class BasicBlock(_Block):
    """Two 3×3 convs; the second's BN output is added to the shortcut before the ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Sequential] = None,
                 drop_path: float = 0.0):
        super().__init__([(inplanes, planes, 3, stride), (planes, planes, 3, 1)], downsample, drop_path)


class Bottleneck(_Block):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4; the shortcut joins the last fused op."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Sequential] = None,
                 drop_path: float = 0.0):
        super().__init__([(inplanes, planes, 1, 1), (planes, planes, 3, stride),
                          (planes, planes * self.expansion, 1, 1)], downsample, drop_path)


class ResNet(nn.Module):
    """ResNet with torchvision's layout.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        num_classes: classifier outputs.
        image_size: input resolution (224 by default); ``<= 64`` selects the CIFAR stem.
        zero_init_residual: zero the last BN's gamma in every block (Goyal et al. 2017).
        drop_path_rate: stochastic depth of the residual branches, rising linearly
            from 0 in the first block to this in the last (Huang et al. 2016).
        channel_divisor: test-only, not a paper knob: divides every width.
    """

    def __init__(self, block, layers, num_classes: int = 1000, image_size: int = 224,
                 zero_init_residual: bool = False, drop_path_rate: float = 0.0, channel_divisor: int = 1):
        super().__init__()
        check_image_size("resnet", image_size, 8)
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        self.small_input = image_size <= SMALL_MAX
        widths = [scaled(w, channel_divisor) for w in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if self.small_input:
            self.conv1 = _conv(3, widths[0], 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = vnn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = vnn.BatchNorm2d(widths[0])
        # The stem's output under timm's name, for features_only hooks; its ReLU runs in
        # the fused op, so the module itself holds and does nothing.
        self.act1 = nn.Identity()
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1, rates)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, rates)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, rates)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, rates)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        self.zero_init_residual = zero_init_residual
        init_conv_bn(self)
        self._zero_residual_gammas()

    def init_weights(self, scheme: str) -> None:
        """``paper``: section 3.4 initializes "as in [13]" (He et al. 2015, section 2.2):
        convs N(0, 2 / (k^2 c)), i.e. Kaiming-normal over fan_in; BN (1, 0); the fc layer,
        which the paper does not describe, keeps PyTorch's default. ``modern`` / ``torch``:
        :mod:`vhist.models.initialization` (the default is torchvision's: ``modern`` but for
        the fc layer, which keeps PyTorch's default).
        ``zero_init_residual`` applies under every scheme."""
        if scheme == "paper":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            norms_(self)
            self.fc.reset_parameters()
        else:
            generic_init(self, scheme)
        self._zero_residual_gammas()

    def _zero_residual_gammas(self) -> None:
        if not self.zero_init_residual:
            return
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, rates) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv(self.inplanes, planes * block.expansion, 1, stride),
                                       vnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, next(rates))]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, drop_path=next(rates)) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    # The RGB stem and the classifier, under timm's pretrained_cfg field names (vhist.models.pretrained).
    pretrained_keys = dict(first_conv="conv1", classifier="fc")

    def feature_modules(self) -> list[str]:
        """Candidate stage outputs for :func:`vhist.models.features.FeatureListNet`."""
        return ["act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's unpooled map, (B, C, H/32, W/32) with the ImageNet stem."""
        x = self.act1(vnn.conv_bn_act(self.conv1, self.bn1, x, "relu"))
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' map."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(block, layers, num_classes, image_size, **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes=num_classes, image_size=image_size or IMAGE_SIZE, **kwargs)


def _entrypoint(name: str, block, layers: list[int]):
    def entry(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> ResNet:
        return _resnet(block, layers, num_classes, image_size, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f'ResNet-{name[6:]} (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).'
    return register_model(entry, image_size=IMAGE_SIZE, small_below=SMALL_MAX + 1)


# name: (block, blocks per stage), the paper's Table 1
_VARIANTS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
             "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3])}
for _name, _variant in _VARIANTS.items():
    globals()[_name] = _entrypoint(_name, *_variant)
