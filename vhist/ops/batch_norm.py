"""Batch Normalization: Triton launchers, torch.library registration and autograd.

``batch_norm_fwd`` / ``batch_norm_bwd`` launch the kernels of
:mod:`vhist.kernels.batch_norm` and are registered as ``vhist::batch_norm_fwd`` and
``vhist::batch_norm_bwd`` custom ops with fake implementations, so ``torch.compile``
traces them. :class:`BatchNormFunction` ties them together for autograd, and
:func:`batch_norm` picks the backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from vhist import reference
from vhist.ops import heuristics
from vhist.ops._dispatch import check_float_dtype, dispatch
# is_channels_last_dense stays importable from here, its former home.
from vhist.ops.common import cdiv
from vhist.ops.common import (DEFAULT_NEGATIVE_SLOPE, acc_dtype, activation_constexprs, check_bn_args, dense_layout,
                              is_channels_last, is_channels_last_dense, kernel_slope, like_layout, op_outputs,
                              or_placeholder, partial_buffers, tl_acc)
from vhist.ops.launch_cache import Launch, lookup, new_cache, scratch
from vhist.ops.op_call import custom_op

OP = "batch_norm"


@dataclass(frozen=True)
class ChannelGeometry:
    """An (N, C, *spatial) tensor as the kernels see it: an (N, C, S) view with strides,
    and the split of the N*S reduction space into chunks (see kernels/batch_norm.py)."""

    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int
    n_per_chunk: int
    seg_len: int
    segs_per_row: int
    channels_contiguous: bool

    @property
    def num_chunks(self) -> int:
        return cdiv(self.n, self.n_per_chunk) * self.segs_per_row

    @property
    def count(self) -> int:
        return self.n * self.s

    def args(self) -> tuple:
        return (self.n, self.c, self.s, self.stride_n, self.stride_c, self.stride_s,
                self.n_per_chunk, self.seg_len, self.segs_per_row)

    def grid(self, meta) -> tuple:
        return (cdiv(self.c, meta["BLOCK_C"]), self.num_chunks)


_CHANNEL_GEOMETRY = new_cache()


def channel_geometry(x: torch.Tensor) -> ChannelGeometry:
    """The (N, C, S) view of a dense ``x`` and its reduction chunks, cached per (shape,
    strides, device) (:mod:`vhist.ops.launch_cache`)."""
    return lookup(_CHANNEL_GEOMETRY, (x.shape, x.stride(), x.device), _channel_geometry, x)


def _channel_geometry(x: torch.Tensor) -> ChannelGeometry:
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    channels_contiguous = s == 1 or is_channels_last(x)
    if channels_contiguous:
        # N and S are contiguous together: one flat "row" of N*S positions, stride C.
        rows, length, stride_n, stride_c, stride_s = 1, n * s, 0, 1, c
    else:
        rows, length, stride_n, stride_c, stride_s = n, s, c * s, s, 1

    total = rows * length
    chunks = heuristics.bn_chunks(total, c, channels_contiguous, x.device)
    per_chunk = cdiv(total, chunks)
    if per_chunk >= length:
        n_per_chunk, seg_len = per_chunk // length, length
    else:
        n_per_chunk, seg_len = 1, per_chunk
    return ChannelGeometry(rows, c, length, stride_n, stride_c, stride_s, n_per_chunk, seg_len,
                           cdiv(length, seg_len), channels_contiguous)


def _pick(kernels, geom: ChannelGeometry):
    channels_contiguous_kernel, spatial_contiguous_kernel = kernels
    return channels_contiguous_kernel if geom.channels_contiguous else spatial_contiguous_kernel


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=acc_dtype(like.dtype))


# ----------------------------------------------------------------------------- stages
# The BN stages below are shared by batch_norm, the fused conv/depthwise + BN + act ops
# (which feed bn_finalize with partials from their conv epilogue) and sync_batch_norm
# (which exchanges the partials and sums between processes between two stages).


def _tensor_key(x: torch.Tensor) -> tuple:
    """What a BN launch's geometry and arguments depend on in ``x``."""
    return x.shape, x.stride(), x.dtype, x.device


def _stats_launch(x: torch.Tensor) -> Launch:
    from vhist.kernels import batch_norm as kernels

    geom = channel_geometry(x)
    return Launch(_pick(kernels.bn_fwd_stats, geom), geom.grid, geom.args(), ACC=tl_acc(x.dtype))


