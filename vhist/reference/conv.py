import math

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "relu6", "silu", "hardswish", "leaky_relu", "gelu", "gelu_tanh", "sigmoid", "hardsigmoid")


def activate(x: torch.Tensor, activation, negative_slope: float = 0.01) -> torch.Tensor:
    """``activation`` (one of :data:`ACTIVATIONS`) applied to ``x`` by PyTorch's own op;
    ``negative_slope`` is leaky relu's."""
    if activation is None:
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        if x.is_cuda:
            return F.relu6(x)
        # On CPU, hardtanh_backward's SIMD loop zeroes the gradient at a NaN input while
        # its scalar remainder loop and the CUDA kernel pass it ((x <= 0 || x >= 6) ? 0
        # : grad), so the gradient depends on the NaN's position (pytorch/pytorch#195075).
        # This composition has the CUDA kernel's forward and backward everywhere.
        return torch.where(x <= 0, 0.0, torch.where(x >= 6, 6.0, x))
    if activation == "silu":
        return F.silu(x)
    if activation == "hardswish":
        # On CPU, hardswish_backward's SIMD loop gives NaN at a NaN input where its scalar
        # loop and the CUDA kernel pass the gradient: the CUDA kernel's definitions instead.
        return F.hardswish(x) if x.is_cuda else _ByDefinition.apply(x, activation, negative_slope)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if activation == "gelu":
        # On CPU, gelu's fp32 SIMD loops give NaN at +Inf forward, and form dy * cdf + dy *
        # x * pdf backward (Inf - Inf where dy is Inf), where the scalar loops and the CUDA
        # kernel give +Inf and dy * (cdf + x * pdf): the CUDA kernel's definitions instead.
        return F.gelu(x) if x.is_cuda else _ByDefinition.apply(x, activation, negative_slope)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "hardsigmoid":
        return F.hardsigmoid(x)
    raise ValueError(f"unknown activation {activation!r}; valid: {ACTIVATIONS}")


class _ByDefinition(torch.autograd.Function):
    """An activation by the formulas of PyTorch's CUDA kernels, forward and backward
    (:func:`activation_backward`), for the CPU ops whose SIMD loops deviate from them."""

    @staticmethod
    def forward(ctx, x, activation, negative_slope):
        ctx.save_for_backward(x)
        ctx.args = (activation, negative_slope)
        if activation == "gelu":
            return x * 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
        return x * torch.where(x + 3 <= 0, 0.0, torch.where(x + 3 >= 6, 6.0, x + 3)) / 6  # hardswish

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return activation_backward(grad, x, *ctx.args), None, None


def activation_backward(grad: torch.Tensor, z: torch.Tensor, activation, negative_slope: float = 0.01) -> torch.Tensor:
    """``grad * act'(z)`` by PyTorch's backward formula of ``activation`` (its
    ``*_backward`` kernel, aten/src/ATen/native/cpu/Activation.cpp) at the pre-activation
    ``z``, kinks and NaN included; for relu and relu6 ``z`` may equally be their output.
    Plain tensor ops, no autograd: the registered ops call it inside their kernels' stead."""
    if activation is None:
        return grad
    zero = grad.new_zeros(())
    if activation == "relu":  # threshold_backward: 0 where z <= 0 (a NaN z passes grad)
        return torch.where(z <= 0, zero, grad)
    if activation == "relu6":  # hardtanh_backward
        return torch.where((z <= 0) | (z >= 6), zero, grad)
    if activation == "silu":
        s = torch.sigmoid(z)
        return grad * s * (1 + z * (1 - s))
    if activation == "hardswish":
        return torch.where(z <= -3, zero, torch.where(z < 3, grad * (z / 3 + 0.5), grad))
    if activation == "leaky_relu":
        return torch.where(z > 0, grad, grad * negative_slope)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
        return grad * (cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
    if activation == "gelu_tanh":
        t = torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))
        du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * z * z)
        return grad * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du)
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return grad * (1 - s) * s
    if activation == "hardsigmoid":  # PyTorch multiplies by 1/6 rounded to fp32, in fp64 too
        return torch.where((z > -3) & (z < 3), grad * 0.1666666716337204, zero)
    raise ValueError(f"unknown activation {activation!r}; valid: {ACTIVATIONS}")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
           negative_slope=0.01):
    """``F.conv2d`` followed by the activation."""
    return activate(F.conv2d(input, weight, bias, stride, padding, dilation, groups), activation, negative_slope)


def fused_conv_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                      padding=0, dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5,
                      activation="relu", residual=None, negative_slope=0.01):
    """act(batch_norm(conv2d(input, weight)) + residual), the three steps of eager PyTorch."""
    y = F.conv2d(input, weight, None, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return activate(y, activation, negative_slope)


def fused_conv_act_bn(input, weight, bn_weight, bn_bias, running_mean, running_var, *, bias=None, stride=1,
                      padding=0, dilation=1, groups=1, activation="relu", negative_slope=0.01, training=True,
                      momentum=0.1, eps=1e-5):
    """batch_norm(act(conv2d(input, weight, bias))): the conv -> activation -> BN order
    (ConvMixer), in eager PyTorch."""
    y = activate(F.conv2d(input, weight, bias, stride, padding, dilation, groups), activation, negative_slope)
    return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)


def bn_act(input, bn_weight, bn_bias, running_mean, running_var, *, training=True, momentum=0.1, eps=1e-5,
           activation="relu", negative_slope=0.01):
    """act(batch_norm(input)): the BN -> activation half of a pre-activation block (DenseNet)."""
    y = F.batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return activate(y, activation, negative_slope)


# The design's name of fused_conv_bn_act, as in vhist.ops.
fused_conv_bn_relu = fused_conv_bn_act
