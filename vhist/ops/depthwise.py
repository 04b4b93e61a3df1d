"""Depthwise conv2d and its fused BatchNorm + activation variant (MobileNet).

Backends: ``triton`` (kernels/depthwise.py), ``cuda`` (csrc/depthwise/) and ``torch``
(the reference). The Triton passes are registered as the custom ops
``vhist::depthwise_conv2d_fwd``, ``vhist::depthwise_conv2d_bwd_input`` and
``vhist::depthwise_conv2d_bwd_weight`` (the CUDA ones as ``vhist::depthwise_conv2d_cuda_*``),
each with a fake implementation so ``torch.compile`` traces them, and tied together by
:class:`DepthwiseConv2dFunction`. The fused op ``vhist::fused_depthwise_bn_act_fwd`` /
``_bwd`` is the scaffold of :mod:`vhist.ops.fused_bn` on the depthwise passes: training
runs under :class:`~vhist.ops.fused_bn.FusedConvBNFunction`, eval is the folded
depthwise conv (BN folded into the weights, activation and residual in the epilogue).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from vhist import reference
from vhist.ops import heuristics
from vhist.ops._dispatch import autocast_inputs, check_float_dtype, check_same_device, dispatch
from vhist.ops.common import cdiv
from vhist.ops.common import (DEFAULT_NEGATIVE_SLOPE, OUTPUT_GRAD_CODES, acc_dtype, activation_code,
                              activation_constexprs, activation_grad, channels_last_strides, check_negative_slope,
                              contiguous_strides, dense_layout, empty_4d, is_channels_last, kernel_slope, like_layout,
                              op_outputs, or_placeholder, partial_buffers)
# The weight-gradient launcher below calls these two under their former private names.
from vhist.ops.common import sm_count as _sm_count
from vhist.ops.common import tl_acc as _tl_acc
from vhist.ops.conv_common import ConvGeometryBase, op_lists_key, positive_pair, resolve_padding
from vhist.ops.fused_bn import ConvPasses, check_fused_args, define_fused_ops, run_fused_triton
from vhist.ops.launch_cache import Launch, lookup, new_cache, scratch, shape_cached
from vhist.ops.op_call import custom_op

OP = "depthwise_conv2d"
FUSED_OP = "fused_depthwise_bn_act"
FWD_BLOCK_P = heuristics.DEPTHWISE_FWD_BLOCK_P  # output pixels per forward tile


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class DepthwiseGeometry(ConvGeometryBase):
    """Sizes of a depthwise conv (:class:`ConvGeometryBase`; groups = C_in)."""

    @property
    def multiplier(self) -> int:
        return self.c_out // self.c_in

    def conv_args(self) -> tuple:
        """(conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w) as the kernels take
        them (begin padding only)."""
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
    stride, dilation = positive_pair(op, "stride", stride), positive_pair(op, "dilation", dilation)
    pads = resolve_padding(op, padding, stride, dilation, kh, kw)
    geom = DepthwiseGeometry(n, c_in, h, w, c_out, kh, kw, stride, pads, dilation)
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(input_shape)}")
    if geom.oh < 1 or geom.ow < 1:
        raise ValueError(f"{op}: the output would be empty ({geom.oh} x {geom.ow}) for input "
                         f"{tuple(input_shape)}, kernel {kh} x {kw}, stride {stride!r}, padding "
                         f"{padding!r}, dilation {dilation!r}")
    return geom


@shape_cached(key=op_lists_key)
def _geometry_from_lists(input_shape, weight_shape, stride, padding, dilation, groups=None) -> DepthwiseGeometry:
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    return DepthwiseGeometry(n, c_in, h, w, c_out, kh, kw, tuple(stride), tuple(padding), tuple(dilation))


def _channels_last(x: torch.Tensor) -> bool:
    """Whether the kernels see ``x`` as NHWC (:func:`vhist.ops.common.is_channels_last`)."""
    return is_channels_last(x)


def _empty_output(like: torch.Tensor, shape, channels_last: bool, dtype=None) -> torch.Tensor:
    return empty_4d(shape, like, channels_last, dtype)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def taps_major(weight: torch.Tensor, geom: DepthwiseGeometry) -> torch.Tensor:
    """The depthwise weight (C_out, 1, KH, KW) copied once per call to (KH*KW, C_out),
    channels contiguous (the kernels take it with :func:`_taps_major_strides`): a tap's
    weights for a tile of channels are then one 16-byte load per thread, not KH*KW-strided
    scalar loads."""
    return weight.reshape(geom.c_out, geom.kh * geom.kw).t().contiguous()


def _taps_major_strides(geom: DepthwiseGeometry) -> tuple[int, int, int]:
    """The (channel, kh, kw) strides of :func:`taps_major`'s copy."""
    return 1, geom.kw * geom.c_out, geom.c_out