_STATS_LAUNCHES = new_cache()


def bn_stats_partials(x: torch.Tensor):
    """Per-chunk (mean, M2, count) of a dense ``x`` (N, C, ...), in the accumulation dtype:
    the launch's scratch (:func:`vhist.ops.launch_cache.scratch`), to be merged before the
    next call of the same shape."""
    launch = lookup(_STATS_LAUNCHES, _tensor_key(x), _stats_launch, x)
    partials = scratch(launch.scratch, x, lambda: _chunk_partials(x, counts=True))
    launch(x, *partials)
    return partials


def _chunk_partials(x: torch.Tensor, counts: bool) -> tuple:
    """One row of partials per reduction chunk of ``x`` (:func:`channel_geometry`)."""
    geom = channel_geometry(x)
    return partial_buffers(geom.num_chunks, geom.c, x, counts)


@dataclass(frozen=True)
class _MergePlan:
    """The merge tree of (num_partials, C) partials (:func:`bn_finalize`,
    :func:`bn_merge_sums`): per level, the merged count and its launch, then the final
    launch."""

    levels: tuple  # ((groups, Launch), ...)
    final: Launch
    scratch: dict = field(default_factory=dict, compare=False, repr=False)  # the levels' outputs


def _level_buffers(plan: _MergePlan, c: int, like: torch.Tensor, count: bool) -> tuple:
    """Per merge level, the merged partials ((groups, C) each, then the (groups,) counts
    when ``count``), in ``like``'s dtype."""
    return tuple(((like.new_empty((groups, c)), like.new_empty((groups, c))) +
                  ((like.new_empty((groups,)),) if count else ())) for groups, _ in plan.levels)


def _merge_plan(merge_kernel, final_kernel, num: int, c: int, acc_tl, final_tail: tuple,
                **final_constexprs) -> _MergePlan:
    block_c, group = heuristics.bn_finalize_block_c(c), heuristics.BN_MERGE_GROUP
    levels = []
    for level_num in heuristics.bn_merge_levels(num):
        groups = cdiv(level_num, group)
        levels.append((groups, Launch(merge_kernel, (cdiv(c, block_c), groups), (c, level_num, group),
                                      ACC=acc_tl, BLOCK_C=block_c, BLOCK_K=heuristics.BN_FINALIZE_BLOCK_K)))
        num = groups
    final = Launch(final_kernel, (cdiv(c, block_c),), (c, num, *final_tail), ACC=acc_tl, BLOCK_C=block_c,
                   BLOCK_K=heuristics.BN_FINALIZE_BLOCK_K, **final_constexprs)
    return _MergePlan(tuple(levels), final)


def _finalize_plan(num: int, c: int, dtype: torch.dtype, update: bool, momentum: float, eps: float) -> _MergePlan:
    from vhist.kernels import batch_norm as kernels

    return _merge_plan(kernels.bn_fwd_merge, kernels.bn_fwd_finalize, num, c, tl_acc(dtype), (momentum, eps),
                       UPDATE_RUNNING=update)


_FINALIZE_PLANS = new_cache()


def bn_finalize(part_mean, part_m2, part_count, running_mean, running_var, momentum: float, eps: float):
    """Merges (num_partials, C) statistics partials into the batch (mean, rstd) and, when
    running statistics are given, updates them in place.

    The merge is a tree of fan-in ``heuristics.BN_MERGE_GROUP`` (levels of
    ``bn_fwd_merge`` over (channel blocks x groups), then ``bn_fwd_finalize``), in an
    order fixed by ``num_partials``: no program walks more than a group of partials.
    """
    num, c = part_mean.shape
    update = running_mean is not None
    plan = lookup(_FINALIZE_PLANS, (num, c, part_mean.dtype, part_mean.device, update, momentum, eps),
                  _finalize_plan, num, c, part_mean.dtype, update, momentum, eps)
    if plan.levels:
        buffers = scratch(plan.scratch, part_mean, lambda: _level_buffers(plan, c, part_mean, count=True))
        for (_, launch), merged in zip(plan.levels, buffers):
            launch(part_mean, part_m2, part_count, *merged)
            part_mean, part_m2, part_count = merged
    mean, rstd = part_mean.new_empty((c,)), part_mean.new_empty((c,))
    plan.final(part_mean, part_m2, part_count, mean, rstd, running_mean if update else mean,
               running_var if update else rstd)
    return mean, rstd


