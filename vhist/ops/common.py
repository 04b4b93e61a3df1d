"""Launch helpers shared by the op launchers: accumulation dtypes, the device's SM count,
memory layouts, the activation codes of the kernels, and the BatchNorm argument check.

Launch heuristics (tile counts, splits, chunks) live in :mod:`vhist.ops.heuristics`;
conv geometry and the fused conv + BN scaffold in :mod:`vhist.ops.conv_common` and
:mod:`vhist.ops.fused_bn`.
"""
from __future__ import annotations

import enum
import functools
from typing import Optional

import torch
# Imported with vhist (the launchers no longer need it at module level): Triton decides
# at its import whether it runs under the interpreter, and vhist documents that
# TRITON_INTERPRET counts only when set before vhist is imported.
import triton  # noqa: F401

from vhist.ops._dispatch import check_float_dtype, check_same_device
from vhist.reference import activation_backward
from vhist.ops.launch_cache import Launch

# ----------------------------------------------------------------------------- dtypes and device


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_buffers(rows: int, channels: int, like: torch.Tensor, counts: bool) -> tuple:
    """Uninitialized per-tile partials of a per-channel reduction on ``like``'s device, in
    the accumulation dtype: two (rows, C) buffers (mean and M2, or Σdz and Σdz·x̂) and,
    with ``counts``, the (rows,) element counts."""
    acc = acc_dtype(like.dtype)
    buffers = (like.new_empty((rows, channels), dtype=acc), like.new_empty((rows, channels), dtype=acc))
    return buffers + (like.new_empty((rows,), dtype=acc),) if counts else buffers


# torch's newer precision API: per (backend, op) "tf32" / "ieee", or "none" to inherit
# from the parent; ATen resolves cuDNN's conv setting through (cuda, conv), (cuda, all),
# (generic, all), and the legacy flag torch.backends.cudnn.allow_tf32 sets the cuda levels.
_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)


def cudnn_allow_tf32() -> bool:
    """Whether PyTorch's cuDNN convolutions may use TF32 on fp32 inputs (the fp32 conv
    kernels follow it): ``torch.backends.cudnn.conv.fp32_precision`` ("tf32" / "ieee"),
    where "none" inherits from ``torch.backends.cudnn.fp32_precision`` and then
    ``torch.backends.fp32_precision`` (nothing set anywhere: IEEE), which also reflects the
    legacy ``torch.backends.cudnn.allow_tf32``; on a torch without that API, the legacy
    flag. The legacy getter alone will not do: it raises once the conv and RNN
    precisions differ (a user set ``cudnn.conv.fp32_precision``). Read through the
    getters behind those properties (a module attribute costs about 0.5 µs a read, and
    the conv launchers read it on every call)."""
    if _FP32_PRECISION is None:
        return torch._C._get_cudnn_allow_tf32()
    precision = _FP32_PRECISION("cuda", "conv")
    if precision == "none":  # (unrolled: this runs on every conv call)
        precision = _FP32_PRECISION("cuda", "all")
        if precision == "none":
            precision = _FP32_PRECISION("generic", "all")
    return precision == "tf32"


_UNUSED_OUTPUTS: dict = {}  # (device, dtype, position) -> an empty tensor


def op_outputs(like: torch.Tensor, *outputs: Optional[torch.Tensor]) -> tuple:
    """A registered op's outputs, each one it did not compute (None) replaced by an empty
    (0,) tensor in ``like``'s dtype and device, as the op's fake gives it. The empty
    tensor of each (device, dtype, position) is made once and returned by every call (no
    allocation per call): the outputs of one call are still distinct tensors (a custom
    op's outputs may not alias one another), and nothing reads or writes a tensor of no
    elements."""
    for t in outputs:
        if t is None:
            break
    else:
        return outputs
    return tuple(t if t is not None else _unused_output(like, position) for position, t in enumerate(outputs))


def _unused_output(like: torch.Tensor, position: int) -> torch.Tensor:
    key = (like.device, like.dtype, position)
    empty = _UNUSED_OUTPUTS.get(key)
    if empty is None:
        empty = _UNUSED_OUTPUTS[key] = like.new_empty((0,))
    return empty


def tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as the Triton dtype the kernels' ``ACC`` constexpr takes."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (read once per device, then cached); 1 on
    a CPU, where the kernels run through Triton's interpreter."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- integer helpers