def weight_chunks(pixels: int, c_out: int, device: torch.device) -> tuple[int, int]:
    """Split of the N*OH*OW reduction of the weight gradient: (chunk length, chunks).
    Depends only on the shape and the device, so the summation order is fixed."""
    c_blocks = cdiv(c_out, 64)
    chunks = cdiv(4 * _sm_count(device), c_blocks)
    chunks = max(min(chunks, cdiv(pixels, 256)), cdiv(pixels, 32768), 1)
    chunk = cdiv(cdiv(pixels, chunks), 128) * 128
    return chunk, cdiv(pixels, chunk)


# ----------------------------------------------------------------------------- triton launchers


def _fwd_launch(geom: DepthwiseGeometry, dtype, x_strides, out_strides, has_bias, has_residual, activation,
                negative_slope, write_pre, stats, device) -> tuple[Launch, int]:
    """The forward launch and its programs along the pixel axis (with ``stats``, the
    number of BN partials it writes)."""
    from vhist.kernels import depthwise as kernels

    tiles_per_program, programs = heuristics.depthwise_fwd_tiling(geom.positions, stats)
    grid = lambda meta: (programs, cdiv(geom.c_out, meta["BLOCK_C"]))  # noqa: E731
    return Launch(kernels.depthwise_fwd, grid,
                  (geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier,
                   tiles_per_program, *x_strides, *_taps_major_strides(geom), *out_strides, *geom.conv_args()),
                  KH=geom.kh, KW=geom.kw, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, STATS=stats,
                  WRITE_PRE=write_pre, **activation_constexprs(activation, negative_slope), ACC=_tl_acc(dtype),
                  BLOCK_P=FWD_BLOCK_P), programs


_FWD_LAUNCHES = new_cache()


def _launch_fwd(input, weight, bias, residual, geom: DepthwiseGeometry, activation: int, output,
                stats: bool = False, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                pre: Optional[torch.Tensor] = None):
    """Runs the forward into ``output`` (and the pre-activation into ``pre``, a tensor
    like ``output``, when given). Returns the BN partials (mean, M2, count) in the
    accumulation dtype when ``stats`` (the launch's scratch,
    :func:`vhist.ops.launch_cache.scratch`: merged before the next call of the same shape),
    else None."""
    key = (geom, input.dtype, input.stride(), output.stride(), bias is not None, residual is not None, activation,
           kernel_slope(activation, negative_slope), pre is not None, stats, input.device)
    launch, programs = lookup(_FWD_LAUNCHES, key, _fwd_launch, *key)
    if stats:
        part = scratch(launch.scratch, input, lambda: partial_buffers(programs, geom.c_out, input, counts=True))
    else:
        part = (output, output, output)
    weight = taps_major(weight, geom)
    launch(input, weight, or_placeholder(bias, weight), or_placeholder(residual, output), output,
           or_placeholder(pre, output), *part)
    return part if stats else None


