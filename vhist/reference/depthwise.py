import torch.nn.functional as F

from vhist.reference.conv import fused_conv_bn_act


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """``F.conv2d`` with ``groups = C_in`` (weight: (C_in * multiplier, 1, KH, KW))."""
    return F.conv2d(input, weight, bias, stride, padding, dilation, input.shape[1])


def fused_depthwise_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                           padding=0, dilation=1, training=True, momentum=0.1, eps=1e-5,
                           activation="relu6", residual=None, negative_slope=0.01):
    """act(batch_norm(depthwise_conv2d(input, weight)) + residual)."""
    return fused_conv_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var,
                              stride=stride, padding=padding, dilation=dilation, groups=input.shape[1],
                              training=training, momentum=momentum, eps=eps, activation=activation,
                              residual=residual, negative_slope=negative_slope)