# ``x_activation`` of the passes below: the activation (code, slope) applied to x as it is
# loaded, for a BatchNorm after conv -> activation whose input is kept as the pre-activation.
NO_X_ACTIVATION = (0, DEFAULT_NEGATIVE_SLOPE)


def _x_activation_key(x_activation: tuple) -> tuple:
    code, slope = x_activation
    return code, kernel_slope(code, slope)


def _apply_launch(x, rstd_from_var, has_weight, has_bias, has_residual, activation, negative_slope, x_activation,
                  eps) -> Launch:
    from vhist.kernels import batch_norm as kernels

    geom = channel_geometry(x)
    return Launch(_pick(kernels.bn_fwd_apply, geom), geom.grid, (*geom.args(), eps),
                  RSTD_FROM_VAR=rstd_from_var, HAS_W=has_weight, HAS_B=has_bias, ACC=tl_acc(x.dtype),
                  HAS_RESIDUAL=has_residual, **activation_constexprs(activation, negative_slope),
                  **activation_constexprs(*x_activation, "X_"))


_APPLY_LAUNCHES = new_cache()


def bn_apply(x, mean, rstd, weight, bias, eps: float, *, rstd_from_var: bool = False,
             residual: Optional[torch.Tensor] = None, activation: int = 0,
             negative_slope: float = DEFAULT_NEGATIVE_SLOPE, x_activation: tuple = NO_X_ACTIVATION) -> torch.Tensor:
    """``act(w * (x - mean) * rstd + b + residual)`` in one pass over a dense ``x``;
    with ``rstd_from_var``, ``rstd`` holds the (running) variance instead. ``x_activation``
    (a code and its slope) is applied to ``x`` as it is loaded (conv -> act -> BN: ``x``
    the pre-activation)."""
    flags = (rstd_from_var, weight is not None, bias is not None, residual is not None, activation,
             kernel_slope(activation, negative_slope), _x_activation_key(x_activation), eps)
    launch = lookup(_APPLY_LAUNCHES, (*_tensor_key(x), *flags), _apply_launch, x, *flags)
    out = torch.empty_like(x)
    if residual is not None:
        residual = like_layout(residual, x)
    launch(x, out, mean, rstd, or_placeholder(weight, mean), or_placeholder(bias, mean), or_placeholder(residual, x))
    return out


def _grad_sums_launch(x, rstd_from_var, has_weight, has_bias, has_residual, activation, negative_slope,
                      x_activation, write_dz, eps) -> Launch:
    from vhist.kernels import batch_norm as kernels

    geom = channel_geometry(x)
    return Launch(_pick(kernels.bn_bwd_reduce, geom), geom.grid, (*geom.args(), eps), RSTD_FROM_VAR=rstd_from_var,
                  ACC=tl_acc(x.dtype), HAS_RESIDUAL=has_residual, HAS_W=has_weight, HAS_B=has_bias,
                  WRITE_DZ=write_dz, **activation_constexprs(activation, negative_slope),
                  **activation_constexprs(*x_activation, "X_"))


_GRAD_SUMS_LAUNCHES = new_cache()


def bn_grad_sums(grad_output, x, mean, rstd, weight, bias, eps: float, *, rstd_from_var: bool = False,
                 residual: Optional[torch.Tensor] = None, activation: int = 0,
                 want_dweight: bool = False, want_dbias: bool = False, dz_out: Optional[torch.Tensor] = None,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE, x_activation: tuple = NO_X_ACTIVATION):
    """Per-channel Σdz and Σdz·x̂, where dz is ``grad_output`` masked by the activation's
    derivative (recomputed from ``x``, the statistics and ``residual``); with ``dz_out``
    (a tensor like ``x``) dz itself is also written there, in the same pass.

    Returns:
        ``(sum_dz, sum_dz_xhat, grad_weight, grad_bias)``; the parameter gradients are
        these sums in the parameter dtypes, None when not asked for.
    """
    grad_output = like_layout(grad_output, x)
    if residual is not None:
        residual = like_layout(residual, x)
    want_dweight = want_dweight and weight is not None
    want_dbias = want_dbias and bias is not None
    flags = (rstd_from_var, weight is not None, bias is not None, residual is not None, activation,
             kernel_slope(activation, negative_slope), _x_activation_key(x_activation), dz_out is not None, eps)
    launch = lookup(_GRAD_SUMS_LAUNCHES, (*_tensor_key(x), *flags), _grad_sums_launch, x, *flags)
    part_dy, part_dy_xhat = scratch(launch.scratch, x, lambda: _chunk_partials(x, counts=False))
    launch(grad_output, x, mean, rstd, or_placeholder(weight, mean), or_placeholder(bias, mean),
           or_placeholder(residual, x), part_dy, part_dy_xhat, or_placeholder(dz_out, x))
    return bn_merge_sums(part_dy, part_dy_xhat, weight.dtype if want_dweight else None,
                         bias.dtype if want_dbias else None)


