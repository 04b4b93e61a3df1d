"""Convolution modules over vhist ops."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vhist.nn import functional as VF
from vhist.nn.modules.batchnorm import BatchNorm2d, bn_forward_args, count_batch


class Conv2d(nn.Conv2d):
    """Drop-in for :class:`torch.nn.Conv2d` (same constructor, parameters and state_dict)
    on :func:`vhist.nn.functional.conv2d`; a depthwise conv (``groups == in_channels``,
    see :func:`is_depthwise`) runs :func:`vhist.nn.functional.depthwise_conv2d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        if is_depthwise(self):
            unbatched = input.dim() == 3
            out = VF.depthwise_conv2d(input.unsqueeze(0) if unbatched else input, self.weight, self.bias,
                                      self.stride, padding, self.dilation)
            return out.squeeze(0) if unbatched else out
        return VF.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → activation, run as one fused op.

    The state_dict keys are ``conv.weight`` and ``bn.{weight, bias, running_mean,
    running_var, num_batches_tracked}``, so the weights of ``nn.Sequential(Conv2d,
    BatchNorm2d, ReLU)`` load unchanged. Training uses batch statistics and updates the
    running ones; eval folds BN into the conv on the fly without touching the stored
    parameters. Depthwise convolutions (``groups == in_channels``) go to
    :func:`vhist.nn.functional.fused_depthwise_bn_act`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as
            :class:`torch.nn.Conv2d` (``padding`` also takes "same" and "valid").
        activation: "relu", "relu6" or None.
        eps, momentum: as :class:`torch.nn.BatchNorm2d` (``momentum=None`` is the
            cumulative average).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, activation: Optional[str] = "relu", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return conv_bn_act(self.conv, self.bn, input, self.activation, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def is_depthwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is depthwise: one group per input channel (multiplier >= 1)."""
    return conv.groups > 1 and conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, input, activation: Optional[str] = "relu",
                residual: Optional[torch.Tensor] = None, *, defer: bool = False):
    """``act(bn(conv(input)) + residual)`` through the fused op, for a (Conv2d, BatchNorm2d)
    pair kept as separate submodules (so that models keep torchvision's/timm's
    state_dict names). Follows the BatchNorm module's semantics: batch statistics when
    training or not tracking, the cumulative average for ``momentum=None``, and
    ``num_batches_tracked`` counted after a successful call. A :class:`SyncBatchNorm`
    runs unfused, as its own module, so that it can synchronize its statistics.

    ``input`` may be the :class:`~vhist.ops.DeferredBNAct` of the pair before (its BN
    and activation then run in this conv's prologue). With ``defer`` (for a pair whose
    output feeds only convs; a depthwise conv or a SyncBatchNorm ignores it), the result
    is this pair's :class:`~vhist.ops.DeferredBNAct` when training on the triton
    backend, else the tensor; a deferred pair's conv may have a bias (torchvision's
    VGG-BN), the others not.
    """
    from vhist.nn.modules.sync_batchnorm import SyncBatchNorm, unfused_conv_bn_act

    if isinstance(bn, SyncBatchNorm):
        # The fused op cannot exchange statistics between processes mid-kernel.
        return unfused_conv_bn_act(conv, bn, VF.as_tensor(input), activation, residual)
    if conv.padding_mode != "zeros" or (conv.bias is not None and not defer):
        raise ValueError("conv_bn_act: the conv must have padding_mode='zeros' and, unless deferred, bias=False")
    if defer and residual is not None:
        raise ValueError("conv_bn_act: a deferred pair takes no residual (its consumer is a conv)")
    running_mean, running_var, training, momentum = bn_forward_args(bn)
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, training=training,
                  momentum=momentum, eps=bn.eps, activation=activation)
    if is_depthwise(conv):
        if conv.bias is not None:
            raise ValueError("conv_bn_act: a depthwise conv before BatchNorm must have bias=False")
        args = (VF.as_tensor(input), conv.weight, bn.weight, bn.bias, running_mean, running_var)
        out = VF.fused_depthwise_bn_act(*args, residual=residual, **kwargs)
    elif defer:
        out = VF.conv_bn_deferred(input, conv.weight, bn.weight, bn.bias, running_mean, running_var,
                                  bias=conv.bias, groups=conv.groups, **kwargs)
    else:
        args = (input, conv.weight, bn.weight, bn.bias, running_mean, running_var)
        out = VF.fused_conv_bn_act(*args, groups=conv.groups, residual=residual, **kwargs)
    count_batch(bn)
    return out
