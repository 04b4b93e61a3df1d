"""Batch norm with statistics synchronized across processes (data-parallel training).

The split of :mod:`vhist.ops.batch_norm` into a statistics stage, a finalize stage and
an apply stage leaves a natural place for the communication:

forward
    1. every rank reduces its own activation to per-channel ``(count, mean, M2)``
       (Triton: the ``bn_fwd_stats`` kernel's per-chunk partials, merged locally;
       torch: the mean, then the sum of squared deviations);
    2. ``all_gather`` of the packed ``(count, mean, M2)`` of every rank;
    3. the world-size rows are merged with Chan et al.'s formula, in rank order, and
       the running statistics are updated with the global unbiased variance (Triton:
       the ``bn_fwd_finalize`` kernel, fed the gathered rows as its "chunks");
    4. every rank normalizes its own activation with the global (mean, rstd).

backward
    1. every rank reduces ``sum(dy)`` and ``sum(dy * x_hat)`` over its activation;
    2. ``all_reduce(SUM)`` of both;
    3. ``dx = w * rstd * (dy - sum(dy)/m - x_hat * sum(dy * x_hat)/m)`` with the global
       ``m``; ``dweight`` / ``dbias`` are the local sums (DistributedDataParallel
       reduces parameter gradients itself, as it does for torch's SyncBatchNorm).

Nothing forms ``E[x^2] - E[x]^2``, so the result does not cancel when |mean| >> std.
The gathered rows are merged in rank order on every rank, so all ranks hold bitwise
identical statistics. Without an initialized process group (or with one process) the
op is exactly batch norm over the local batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from vhist.ops._dispatch import dispatch
from vhist.ops.batch_norm import (batch_norm, bn_apply, bn_finalize, bn_grad_input, bn_grad_sums, bn_stats_partials,
                                  check_inputs)
from vhist.ops.common import acc_dtype, dense_layout, like_layout

OP = "sync_batch_norm"


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against the (N, C, *spatial) ``x``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def merge_stats(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple:
    """K-way form of Chan et al.'s pairwise update: merges K rows of per-channel
    ``(count, mean, M2)`` into one.

    ``mean = sum_k n_k m_k / n`` and ``M2 = sum_k (M2_k + n_k (m_k - mean)^2)``: both are
    sums of non-negative terms around the merged mean, so nothing cancels.

    Args:
        count: (K,) element counts per channel of each row (same for every channel).
        mean: (K, C) row means.
        m2: (K, C) row sums of squared deviations from the row mean.

    Returns:
        ``(count, mean, m2)``: a scalar tensor and two (C,) tensors.
    """
    total = count.sum()
    merged_mean = (count[:, None] * mean).sum(0) / total
    dev = mean - merged_mean[None, :]
    merged_m2 = (m2 + count[:, None] * dev * dev).sum(0)
    return total, merged_mean, merged_m2


def _world(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


# ----------------------------------------------------------------------------- local stages


def _local_stats_torch(x: torch.Tensor):
    acc = acc_dtype(x.dtype)
    dims = _reduce_dims(x)
    count = x.numel() // x.shape[1]
    # Two passes, sum / n then the squared deviations, as F.batch_norm computes them on
    # CPU: a channel holding an Inf keeps an Inf mean (var_mean's Welford update makes it
    # Inf - Inf = NaN, and the running mean with it).
    x_acc = x.to(acc)
    mean = x_acc.mean(dims)
    dev = x_acc - _bcast(mean, x)
    return x.new_full((), float(count), dtype=acc), mean, (dev * dev).sum(dims)


def _local_stats_triton(x: torch.Tensor):
    part_mean, part_m2, part_count = bn_stats_partials(x)
    # A handful of chunks: merged here, in chunk order, with the kernel's formula.
    return merge_stats(part_count, part_mean, part_m2)


def _finalize_torch(counts, means, m2s, running_mean, running_var, momentum, eps):
    count, mean, m2 = merge_stats(counts, means, m2s)
    rstd = torch.rsqrt(m2 / count + eps)
    if running_mean is not None:
        unbiased = m2 / (count - 1)
        running_mean.copy_((1 - momentum) * running_mean.to(mean.dtype) + momentum * mean)
        running_var.copy_((1 - momentum) * running_var.to(mean.dtype) + momentum * unbiased)
    return mean, rstd


def _finalize_triton(counts, means, m2s, running_mean, running_var, momentum, eps):
    # The gathered per-rank rows are the finalize kernel's partials.
    return bn_finalize(means.contiguous(), m2s.contiguous(), counts.contiguous(), running_mean, running_var,
                       momentum, eps)


def _apply_torch(x, mean, rstd, weight, bias, eps):
    acc = mean.dtype
    scale = rstd if weight is None else rstd * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return (x.to(acc) * _bcast(scale, x) + _bcast(shift, x)).to(x.dtype)


def _grad_sums_torch(dy, x, mean, rstd, eps):
    acc = mean.dtype
    dims = _reduce_dims(x)
    dy_acc = dy.to(acc)
    x_hat = (x.to(acc) - _bcast(mean, x)) * _bcast(rstd, x)
    return dy_acc.sum(dims), (dy_acc * x_hat).sum(dims)


def _grad_sums_triton(dy, x, mean, rstd, eps):
    sum_dy, sum_dy_xhat, _, _ = bn_grad_sums(dy, x, mean, rstd, None, None, eps)
    return sum_dy, sum_dy_xhat


def _grad_input_torch(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, eps):
    acc = mean.dtype
    x_hat = (x.to(acc) - _bcast(mean, x)) * _bcast(rstd, x)
    scale = rstd if weight is None else rstd * weight.to(acc)
    g = dy.to(acc) - _bcast(sum_dy / count, x) - x_hat * _bcast(sum_dy_xhat / count, x)
    return (g * _bcast(scale, x)).to(x.dtype)


def _grad_input_triton(dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, eps):
    # The global count is a device tensor (reading it would synchronize with the host):
    # the sums are divided by it on the device, and the kernel's 1/count is then 1.
    return bn_grad_input(dy, x, mean, rstd, weight, None, sum_dy / count, sum_dy_xhat / count, eps, count=1)[0]


@dataclass(frozen=True)
class _Stages:
    """One backend's local stages; the communication happens between them."""

    local_stats: Callable
    finalize: Callable
    apply: Callable
    grad_sums: Callable
    grad_input: Callable