def _merge_sums_plan(num: int, c: int, dtype: torch.dtype, want_dweight: bool, want_dbias: bool) -> _MergePlan:
    from vhist.kernels import batch_norm as kernels

    return _merge_plan(kernels.bn_bwd_merge, kernels.bn_bwd_finalize, num, c, tl_acc(dtype), (),
                       WRITE_DW=want_dweight, WRITE_DB=want_dbias)


_MERGE_SUMS_PLANS = new_cache()


def bn_merge_sums(part_dy, part_dy_xhat, dweight_dtype: Optional[torch.dtype] = None,
                  dbias_dtype: Optional[torch.dtype] = None):
    """Sums (num_partials, C) partials of Σdz and Σdz·x̂ over partials, by the same tree as
    :func:`bn_finalize` (order fixed by ``num_partials``).

    Args:
        dweight_dtype, dbias_dtype: the dtypes to also write the sums in as the
            parameter gradients (Σdz·x̂ and Σdz), or None.

    Returns:
        ``(sum_dz, sum_dz_xhat, grad_weight, grad_bias)``, the latter two None when
        their dtype is None; a parameter gradient in the sums' dtype is the sum tensor
        itself (``grad_weight is sum_dz_xhat``, ``grad_bias is sum_dz``).
    """
    num, c = part_dy.shape
    acc = part_dy.dtype
    # A parameter gradient in the accumulation dtype (fp32 parameters, as under autocast)
    # is the sum itself: one tensor serves both, written once.
    write_dweight = dweight_dtype is not None and dweight_dtype != acc
    write_dbias = dbias_dtype is not None and dbias_dtype != acc
    plan = lookup(_MERGE_SUMS_PLANS, (num, c, acc, part_dy.device, write_dweight, write_dbias),
                  _merge_sums_plan, num, c, acc, write_dweight, write_dbias)
    sum_dy, sum_dy_xhat = part_dy.new_empty((c,)), part_dy.new_empty((c,))
    grad_weight = grad_bias = None
    if dweight_dtype is not None:
        grad_weight = part_dy.new_empty((c,), dtype=dweight_dtype) if write_dweight else sum_dy_xhat
    if dbias_dtype is not None:
        grad_bias = part_dy.new_empty((c,), dtype=dbias_dtype) if write_dbias else sum_dy
    if plan.levels:
        buffers = scratch(plan.scratch, part_dy, lambda: _level_buffers(plan, c, part_dy, count=False))
        for (_, launch), merged in zip(plan.levels, buffers):
            launch(part_dy, part_dy_xhat, *merged)
            part_dy, part_dy_xhat = merged
    plan.final(part_dy, part_dy_xhat, sum_dy, sum_dy_xhat, grad_weight if write_dweight else sum_dy,
               grad_bias if write_dbias else sum_dy)
    return sum_dy, sum_dy_xhat, grad_weight, grad_bias


def _grad_input_launch(x, training, rstd_from_var, has_weight, has_bias, has_residual, activation, negative_slope,
                       x_activation, want_dresidual, eps, count) -> Launch:
    from vhist.kernels import batch_norm as kernels

    geom = channel_geometry(x)
    return Launch(_pick(kernels.bn_bwd_dx, geom), geom.grid, (*geom.args(), eps, 1.0 / (count or geom.count)),
                  TRAINING=training, RSTD_FROM_VAR=rstd_from_var, HAS_W=has_weight, ACC=tl_acc(x.dtype),
                  HAS_RESIDUAL=has_residual, HAS_B=has_bias, WRITE_DRES=want_dresidual,
                  **activation_constexprs(activation, negative_slope), **activation_constexprs(*x_activation, "X_"))


_GRAD_INPUT_LAUNCHES = new_cache()


