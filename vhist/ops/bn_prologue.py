"""BatchNorm + activation applied in the next conv's prologue (training).

A conv → BN → activation whose output only feeds other convs need not write its
normalized output at all. The producer writes the raw conv output ``z`` and its batch
statistics (the conv epilogue's partials, merged by ``bn_finalize``, which also updates
the running statistics); the consumer conv loads ``z`` and applies
``act(gamma * (z - mean) * rstd + beta)`` to each input tile in registers
(``_prologue`` in :mod:`vhist.kernels.conv`), its weight gradient recomputes the same
transform from ``z``, and the producer's BN + activation backward runs inside the
consumer's backward, from the same saved ``z``. This is the mainloop fusion of CUTLASS's
examples 25 and 26, for training: per such layer it saves the apply pass's read of ``z``
and write of ``y`` forward, and keeps one activation-sized tensor instead of two alive
for the backward.

The hand-off between producer and consumer is a :class:`~vhist.ops.deferred.DeferredBNAct`.
This module also holds the package-level :func:`conv2d` and :func:`fused_conv_bn_act`,
which take one as input (the tensor-only ops of :mod:`vhist.ops.conv` do not).

Registered custom ops (fakes included, so ``torch.compile`` traces them):

* ``vhist::conv_bn_stats_fwd``: ``conv2d(P(input), weight) + bias`` and its batch
  statistics, where ``P`` is the optional prologue (the producing layer's BN + act);
* ``vhist::conv_bn_stats_bwd``: its backward from the gradient at the conv output: the
  weight (and bias) gradient, and the gradient at ``input`` through the prologue (dgrad,
  then the prologue's BN + activation backward) with the prologue's affine gradients;
* ``vhist::bn_act_fwd`` / ``_bwd`` (:mod:`vhist.ops.batch_norm`): the apply pass with
  given statistics, for a consumer that needs a tensor (a residual join, a pooling).

Both sides run under :class:`ConvBNStatsFunction` and
:class:`~vhist.ops.batch_norm.BNActFunction`; the statistics are non-differentiable
outputs, since the full training backward (through the statistics) is computed by whoever
applies them. Dense convs only (the depthwise and stem paths have no prologue), triton
backend only; elsewhere :func:`conv_bn_deferred` returns the applied tensor.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from vhist import reference
from vhist.ops import conv
from vhist.ops._dispatch import autocast_inputs, dispatch
from vhist.ops.batch_norm import bn_act_backward, bn_finalize
from vhist.ops.common import (ACTIVATION_CODES, DEFAULT_NEGATIVE_SLOPE, acc_dtype, check_bn_args,
                              check_negative_slope, op_outputs, to_channels_last)
from vhist.ops.conv import (FUSED_OPS, ConvGeometry, check_conv_inputs, conv_fwd_launch, dgrad_launch, eval_conv,
                            geometry_from_lists, is_stem, wgrad_launch)
from vhist.ops.conv_common import check_residual, fold_bn
from vhist.ops.deferred import DeferredBNAct, as_tensor
from vhist.ops.fused_bn import run_fused_triton
from vhist.ops.op_call import custom_op

OP = "conv_bn_deferred"


# ----------------------------------------------------------------------------- registered ops


def _prologue(pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation, pre_negative_slope):
    """The launchers' ``prologue`` argument (see :func:`vhist.ops.conv.conv_fwd_launch`)."""
    if pre_mean is None:
        return None
    return pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation, pre_negative_slope