STAGES = {
    "triton": _Stages(_local_stats_triton, _finalize_triton, bn_apply, _grad_sums_triton, _grad_input_triton),
    "torch": _Stages(_local_stats_torch, _finalize_torch, _apply_torch, _grad_sums_torch, _grad_input_torch),
}


# ----------------------------------------------------------------------------- autograd


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the union of every rank's batch (see module doc).

    Saves the input and the global (mean, rstd), never the normalized activation."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, process_group, stages):
        world = _world(process_group)
        c = input.shape[1]
        # A process with an empty batch (world >= 2 only) sends a zero row, as PyTorch's
        # SyncBatchNorm does; with count 0 it adds nothing to Chan's merge, so no row has
        # to be dropped (PyTorch drops them with a boolean mask, a host synchronization).
        empty = input.numel() == 0
        if empty:
            zeros = input.new_zeros((c,), dtype=acc_dtype(input.dtype))
            count, mean, m2 = zeros.new_zeros(()), zeros, zeros
        else:
            count, mean, m2 = stages.local_stats(input)
        packed = torch.cat([count.reshape(1), mean, m2])
        if world > 1:
            rows = [torch.empty_like(packed) for _ in range(world)]
            dist.all_gather(rows, packed, group=process_group)
            gathered = torch.stack(rows)
        else:
            gathered = packed[None]
        counts, means, m2s = gathered[:, 0], gathered[:, 1:1 + c], gathered[:, 1 + c:]
        mean, rstd = stages.finalize(counts, means, m2s, running_mean, running_var, momentum, eps)
        output = torch.empty_like(input) if empty else stages.apply(input, mean, rstd, weight, bias, eps)
        # The global count stays on the device: float() of it would synchronize with the
        # host once per layer and step, and break a CUDA graph capture.
        ctx.save_for_backward(input, weight, mean, rstd, counts.sum())
        ctx.eps, ctx.process_group, ctx.stages, ctx.world = eps, process_group, stages, world
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, rstd, total_count = ctx.saved_tensors
        grad_output = like_layout(grad_output, input)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        empty = input.numel() == 0
        if empty:
            sum_dy = sum_dy_xhat = mean.new_zeros(mean.shape)
        else:
            sum_dy, sum_dy_xhat = ctx.stages.grad_sums(grad_output, input, mean, rstd, ctx.eps)
        # The parameter gradients are this rank's share; DDP sums/averages them.
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_dw and weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_db and ctx.bias_dtype is not None else None
        grad_input = None
        if need_dx:
            if ctx.world > 1:
                sums = torch.cat([sum_dy, sum_dy_xhat])
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
                c = sum_dy.shape[0]
                sum_dy, sum_dy_xhat = sums[:c], sums[c:]
            grad_input = torch.empty_like(input) if empty else ctx.stages.grad_input(
                grad_output, input, mean, rstd, weight, sum_dy, sum_dy_xhat, total_count, ctx.eps)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public op


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> torch.Tensor:
    """Batch norm whose training statistics cover the batches of every process in
    ``process_group`` (Ioffe & Szegedy, 2015, over the global batch).

    Same arguments and result as :func:`vhist.ops.batch_norm`, plus ``process_group``
    (None: the default group). Eval mode uses the running statistics and needs no
    communication, so it is exactly :func:`vhist.ops.batch_norm`. Every rank must call
    it the same number of times, with the same channel count, dtype and backend.

    Raises:
        ValueError / TypeError: bad input (checked before anything is written).
        NotImplementedError: the active backend has no kernel (only ``triton`` and
            ``torch`` have one).
    """
    world = _world(process_group) if training else 1
    check_inputs(input, running_mean, running_var, weight, bias, training, world)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    stages = dispatch(OP, STAGES, input.device)
    if stages is STAGES["triton"]:
        input = dense_layout(input)
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                       process_group, stages)