def bn_grad_input(grad_output, x, mean, rstd, weight, bias, sum_dy, sum_dy_xhat, eps: float, *,
                  training: bool = True, rstd_from_var: bool = False, residual: Optional[torch.Tensor] = None,
                  activation: int = 0, want_dresidual: bool = False, count: Optional[int] = None,
                  negative_slope: float = DEFAULT_NEGATIVE_SLOPE, x_activation: tuple = NO_X_ACTIVATION):
    """The gradient at the BN input (training: with the mean terms from
    :func:`bn_grad_sums` over ``count`` values, by default this batch's N*S) and, with
    ``want_dresidual``, dz, the gradient of the residual.

    Returns:
        ``(grad_input, grad_residual)``, the latter None unless asked for.
    """
    grad_output = like_layout(grad_output, x)
    if residual is not None:
        residual = like_layout(residual, x)
    flags = (training, rstd_from_var, weight is not None, bias is not None, residual is not None, activation,
             kernel_slope(activation, negative_slope), _x_activation_key(x_activation), want_dresidual, eps, count)
    launch = lookup(_GRAD_INPUT_LAUNCHES, (*_tensor_key(x), *flags), _grad_input_launch, x, *flags)
    grad_input = torch.empty_like(x)
    grad_residual = torch.empty_like(x) if want_dresidual else None
    launch(grad_output, x, grad_input, mean, rstd, or_placeholder(weight, mean), or_placeholder(sum_dy, mean),
           or_placeholder(sum_dy_xhat, mean), or_placeholder(bias, mean), or_placeholder(residual, x),
           grad_residual if want_dresidual else grad_input)
    return grad_input, grad_residual