@custom_op("vhist::conv_bn_stats_fwd", mutates_args=("running_mean", "running_var"))
def conv_bn_stats_fwd(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      pre_mean: Optional[torch.Tensor], pre_rstd: Optional[torch.Tensor],
                      pre_weight: Optional[torch.Tensor], pre_bias: Optional[torch.Tensor], pre_activation: int,
                      pre_negative_slope: float, running_mean: Optional[torch.Tensor],
                      running_var: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int],
                      groups: int, momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z = conv2d(P(input), weight) + bias`` and the batch statistics of ``z`` (running
    statistics updated in place), with ``P(x) = act(pre_weight * (x - pre_mean) * pre_rstd
    + pre_bias)`` applied in the conv's prologue when ``pre_mean`` is given (identity
    otherwise).

    Returns:
        ``(z, mean, rstd)``: z channels_last, the statistics in the accumulation dtype.
    """
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    prologue = _prologue(pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation, pre_negative_slope)
    z, (part_mean, part_m2, part_count, _) = conv_fwd_launch(input, weight, bias, None, g, 0, stats=True,
                                                             prologue=prologue)
    mean, rstd = bn_finalize(part_mean, part_m2, part_count, running_mean, running_var, momentum, eps)
    return z, mean, rstd


@conv_bn_stats_fwd.register_fake
def _(input, weight, bias, pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation, pre_negative_slope,
      running_mean, running_var, stride, padding, dilation, groups, momentum, eps):
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    acc = acc_dtype(input.dtype)
    z = torch.empty(g.out_shape, device=input.device, dtype=input.dtype, memory_format=torch.channels_last)
    return z, input.new_empty((g.c_out,), dtype=acc), input.new_empty((g.c_out,), dtype=acc)


@custom_op("vhist::conv_bn_stats_bwd", mutates_args=())
def conv_bn_stats_bwd(grad_z: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                      pre_mean: Optional[torch.Tensor], pre_rstd: Optional[torch.Tensor],
                      pre_weight: Optional[torch.Tensor], pre_bias: Optional[torch.Tensor], pre_activation: int,
                      pre_negative_slope: float, stride: list[int], padding: list[int], dilation: list[int],
                      groups: int, pre_eps: float,
                      output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """Backward of :func:`conv_bn_stats_fwd` from ``grad_z``, the full gradient at ``z``.

    The weight gradient recomputes ``P(input)`` tile by tile; the gradient at the conv's
    input (dgrad) goes, with a prologue, through its BatchNorm + activation backward
    (training, through ``pre_mean`` / ``pre_rstd``), which gives the gradient at the
    producer's raw output and the prologue's affine gradients.

    Args:
        output_mask: which of (grad_input, grad_weight, grad_bias, grad_pre_weight,
            grad_pre_bias) to compute.

    Returns:
        The five gradients, an entry not asked for empty; grad_bias in the accumulation
        dtype.
    """
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    grad_z = to_channels_last(grad_z)
    want_dx, want_dw, want_db, want_dpw, want_dpb = output_mask
    prologue = _prologue(pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation, pre_negative_slope)
    dx = dw = db = dpw = dpb = None
    if want_dw or want_db:
        dw, db = wgrad_launch(grad_z, None, input, weight.shape, weight.dtype, g, 0, want_dw, want_db,
                              prologue=prologue)
    through_prologue = prologue is not None and (want_dx or want_dpw or want_dpb)
    if want_dx or through_prologue:
        grad_act = dgrad_launch(grad_z, None, weight, g, 0, input)
        if prologue is None:
            dx = grad_act
        else:
            dx, dpw, dpb, _ = bn_act_backward(grad_act, input, pre_mean, pre_rstd, pre_weight, pre_bias, pre_eps,
                                              activation=pre_activation, want_dx=want_dx, want_dweight=want_dpw,
                                              want_dbias=want_dpb, negative_slope=pre_negative_slope)
    return op_outputs(input, dx, dw, db, dpw, dpb)


@conv_bn_stats_bwd.register_fake
def _(grad_z, input, weight, pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation, pre_negative_slope, stride,
      padding, dilation, groups, pre_eps, output_mask):
    c_in, c_out, empty = input.shape[1], weight.shape[0], input.new_empty

    def like(t):
        return torch.empty(t.shape, device=t.device, dtype=t.dtype, memory_format=torch.channels_last)

    return (like(input) if output_mask[0] else empty((0,)),
            like(weight) if output_mask[1] else empty((0,)),
            empty((c_out,), dtype=acc_dtype(input.dtype)) if output_mask[2] else empty((0,)),
            empty((c_in,), dtype=pre_weight.dtype) if output_mask[3] and pre_weight is not None else empty((0,)),
            empty((c_in,), dtype=pre_bias.dtype) if output_mask[4] and pre_bias is not None else empty((0,)))


class ConvBNStatsFunction(torch.autograd.Function):
    """Autograd for :func:`conv_bn_stats_fwd`: differentiable in ``input``, ``weight``,
    ``bias`` and the prologue's ``pre_weight`` / ``pre_bias``; ``mean`` and ``rstd`` are
    marked non-differentiable (the consumer's backward goes through them)."""

    @staticmethod
    def forward(ctx, input, weight, bias, pre_mean, pre_rstd, pre_weight, pre_bias, pre_activation,
                pre_negative_slope, pre_eps, running_mean, running_var, stride, padding, dilation, groups, momentum,
                eps):
        z, mean, rstd = conv_bn_stats_fwd(input, weight, bias, pre_mean, pre_rstd, pre_weight, pre_bias,
                                          pre_activation, pre_negative_slope, running_mean, running_var, stride,
                                          padding, dilation, groups, momentum, eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(input, weight, pre_mean, pre_rstd, pre_weight, pre_bias)
        ctx.args = (pre_activation, pre_negative_slope, stride, padding, dilation, groups, pre_eps)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return z, mean, rstd

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_rstd):
        input, weight, pre_mean, pre_rstd, pre_weight, pre_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[5], need[6]]
        dx, dw, db, dpw, dpb = conv_bn_stats_bwd(grad_z, input, weight, pre_mean, pre_rstd, pre_weight, pre_bias,
                                                 *ctx.args, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db.to(ctx.bias_dtype) if mask[2] else None,
                None, None, dpw if mask[3] and pre_weight is not None else None,
                dpb if mask[4] and pre_bias is not None else None) + (None,) * 11