@custom_op("vhist::depthwise_conv2d_fwd", mutates_args=())
def depthwise_conv2d_fwd(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the depthwise conv on the Triton kernel: ``act(conv + bias + residual)``.

    Args:
        padding: (top, bottom, left, right).
        activation: a :class:`~vhist.ops.common.Activation` code; negative_slope: leaky relu's.

    Returns:
        ``(output, pre_activation)``, channels-last when the input is, contiguous
        otherwise; the pre-activation (what the backward reads for an activation outside
        :data:`~vhist.ops.common.OUTPUT_GRAD_CODES`) is empty for the others.
    """
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    output = _empty_output(input, geom.out_shape, _channels_last(input))
    pre = None if activation in OUTPUT_GRAD_CODES else torch.empty_like(output)
    if residual is not None:
        residual = like_layout(residual, output)
    _launch_fwd(input, weight, bias, residual, geom, activation, output, negative_slope=negative_slope, pre=pre)
    return op_outputs(input, output, pre)


@custom_op("vhist::depthwise_conv2d_bwd_input", mutates_args=())
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
    negative_slope: float,
) -> torch.Tensor:
    """Input gradient (a gather over the taps that reach each input pixel).

    Args:
        output: what the forward saved for the activation (``activation`` != 0): its
            output for ReLU / ReLU6, its pre-activation otherwise.
        input_size, channels_last: shape and memory format of the forward input.

    Returns:
        grad_input, in the forward input's memory format.
    """
    return _bwd_input_impl(grad_output, output, weight, input_size, channels_last, stride, padding, dilation,
                           activation, negative_slope)


def _bwd_input_launch(geom: DepthwiseGeometry, dtype, grad_strides, channels_last, activation,
                      negative_slope, device) -> Launch:
    from vhist.kernels import depthwise as kernels

    grid = lambda meta: (cdiv(geom.n * geom.h * geom.w, meta["BLOCK_P"]),  # noqa: E731
                         cdiv(geom.c_in, meta["BLOCK_C"]))
    input_shape = (geom.n, geom.c_in, geom.h, geom.w)
    dx_strides = channels_last_strides(input_shape) if channels_last else contiguous_strides(input_shape)
    return Launch(kernels.depthwise_bwd_input, grid,
                  (geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier, *grad_strides,
                   *_taps_major_strides(geom), *dx_strides, *geom.conv_args()),
                  KH=geom.kh, KW=geom.kw, **activation_constexprs(activation, negative_slope), ACC=_tl_acc(dtype))


_BWD_INPUT_LAUNCHES = new_cache()


def _bwd_input_impl(grad_output, output, weight, input_size, channels_last, stride, padding, dilation,
                    activation, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    geom = _geometry_from_lists(input_size, weight.shape, stride, padding, dilation)
    if activation:
        grad_output = like_layout(grad_output, output)
    key = (geom, weight.dtype, grad_output.stride(), channels_last, activation,
           kernel_slope(activation, negative_slope), grad_output.device)
    launch = lookup(_BWD_INPUT_LAUNCHES, key, _bwd_input_launch, *key)
    grad_input = _empty_output(grad_output, input_size, channels_last, dtype=weight.dtype)
    launch(grad_output, output if activation else grad_output, taps_major(weight, geom), grad_input)
    return grad_input


@custom_op("vhist::depthwise_conv2d_bwd_weight", mutates_args=())
def depthwise_conv2d_bwd_weight(
    grad_output: torch.Tensor,
    output: Optional[torch.Tensor],
    input: torch.Tensor,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    negative_slope: float,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (and bias) gradient: a two-stage, deterministic reduction over N*OH*OW.

    Returns:
        ``(grad_weight, grad_bias)``; grad_bias is empty unless ``has_bias``.
    """
    return _bwd_weight_impl(grad_output, output, input, weight_size, stride, padding, dilation, activation,
                            has_bias, negative_slope)


@dataclass(frozen=True)
class _WeightGradPlan:
    """The launches of a weight gradient (:func:`_bwd_weight_impl`, :func:`_bwd_impl`):
    the pass writing (chunks, taps, C_out) partials, the merge levels of the tree that
    sums them (:func:`vhist.ops.heuristics.merge_levels`) and its finalize."""

    chunks: int
    taps: int
    grad: Launch
    merges: tuple  # (Launch, groups) per merge level
    finalize: Launch
    scratch: dict = field(default_factory=dict, compare=False, repr=False)  # the partials (launch_cache.scratch)

    def partials(self, input: torch.Tensor, c_out: int) -> tuple:
        """The (chunks, taps, C_out) partials buffer and one (groups, taps, C_out) buffer
        per merge level, in the accumulation dtype."""
        acc = acc_dtype(input.dtype)
        return scratch(self.scratch, input, lambda: tuple(
            input.new_empty((rows, self.taps, c_out), dtype=acc)
            for rows in (self.chunks, *(groups for _, groups in self.merges))))

    def reduce(self, parts: tuple, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
        """Sums the first stage's partials (``parts[0]``) level by level, then writes the
        weight (and bias) gradient."""
        for (merge, _), src, dst in zip(self.merges, parts, parts[1:]):
            merge(src, dst)
        self.finalize(parts[-1], grad_weight, grad_bias)


def _reduce_launches(geom: DepthwiseGeometry, chunks: int, has_bias: bool, tl_acc) -> tuple[tuple, Launch]:
    """Stage 2 of the weight gradient: the (chunks, taps, C_out) partials summed in a tree
    of fan-in ``DEPTHWISE_WGRAD_MERGE_GROUP`` (the merge levels, each ordered by chunk),
    then into the weight (and bias) gradient, (C_out, 1, KH, KW) contiguous."""
    from vhist.kernels import depthwise as kernels

    taps = geom.kh * geom.kw + int(has_bias)
    block_j, block_k = heuristics.DEPTHWISE_WGRAD_MERGE_BLOCK_J, heuristics.DEPTHWISE_WGRAD_MERGE_BLOCK_K
    group, j_blocks = heuristics.DEPTHWISE_WGRAD_MERGE_GROUP, cdiv(taps * geom.c_out, block_j)
    merges = []
    for num in heuristics.merge_levels(chunks, group):
        groups = cdiv(num, group)
        merges.append((Launch(kernels.depthwise_bwd_weight_merge, (j_blocks, groups), (taps * geom.c_out, num, group),
                              ACC=tl_acc, BLOCK_J=block_j, BLOCK_K=block_k), groups))
        chunks = groups
    finalize = Launch(kernels.depthwise_bwd_weight_finalize, (j_blocks,),
                      (geom.c_out, chunks, geom.kh * geom.kw, geom.kw, 1), KH=geom.kh, KW=geom.kw, HAS_BIAS=has_bias,
                      ACC=tl_acc, BLOCK_J=block_j, BLOCK_K=block_k)
    return tuple(merges), finalize


def _weight_grad_plan(geom: DepthwiseGeometry, dtype, grad_strides, x_strides, channels_last, activation,
                      negative_slope, has_bias, device) -> _WeightGradPlan:
    from vhist.kernels import depthwise as kernels

    tl_acc = _tl_acc(dtype)
    chunk, chunks = weight_chunks(geom.n * geom.oh * geom.ow, geom.c_out, device)
    block_p, block_c, num_warps = kernels.weight_grad_tiling(geom.kh, geom.kw, channels_last)
    grad = Launch(kernels.depthwise_bwd_weight_reduce, (cdiv(geom.c_out, block_c), chunks),
                  (geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier, chunk,
                   *grad_strides, *x_strides, *geom.conv_args()),
                  KH=geom.kh, KW=geom.kw, HAS_BIAS=has_bias, **activation_constexprs(activation, negative_slope),
                  ACC=tl_acc, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return _WeightGradPlan(chunks, geom.kh * geom.kw + int(has_bias), grad,
                           *_reduce_launches(geom, chunks, has_bias, tl_acc))


_WEIGHT_GRAD_PLANS = new_cache()


def _bwd_weight_impl(grad_output, output, input, weight_size, stride, padding, dilation, activation, has_bias,
                     negative_slope=DEFAULT_NEGATIVE_SLOPE):
    geom = _geometry_from_lists(input.shape, weight_size, stride, padding, dilation)
    if activation:
        grad_output = like_layout(grad_output, output)
    key = (geom, input.dtype, grad_output.stride(), input.stride(), _channels_last(input), activation,
           kernel_slope(activation, negative_slope), has_bias, input.device)
    plan = lookup(_WEIGHT_GRAD_PLANS, key, _weight_grad_plan, *key)
    parts = plan.partials(input, geom.c_out)
    grad_weight = input.new_empty(weight_size)
    grad_bias = input.new_empty((geom.c_out,) if has_bias else (0,))
    plan.grad(grad_output, output if activation else grad_output, input, parts[0])
    plan.reduce(parts, grad_weight, grad_bias if has_bias else grad_weight)
    return grad_weight, grad_bias


@custom_op("vhist::depthwise_conv2d_bwd", mutates_args=())
def depthwise_conv2d_bwd(grad_output: torch.Tensor, output: Optional[torch.Tensor], input: torch.Tensor,
                         weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                         activation: int, negative_slope: float,
                         has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, weight (and bias) gradients from one read of dy (the gather of
    ``vhist::depthwise_conv2d_bwd_input`` feeding both), the weight gradient reduced in
    two deterministic stages.

    Args:
        output: as ``vhist::depthwise_conv2d_bwd_input``'s.

    Returns:
        ``(grad_input, grad_weight, grad_bias)``: grad_input in the forward input's memory
        format; grad_bias empty unless ``has_bias``.
    """
    return _bwd_impl(grad_output, output, input, weight, stride, padding, dilation, activation, has_bias,
                     negative_slope)


def _gather_grid(geom: DepthwiseGeometry) -> tuple[int, int]:
    """(GH, GW) of :func:`vhist.kernels.depthwise._depthwise_bwd_kernel`'s gather grid: the
    input with its begin padding and every row / column past the image a tap of an output
    reaches (the end padding the conv uses), so that the weight gradient sums dy * 0 over
    the padding as PyTorch's conv backward does."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    top, left = geom.padding[0], geom.padding[2]
    last_h = (geom.oh - 1) * sh - top + (geom.kh - 1) * dh
    last_w = (geom.ow - 1) * sw - left + (geom.kw - 1) * dw
    return top + max(geom.h, last_h + 1), left + max(geom.w, last_w + 1)


def _input_weight_grad_plan(geom: DepthwiseGeometry, dtype, grad_strides, x_strides, channels_last, activation,
                            negative_slope, has_bias, device) -> _WeightGradPlan:
    from vhist.kernels import depthwise as kernels

    tl_acc = _tl_acc(dtype)
    block_j, block_p, block_c, num_warps = kernels.input_weight_grad_tiling(geom.kh, geom.kw, geom.multiplier,
                                                                            channels_last)
    # Chunks of the gather grid's pixels, and as many chunks of output pixels for db.
    grid_h, grid_w = _gather_grid(geom)
    chunk, chunks = weight_chunks(geom.n * grid_h * grid_w, geom.c_in, device)
    out_chunk = cdiv(geom.n * geom.oh * geom.ow, chunks)
    input_shape = (geom.n, geom.c_in, geom.h, geom.w)
    dx_strides = channels_last_strides(input_shape) if channels_last else contiguous_strides(input_shape)
    grad = Launch(kernels.depthwise_bwd, (cdiv(geom.c_in, block_c), chunks),
                  (geom.n, geom.c_in, geom.h, geom.w, geom.c_out, geom.oh, geom.ow, geom.multiplier, chunk, out_chunk,
                   grid_h, grid_w, *grad_strides, *x_strides, *_taps_major_strides(geom), *dx_strides,
                   *geom.conv_args()),
                  KH=geom.kh, KW=geom.kw, UNIT_MULT=geom.multiplier == 1, HAS_BIAS=has_bias,
                  **activation_constexprs(activation, negative_slope), ACC=tl_acc, BLOCK_J=block_j, BLOCK_P=block_p,
                  BLOCK_C=block_c, num_warps=num_warps)
    return _WeightGradPlan(chunks, geom.kh * geom.kw + int(has_bias), grad,
                           *_reduce_launches(geom, chunks, has_bias, tl_acc))


_INPUT_WEIGHT_GRAD_PLANS = new_cache()


def _bwd_impl(grad_output, output, input, weight, stride, padding, dilation, activation, has_bias,
              negative_slope=DEFAULT_NEGATIVE_SLOPE):
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    if activation:
        grad_output = like_layout(grad_output, output)
    channels_last = _channels_last(input)
    key = (geom, input.dtype, grad_output.stride(), input.stride(), channels_last, activation,
           kernel_slope(activation, negative_slope), has_bias, input.device)
    plan = lookup(_INPUT_WEIGHT_GRAD_PLANS, key, _input_weight_grad_plan, *key)
    parts = plan.partials(input, geom.c_out)
    grad_input = _empty_output(grad_output, input.shape, channels_last, dtype=weight.dtype)
    grad_weight = input.new_empty(weight.shape)
    grad_bias = input.new_empty((geom.c_out,) if has_bias else (0,))
    # One [taps, channels] weight tile load per program.
    plan.grad(grad_output, output if activation else grad_output, grad_output, input, taps_major(weight, geom),
              grad_input, parts[0])
    plan.reduce(parts, grad_weight, grad_bias if has_bias else grad_weight)
    return grad_input, grad_weight, grad_bias


# One fake per pass, registered for the pass's triton and cuda ops (same contract).


def _fwd_fake(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope):
    geom = _geometry_from_lists(input.shape, weight.shape, stride, padding, dilation)
    output = _empty_output(input, geom.out_shape, _channels_last(input))
    return output, input.new_empty((0,)) if activation in OUTPUT_GRAD_CODES else torch.empty_like(output)


def _bwd_input_fake(grad_output, output, weight, input_size, channels_last, stride, padding, dilation, activation,
                    negative_slope):
    return _empty_output(grad_output, input_size, channels_last, dtype=weight.dtype)


def _bwd_weight_fake(grad_output, output, input, weight_size, stride, padding, dilation, activation, negative_slope,
                     has_bias):
    c_out = weight_size[0]
    return input.new_empty(weight_size), input.new_empty((c_out,) if has_bias else (0,))


depthwise_conv2d_fwd.register_fake(_fwd_fake)
depthwise_conv2d_bwd_input.register_fake(_bwd_input_fake)
depthwise_conv2d_bwd_weight.register_fake(_bwd_weight_fake)


@depthwise_conv2d_bwd.register_fake
def _bwd_fake(grad_output, output, input, weight, stride, padding, dilation, activation, negative_slope, has_bias):
    grad_weight, grad_bias = _bwd_weight_fake(grad_output, output, input, list(weight.shape), stride, padding,
                                              dilation, activation, negative_slope, has_bias)
    return (_bwd_input_fake(grad_output, output, weight, list(input.shape), _channels_last(input), stride, padding,
                            dilation, activation, negative_slope), grad_weight, grad_bias)


class DepthwiseConv2dFunction(torch.autograd.Function):
    """Autograd for ``act(depthwise_conv2d(input, weight, bias) + residual)`` on one
    backend's custom ops (``ops`` = (fwd, bwd_input, bwd_weight, bwd), ``bwd`` computing
    all three gradients from one read of dy, or None where the backend has no such
    kernel). Saves the input, the weight and, with an activation, one tensor for its
    derivative: the output for ReLU / ReLU6, the pre-activation for the others."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, stride, padding, dilation, activation, ops,
                negative_slope=DEFAULT_NEGATIVE_SLOPE):
        fwd = ops[0]
        output, pre = fwd(input, weight, bias, residual, stride, padding, dilation, activation, negative_slope)
        saved = (output if activation in OUTPUT_GRAD_CODES else pre) if activation else None
        ctx.save_for_backward(input, weight, saved)
        ctx.conf = (stride, padding, dilation, activation, negative_slope, ops)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        stride, padding, dilation, activation, slope, (_, bwd_input, bwd_weight, bwd) = ctx.conf
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        grad_input = grad_weight = grad_bias = grad_residual = None
        if need_dx and (need_dw or need_db) and bwd is not None:
            grad_input, grad_weight, grad_bias = bwd(grad_output, output, input, weight, stride, padding, dilation,
                                                     activation, slope, ctx.has_bias)
        else:
            if need_dx:
                grad_input = bwd_input(grad_output, output, weight, list(input.shape), _channels_last(input),
                                       stride, padding, dilation, activation, slope)
            if need_dw or need_db:
                grad_weight, grad_bias = bwd_weight(grad_output, output, input, list(weight.shape), stride,
                                                    padding, dilation, activation, slope, ctx.has_bias)
        if need_dw or need_db:
            grad_weight = grad_weight if need_dw else None
            grad_bias = grad_bias.to(ctx.bias_dtype) if need_db and ctx.has_bias else None
        if need_dres:
            grad_residual = activation_grad(grad_output, output, activation, slope)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None


TRITON_OPS = (depthwise_conv2d_fwd, depthwise_conv2d_bwd_input, depthwise_conv2d_bwd_weight,
              depthwise_conv2d_bwd)


# ----------------------------------------------------------------------------- cuda launchers


def _cuda_extension():
    from vhist.ops._cuda_ext import csrc_path, load_extension

    return load_extension("depthwise", [csrc_path("depthwise/depthwise.cpp"),
                                        csrc_path("depthwise/depthwise_kernel.cu")])


def _no_epilogue(residual, activation):
    if residual is not None or activation:
        raise NotImplementedError(f"{OP}: the cuda kernels have no residual/activation epilogue")


@custom_op("vhist::depthwise_conv2d_cuda_fwd", mutates_args=())
def depthwise_conv2d_cuda_fwd(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              residual: Optional[torch.Tensor], stride: list[int], padding: list[int],
                              dilation: list[int], activation: int,
                              negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on the CUDA C++ kernel (same contract as ``vhist::depthwise_conv2d_fwd``
    without the residual/activation epilogue)."""
    _no_epilogue(residual, activation)
    return _cuda_extension().fwd(input, weight, bias, stride, padding, dilation), input.new_empty((0,))


@custom_op("vhist::depthwise_conv2d_cuda_bwd_input", mutates_args=())
def depthwise_conv2d_cuda_bwd_input(grad_output: torch.Tensor, output: Optional[torch.Tensor], weight: torch.Tensor,
                                    input_size: list[int], channels_last: bool, stride: list[int],
                                    padding: list[int], dilation: list[int], activation: int,
                                    negative_slope: float) -> torch.Tensor:
    """Input gradient on the CUDA C++ kernel (a gather, no atomics)."""
    _no_epilogue(None, activation)
    return _cuda_extension().bwd_input(grad_output, weight, input_size, channels_last, stride, padding, dilation)


@custom_op("vhist::depthwise_conv2d_cuda_bwd_weight", mutates_args=())
def depthwise_conv2d_cuda_bwd_weight(grad_output: torch.Tensor, output: Optional[torch.Tensor], input: torch.Tensor,
                                     weight_size: list[int], stride: list[int], padding: list[int],
                                     dilation: list[int], activation: int, negative_slope: float,
                                     has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (and bias) gradient on the CUDA C++ kernels: the same deterministic two-stage
    reduction (chunks fixed by the shape) as the Triton backend."""
    _no_epilogue(None, activation)
    geom = _geometry_from_lists(input.shape, weight_size, stride, padding, dilation)
    chunk, chunks = weight_chunks(geom.n * geom.oh * geom.ow, geom.c_out, input.device)
    grad_weight, grad_bias = _cuda_extension().bwd_weight(grad_output, input, weight_size, stride, padding, dilation,
                                                          has_bias, chunk, chunks)
    return grad_weight, grad_bias


depthwise_conv2d_cuda_fwd.register_fake(_fwd_fake)
depthwise_conv2d_cuda_bwd_input.register_fake(_bwd_input_fake)
depthwise_conv2d_cuda_bwd_weight.register_fake(_bwd_weight_fake)


# The CUDA backend runs its input and weight gradients as two kernels (no combined one).
CUDA_OPS = (depthwise_conv2d_cuda_fwd, depthwise_conv2d_cuda_bwd_input, depthwise_conv2d_cuda_bwd_weight, None)


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


def _depthwise_triton(input, weight, bias, geom: DepthwiseGeometry, ops=TRITON_OPS):
    # The kernels take any strides; only overlapping or negative-stride views are copied.
    return DepthwiseConv2dFunction.apply(dense_layout(input), weight, bias, None, *geom.op_args(), 0, ops,
                                         DEFAULT_NEGATIVE_SLOPE)


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


def _forward_with_stats(input, weight, geom: DepthwiseGeometry):
    conv_out = _empty_output(input, geom.out_shape, _channels_last(input))
    return conv_out, _launch_fwd(input, weight, None, None, geom, 0, conv_out, stats=True)


def _grad_input(dy_conv, input, weight, geom: DepthwiseGeometry):
    return _bwd_input_impl(dy_conv, None, weight, list(input.shape), _channels_last(input), *geom.op_args(), 0)


def _grad_weight(dy_conv, input, weight, geom: DepthwiseGeometry):
    grad_weight, _ = _bwd_weight_impl(dy_conv, None, input, list(weight.shape), *geom.op_args(), 0, False)
    return grad_weight


def _grad_input_and_weight(dy_conv, input, weight, geom: DepthwiseGeometry):
    grad_input, grad_weight, _ = _bwd_impl(dy_conv, None, input, weight, *geom.op_args(), 0, False)
    return grad_input, grad_weight


FUSED_PASSES = ConvPasses(
    geometry=_geometry_from_lists,
    forward_with_stats=_forward_with_stats,
    grad_input=_grad_input,
    grad_weight=_grad_weight,
    grad_input_and_weight=_grad_input_and_weight,
    empty_output=lambda like, shape: _empty_output(like, shape, _channels_last(like)),
    empty_grad_weight=lambda weight: weight.new_empty(weight.shape),
)
FUSED_OPS = define_fused_ops(FUSED_OP, FUSED_PASSES)


def _eval_conv(input, weight, bias, residual, geom: DepthwiseGeometry, activation: int, negative_slope: float):
    return DepthwiseConv2dFunction.apply(input, weight, bias, residual, *geom.op_args(), activation, TRITON_OPS,
                                         negative_slope)


def _fused_triton(input, weight, bn_weight, bn_bias, running_mean, running_var, geom: DepthwiseGeometry, *,
                  training, momentum, eps, activation, residual, negative_slope):
    return run_fused_triton(FUSED_OPS, _eval_conv, dense_layout(input), weight, bn_weight, bn_bias, running_mean,
                            running_var, geom, geom.c_in, training=training, momentum=momentum, eps=eps,
                            activation=activation, residual=residual, negative_slope=negative_slope)


FUSED_IMPLS = {"triton": _fused_triton, "torch": reference.fused_depthwise_bn_act}


def fused_depthwise_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                           padding=0, dilation=1, training=True, momentum=0.1, eps=1e-5,
                           activation: Optional[str] = "relu6", residual: Optional[torch.Tensor] = None,
                           negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """``act(batch_norm(depthwise_conv2d(input, weight)) + residual)`` as one op, with the
    argument conventions of :func:`vhist.ops.fused_conv_bn_act` (MobileNet's dw-BN-ReLU6).

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
        activation: a name of :data:`~vhist.ops.common.ACTIVATION_CODES`.
        residual: optional tensor of the output's shape added before the activation.
        negative_slope: leaky relu's slope, as ``F.leaky_relu``'s.

    Returns:
        (N, C_out, OH, OW) in the input's memory format.
    """
    input, weight, residual = autocast_inputs(input, weight, residual)
    geom = _check_inputs(input, weight, None, stride, padding, dilation, FUSED_OP)
    activation_code(FUSED_OP, activation)
    check_fused_args(FUSED_OP, geom, input, bn_weight, bn_bias, running_mean, running_var, training, residual)
    impl = dispatch(FUSED_OP, FUSED_IMPLS, input.device)
    negative_slope = check_negative_slope(FUSED_OP, negative_slope)
    kwargs = dict(training=training, momentum=momentum, eps=eps, activation=activation, residual=residual,
                  negative_slope=negative_slope)
    if impl is reference.fused_depthwise_bn_act:
        return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                    padding=padding, dilation=dilation, **kwargs)
    return impl(input, weight, bn_weight, bn_bias, running_mean, running_var, geom, **kwargs)
