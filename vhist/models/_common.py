"""Pieces shared by the model families: channel scaling, the (conv, BN) pair in
torchvision's ``Conv2dNormActivation`` layout, and a feature runner that fuses
conv + ReLU into one vhist op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vhist import nn as vnn
from vhist.nn import functional as VF


def scaled(channels: int, divisor: int) -> int:
    """``channels / divisor`` for the test-only ``channel_divisor`` knob.

    Every width of a model goes through this, so concatenations and residual sums stay
    consistent. It must divide exactly: a silent floor would break branch widths.
    """
    if divisor < 1 or channels % divisor:
        raise ValueError(f"channel_divisor={divisor} does not divide the width {channels}")
    return channels // divisor


def check_image_size(name: str, image_size: int, minimum: int) -> int:
    if not isinstance(image_size, int) or image_size < minimum:
        raise ValueError(f"{name}: image_size must be an int >= {minimum}, got {image_size!r}")
    return image_size


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) at index 0 and BatchNorm2d at index 1, run as one fused
    conv + BN + activation op. The layout (and so the state_dict keys ``0.weight``,
    ``1.*``) is torchvision's ``Conv2dNormActivation``, whose activation module holds no
    parameters."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, groups: int = 1, activation: Optional[str] = "relu",
                 eps: float = 1e-5):
        if padding is None:
            padding = (kernel_size - 1) // 2
        super().__init__(vnn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                    bias=False),
                         vnn.BatchNorm2d(out_channels, eps=eps))
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return vnn.conv_bn_act(self[0], self[1], x, self.activation, residual)


def _is_conv_bn_relu(layers: list, i: int) -> bool:
    return (i + 2 < len(layers) and isinstance(layers[i], vnn.Conv2d) and type(layers[i + 1]) is vnn.BatchNorm2d
            and isinstance(layers[i + 2], nn.ReLU) and layers[i].padding_mode == "zeros"
            and not vnn.is_depthwise(layers[i]))


def deferred_pairs(features: nn.Sequential) -> int:
    """How many ``Conv2d, BatchNorm2d, ReLU`` of a ``features`` Sequential
    :func:`run_features` runs with their BN + ReLU in the next conv's prologue (those
    followed by a ``Conv2d``), when training on the triton backend."""
    layers = list(features)
    return sum(_is_conv_bn_relu(layers, i) and i + 3 < len(layers) and isinstance(layers[i + 3], vnn.Conv2d)
               for i in range(len(layers)))


def prologue_pairs(model: nn.Module) -> int:
    """How many (conv, BN) pairs of ``model`` hand their BN + activation to the next
    conv's prologue when training on the triton backend (each block or stack that does
    so says how many through a ``prologue_pairs()`` method)."""
    return sum(m.prologue_pairs() for m in model.modules() if callable(getattr(m, "prologue_pairs", None)))


def run_features(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Runs a torchvision-style ``features`` Sequential with its layout (so state_dicts
    load unchanged) on fused ops: each ``Conv2d, BatchNorm2d, ReLU`` runs as a deferred
    conv + BN (:func:`vhist.nn.conv_bn_act` with ``defer``): in training on the triton
    backend its BN + ReLU then run in the next conv's prologue, or in one apply pass where
    another layer (a pooling) comes next. Each biased ``Conv2d`` directly followed by
    ``ReLU`` runs as one conv op with a ReLU epilogue."""
    layers = list(features)
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if _is_conv_bn_relu(layers, i):
            x = vnn.conv_bn_act(layer, nxt, x, "relu", defer=True)
            i += 3
        elif isinstance(layer, vnn.Conv2d) and isinstance(nxt, nn.ReLU) and layer.padding_mode == "zeros":
            x = VF.conv2d(VF.as_tensor(x), layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                          layer.groups, activation="relu")
            i += 2
        else:
            x = layer(VF.as_tensor(x))
            i += 1
    return VF.as_tensor(x)


class SequentialClassifierNet(nn.Module):
    """The timm interface of a torchvision-style net made of a ``features`` Sequential
    (run by :func:`run_features`), an optional ``avgpool`` and a ``classifier``
    Sequential whose last layer is the head (AlexNet, VGG)."""

    pretrained_keys = dict(first_conv="features.0", classifier="classifier.6")

    def feature_modules(self) -> list[str]:
        """Candidate stage outputs: the layers :func:`run_features` calls as modules (LRN, pools)."""
        return [f"features.{i}" for i in range(len(self.features))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return run_features(self.features, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The hidden layers' output (``pre_logits``) or logits from :meth:`forward_features`' map."""
        pool = getattr(self, "avgpool", None)
        x = torch.flatten(x if pool is None else pool(x), 1)
        return self.classifier[:-1](x) if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias, BN at (1, 0): He et al. 2015."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016),
    per sample as in FractalNet / timm's ``DropPath``: in training, each sample's residual
    branch is zeroed with probability ``drop_prob`` and the kept ones are scaled by
    ``1 / (1 - drop_prob)``, so the expectation is unchanged; the identity in eval.

    The mask is drawn from the global torch generator (as ``nn.Dropout``), whose state the
    training checkpoints hold, so ``--resume`` reproduces it. No parameters or buffers:
    adding it leaves a model's ``state_dict`` unchanged.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0 <= drop_prob < 1:
            raise ValueError(f"drop path probability must be >= 0 and < 1, got {drop_prob!r}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Per-block drop probabilities rising linearly from 0 to ``rate`` over ``blocks``
    residual blocks (Huang et al. 2016, §3: "linear decay rule" of the survival
    probability)."""
    if not 0 <= rate < 1:
        raise ValueError(f"drop_path_rate must be >= 0 and < 1, got {rate!r}")
    if blocks <= 1:
        return [0.0] * blocks
    return [rate * i / (blocks - 1) for i in range(blocks)]