# ----------------------------------------------------------------------------- public op


def _deferred_triton(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, g: ConvGeometry, *,
                     training, momentum, eps, activation, negative_slope):
    code = ACTIVATION_CODES[activation]
    if not training and bias is None:
        # Eval: BN folded into the conv, one launch with the activation; the backward is
        # PyTorch's unfolded chain (vhist.ops.fused_bn.FusedConvBNEvalFunction).
        return run_fused_triton(FUSED_OPS, eval_conv, to_channels_last(as_tensor(input)), weight, bn_weight,
                                bn_bias, running_mean, running_var, g, g.groups, training=False, momentum=momentum,
                                eps=eps, activation=activation, residual=None, negative_slope=negative_slope)
    if not training:
        # Eval with a conv bias: BN and the bias folded into the conv, autograd through
        # the fold (an Inf in a parameter gradient can meet an Inf of the other sign
        # there, where PyTorch's unfolded backward has none).
        folded_weight, folded_bias = fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps,
                                             conv_bias=bias)
        return eval_conv(to_channels_last(as_tensor(input)), folded_weight, folded_bias, None, g, code,
                         negative_slope)
    deferred = isinstance(input, DeferredBNAct)
    pre = input.prologue_args() if deferred else (None,) * 4 + (0, DEFAULT_NEGATIVE_SLOPE)
    pre_eps = input.eps if deferred else 0.0
    raw = input.conv_output if deferred else to_channels_last(input)
    z, mean, rstd = ConvBNStatsFunction.apply(raw, weight, bias, *pre, pre_eps, running_mean, running_var,
                                              *g.op_args(), g.groups, momentum, eps)
    return DeferredBNAct(z, mean, rstd, bn_weight, bn_bias, activation, eps, negative_slope)


def _deferred_reference(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, *, training,
                        momentum, eps, activation, negative_slope):
    top, bottom, left, right = g.padding  # resolved, possibly asymmetric ('same' with an even kernel)
    x = torch.nn.functional.pad(as_tensor(input), (left, right, top, bottom))
    y = torch.nn.functional.conv2d(x, weight, bias, g.stride, 0, g.dilation, g.groups)
    y = torch.nn.functional.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return reference.activate(y, activation, negative_slope)


IMPLS = {"triton": _deferred_triton, "torch": _deferred_reference}


