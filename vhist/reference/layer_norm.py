"""LayerNorm references (F.layer_norm compositions)."""
import torch.nn.functional as F


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """PyTorch's ``F.layer_norm``."""
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``(s, F.layer_norm(s))`` with ``s = input + residual`` (two aten kernels)."""
    total = input + residual
    return total, F.layer_norm(total, normalized_shape, weight, bias, eps)


def layer_norm_2d(input, weight=None, bias=None, eps=1e-6):
    """LayerNorm over the channels of an (N, C, H, W) tensor, as timm's ``LayerNorm2d``:
    permute to NHWC, ``F.layer_norm``, permute back."""
    return F.layer_norm(input.permute(0, 2, 3, 1), input.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)