# Plain-int versions of triton.cdiv / triton.next_power_of_2, which are Triton
# constexpr functions (a few microseconds of argument unwrapping per call) and are
# called thousands of times a training step by the launchers.


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1`` (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# Second stage of the deterministic column sums (kernels.common.partials_sum): BLOCK_P
# partial rows by PARTIALS_BLOCK_N columns per step.
PARTIALS_BLOCK_P, PARTIALS_BLOCK_N = 64, 32


def partials_sum_launch(width: int, parts: int, has_a: bool, has_b: bool, acc) -> Launch:
    """The launch that sums (parts, width) partial buffers by columns into (width,)
    outputs, called with (PartA, PartB, A, B)."""
    from vhist.kernels.common import partials_sum

    return Launch(partials_sum, (cdiv(width, PARTIALS_BLOCK_N),), (parts, width), HAS_A=has_a, HAS_B=has_b, ACC=acc,
                  BLOCK_P=PARTIALS_BLOCK_P, BLOCK_N=PARTIALS_BLOCK_N, num_warps=4)


# ----------------------------------------------------------------------------- layouts


def is_channels_last_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` (N, C, *spatial) is dense with channels innermost."""
    dim = x.dim()
    if dim < 3:
        return x.is_contiguous()
    if dim == 4:  # the same test as the permute below, without making a view
        return x.is_contiguous(memory_format=torch.channels_last) or x.numel() == 0
    if dim == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) or x.numel() == 0
    perm = (0, *range(2, x.dim()), 1)
    return x.permute(perm).is_contiguous()


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is channels-last dense and not also contiguous (the kernels' NHWC
    case; a tensor that is both, e.g. with C == 1, counts as contiguous)."""
    return not x.is_contiguous() and is_channels_last_dense(x)


def dense_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it is contiguous or channels-last dense, else one contiguous copy
    made at the op boundary."""
    if x.is_contiguous() or is_channels_last_dense(x):
        return x
    return x.contiguous()


def like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``ref`` (converted once if they differ)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (4-D) in channels_last, copied once only if it is not already."""
    return x.contiguous(memory_format=torch.channels_last)


def channels_innermost(x: torch.Tensor) -> torch.Tensor:
    """``x`` (4-D) as it is when its channels are innermost (channel stride 1, any other
    strides: a tensor the GEMM kernels read through all four strides, such as the slice of
    a larger gradient), else in channels_last, copied once."""
    return x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)


def channels_last_strides(shape) -> tuple[int, int, int, int]:
    """The strides ``torch.channels_last`` gives a 4-D ``shape`` (N, C, H, W)."""
    _, c, h, w = shape
    return h * w * c, 1, w * c, c


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def empty_4d(shape, like: torch.Tensor, channels_last: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialized 4-D tensor on ``like``'s device, channels_last or contiguous
    (``torch.empty_strided``: a memory format argument costs the host about twice as
    much)."""
    strides = channels_last_strides(shape) if channels_last else contiguous_strides(shape)
    return torch.empty_strided(shape, strides, device=like.device, dtype=dtype or like.dtype)


def or_placeholder(tensor: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A kernel pointer argument: ``tensor``, or a placeholder the kernel never reads
    (its HAS_* flag is off)."""
    return tensor if tensor is not None else placeholder


# ----------------------------------------------------------------------------- activations


class Activation(enum.IntEnum):
    """The ``ACTIVATION`` constexpr of the BN, conv and depthwise kernels
    (:func:`vhist.kernels.common.activate`)."""

    NONE = 0
    RELU = 1
    RELU6 = 2
    SILU = 3
    HARDSWISH = 4
    LEAKY_RELU = 5
    GELU = 6
    GELU_TANH = 7
    SIGMOID = 8
    HARDSIGMOID = 9


# The one table of the activations the fused ops take (by name): what a model rewrite
# asks to know whether an activation runs on the kernels.
ACTIVATION_CODES = {None: int(Activation.NONE), "relu": int(Activation.RELU), "relu6": int(Activation.RELU6),
                    "silu": int(Activation.SILU), "hardswish": int(Activation.HARDSWISH),
                    "leaky_relu": int(Activation.LEAKY_RELU), "gelu": int(Activation.GELU),
                    "gelu_tanh": int(Activation.GELU_TANH), "sigmoid": int(Activation.SIGMOID),
                    "hardsigmoid": int(Activation.HARDSIGMOID)}

ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}

# F.leaky_relu's default slope; what the kernels' NEG_SLOPE constexpr holds for the other
# activations (which ignore it), so that a slope never compiles a variant they do not need.
DEFAULT_NEGATIVE_SLOPE = 0.01

# Activations whose derivative the kernels read off the output as well as off the
# pre-activation (:func:`vhist.kernels.common.activation_grad`): the plain conv and
# depthwise ops save the output for these, the pre-activation for the others.
OUTPUT_GRAD_CODES = frozenset((int(Activation.NONE), int(Activation.RELU), int(Activation.RELU6)))


def activation_code(op: str, activation) -> int:
    """The kernels' code for ``activation``; ValueError naming ``op`` for an unknown one."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"{op}: unknown activation {activation!r}; valid: {tuple(ACTIVATION_CODES)}")
    return ACTIVATION_CODES[activation]


def check_negative_slope(op: str, negative_slope) -> float:
    """``negative_slope`` as a float (F.leaky_relu's argument); TypeError naming ``op`` for
    anything that is not a real number."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"{op}: negative_slope must be a float, got {negative_slope!r}")
    return float(negative_slope)


def kernel_slope(activation: int, negative_slope: float) -> float:
    """The ``NEG_SLOPE`` constexpr of a launch: the slope for leaky relu, the default for
    every other activation (so that their launches do not depend on it)."""
    return float(negative_slope) if activation == Activation.LEAKY_RELU else DEFAULT_NEGATIVE_SLOPE


def activation_constexprs(activation: int, negative_slope: float, prefix: str = "") -> dict:
    """The ``{prefix}ACTIVATION`` / ``{prefix}NEG_SLOPE`` constexprs of a launch."""
    return {f"{prefix}ACTIVATION": activation, f"{prefix}NEG_SLOPE": kernel_slope(activation, negative_slope)}


def activation_grad(grad: torch.Tensor, saved: Optional[torch.Tensor], activation: int,
                    negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """``grad * act'(z)`` from what the plain conv ops save (the output for the codes in
    :data:`OUTPUT_GRAD_CODES`, the pre-activation ``z`` otherwise), with PyTorch's
    derivatives, kinks included (:func:`vhist.reference.activation_backward`); ``grad``
    itself without an activation."""
    if activation == Activation.NONE:
        return grad
    return activation_backward(grad, saved, ACTIVATION_NAMES[activation], negative_slope)


# ----------------------------------------------------------------------------- BatchNorm arguments


def check_bn_args(op: str, channels: int, input: torch.Tensor, bn_weight, bn_bias, running_mean, running_var,
                  training: bool, values_per_channel: int, *, names=("weight", "bias"),
                  matches: str = "the input's {c} channels", shape_name: str = "input of shape",
                  shape=None) -> None:
    """Checks BatchNorm's affine parameters and statistics against ``channels``.

    Args:
        op: the op named in the errors.
        channels: the channel count C every (C,) argument must have.
        input: the tensor whose device the arguments must share.
        bn_weight, bn_bias, running_mean, running_var: optional (C,) tensors.
        training: batch statistics (which need more than one value per channel) or the
            running ones (which must then be given).
        values_per_channel: how many values each channel's batch statistics reduce.
        names: the op's names of (bn_weight, bn_bias), for the errors.
        matches, shape_name, shape: wording of the errors: what C counts ("the input's
            {c} channels"), and what has ``shape`` (default ``input.shape``).

    Raises:
        ValueError: mixed devices, a wrong shape, one running statistic without the
            other, no running statistics in eval, or one value per channel in training.
        TypeError: a non-float dtype.
    """
    weight_name, bias_name = names
    check_same_device(op, input=input, running_mean=running_mean, running_var=running_var,
                      **{weight_name: bn_weight, bias_name: bn_bias})
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    (weight_name, bn_weight), (bias_name, bn_bias)):
        check_float_dtype(op, name, t)
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{op}: {name} must have shape ({channels},) to match "
                             f"{matches.format(c=channels)}, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var must be given in eval mode")
    if training and values_per_channel <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got {shape_name} "
                         f"{tuple(shape if shape is not None else input.shape)}")
