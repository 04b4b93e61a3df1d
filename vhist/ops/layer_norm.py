"""Layer Normalization (Ba, Kiros & Hinton, 2016): launchers, torch.library registration
and autograd, with the pre-norm residual add folded in and a channels-last 2-D form.

Backends: ``triton`` (:mod:`vhist.kernels.layer_norm`) and ``torch``
(:mod:`vhist.reference.layer_norm`, F.layer_norm). The kernels see the input as (M, N)
rows (:func:`rows_view`); one forward kernel, and a backward of two: the input gradient
with per-program partials of the weight and bias gradients, then their fixed-order sum.
Registered as ``vhist::layer_norm_fwd`` / ``_bwd`` with fake implementations so
``torch.compile(fullgraph=True)`` traces them.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from vhist import reference
from vhist.ops._dispatch import autocast_fp32_inputs, check_float_dtype, check_same_device, dispatch
from vhist.ops.common import acc_dtype, cdiv, next_power_of_2, op_outputs, partials_sum_launch
from vhist.ops.common import tl_acc as _tl_acc
from vhist.ops.launch_cache import Launch, lookup, new_cache, scratch
from vhist.ops.op_call import custom_op

OP = "layer_norm"
# Widest row a tile holds (every column of a row in registers: 64 KB of fp32).
MAX_WIDTH = 16384
# Elements of a forward / backward tile: BLOCK_M = TILE // BLOCK_N rows of narrow widths.
TILE = 4096
# Programs of the backward's first stage at most (so at most this many rows of dw / db
# partials): about four per SM of an H100, fixed so that the partition, and with it the
# sums' order, depends on the shape alone.
MAX_PARTIALS = 512


def tile_width(width: int) -> int:
    """BLOCK_N of the kernels' tiles: every column of a row.

    Raises:
        ValueError: ``width`` exceeds ``MAX_WIDTH``.
    """
    if width > MAX_WIDTH:
        raise ValueError(f"{OP}: the triton kernels normalize at most {MAX_WIDTH} elements per row, got "
                         f"{width}; use the torch backend")
    return max(2, next_power_of_2(width))


def tile_geometry(rows: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a (rows, width) problem: whole rows, TILE elements
    per tile, 16 of them per thread (fixed from the shape alone: the reductions' order
    depends on the layout, so nothing here is tuned)."""
    block_n = tile_width(width)
    block_m = max(1, min(TILE // block_n, next_power_of_2(max(rows, 1))))
    return block_m, block_n, min(16, max(1, block_m * block_n // 512))


def partition(rows: int, width: int) -> tuple[int, int]:
    """(P, TILES_PER_PROGRAM) of the backward's first stage: P programs, each owning that
    many consecutive tiles."""
    block_m, _, _ = tile_geometry(rows, width)
    tiles = cdiv(rows, block_m)
    per_program = cdiv(tiles, MAX_PARTIALS)
    return cdiv(tiles, per_program), per_program


def rows_view(input: torch.Tensor, width: int) -> torch.Tensor:
    """``input`` as (M, width) rows with contiguous columns: a view where the strides
    allow it, else one copy at the op boundary."""
    x = input.reshape(-1, width)
    return x if x.stride(1) == 1 or width == 1 else x.contiguous()


def _build_fwd(m, n, x_stride, r_stride, has_res, has_w, has_b, dtype, eps):
    from vhist.kernels import layer_norm as kernels

    block_m, block_n, warps = tile_geometry(m, n)
    return Launch(kernels.layer_norm_fwd, (cdiv(m, block_m),), (m, n, x_stride, r_stride, eps),
                  HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACC=_tl_acc(dtype), BLOCK_M=block_m,
                  BLOCK_N=block_n, num_warps=warps)


def _build_bwd(m, n, dy_stride, x_stride, ds_stride, has_w, has_dres, dw, db, dtype):
    from vhist.kernels import layer_norm as kernels

    block_m, block_n, warps = tile_geometry(m, n)
    parts, per_program = partition(m, n)
    acc = _tl_acc(dtype)
    dx = Launch(kernels.layer_norm_bwd_dx, (parts,), (m, n, dy_stride, x_stride, ds_stride, per_program),
                HAS_W=has_w, HAS_DRES=has_dres, COMPUTE_DW=dw, COMPUTE_DB=db, ACC=acc, BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=warps)
    dwdb = partials_sum_launch(n, parts, dw, db, acc)
    return dx, dwdb, parts


_FWD, _BWD = new_cache(), new_cache()


# ----------------------------------------------------------------------------- triton


@custom_op("vhist::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of LayerNorm over the rows of a 2-D ``input`` (M, N) with contiguous
    columns, normalizing ``input + residual`` when a residual is given.

    Returns:
        (output (M, N), mean (M,), rstd (M,), sum (M, N): input + residual, or an empty
        tensor without a residual); mean and rstd in fp32 (fp64 for fp64 inputs).
    """
    m, n = input.shape
    acc = acc_dtype(input.dtype)
    output = input.new_empty((m, n))
    mean, rstd = input.new_empty((m,), dtype=acc), input.new_empty((m,), dtype=acc)
    total = input.new_empty((m, n)) if residual is not None else None
    key = (m, n, input.stride(0), residual.stride(0) if residual is not None else 0, residual is not None,
           weight is not None, bias is not None, input.dtype, eps)
    launch = lookup(_FWD, key, _build_fwd, *key)
    launch(input, residual if residual is not None else input, weight if weight is not None else input,
           bias if bias is not None else input, output, total if total is not None else output, mean, rstd)
    return op_outputs(input, output, mean, rstd, total)


@custom_op("vhist::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(grad_output: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                   mean: torch.Tensor, rstd: torch.Tensor, grad_sum: Optional[torch.Tensor],
                   output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of LayerNorm: ``input`` is what was normalized (the residual sum when
    there was one), ``grad_sum`` the gradient reaching that sum from elsewhere (added to
    the input gradient). ``output_mask`` = [weight gradient, bias gradient].

    Returns:
        (grad_input (M, N), grad_weight (N,), grad_bias (N,)), an empty tensor for each
        gradient not asked for; the partials are summed in a fixed order (deterministic).
    """
    m, n = input.shape
    want_dw, want_db = bool(output_mask[0]) and weight is not None, bool(output_mask[1])
    grad_output = grad_output if grad_output.stride(1) == 1 else grad_output.contiguous()
    if grad_sum is not None and grad_sum.stride(1) != 1:
        grad_sum = grad_sum.contiguous()
    key = (m, n, grad_output.stride(0), input.stride(0), grad_sum.stride(0) if grad_sum is not None else 0,
           weight is not None, grad_sum is not None, want_dw, want_db, input.dtype)
    dx_launch, dwdb_launch, parts = lookup(_BWD, key, _build_bwd, *key)
    grad_input = input.new_empty((m, n))
    acc = acc_dtype(input.dtype)
    partials = scratch(dx_launch.scratch, input, lambda: (input.new_empty((parts, n), dtype=acc),
                                                          input.new_empty((parts, n), dtype=acc)))
    dx_launch(grad_output, input, weight if weight is not None else input, mean, rstd,
              grad_sum if grad_sum is not None else input, grad_input, *partials)
    grad_weight = weight.new_empty((n,)) if want_dw else None
    grad_bias = (weight if weight is not None else input).new_empty((n,)) if want_db else None
    if want_dw or want_db:
        dwdb_launch(*partials, grad_weight if want_dw else partials[0], grad_bias if want_db else partials[1])
    return op_outputs(input, grad_input, grad_weight, grad_bias)


@layer_norm_fwd.register_fake
def _fwd_fake(input, weight, bias, residual, eps):
    m, n = input.shape
    acc = acc_dtype(input.dtype)
    total = input.new_empty((m, n)) if residual is not None else input.new_empty((0,))
    return input.new_empty((m, n)), input.new_empty((m,), dtype=acc), input.new_empty((m,), dtype=acc), total


@layer_norm_bwd.register_fake
def _bwd_fake(grad_output, input, weight, mean, rstd, grad_sum, output_mask):
    n = input.shape[1]
    want_dw, want_db = bool(output_mask[0]) and weight is not None, bool(output_mask[1])
    grad_weight = weight.new_empty((n,)) if want_dw else input.new_empty((0,))
    grad_bias = (weight if weight is not None else input).new_empty((n,)) if want_db else input.new_empty((0,))
    return input.new_empty(input.shape), grad_weight, grad_bias


class LayerNormFunction(torch.autograd.Function):
    """Autograd of LayerNorm on (M, N) rows, optionally of ``input + residual``: saves the
    normalized input (the sum with a residual), the mean and rstd; with a residual it
    returns ``(sum, output)`` and both inputs get the same gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps):
        output, mean, rstd, total = layer_norm_fwd(input, weight, bias, residual, eps)
        normalized = total if residual is not None else input
        ctx.save_for_backward(normalized, weight, mean, rstd)
        ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
        if residual is not None:
            return total, output
        return output

    @staticmethod
    def backward(ctx, *grads):
        normalized, weight, mean, rstd = ctx.saved_tensors
        grad_sum, grad_output = grads if ctx.has_residual else (None, grads[0])
        want = [ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
        grad_input, grad_weight, grad_bias = layer_norm_bwd(grad_output, normalized, weight, mean, rstd, grad_sum,
                                                            want)
        return (grad_input, grad_weight if want[0] else None, grad_bias if want[1] else None,
                grad_input if ctx.has_residual and ctx.needs_input_grad[3] else None, None)


# ----------------------------------------------------------------------------- public op


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def _check_inputs(input, normalized_shape, weight, bias, residual=None):
    check_float_dtype(OP, "input", input)
    check_float_dtype(OP, "weight", weight)
    check_float_dtype(OP, "bias", bias)
    check_float_dtype(OP, "residual", residual)
    check_same_device(OP, input=input, weight=weight, bias=bias, residual=residual)
    shape = _normalized_shape(normalized_shape)
    if not shape:
        raise ValueError(f"{OP}: normalized_shape must name at least one dimension, got {normalized_shape!r}")
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(f"{OP}: normalized_shape {list(shape)} must equal the input's trailing dimensions, got "
                         f"an input of shape {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape {list(shape)} (normalized_shape), got {tuple(t.shape)}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"{OP}: the residual must have the input's shape, got {tuple(residual.shape)} for "
                         f"{tuple(input.shape)}")
    return shape


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.reshape(-1) if t is not None else None


def _layer_norm_triton(input, shape, weight, bias, eps):
    width = math.prod(shape)
    tile_width(width)
    if input.numel() == 0:
        return reference.layer_norm(input, shape, weight, bias, eps)
    y = LayerNormFunction.apply(rows_view(input, width), _flat(weight), _flat(bias), None, float(eps))
    return y.view(input.shape)


def _add_layer_norm_triton(input, residual, shape, weight, bias, eps):
    width = math.prod(shape)
    tile_width(width)
    if input.numel() == 0:
        return reference.add_layer_norm(input, residual, shape, weight, bias, eps)
    total, y = LayerNormFunction.apply(rows_view(input, width), _flat(weight), _flat(bias),
                                       rows_view(residual, width), float(eps))
    return total.view(input.shape), y.view(input.shape)


def _layer_norm_2d_triton(input, weight, bias, eps):
    n, c, h, w = input.shape
    tile_width(c)
    if input.numel() == 0:
        return reference.layer_norm_2d(input, weight, bias, eps)
    # NHWC rows: a view of a channels_last input, one copy of an NCHW one.
    rows = rows_view(input.permute(0, 2, 3, 1), c)
    y = LayerNormFunction.apply(rows, weight, bias, None, float(eps))
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


IMPLS = {"triton": _layer_norm_triton, "torch": reference.layer_norm}
ADD_IMPLS = {"triton": _add_layer_norm_triton, "torch": reference.add_layer_norm}
IMPLS_2D = {"triton": _layer_norm_2d_triton, "torch": reference.layer_norm_2d}


def layer_norm(input: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer Normalization over the trailing ``normalized_shape`` dims, as ``F.layer_norm``
    (Ba, Kiros & Hinton, 2016, Eq. 4): ``(x - mean) / sqrt(var + eps) * weight + bias``,
    the biased variance, statistics in fp32 (fp64 for fp64 inputs).

    Args:
        input: (*, *normalized_shape); a tensor whose trailing dims are not contiguous is
            copied once.
        normalized_shape: int or sequence, the trailing dims to normalize over (their
            product at most ``MAX_WIDTH`` on the triton backend).
        weight, bias: optional tensors of ``normalized_shape``.
        eps: added to the variance.

    Returns:
        The normalized tensor, same shape and dtype as ``input``, contiguous; under CUDA
        autocast fp32, as PyTorch's autocast runs layer_norm in fp32 there.
    """
    shape = _check_inputs(input, normalized_shape, weight, bias)
    input, weight, bias = autocast_fp32_inputs(input, weight, bias)
    return dispatch(OP, IMPLS, input.device)(input, shape, weight, bias, eps)


def add_layer_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = input + residual`` and ``F.layer_norm(s, ...)`` in one pass (the pre-norm
    transformer block's residual add and the next norm: Xiong et al., 2020).

    Returns:
        (s, layer_norm(s)), both of ``input``'s shape, in the dtype torch's ``input +
        residual`` would give (the two are promoted as the add promotes them). Under
        CUDA autocast with two fp16/bf16 inputs both stay in that dtype, where PyTorch
        would return layer_norm(s) in fp32.
    """
    shape = _check_inputs(input, normalized_shape, weight, bias, residual)
    if input.dtype != residual.dtype:  # type promotion, as torch's add (e.g. a bf16 branch onto an fp32 stream)
        dtype = torch.promote_types(input.dtype, residual.dtype)
        input, residual = input.to(dtype), residual.to(dtype)
    return dispatch(OP, ADD_IMPLS, input.device)(input, residual, shape, weight, bias, eps)


def layer_norm_2d(input: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels at each pixel of an (N, C, H, W) tensor (ConvNeXt's
    LayerNorm2d, Liu et al., 2022): ``F.layer_norm`` of the NHWC permutation, permuted back.

    Returns:
        The normalized tensor, channels_last (NHWC in memory) on the triton backend; a
        channels_last input is read in place, an NCHW one copied once.
    """
    if input.dim() != 4:
        raise ValueError(f"{OP}: layer_norm_2d expects a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")
    _check_inputs(input.permute(0, 2, 3, 1), input.shape[1], weight, bias)
    input, weight, bias = autocast_fp32_inputs(input, weight, bias)
    return dispatch(OP, IMPLS_2D, input.device)(input, weight, bias, eps)
