"""What the dense and the depthwise conv share above the kernels: argument
normalization (:func:`pair`, :func:`resolve_padding`), the geometry base with the output
size, the residual check and BatchNorm folding for eval."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vhist.ops._dispatch import check_float_dtype
from vhist.ops.common import acc_dtype


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def pair(op: str, name: str, value) -> tuple[int, int]:
    """``value`` as (height, width): an int, a 1-tuple/list or a 2-tuple/list of ints.

    Raises:
        ValueError: anything else (bools, floats, other lengths).
    """
    if _is_int(value):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(_is_int(v) for v in value):
        return int(value[0]), int(value[-1])
    raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def positive_pair(op: str, name: str, value) -> tuple[int, int]:
    """:func:`pair` for a stride or a dilation, which must be >= 1."""
    result = pair(op, name, value)
    if min(result) < 1:
        raise ValueError(f"{op}: {name} must be >= 1 (a {name} must be positive), got {value!r}")
    return result


def resolve_padding(op: str, padding, stride: tuple[int, int], dilation: tuple[int, int], kh: int,
                    kw: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding for an int, a pair, 'valid' or 'same'.

    'same' splits an odd total as PyTorch does (the extra row/column at the end) and,
    as in PyTorch, needs stride 1.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if max(stride) > 1:
                raise ValueError(f"{op}: padding='same' needs stride 1, as in PyTorch (it is not supported for "
                                 f"strided convolutions), got stride={stride}")
            total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2
        raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(op, "padding", padding)
    if min(ph, pw) < 0:
        raise ValueError(f"{op}: padding must be >= 0 (non-negative), got {padding!r}")
    return ph, ph, pw, pw


@dataclass(frozen=True)
class ConvGeometryBase:
    """A 2-D conv's sizes as the launchers see them; padding is (top, bottom, left,
    right), so that PyTorch's asymmetric 'same' padding (odd total) is exact."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]

    @property
    def oh(self) -> int:
        top, bottom = self.padding[:2]
        return (self.h + top + bottom - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        left, right = self.padding[2:]
        return (self.w + left + right - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return self.n, self.c_out, self.oh, self.ow

    @property
    def positions(self) -> int:
        """N * OH * OW, the output positions (the rows of the forward GEMM)."""
        return self.n * self.oh * self.ow

    def op_args(self) -> tuple[list[int], list[int], list[int]]:
        """(stride, padding, dilation) as lists, the form the registered ops take."""
        return list(self.stride), list(self.padding), list(self.dilation)


def op_lists_key(input_shape, weight_shape, stride, padding, dilation, groups=None) -> tuple:
    """The launch-cache key of a registered conv op's geometry arguments (the lists
    flattened; :func:`vhist.ops.launch_cache.shape_cached`)."""
    return input_shape, weight_shape, *stride, *padding, *dilation, groups


def check_residual(op: str, residual: Optional[torch.Tensor], input: torch.Tensor, out_shape) -> None:
    """A residual, when given, has the output's shape and the input's float dtype."""
    if residual is None:
        return
    check_float_dtype(op, "residual", residual)
    if tuple(residual.shape) != tuple(out_shape):
        raise ValueError(f"{op}: residual must have the output's shape {tuple(out_shape)}, "
                         f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"{op}: residual ({residual.dtype}) must have the input's dtype ({input.dtype})")


def fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps, conv_bias=None):
    """Eval BatchNorm folded into the conv: ``(weight * s, beta + (conv_bias - mean) * s)``
    with ``s = gamma / sqrt(var + eps)`` (a conv bias 0 when absent), computed in the
    accumulation dtype as new tensors (the stored parameters are untouched; autograd flows
    through the fold)."""
    acc = acc_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    folded_weight = (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    folded_bias = -running_mean.to(acc) * scale
    if conv_bias is not None:
        folded_bias = folded_bias + conv_bias.to(acc) * scale
    if bn_bias is not None:
        folded_bias = folded_bias + bn_bias.to(acc)
    return folded_weight, folded_bias
