"""Dense conv2d and the fused conv + BatchNorm + activation op.

Backends: ``torch`` (the reference composition). The Triton implicit-GEMM kernels are
added by the fused-conv work (issue 3).
"""
from __future__ import annotations

from typing import Optional

import torch

from vhist import reference
from vhist.ops._dispatch import dispatch

CONV2D_IMPLS = {"torch": reference.conv2d}
FUSED_IMPLS = {"torch": reference.fused_conv_bn_relu}


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, activation: Optional[str] = None):
    """``F.conv2d`` with an optional activation epilogue ("relu", "relu6" or None)."""
    impl = dispatch("conv2d", CONV2D_IMPLS, input.device)
    return impl(input, weight, bias, stride, padding, dilation, groups, activation=activation)


def fused_conv_bn_relu(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                       padding=0, dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5,
                       activation: Optional[str] = "relu", residual: Optional[torch.Tensor] = None):
    """``act(batch_norm(conv2d(input, weight)) + residual)`` as one op, running statistics
    included (see :func:`vhist.reference.fused_conv_bn_relu`)."""
    impl = dispatch("fused_conv_bn_relu", FUSED_IMPLS, input.device)
    return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                padding=padding, dilation=dilation, groups=groups, training=training,
                momentum=momentum, eps=eps, activation=activation, residual=residual)
