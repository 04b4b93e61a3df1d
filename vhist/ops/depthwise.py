"""Depthwise conv2d and its fused BatchNorm + activation variant (MobileNet).

Backends: ``triton`` (kernels/depthwise.py), ``cuda`` (csrc/depthwise/) and ``torch``
(the reference). The Triton passes are registered as the custom ops
``vhist::depthwise_conv2d_fwd``, ``vhist::depthwise_conv2d_bwd_input`` and
``vhist::depthwise_conv2d_bwd_weight`` (the CUDA ones as ``vhist::depthwise_conv2d_cuda_*``),
each with a fake implementation so ``torch.compile`` traces them, and tied together by
:class:`DepthwiseConv2dFunction`. The fused op is ``vhist::fused_depthwise_bn_act_fwd`` /
``_bwd`` under :class:`FusedDepthwiseBNActFunction` in training, and the folded
depthwise conv (BN folded into the weights, activation and residual in the epilogue)
in eval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from vhist import reference
from vhist.ops._dispatch import autocast_inputs, check_float_dtype, check_same_device, dispatch
from vhist.ops.batch_norm import (ACTIVATION_CODES, _sm_count, _tl_acc, acc_dtype, activation_code, bn_apply,
                                  bn_finalize, bn_grad_input, bn_grad_sums, is_channels_last_dense, like_layout)

OP = "depthwise_conv2d"
FUSED_OP = "fused_depthwise_bn_act"
FWD_BLOCK_P = 64  # output pixels per forward tile
# The fused op's forward gives each program several pixel tiles so that the BN partials
# (one per program) stay few enough for the single-pass finalize kernel to merge quickly.
MAX_STATS_PARTIALS = 1024


# ----------------------------------------------------------------------------- geometry


def _pair(op: str, name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


@dataclass(frozen=True)
class DepthwiseGeometry:
    """Sizes of a depthwise conv: padding is (top, bottom, left, right), so that PyTorch's
    asymmetric 'same' padding (odd total) is exact."""

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
    def multiplier(self) -> int:
        return self.c_out // self.c_in

    @property
    def oh(self) -> int:
        top, bottom = self.padding[:2]
        return (self.h + top + bottom - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        left, right = self.padding[2:]
        return (self.w + left + right - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    def conv_args(self) -> tuple:
        """(sh, sw, ph, pw, dh, dw) as the kernels take them (begin padding only)."""
        return (*self.stride, self.padding[0], self.padding[2], *self.dilation)


def depthwise_geometry(input_shape, weight_shape, stride, padding, dilation, op: str = OP) -> DepthwiseGeometry:
    """Validates a depthwise conv's arguments and returns its geometry.

    Raises:
        ValueError: the weight is not depthwise-shaped ((C_in * multiplier, 1, KH, KW)),
            its output channels are not a multiple of C_in, a stride or dilation is
            below 1, the padding is negative or unknown, or the output would be empty.
    """
    if len(input_shape) != 4:
        raise ValueError(f"{op}: expected a 4-D input (N, C, H, W), got shape {tuple(input_shape)}")
    if len(weight_shape) != 4 or weight_shape[1] != 1:
        raise ValueError(f"{op}: weight of shape {tuple(weight_shape)} is not depthwise: expected "
                         "(C_in * multiplier, 1, KH, KW)")
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    if c_in == 0 or c_out == 0 or c_out % c_in != 0:
        raise ValueError(f"{op}: multiplier mismatch: the weight's {c_out} output channels are not a "
                         f"positive multiple of the input's {c_in} channels")
    if kh < 1 or kw < 1:
        raise ValueError(f"{op}: empty kernel of shape {tuple(weight_shape)}")
    sh, sw = _pair(op, "stride", stride)
    dh, dw = _pair(op, "dilation", dilation)
    if sh < 1 or sw < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {stride!r}")
    if dh < 1 or dw < 1:
        raise ValueError(f"{op}: dilation must be >= 1, got {dilation!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1 (as F.conv2d), got {stride!r}")
            total_h, total_w = dh * (kh - 1), dw * (kw - 1)
            pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _pair(op, "padding", padding)
        if ph < 0 or pw < 0:
            raise ValueError(f"{op}: padding must be >= 0, got {padding!r}")
        pads = (ph, ph, pw, pw)
    geom = DepthwiseGeometry(n, c_in, h, w, c_out, kh, kw, (sh, sw), pads, (dh, dw))
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(input_shape)}")
    if geom.oh < 1 or geom.ow < 1:
        raise ValueError(f"{op}: the output would be empty ({geom.oh} x {geom.ow}) for input "
                         f"{tuple(input_shape)}, kernel {kh} x {kw}, stride {stride!r}, padding "
                         f"{padding!r}, dilation {dilation!r}")
    return geom


def _geometry_from_lists(input_shape, weight_shape, stride, padding, dilation) -> DepthwiseGeometry:
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    return DepthwiseGeometry(n, c_in, h, w, c_out, kh, kw, tuple(stride), tuple(padding), tuple(dilation))


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and is_channels_last_dense(x)


def _empty_output(like: torch.Tensor, shape, channels_last: bool, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype, memory_format=fmt)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _weight_chunks(pixels: int, c_out: int, device: torch.device) -> tuple[int, int]:
    """Split of the N*OH*OW reduction of the weight gradient: (chunk length, chunks).
    Depends only on the shape and the device, so the summation order is fixed."""
    c_blocks = triton.cdiv(c_out, 64)
    chunks = triton.cdiv(4 * _sm_count(device), c_blocks)
    chunks = max(min(chunks, triton.cdiv(pixels, 256)), triton.cdiv(pixels, 32768), 1)
    chunk = triton.cdiv(triton.cdiv(pixels, chunks), 128) * 128
    return chunk, triton.cdiv(pixels, chunk)


# ----------------------------------------------------------------------------- triton launchers


def _fwd_tiling(geom: DepthwiseGeometry, stats: bool) -> tuple[int, int]:
    """(pixel tiles per program, programs along the pixel axis) of the forward kernel."""
    tiles = triton.cdiv(geom.n * geom.oh * geom.ow, FWD_BLOCK_P)
    per_program = triton.cdiv(tiles, MAX_STATS_PARTIALS) if stats else 1
    return per_program, triton.cdiv(tiles, per_program)


def _launch_fwd(input, weight, bias, residual, geom: DepthwiseGeometry, activation: int, output,
                stats=None):
    from vhist.kernels import depthwise as kernels

    tiles_per_program, programs = _fwd_tiling(geom, stats is not None)
    part = stats if stats is not None else (output, output, output)
    grid = lambda meta: (programs, triton.cdiv(geom.c_out, meta["BLOCK_C"]))  # noqa: E731
    kernels.depthwise_fwd[grid](
        input, weight, bias if bias is not None else weight, residual if residual is not None else output,
        output, *part,
        geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier, tiles_per_program,
        *_strides(input), weight.stride(0), weight.stride(2), weight.stride(3), *_strides(output),
        *geom.conv_args(),
        KH=geom.kh, KW=geom.kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation, STATS=stats is not None, ACC=_tl_acc(input.dtype), BLOCK_P=FWD_BLOCK_P)


@torch.library.custom_op("vhist::depthwise_conv2d_fwd", mutates_args=())
def depthwise_conv2d_fwd(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
) -> torch.Tensor:
    """Forward of the depthwise conv on the Triton kernel: ``act(conv + bias + residual)``.

    Args:
        padding: (top, bottom, left, right).
        activation: 0 none, 1 ReLU, 2 ReLU6.

    Returns:
        The output, channels-last when the input is, contiguous otherwise.
    """
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    output = _empty_output(input, (geom.n, geom.c_out, geom.oh, geom.ow), _channels_last(input))
    if residual is not None:
        residual = like_layout(residual, output)
    _launch_fwd(input, weight, bias, residual, geom, activation, output)
    return output


@depthwise_conv2d_fwd.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, activation):
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    return _empty_output(input, (geom.n, geom.c_out, geom.oh, geom.ow), _channels_last(input))


@torch.library.custom_op("vhist::depthwise_conv2d_bwd_input", mutates_args=())
def depthwise_conv2d_bwd_input(
    grad_output: torch.Tensor,
    output: Optional[torch.Tensor],
    weight: torch.Tensor,
    input_size: list[int],
    channels_last: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
) -> torch.Tensor:
    """Input gradient (a gather over the taps that reach each input pixel).

    Args:
        output: the forward output, read for the activation's mask (``activation`` != 0).
        input_size, channels_last: shape and memory format of the forward input.

    Returns:
        grad_input, in the forward input's memory format.
    """
    return _bwd_input_impl(grad_output, output, weight, input_size, channels_last, stride, padding, dilation,
                           activation)


def _bwd_input_impl(grad_output, output, weight, input_size, channels_last, stride, padding, dilation,
                    activation):
    from vhist.kernels import depthwise as kernels

    geom = _geometry_from_lists(input_size, weight.shape, stride, padding, dilation)
    if activation:
        grad_output = like_layout(grad_output, output)
    grad_input = _empty_output(grad_output, input_size, channels_last, dtype=weight.dtype)
    grid = lambda meta: (triton.cdiv(geom.n * geom.h * geom.w, meta["BLOCK_P"]),  # noqa: E731
                         triton.cdiv(geom.c_in, meta["BLOCK_C"]))
    kernels.depthwise_bwd_input[grid](
        grad_output, output if activation else grad_output, weight, grad_input,
        geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier,
        *_strides(grad_output), weight.stride(0), weight.stride(2), weight.stride(3), *_strides(grad_input),
        *geom.conv_args(),
        KH=geom.kh, KW=geom.kw, ACTIVATION=activation, ACC=_tl_acc(weight.dtype))
    return grad_input


@depthwise_conv2d_bwd_input.register_fake
def _(grad_output, output, weight, input_size, channels_last, stride, padding, dilation, activation):
    return _empty_output(grad_output, input_size, channels_last, dtype=weight.dtype)


@torch.library.custom_op("vhist::depthwise_conv2d_bwd_weight", mutates_args=())
def depthwise_conv2d_bwd_weight(
    grad_output: torch.Tensor,
    output: Optional[torch.Tensor],
    input: torch.Tensor,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (and bias) gradient: a two-stage, deterministic reduction over N*OH*OW.

    Returns:
        ``(grad_weight, grad_bias)``; grad_bias is empty unless ``has_bias``.
    """
    return _bwd_weight_impl(grad_output, output, input, weight_size, stride, padding, dilation, activation,
                            has_bias)