def conv_bn_deferred(input: Union[torch.Tensor, DeferredBNAct], weight: torch.Tensor,
                     bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], *,
                     bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                     training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                     activation: Optional[str] = "relu",
                     negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> Union[torch.Tensor, DeferredBNAct]:
    """``act(batch_norm(conv2d(input, weight, bias)))`` for a consumer that is a conv:
    in training on the triton backend, a :class:`DeferredBNAct` (the conv output and its
    statistics, running statistics updated) that :func:`fused_conv_bn_act`, :func:`conv2d`
    and this function take as ``input`` and apply in their conv's prologue; in eval, or
    on another backend, the applied tensor. ``input`` may itself be a
    :class:`DeferredBNAct`.

    Args:
        weight, bias: the conv's (C_out, C_in / groups, KH, KW) weight and optional bias
            (a bias before BatchNorm only moves the batch mean, as in torchvision's VGG-BN).
        bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
        activation, negative_slope, stride, padding, dilation, groups: as
            :func:`vhist.ops.fused_conv_bn_act`.

    A stem conv (at most 4 input channels, :func:`vhist.ops.conv.is_stem`) consuming a
    deferred input applies it first (the stem path has no prologue).

    Raises:
        ValueError / TypeError: as :func:`vhist.ops.fused_conv_bn_act` for bad arguments.
    """
    deferred = isinstance(input, DeferredBNAct)
    x, weight, bias = autocast_inputs(input.conv_output if deferred else input, weight, bias)
    if not deferred:
        input = x
    elif x is not input.conv_output:  # autocast cast it
        input = dataclasses.replace(input, conv_output=x)
    g = check_conv_inputs(OP, x, weight, bias, None, stride, padding, dilation, groups, activation)
    check_bn_args(OP, g.c_out, x, bn_weight, bn_bias, running_mean, running_var, training, g.positions,
                  names=("bn_weight", "bn_bias"), matches="the conv's {c} output channels",
                  shape_name="a conv output of shape", shape=g.out_shape)
    negative_slope = check_negative_slope(OP, negative_slope)
    if deferred and is_stem(g, x.dtype):
        # The stem path (at most 4 input channels, channels zero-padded) has no prologue:
        # the producer's BN + act is applied first, in one pass.
        input = input.materialize()
    impl = dispatch(OP, IMPLS, x.device)
    return impl(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, training=training,
                momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope)


# ----------------------------------------------------------------------------- convs taking a deferred input


def fused_conv_bn_act(input: Union[torch.Tensor, DeferredBNAct], weight, bn_weight, bn_bias, running_mean,
                      running_var, *, stride=1, padding=0, dilation=1, groups=1, training=True, momentum=0.1,
                      eps=1e-5, activation: Optional[str] = "relu", residual: Optional[torch.Tensor] = None,
                      negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """:func:`vhist.ops.conv.fused_conv_bn_act` that also takes a :class:`DeferredBNAct`
    as ``input``: in training on the triton backend its BN + act run in this conv's
    prologue (:func:`conv_bn_deferred`) and this layer's own BN + residual + act in one
    apply pass; elsewhere it is applied first. Arguments as
    :func:`vhist.ops.conv.fused_conv_bn_act`.
    """
    if isinstance(input, DeferredBNAct):
        device = input.conv_output.device
        if training and dispatch(conv.FUSED_OP, conv.FUSED_IMPLS, device) is conv.FUSED_IMPLS["triton"]:
            out = conv_bn_deferred(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                                   padding=padding, dilation=dilation, groups=groups, training=True,
                                   momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope)
            # Its BN + act in this conv's prologue; this layer's own BN applied after.
            (residual,) = autocast_inputs(residual) if residual is not None else (None,)
            check_residual(conv.FUSED_OP, residual, out.conv_output, out.shape)
            return out.materialize(residual)
        input = input.materialize()
    return conv.fused_conv_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                                  padding=padding, dilation=dilation, groups=groups, training=training,
                                  momentum=momentum, eps=eps, activation=activation, residual=residual,
                                  negative_slope=negative_slope)


def conv2d(input: Union[torch.Tensor, DeferredBNAct], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, activation: Optional[str] = None,
           residual: Optional[torch.Tensor] = None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """:func:`vhist.ops.conv.conv2d` that also takes a :class:`DeferredBNAct` as ``input``
    (applied first, in one pass: the plain conv has no BN-statistics epilogue to pair a
    prologue with). Arguments as :func:`vhist.ops.conv.conv2d`."""
    return conv.conv2d(as_tensor(input), weight, bias, stride, padding, dilation, groups, activation=activation,
                       residual=residual, negative_slope=negative_slope)


# The design's name for the fused op.
fused_conv_bn_relu = fused_conv_bn_act
