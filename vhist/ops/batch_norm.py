"""Batch Normalization: Triton launchers, torch.library registration and autograd.

``batch_norm_fwd`` / ``batch_norm_bwd`` launch the kernels of
:mod:`vhist.kernels.batch_norm` and are registered as ``vhist::batch_norm_fwd`` and
``vhist::batch_norm_bwd`` custom ops with fake implementations, so ``torch.compile``
traces them. :class:`BatchNormFunction` ties them together for autograd, and
:func:`batch_norm` picks the backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from vhist import reference
from vhist.ops._dispatch import check_float_dtype, check_same_device, dispatch

OP = "batch_norm"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


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
        return triton.cdiv(self.n, self.n_per_chunk) * self.segs_per_row

    @property
    def count(self) -> int:
        return self.n * self.s

    def args(self) -> tuple:
        return (self.n, self.c, self.s, self.stride_n, self.stride_c, self.stride_s,
                self.n_per_chunk, self.seg_len, self.segs_per_row)

    def grid(self, meta) -> tuple:
        return (triton.cdiv(self.c, meta["BLOCK_C"]), self.num_chunks)


def is_channels_last_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` (N, C, *spatial) is dense with channels innermost."""
    if x.dim() < 3:
        return x.is_contiguous()
    perm = (0, *range(2, x.dim()), 1)
    return x.permute(perm).is_contiguous()


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


def channel_geometry(x: torch.Tensor) -> ChannelGeometry:
    """The (N, C, S) view of a dense ``x`` and its reduction chunks."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    channels_contiguous = s == 1 or (not x.is_contiguous() and is_channels_last_dense(x))
    if channels_contiguous:
        # N and S are contiguous together: one flat "row" of N*S positions, stride C.
        rows, length, stride_n, stride_c, stride_s = 1, n * s, 0, 1, c
    else:
        rows, length, stride_n, stride_c, stride_s = n, s, c * s, s, 1

    # Enough chunks to give every SM several programs, never fewer than 512 elements
    # per chunk, and never more than 64K (which bounds one program's loop).
    c_blocks = triton.cdiv(c, 64 if channels_contiguous else 2)
    chunks = triton.cdiv(8 * _sm_count(x.device), c_blocks)
    total = rows * length
    chunks = max(min(chunks, triton.cdiv(total, 512)), triton.cdiv(total, 65536), 1)
    per_chunk = triton.cdiv(total, chunks)
    if per_chunk >= length:
        n_per_chunk, seg_len = per_chunk // length, length
    else:
        n_per_chunk, seg_len = 1, per_chunk
    return ChannelGeometry(rows, c, length, stride_n, stride_c, stride_s, n_per_chunk, seg_len,
                           triton.cdiv(length, seg_len), channels_contiguous)


def _pick(kernels, geom: ChannelGeometry):
    channels_contiguous_kernel, spatial_contiguous_kernel = kernels
    return channels_contiguous_kernel if geom.channels_contiguous else spatial_contiguous_kernel


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=acc_dtype(like.dtype))


# ----------------------------------------------------------------------------- launchers


@torch.library.custom_op("vhist::batch_norm_fwd", mutates_args=("running_mean", "running_var"))
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
    from vhist.kernels import batch_norm as kernels

    geom = channel_geometry(input)
    acc, tl_acc = acc_dtype(input.dtype), _tl_acc(input.dtype)
    output = torch.empty_like(input)
    c = geom.c
    if training:
        chunks = geom.num_chunks
        part_mean = input.new_empty((chunks, c), dtype=acc)
        part_m2 = input.new_empty((chunks, c), dtype=acc)
        part_count = input.new_empty((chunks,), dtype=acc)
        _pick(kernels.bn_fwd_stats, geom)[geom.grid](
            input, part_mean, part_m2, part_count, *geom.args(), ACC=tl_acc)
        mean = input.new_empty((c,), dtype=acc)
        rstd = input.new_empty((c,), dtype=acc)
        update = running_mean is not None
        block_c = min(triton.next_power_of_2(c), 128)
        kernels.bn_fwd_finalize[(triton.cdiv(c, block_c),)](
            part_mean, part_m2, part_count, mean, rstd,
            running_mean if update else mean, running_var if update else rstd,
            c, chunks, momentum, eps,
            UPDATE_RUNNING=update, ACC=tl_acc, BLOCK_C=block_c, BLOCK_K=16)
        stats, rstd_from_var = (mean, rstd), False
    else:
        mean, rstd = _empty(input), _empty(input)
        stats, rstd_from_var = (running_mean, running_var), True
    _pick(kernels.bn_fwd_apply, geom)[geom.grid](
        input, output, *stats,
        weight if weight is not None else input, bias if bias is not None else input,
        *geom.args(), eps,
        RSTD_FROM_VAR=rstd_from_var, HAS_W=weight is not None, HAS_B=bias is not None, ACC=tl_acc)
    return output, mean, rstd


@batch_norm_fwd.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    c = input.shape[1] if training else 0
    acc = acc_dtype(input.dtype)
    return torch.empty_like(input), input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc)


@torch.library.custom_op("vhist::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    training: bool,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of batch norm on the Triton kernels.

    Args:
        mean, rstd: what the forward saved when training; the running mean and running
            variance in eval.
        output_mask: which of (grad_input, grad_weight, grad_bias) to compute.

    Returns:
        ``(grad_input, grad_weight, grad_bias)``; an entry not asked for is empty.
    """
    from vhist.kernels import batch_norm as kernels

    grad_output = like_layout(grad_output, input)
    geom = channel_geometry(input)
    acc, tl_acc = acc_dtype(input.dtype), _tl_acc(input.dtype)
    c = geom.c
    want_dx, want_dw, want_db = output_mask
    want_dw = want_dw and weight is not None
    want_db = want_db and weight is not None
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_weight = input.new_empty((c,) if want_dw else (0,), dtype=param_dtype)
    grad_bias = input.new_empty((c,) if want_db else (0,), dtype=param_dtype)
    sum_dy = sum_dy_xhat = _empty(input)
    if training or want_dw or want_db:
        chunks = geom.num_chunks
        part_dy = input.new_empty((chunks, c), dtype=acc)
        part_dy_xhat = input.new_empty((chunks, c), dtype=acc)
        _pick(kernels.bn_bwd_reduce, geom)[geom.grid](
            grad_output, input, mean, rstd, part_dy, part_dy_xhat, *geom.args(), eps,
            RSTD_FROM_VAR=not training, ACC=tl_acc)
        sum_dy = input.new_empty((c,), dtype=acc)
        sum_dy_xhat = input.new_empty((c,), dtype=acc)
        block_c = min(triton.next_power_of_2(c), 128)
        kernels.bn_bwd_finalize[(triton.cdiv(c, block_c),)](
            part_dy, part_dy_xhat, sum_dy, sum_dy_xhat,
            grad_weight if want_dw else sum_dy, grad_bias if want_db else sum_dy, c, chunks,
            WRITE_DW=want_dw, WRITE_DB=want_db, ACC=tl_acc, BLOCK_C=block_c, BLOCK_K=16)
    grad_input = input.new_empty((0,))
    if want_dx:
        grad_input = torch.empty_like(input)
        _pick(kernels.bn_bwd_dx, geom)[geom.grid](
            grad_output, input, grad_input, mean, rstd,
            weight if weight is not None else input, sum_dy, sum_dy_xhat,
            *geom.args(), eps, 1.0 / geom.count,
            TRAINING=training, RSTD_FROM_VAR=not training, HAS_W=weight is not None, ACC=tl_acc)
    return grad_input, grad_weight, grad_bias


