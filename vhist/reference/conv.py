import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "relu6", None)


def activate(x: torch.Tensor, activation) -> torch.Tensor:
    """``activation`` in {"relu", "relu6", None} applied to ``x``."""
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
    if activation is None:
        return x
    raise ValueError(f"unknown activation {activation!r}; valid: {ACTIVATIONS}")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """``F.conv2d`` followed by the activation."""
    return activate(F.conv2d(input, weight, bias, stride, padding, dilation, groups), activation)


def fused_conv_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                      padding=0, dilation=1, groups=1, training=True, momentum=0.1, eps=1e-5,
                      activation="relu", residual=None):
    """act(batch_norm(conv2d(input, weight)) + residual), the three steps of eager PyTorch."""
    y = F.conv2d(input, weight, None, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return activate(y, activation)


# The design's name of fused_conv_bn_act, as in vhist.ops.
fused_conv_bn_relu = fused_conv_bn_act
