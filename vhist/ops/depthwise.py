"""Depthwise conv2d and its fused BatchNorm + activation variant (MobileNet).

Backends: ``torch`` (the reference). The Triton and CUDA kernels are added by the
depthwise work (issue 5).
"""
from vhist import reference
from vhist.ops._dispatch import dispatch

IMPLS = {"torch": reference.depthwise_conv2d}
FUSED_IMPLS = {"torch": reference.fused_depthwise_bn_act}


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C_in)``."""
    impl = dispatch("depthwise_conv2d", IMPLS, input.device)
    return impl(input, weight, bias, stride, padding, dilation)


def fused_depthwise_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                           padding=0, dilation=1, training=True, momentum=0.1, eps=1e-5,
                           activation="relu6", residual=None):
    """``act(batch_norm(depthwise_conv2d(input, weight)) + residual)`` as one op."""
    impl = dispatch("fused_depthwise_bn_act", FUSED_IMPLS, input.device)
    return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                padding=padding, dilation=dilation, training=training, momentum=momentum, eps=eps,
                activation=activation, residual=residual)