def bn_act_backward(grad_output, x, mean, rstd, weight, bias, eps: float, *,
                    residual: Optional[torch.Tensor] = None, activation: int = 0, want_dx: bool = True,
                    want_dweight: bool = False, want_dbias: bool = False, want_dresidual: bool = False,
                    negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
    """The training backward of ``act(BN(x) + residual)`` with ``x``'s batch statistics
    (``mean``, ``rstd``): the gradient at ``x`` (through the statistics too), of the affine
    parameters and of the residual. With the residual's gradient wanted, the sums pass
    also writes dz (that gradient) and the dx pass reads it instead of dy, x's mask and the
    residual: one write and one read instead of two reads and a write.

    Returns:
        ``(grad_x, grad_weight, grad_bias, grad_residual)``, each None when not asked for
        (:func:`vhist.ops.common.op_outputs` makes them a registered op's empty outputs).
    """
    grad_output = like_layout(grad_output, x)  # once for both passes (each would convert its own)
    dz = torch.empty_like(x) if residual is not None and want_dresidual else None
    sum_dy, sum_dy_xhat, grad_weight, grad_bias = bn_grad_sums(
        grad_output, x, mean, rstd, weight, bias, eps, residual=residual, activation=activation,
        want_dweight=want_dweight, want_dbias=want_dbias, dz_out=dz, negative_slope=negative_slope)
    grad_x = None
    if want_dx:
        if dz is not None:
            grad_x, _ = bn_grad_input(dz, x, mean, rstd, weight, None, sum_dy, sum_dy_xhat, eps)
        else:
            grad_x, _ = bn_grad_input(grad_output, x, mean, rstd, weight, bias, sum_dy, sum_dy_xhat, eps,
                                      residual=residual, activation=activation, negative_slope=negative_slope)
    return grad_x, grad_weight, grad_bias, dz


# ----------------------------------------------------------------------------- launchers


@custom_op("vhist::bn_act_fwd", mutates_args=())
def bn_act_fwd(input: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float,
               activation: int, negative_slope: float) -> torch.Tensor:
    """``act(weight * (input - mean) * rstd + bias + residual)`` with given batch
    statistics: the apply pass of a BatchNorm whose statistics a conv's epilogue computed
    (``vhist::conv_bn_stats_fwd``), when its output is needed as a tensor."""
    return bn_apply(input, mean, rstd, weight, bias, eps, residual=residual, activation=activation,
                    negative_slope=negative_slope)


@bn_act_fwd.register_fake
def _(input, mean, rstd, weight, bias, residual, eps, activation, negative_slope):
    return torch.empty_like(input)


@custom_op("vhist::bn_act_bwd", mutates_args=())
def bn_act_bwd(grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               eps: float, activation: int, negative_slope: float,
               output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`bn_act_fwd` in training (:func:`bn_act_backward`).

    Args:
        output_mask: which of (grad_input, grad_weight, grad_bias, grad_residual) to compute.

    Returns:
        ``(grad_input, grad_weight, grad_bias, grad_residual)``, an entry not asked for empty.
    """
    want_dx, want_dw, want_db, want_dres = output_mask
    return op_outputs(input, *bn_act_backward(grad_output, input, mean, rstd, weight, bias, eps, residual=residual,
                                              activation=activation, want_dx=want_dx, want_dweight=want_dw,
                                              want_dbias=want_db, want_dresidual=want_dres,
                                              negative_slope=negative_slope))


@bn_act_bwd.register_fake
def _(grad_output, input, mean, rstd, weight, bias, residual, eps, activation, negative_slope, output_mask):
    c, empty = input.shape[1], input.new_empty
    return (torch.empty_like(input) if output_mask[0] else empty((0,)),
            empty((c,), dtype=weight.dtype) if output_mask[1] and weight is not None else empty((0,)),
            empty((c,), dtype=bias.dtype) if output_mask[2] and bias is not None else empty((0,)),
            torch.empty_like(input) if output_mask[3] and residual is not None else empty((0,)))


class BNActFunction(torch.autograd.Function):
    """Autograd for :func:`bn_act_fwd`: ``mean`` and ``rstd`` are the batch statistics of
    ``input`` (non-differentiable outputs of the op that computed them); the backward is
    the full training one, through the statistics."""

    @staticmethod
    def forward(ctx, input, mean, rstd, weight, bias, residual, eps, activation,
                negative_slope=DEFAULT_NEGATIVE_SLOPE):
        out = bn_act_fwd(input, mean, rstd, weight, bias, residual, eps, activation, negative_slope)
        ctx.save_for_backward(input, mean, rstd, weight, bias, residual)
        ctx.args = (eps, activation, negative_slope)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, mean, rstd, weight, bias, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[3], need[4], need[5]]
        dx, dw, db, dres = bn_act_bwd(grad_output, input, mean, rstd, weight, bias, residual, *ctx.args, mask)
        return (dx if mask[0] else None, None, None, dw if mask[1] and weight is not None else None,
                db if mask[2] and bias is not None else None, dres if mask[3] else None, None, None, None)


@custom_op("vhist::batch_norm_fwd", mutates_args=("running_mean", "running_var"))
def batch_norm_fwd(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of batch norm on the Triton kernels.

    Returns:
        ``(output, mean, rstd)``: the batch mean and 1/sqrt(var + eps) in the
        accumulation dtype when training, empty tensors in eval.
    """
    if not training:
        output = bn_apply(input, running_mean, running_var, weight, bias, eps, rstd_from_var=True)
        return output, _empty(input), _empty(input)
    mean, rstd = bn_finalize(*bn_stats_partials(input), running_mean, running_var, momentum, eps)
    return bn_apply(input, mean, rstd, weight, bias, eps), mean, rstd


@batch_norm_fwd.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    c = input.shape[1] if training else 0
    acc = acc_dtype(input.dtype)
    return torch.empty_like(input), input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc)


@custom_op("vhist::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_stats(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch statistics of ``input`` (N, C, ...) alone, running statistics updated in
    place: the first half of a training BatchNorm whose apply runs elsewhere (the
    consuming conv's prologue, :func:`vhist.ops.batch_norm_deferred`).

    Returns:
        ``(mean, rstd)`` in the accumulation dtype.
    """
    return bn_finalize(*bn_stats_partials(input), running_mean, running_var, momentum, eps)


@batch_norm_stats.register_fake
def _(input, running_mean, running_var, momentum, eps):
    acc = acc_dtype(input.dtype)
    return input.new_empty((input.shape[1],), dtype=acc), input.new_empty((input.shape[1],), dtype=acc)


@custom_op("vhist::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    training: bool,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of batch norm on the Triton kernels.

    Args:
        bias: only its presence and dtype matter (it does not enter the gradients).
        mean, rstd: what the forward saved when training; the running mean and running
            variance in eval.
        output_mask: which of (grad_input, grad_weight, grad_bias) to compute.

    Returns:
        ``(grad_input, grad_weight, grad_bias)``; an entry not asked for is empty.
    """
    want_dx, want_dw, want_db = output_mask
    want_dw, want_db = want_dw and weight is not None, want_db and bias is not None
    sum_dy = sum_dy_xhat = grad_weight = grad_bias = grad_input = None
    if training or want_dw or want_db:
        sum_dy, sum_dy_xhat, grad_weight, grad_bias = bn_grad_sums(
            grad_output, input, mean, rstd, weight, bias, eps, rstd_from_var=not training,
            want_dweight=want_dw, want_dbias=want_db)
    if want_dx:
        # The bias does not enter dx: without an activation it is never read.
        grad_input, _ = bn_grad_input(grad_output, input, mean, rstd, weight, None, sum_dy, sum_dy_xhat, eps,
                                      training=training, rstd_from_var=not training)
    return op_outputs(input, grad_input, grad_weight, grad_bias)


@batch_norm_bwd.register_fake
def _(grad_output, input, weight, bias, mean, rstd, training, eps, output_mask):
    c = input.shape[1]

    def param_grad(wanted, param):
        return input.new_empty((c,), dtype=param.dtype) if wanted and param is not None else input.new_empty((0,))

    return (torch.empty_like(input) if output_mask[0] else input.new_empty((0,)),
            param_grad(output_mask[1], weight), param_grad(output_mask[2], bias))


class BatchNormFunction(torch.autograd.Function):
    """Autograd for the Triton batch norm: saves the input and (mean, rstd), never the
    normalized activation."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        output, mean, rstd = batch_norm_fwd(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
        if training:
            ctx.save_for_backward(input, weight, bias, mean, rstd)
        else:
            ctx.save_for_backward(input, weight, bias, running_mean, running_var)
        ctx.training, ctx.eps = training, eps
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias = batch_norm_bwd(
            grad_output, input, weight, bias, mean, rstd, ctx.training, ctx.eps, [need_dx, need_dw, need_db])
        return (grad_input if need_dx else None,
                grad_weight if need_dw else None,
                grad_bias if need_db else None,
                None, None, None, None, None)


# ----------------------------------------------------------------------------- public op


def check_inputs(input, running_mean, running_var, weight, bias, training, world_size: int = 1):
    """The checks of :func:`batch_norm` (and :func:`vhist.ops.sync_batch_norm`, whose
    training statistics cover ``world_size`` processes: one value per channel here, or an
    empty batch, is then accepted, as in PyTorch's SyncBatchNorm).

    Raises:
        ValueError / TypeError: see :func:`vhist.ops.common.check_bn_args`, plus a
            non-float, empty or not 2-D to 5-D input.
    """
    check_float_dtype(OP, "input", input)
    if not 2 <= input.dim() <= 5:
        raise ValueError(f"{OP}: expected a 2-D to 5-D input (N, C, ...), got {input.dim()}-D "
                         f"of shape {tuple(input.shape)}")
    if input.numel() == 0 and world_size < 2:
        raise ValueError(f"{OP}: empty input of shape {tuple(input.shape)}")
    c = input.shape[1]
    values = input.numel() // c if c else 0
    check_bn_args(OP, c, input, weight, bias, running_mean, running_var, training,
                  values if world_size < 2 else max(values, 2))


def _batch_norm_triton(input, running_mean, running_var, weight, bias, training, momentum, eps):
    input = dense_layout(input)
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                   training, momentum, eps)


IMPLS = {"triton": _batch_norm_triton, "torch": reference.batch_norm}


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch Normalization (Ioffe & Szegedy, 2015), as ``torch.nn.functional.batch_norm``.

    Training normalizes with the batch statistics over N and the spatial dims
    (Algorithm 1) and updates ``running_mean`` / ``running_var`` in place with
    ``momentum`` (the variance unbiased); eval uses the running statistics (Algorithm 2).

    Args:
        input: (N, C) or (N, C, *spatial) with up to 3 spatial dims, contiguous or
            channels-last; the output keeps its memory format.
        running_mean, running_var: (C,) buffers, or None to always use batch statistics.
        weight, bias: optional (C,) affine parameters.
        training: use batch statistics and update the running ones.
        momentum: weight of the new statistic in the running average.
        eps: added to the variance.

    Returns:
        The normalized tensor, same shape, dtype and memory format as ``input``.
    """
    check_inputs(input, running_mean, running_var, weight, bias, training)
    impl = dispatch(OP, IMPLS, input.device)
    return impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