@batch_norm_bwd.register_fake
def _(grad_output, input, weight, mean, rstd, training, eps, output_mask):
    c = input.shape[1]
    has_w = weight is not None
    param_dtype = weight.dtype if has_w else input.dtype
    return (
        torch.empty_like(input) if output_mask[0] else input.new_empty((0,)),
        input.new_empty((c,) if output_mask[1] and has_w else (0,), dtype=param_dtype),
        input.new_empty((c,) if output_mask[2] and has_w else (0,), dtype=param_dtype),
    )


class BatchNormFunction(torch.autograd.Function):
    """Autograd for the Triton batch norm: saves the input and (mean, rstd), never the
    normalized activation."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        output, mean, rstd = torch.ops.vhist.batch_norm_fwd(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
        if training:
            ctx.save_for_backward(input, weight, mean, rstd)
        else:
            ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.training, ctx.eps = training, eps
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias = torch.ops.vhist.batch_norm_bwd(
            grad_output, input, weight, mean, rstd, ctx.training, ctx.eps,
            [need_dx, need_dw, need_db and ctx.has_bias])
        return (grad_input if need_dx else None,
                grad_weight if need_dw else None,
                grad_bias if need_db and ctx.has_bias else None,
                None, None, None, None, None)


# ----------------------------------------------------------------------------- public op


def _check_inputs(input, running_mean, running_var, weight, bias, training):
    check_same_device(OP, input=input, running_mean=running_mean, running_var=running_var,
                      weight=weight, bias=bias)
    for name, t in (("input", input), ("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_float_dtype(OP, name, t)
    if not 2 <= input.dim() <= 5:
        raise ValueError(f"{OP}: expected a 2-D to 5-D input (N, C, ...), got {input.dim()}-D "
                         f"of shape {tuple(input.shape)}")
    if input.numel() == 0:
        raise ValueError(f"{OP}: empty input of shape {tuple(input.shape)}")
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},) to match the input's "
                             f"{c} channels, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{OP}: running_mean and running_var must be given in eval mode")
    if training and input.numel() // c <= 1:
        raise ValueError(f"{OP}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")


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
    _check_inputs(input, running_mean, running_var, weight, bias, training)
    impl = dispatch(OP, IMPLS, input.device)
    return impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