def _bwd_weight_impl(grad_output, output, input, weight_size, stride, padding, dilation, activation, has_bias):
    from vhist.kernels import depthwise as kernels

    geom = _geometry_from_lists(input.shape, weight_size, stride, padding, dilation)
    if activation:
        grad_output = like_layout(grad_output, output)
    acc, tl_acc = acc_dtype(input.dtype), _tl_acc(input.dtype)
    chunk, chunks = _weight_chunks(geom.n * geom.oh * geom.ow, geom.c_out, input.device)
    taps = geom.kh * geom.kw + int(has_bias)
    part = input.new_empty((chunks, taps, geom.c_out), dtype=acc)
    grad_weight = input.new_empty(weight_size)
    grad_bias = input.new_empty((geom.c_out,) if has_bias else (0,))
    block_p, block_c, num_warps = kernels.weight_grad_tiling(geom.kh, geom.kw, _channels_last(input))
    kernels.depthwise_bwd_weight_reduce[(triton.cdiv(geom.c_out, block_c), chunks)](
        grad_output, output if activation else grad_output, input, part,
        geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier, chunk,
        *_strides(grad_output), *_strides(input), *geom.conv_args(),
        KH=geom.kh, KW=geom.kw, HAS_BIAS=has_bias, ACTIVATION=activation, ACC=tl_acc,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    block_j = 128
    kernels.depthwise_bwd_weight_finalize[(triton.cdiv(taps * geom.c_out, block_j),)](
        part, grad_weight, grad_bias if has_bias else grad_weight, geom.c_out, chunks,
        grad_weight.stride(0), grad_weight.stride(2), grad_weight.stride(3),
        KH=geom.kh, KW=geom.kw, HAS_BIAS=has_bias, ACC=tl_acc, BLOCK_J=block_j, BLOCK_K=16)
    return grad_weight, grad_bias


@depthwise_conv2d_bwd_weight.register_fake
def _(grad_output, output, input, weight_size, stride, padding, dilation, activation, has_bias):
    c_out = weight_size[0]
    return input.new_empty(weight_size), input.new_empty((c_out,) if has_bias else (0,))


def _activation_mask_grad(grad: torch.Tensor, output: torch.Tensor, activation: int) -> torch.Tensor:
    """dy * act'(output) with PyTorch's conventions (the residual's gradient)."""
    if activation == 1:
        return torch.where(output > 0, grad, 0)
    if activation == 2:
        return torch.where((output > 0) & (output < 6), grad, 0)
    return grad


class DepthwiseConv2dFunction(torch.autograd.Function):
    """Autograd for ``act(depthwise_conv2d(input, weight, bias) + residual)`` on one
    backend's three custom ops (``ops`` = (fwd, bwd_input, bwd_weight)). Saves the input,
    the weight and, with an activation, the output (for its mask)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, stride, padding, dilation, activation, ops):
        fwd, _, _ = ops
        output = fwd(input, weight, bias, residual, stride, padding, dilation, activation)
        ctx.save_for_backward(input, weight, output if activation else None)
        ctx.conf = (stride, padding, dilation, activation, ops)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        stride, padding, dilation, activation, (_, bwd_input, bwd_weight) = ctx.conf
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        grad_input = grad_weight = grad_bias = grad_residual = None
        if need_dx:
            grad_input = bwd_input(grad_output, output, weight, list(input.shape), _channels_last(input),
                                   stride, padding, dilation, activation)
        if need_dw or need_db:
            grad_weight, grad_bias = bwd_weight(grad_output, output, input, list(weight.shape), stride, padding,
                                                dilation, activation, ctx.has_bias)
            grad_weight = grad_weight if need_dw else None
            grad_bias = grad_bias.to(ctx.bias_dtype) if need_db and ctx.has_bias else None
        if need_dres:
            grad_residual = _activation_mask_grad(grad_output, output, activation)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None


TRITON_OPS = (lambda *a: torch.ops.vhist.depthwise_conv2d_fwd(*a),
              lambda *a: torch.ops.vhist.depthwise_conv2d_bwd_input(*a),
              lambda *a: torch.ops.vhist.depthwise_conv2d_bwd_weight(*a))


# ----------------------------------------------------------------------------- cuda launchers


def _cuda_extension():
    from vhist.ops._cuda_ext import csrc_path, load_extension

    return load_extension("depthwise", [csrc_path("depthwise/depthwise.cpp"),
                                        csrc_path("depthwise/depthwise_kernel.cu")])


def _no_epilogue(residual, activation):
    if residual is not None or activation:
        raise NotImplementedError(f"{OP}: the cuda kernels have no residual/activation epilogue")


@torch.library.custom_op("vhist::depthwise_conv2d_cuda_fwd", mutates_args=())
def depthwise_conv2d_cuda_fwd(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              residual: Optional[torch.Tensor], stride: list[int], padding: list[int],
                              dilation: list[int], activation: int) -> torch.Tensor:
    """Forward on the CUDA C++ kernel (same contract as ``vhist::depthwise_conv2d_fwd``
    without the residual/activation epilogue)."""
    _no_epilogue(residual, activation)
    return _cuda_extension().fwd(input, weight, bias, stride, padding, dilation)


@depthwise_conv2d_cuda_fwd.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, activation):
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    return _empty_output(input, (geom.n, geom.c_out, geom.oh, geom.ow), _channels_last(input))


@torch.library.custom_op("vhist::depthwise_conv2d_cuda_bwd_input", mutates_args=())
def depthwise_conv2d_cuda_bwd_input(grad_output: torch.Tensor, output: Optional[torch.Tensor], weight: torch.Tensor,
                                    input_size: list[int], channels_last: bool, stride: list[int],
                                    padding: list[int], dilation: list[int], activation: int) -> torch.Tensor:
    """Input gradient on the CUDA C++ kernel (a gather, no atomics)."""
    _no_epilogue(None, activation)
    return _cuda_extension().bwd_input(grad_output, weight, input_size, channels_last, stride, padding, dilation)


@depthwise_conv2d_cuda_bwd_input.register_fake
def _(grad_output, output, weight, input_size, channels_last, stride, padding, dilation, activation):
    return _empty_output(grad_output, input_size, channels_last, dtype=weight.dtype)


@torch.library.custom_op("vhist::depthwise_conv2d_cuda_bwd_weight", mutates_args=())
def depthwise_conv2d_cuda_bwd_weight(grad_output: torch.Tensor, output: Optional[torch.Tensor], input: torch.Tensor,
                                     weight_size: list[int], stride: list[int], padding: list[int],
                                     dilation: list[int], activation: int,
                                     has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (and bias) gradient on the CUDA C++ kernels: the same deterministic two-stage
    reduction (chunks fixed by the shape) as the Triton backend."""
    _no_epilogue(None, activation)
    geom = _geometry_from_lists(input.shape, weight_size, stride, padding, dilation)
    chunk, chunks = _weight_chunks(geom.n * geom.oh * geom.ow, geom.c_out, input.device)
    grad_weight, grad_bias = _cuda_extension().bwd_weight(grad_output, input, weight_size, stride, padding, dilation,
                                                          has_bias, chunk, chunks)
    return grad_weight, grad_bias


@depthwise_conv2d_cuda_bwd_weight.register_fake
def _(grad_output, output, input, weight_size, stride, padding, dilation, activation, has_bias):
    c_out = weight_size[0]
    return input.new_empty(weight_size), input.new_empty((c_out,) if has_bias else (0,))


CUDA_OPS = (lambda *a: torch.ops.vhist.depthwise_conv2d_cuda_fwd(*a),
            lambda *a: torch.ops.vhist.depthwise_conv2d_cuda_bwd_input(*a),
            lambda *a: torch.ops.vhist.depthwise_conv2d_cuda_bwd_weight(*a))


# ----------------------------------------------------------------------------- public ops


def _check_inputs(input, weight, bias, stride, padding, dilation, op=OP) -> DepthwiseGeometry:
    check_same_device(op, input=input, weight=weight, bias=bias)
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        check_float_dtype(op, name, t)
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: input ({input.dtype}) and weight ({weight.dtype}) must have one dtype")
    geom = depthwise_geometry(input.shape, weight.shape, stride, padding, dilation, op)
    if bias is not None and tuple(bias.shape) != (geom.c_out,):
        raise ValueError(f"{op}: bias must have shape ({geom.c_out},), got {tuple(bias.shape)}")
    return geom


def _dense(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides; only overlapping or negative-stride views are copied.
    return x if (x.is_contiguous() or is_channels_last_dense(x)) else x.contiguous()


def _depthwise_triton(input, weight, bias, geom: DepthwiseGeometry, ops=TRITON_OPS):
    return DepthwiseConv2dFunction.apply(_dense(input), weight, bias, None, list(geom.stride),
                                         list(geom.padding), list(geom.dilation), 0, ops)


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Depthwise conv2d: ``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C_in)``.

    Args:
        input: (N, C_in, H, W), channels-last (fast path) or contiguous; fp32, fp16, bf16
            or fp64.
        weight: (C_in * multiplier, 1, KH, KW), multiplier >= 1, same dtype as input.
        bias: optional (C_in * multiplier,).
        stride, dilation: int or pair, >= 1.
        padding: int or pair >= 0, or "same" (stride 1) or "valid".

    Returns:
        (N, C_in * multiplier, OH, OW), in the input's memory format.
    """
    input, weight, bias = autocast_inputs(input, weight, bias)
    geom = _check_inputs(input, weight, bias, stride, padding, dilation)
    impl = dispatch(OP, IMPLS, input.device)
    if impl is reference.depthwise_conv2d:
        return impl(input, weight, bias, stride, padding, dilation)
    return impl(input, weight, bias, geom)



def _depthwise_cuda(input, weight, bias, geom: DepthwiseGeometry):
    if input.device.type != "cuda":
        raise RuntimeError(f"{OP}: the cuda backend needs CUDA tensors, got a tensor on {input.device}")
    if input.dtype == torch.float64:
        raise TypeError(f"{OP}: the cuda backend takes float32, float16 or bfloat16 (float64 runs on the "
                        "triton backend)")
    _cuda_extension()  # build (or fail with the reason) before autograd sees the call
    return _depthwise_triton(input, weight, bias, geom, ops=CUDA_OPS)


IMPLS = {"triton": _depthwise_triton, "cuda": _depthwise_cuda, "torch": reference.depthwise_conv2d}


# ----------------------------------------------------------------------------- fused depthwise + BN + act


@torch.library.custom_op("vhist::fused_depthwise_bn_act_fwd", mutates_args=("running_mean", "running_var"))
def fused_depthwise_bn_act_fwd(
    input: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    momentum: float,
    eps: float,
    activation: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of depthwise conv + BN (batch statistics) + residual + activation.

    The depthwise kernel's epilogue writes the conv output and one (count, mean, M2)
    partial per pixel tile; BatchNorm's finalize kernel merges them (Chan) and updates the
    running statistics; BatchNorm's apply kernel does scale, shift, residual and
    activation in one pass.

    Returns:
        ``(output, conv_output, mean, rstd)``; the statistics in the accumulation dtype.
    """
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    acc, c = acc_dtype(input.dtype), geom.c_out
    conv_out = _empty_output(input, (geom.n, c, geom.oh, geom.ow), _channels_last(input))
    _, tiles = _fwd_tiling(geom, True)
    part_mean, part_m2 = input.new_empty((tiles, c), dtype=acc), input.new_empty((tiles, c), dtype=acc)
    part_count = input.new_empty((tiles,), dtype=acc)
    _launch_fwd(input, weight, None, None, geom, 0, conv_out, stats=(part_mean, part_m2, part_count))
    mean, rstd = bn_finalize(part_mean, part_m2, part_count, running_mean, running_var, momentum, eps)
    out = bn_apply(conv_out, mean, rstd, bn_weight, bn_bias, eps, residual=residual, activation=activation)
    return out, conv_out, mean, rstd


@fused_depthwise_bn_act_fwd.register_fake
def _(input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
      momentum, eps, activation):
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    shape = (geom.n, geom.c_out, geom.oh, geom.ow)
    acc = acc_dtype(input.dtype)
    cl = _channels_last(input)
    return (_empty_output(input, shape, cl), _empty_output(input, shape, cl),
            input.new_empty((geom.c_out,), dtype=acc), input.new_empty((geom.c_out,), dtype=acc))


@torch.library.custom_op("vhist::fused_depthwise_bn_act_bwd", mutates_args=())
def fused_depthwise_bn_act_bwd(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    conv_output: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    eps: float,
    activation: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training backward of :func:`fused_depthwise_bn_act_fwd`.

    BatchNorm's reduce kernel recomputes the activation mask from the conv output, the
    statistics and the residual and sums dz and dz * x_hat per channel; its dx kernel
    writes dy_conv (and dresidual); the depthwise input- and weight-gradient kernels
    then consume dy_conv.

    Args:
        output_mask: which of (input, weight, bn_weight, bn_bias, residual) need gradients.

    Returns:
        The five gradients, an entry not asked for empty.
    """
    want_dx, want_dw, want_dgamma, want_dbeta, want_dres = output_mask
    _, _, dgamma, dbeta = sums = bn_grad_sums(
        grad_output, conv_output, mean, rstd, bn_weight, bn_bias, eps, residual=residual, activation=activation,
        want_dweight=want_dgamma, want_dbias=want_dbeta)
    dx, dw, dres = input.new_empty((0,)), input.new_empty((0,)), input.new_empty((0,))
    if want_dx or want_dw or want_dres:
        dy_conv, dres = bn_grad_input(grad_output, conv_output, mean, rstd, bn_weight, bn_bias, *sums[:2], eps,
                                      residual=residual, activation=activation, want_dresidual=want_dres)
        if want_dx:
            dx = _bwd_input_impl(dy_conv, None, weight, list(input.shape), _channels_last(input),
                                 stride, padding, dilation, 0)
        if want_dw:
            dw, _ = _bwd_weight_impl(dy_conv, None, input, list(weight.shape), stride, padding, dilation, 0,
                                     False)
    return dx, dw, dgamma, dbeta, dres


@fused_depthwise_bn_act_bwd.register_fake
def _(grad_output, input, weight, conv_output, mean, rstd, bn_weight, bn_bias, residual, stride, padding,
      dilation, eps, activation, output_mask):
    c = weight.shape[0]
    empty = input.new_empty((0,))
    return (_empty_output(input, input.shape, _channels_last(input)) if output_mask[0] else empty,
            input.new_empty(weight.shape) if output_mask[1] else empty,
            input.new_empty((c,), dtype=bn_weight.dtype) if output_mask[2] and bn_weight is not None else empty,
            input.new_empty((c,), dtype=bn_bias.dtype) if output_mask[3] and bn_bias is not None else empty,
            torch.empty_like(conv_output) if output_mask[4] else empty)


class FusedDepthwiseBNActFunction(torch.autograd.Function):
    """Autograd for the training fused op. Saves the input, the weight, the conv output and
    (mean, rstd), plus the residual the caller holds anyway; never a normalized or a
    post-activation copy."""

    @staticmethod
    def forward(ctx, input, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                stride, padding, dilation, momentum, eps, activation):
        out, conv_out, mean, rstd = torch.ops.vhist.fused_depthwise_bn_act_fwd(
            input, weight, bn_weight, bn_bias, running_mean, running_var, residual,
            stride, padding, dilation, momentum, eps, activation)
        ctx.save_for_backward(input, weight, conv_out, mean, rstd, bn_weight, bn_bias, residual)
        ctx.args = (stride, padding, dilation, eps, activation)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, conv_out, mean, rstd, bn_weight, bn_bias, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[6]]
        dx, dw, dgamma, dbeta, dres = torch.ops.vhist.fused_depthwise_bn_act_bwd(
            grad_output, input, weight, conv_out, mean, rstd, bn_weight, bn_bias, residual, *ctx.args, mask)
        return (dx if mask[0] else None, dw if mask[1] else None,
                dgamma if mask[2] and bn_weight is not None else None,
                dbeta if mask[3] and bn_bias is not None else None,
                None, None, dres if mask[4] else None,
                None, None, None, None, None, None)


def _fused_triton(input, weight, bn_weight, bn_bias, running_mean, running_var, geom: DepthwiseGeometry, *,
                  training, momentum, eps, activation, residual):
    from vhist.ops.conv import fold_bn

    input = _dense(input)
    code = ACTIVATION_CODES[activation]
    args = (list(geom.stride), list(geom.padding), list(geom.dilation))
    if training:
        return FusedDepthwiseBNActFunction.apply(input, weight, bn_weight, bn_bias, running_mean, running_var,
                                                 residual, *args, momentum, eps, code)
    # Eval: BN folded into the depthwise weight and a bias (new tensors; autograd flows
    # through the fold), activation and residual in the conv epilogue: one kernel.
    folded_weight, folded_bias = fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps)
    return DepthwiseConv2dFunction.apply(input, folded_weight, folded_bias, residual, *args, code, TRITON_OPS)


FUSED_IMPLS = {"triton": _fused_triton, "torch": reference.fused_depthwise_bn_act}


def _check_fused_inputs(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                        dilation, training, activation, residual) -> DepthwiseGeometry:
    geom = _check_inputs(input, weight, None, stride, padding, dilation, FUSED_OP)
    activation_code(FUSED_OP, activation)
    check_same_device(FUSED_OP, input=input, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                      running_var=running_var, residual=residual)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_float_dtype(FUSED_OP, name, t)
        if t is not None and tuple(t.shape) != (geom.c_out,):
            raise ValueError(f"{FUSED_OP}: {name} must have shape ({geom.c_out},) to match the conv's "
                             f"{geom.c_out} output channels, got {tuple(t.shape)}")
    out_shape = (geom.n, geom.c_out, geom.oh, geom.ow)
    if residual is not None:
        check_float_dtype(FUSED_OP, "residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"{FUSED_OP}: residual must have the output's shape {out_shape}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{FUSED_OP}: residual ({residual.dtype}) must have the input's dtype ({input.dtype})")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{FUSED_OP}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{FUSED_OP}: running_mean and running_var must be given in eval mode")
    if training and geom.n * geom.oh * geom.ow <= 1:
        raise ValueError(f"{FUSED_OP}: expected more than 1 value per channel when training, got a conv "
                         f"output of shape {out_shape}")
    return geom


def fused_depthwise_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                           padding=0, dilation=1, training=True, momentum=0.1, eps=1e-5,
                           activation: Optional[str] = "relu6", residual: Optional[torch.Tensor] = None):
    """``act(batch_norm(depthwise_conv2d(input, weight)) + residual)`` as one op, with the
    argument conventions of :func:`vhist.ops.fused_conv_bn_relu` (MobileNet's dw-BN-ReLU6).

    Training computes the BN statistics in the depthwise kernel's epilogue (per-tile
    count/mean/M2, merged with Chan's formula), updates the running statistics, and
    applies scale, shift, residual and activation in one pass; eval folds BN into the
    depthwise weights and a bias and runs a single depthwise kernel with the activation
    in its epilogue.

    Args:
        input: (N, C_in, H, W), channels_last (fast path) or contiguous.
        weight: (C_in * multiplier, 1, KH, KW) depthwise weight (the conv has no bias).
        bn_weight, bn_bias: optional (C_out,) BatchNorm affine parameters.
        running_mean, running_var: (C_out,) buffers, updated in place when training; or
            None to always use batch statistics (training only).
        stride, padding, dilation: as :func:`depthwise_conv2d`.
        training: batch statistics (and running-stat update) or the running ones.
        momentum, eps: as ``F.batch_norm``.
        activation: "relu", "relu6" or None.
        residual: optional tensor of the output's shape added before the activation.

    Returns:
        (N, C_out, OH, OW) in the input's memory format.
    """
    input, weight, residual = autocast_inputs(input, weight, residual)
    geom = _check_fused_inputs(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                               dilation, training, activation, residual)
    impl = dispatch(FUSED_OP, FUSED_IMPLS, input.device)
    kwargs = dict(training=training, momentum=momentum, eps=eps, activation=activation, residual=residual)
    if impl is reference.fused_depthwise_bn_act:
        return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                    padding=padding, dilation=dilation, **kwargs)
    return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, geom, **kwargs)
