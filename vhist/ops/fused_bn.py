"""The fused conv + BatchNorm + residual + activation scaffold, shared by the dense conv
(:mod:`vhist.ops.conv`) and the depthwise conv (:mod:`vhist.ops.depthwise`).

A conv family plugs in its passes (:class:`ConvPasses`: forward with BN statistics in
the epilogue, input gradient, weight gradient) and gets the rest:

* training forward: the conv pass writes the conv output and per-tile (count, mean,
  M2) partials; ``bn_finalize`` merges them (Chan et al.) and updates the running
  statistics; one ``bn_apply`` pass applies scale, shift, residual and activation;
* training backward: ``bn_grad_sums`` recomputes the activation's derivative from the
  saved conv output and sums dz and dz * x_hat per channel (with a residual whose gradient is
  wanted, it also writes dz, that gradient), ``bn_grad_input`` writes dy_conv (reading
  dz when it was written), then the conv's input- and weight-gradient passes;
* eval: BN folded into the weight and a bias (:func:`fold_bn`), one conv launch with
  residual and activation in its epilogue; the backward (:class:`FusedConvBNEvalFunction`)
  is PyTorch's unfolded conv -> batch_norm(eval) -> activation chain, not autograd
  through the fold (see :func:`_fused_eval_bwd`).

Both ops are registered as ``vhist::<name>_fwd`` / ``vhist::<name>_bwd`` with one
schema (``groups`` included; a depthwise conv has ``groups = C_in``), each with its
fake implementation, and run under :class:`FusedConvBNFunction`. Saved for backward:
the input, the weight, the conv output and (mean, rstd), plus the residual the caller
holds anyway; never a normalized or a post-activation copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vhist.ops.batch_norm import bn_act_backward, bn_apply, bn_finalize, bn_grad_input, bn_grad_sums
from vhist.ops.common import ACTIVATION_CODES, acc_dtype, check_bn_args, op_outputs
from vhist.ops.conv_common import ConvGeometryBase, check_residual, fold_bn
from vhist.ops.op_call import custom_op


@dataclass(frozen=True)
class ConvPasses:
    """The conv passes a fused conv + BN op runs.

    Attributes:
        geometry: ``(input_shape, weight_shape, stride, padding, dilation, groups)`` ->
            the conv's geometry, from the registered op's list arguments.
        forward_with_stats: ``(input, weight, geom)`` -> ``(conv_output, (part_mean,
            part_m2, part_count))``, the BN partials in the accumulation dtype.
        grad_input: ``(dy_conv, input, weight, geom)`` -> the input gradient.
        grad_weight: ``(dy_conv, input, weight, geom)`` -> the weight gradient.
        empty_output: ``(input, shape)`` -> an uninitialized tensor in the memory format
            the conv writes its output and input gradient in (for the fakes).
        empty_grad_weight: ``(weight)`` -> an uninitialized weight gradient (fakes).
        grad_input_and_weight: optional ``(dy_conv, input, weight, geom)`` -> ``(input
            gradient, weight gradient)`` in one pass over dy_conv, run when both are
            wanted (the depthwise conv has one; the dense conv's are two GEMMs).
    """

    geometry: Callable[..., ConvGeometryBase]
    forward_with_stats: Callable
    grad_input: Callable
    grad_weight: Callable
    empty_output: Callable
    empty_grad_weight: Callable
    grad_input_and_weight: Optional[Callable] = None


def _fused_fwd(passes: ConvPasses):
    def fwd(
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
        groups: int,
        momentum: float,
        eps: float,
        activation: int,
        negative_slope: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward of conv + BN (batch statistics) + residual + activation.

        Returns:
            ``(output, conv_output, mean, rstd)``; the statistics in the accumulation dtype.
        """
        geom = passes.geometry(input.shape, weight.shape, stride, padding, dilation, groups)
        conv_out, partials = passes.forward_with_stats(input, weight, geom)
        mean, rstd = bn_finalize(*partials, running_mean, running_var, momentum, eps)
        out = bn_apply(conv_out, mean, rstd, bn_weight, bn_bias, eps, residual=residual, activation=activation,
                       negative_slope=negative_slope)
        return out, conv_out, mean, rstd

    def fake(input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, dilation,
             groups, momentum, eps, activation, negative_slope):
        geom = passes.geometry(input.shape, weight.shape, stride, padding, dilation, groups)
        acc = acc_dtype(input.dtype)
        return (passes.empty_output(input, geom.out_shape), passes.empty_output(input, geom.out_shape),
                input.new_empty((geom.c_out,), dtype=acc), input.new_empty((geom.c_out,), dtype=acc))

    return fwd, fake


def _fused_bwd(passes: ConvPasses):
    def bwd(
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
        groups: int,
        eps: float,
        activation: int,
        negative_slope: float,
        output_mask: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training backward of the fused forward.

        Args:
            output_mask: which of (input, weight, bn_weight, bn_bias, residual) need gradients.

        Returns:
            The five gradients, an entry not asked for empty.
        """
        geom = passes.geometry(input.shape, weight.shape, stride, padding, dilation, groups)
        want_dx, want_dw, want_dgamma, want_dbeta, want_dres = output_mask
        dy_conv, dgamma, dbeta, dres = bn_act_backward(
            grad_output, conv_output, mean, rstd, bn_weight, bn_bias, eps, residual=residual, activation=activation,
            negative_slope=negative_slope, want_dx=want_dx or want_dw, want_dweight=want_dgamma, want_dbias=want_dbeta,
            want_dresidual=want_dres)
        dx = dw = None
        if want_dx or want_dw:
            if want_dx and want_dw and passes.grad_input_and_weight is not None:
                dx, dw = passes.grad_input_and_weight(dy_conv, input, weight, geom)
            else:
                if want_dx:
                    dx = passes.grad_input(dy_conv, input, weight, geom)
                if want_dw:
                    dw = passes.grad_weight(dy_conv, input, weight, geom)
        return op_outputs(input, dx, dw, dgamma, dbeta, dres)

    def fake(grad_output, input, weight, conv_output, mean, rstd, bn_weight, bn_bias, residual, stride, padding,
             dilation, groups, eps, activation, negative_slope, output_mask):
        c = weight.shape[0]

        def empty():
            return input.new_empty((0,))

        return (passes.empty_output(input, input.shape) if output_mask[0] else empty(),
                passes.empty_grad_weight(weight) if output_mask[1] else empty(),
                input.new_empty((c,), dtype=bn_weight.dtype) if output_mask[2] and bn_weight is not None
                else empty(),
                input.new_empty((c,), dtype=bn_bias.dtype) if output_mask[3] and bn_bias is not None else empty(),
                torch.empty_like(conv_output) if output_mask[4] else empty())

    return bwd, fake


def _fused_eval_bwd(passes: ConvPasses):
    def bwd(
        grad_output: torch.Tensor,
        input: torch.Tensor,
        weight: torch.Tensor,
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        residual: Optional[torch.Tensor],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        eps: float,
        activation: int,
        negative_slope: float,
        output_mask: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval backward of conv + BN (running statistics) + residual + activation, on the
        unfolded chain as PyTorch differentiates it: with x_hat = (conv(x, w) - mean) *
        rstd recomputed from the conv output, dgamma = sum(dz * x_hat), dbeta = sum(dz),
        dy_conv = dz * gamma * rstd, then the conv's input and weight gradients of dy_conv.
        Autograd through the fold would form dgamma = sum_taps(dW_folded * w) * rstd -
        mean * rstd * dbias_folded, an Inf - Inf (NaN) where PyTorch's sum has none.

        The forward stays folded (one launch, the conv output never stored), so the conv
        output is recomputed here: one conv pass (its BN partials unused) on top of the
        training backward's passes.

        Args:
            output_mask: which of (input, weight, bn_weight, bn_bias, residual) need gradients.

        Returns:
            The five gradients, an entry not asked for empty.
        """
        geom = passes.geometry(input.shape, weight.shape, stride, padding, dilation, groups)
        want_dx, want_dw, want_dgamma, want_dbeta, want_dres = output_mask
        conv_out, _ = passes.forward_with_stats(input, weight, geom)
        _, _, dgamma, dbeta = bn_grad_sums(grad_output, conv_out, running_mean, running_var, bn_weight, bn_bias,
                                           eps, rstd_from_var=True, residual=residual, activation=activation,
                                           negative_slope=negative_slope, want_dweight=want_dgamma,
                                           want_dbias=want_dbeta)
        dx = dw = dres = None
        if want_dx or want_dw or want_dres:
            dy_conv, dres = bn_grad_input(grad_output, conv_out, running_mean, running_var, bn_weight, bn_bias,
                                          None, None, eps, training=False, rstd_from_var=True, residual=residual,
                                          activation=activation, negative_slope=negative_slope,
                                          want_dresidual=want_dres)
            if want_dx and want_dw and passes.grad_input_and_weight is not None:
                dx, dw = passes.grad_input_and_weight(dy_conv, input, weight, geom)
            else:
                if want_dx:
                    dx = passes.grad_input(dy_conv, input, weight, geom)
                if want_dw:
                    dw = passes.grad_weight(dy_conv, input, weight, geom)
        return op_outputs(input, dx, dw, dgamma, dbeta, dres)

    def fake(grad_output, input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
             dilation, groups, eps, activation, negative_slope, output_mask):
        def empty():
            return input.new_empty((0,))

        def param(wanted, p):
            return p.new_empty(p.shape) if wanted and p is not None else empty()

        return (passes.empty_output(input, input.shape) if output_mask[0] else empty(),
                passes.empty_grad_weight(weight) if output_mask[1] else empty(),
                param(output_mask[2], bn_weight), param(output_mask[3], bn_bias),
                passes.empty_output(input, grad_output.shape) if output_mask[4] else empty())

    return bwd, fake


def define_fused_ops(name: str, passes: ConvPasses) -> tuple:
    """Registers ``vhist::<name>_fwd``, ``vhist::<name>_bwd`` and (the eval backward)
    ``vhist::<name>_eval_bwd``, with their fakes, on ``passes``.

    Returns:
        ``(fwd, bwd, eval_bwd)``, the registered ops as :class:`~vhist.ops.op_call.EagerOp`
        (direct calls in eager mode, ``torch.ops.vhist.<name>_*`` when compiling).
    """
    fwd, fwd_fake = _fused_fwd(passes)
    bwd, bwd_fake = _fused_bwd(passes)
    eval_bwd, eval_bwd_fake = _fused_eval_bwd(passes)
    fwd_op = custom_op(f"vhist::{name}_fwd", fwd, mutates_args=("running_mean", "running_var"))
    fwd_op.register_fake(fwd_fake)
    bwd_op = custom_op(f"vhist::{name}_bwd", bwd, mutates_args=())
    bwd_op.register_fake(bwd_fake)
    eval_bwd_op = custom_op(f"vhist::{name}_eval_bwd", eval_bwd, mutates_args=())
    eval_bwd_op.register_fake(eval_bwd_fake)
    return fwd_op, bwd_op, eval_bwd_op


class FusedConvBNFunction(torch.autograd.Function):
    """Autograd for a training fused conv + BN op; ``ops`` is the ``(fwd, bwd)`` pair
    :func:`define_fused_ops` registered."""

    @staticmethod
    def forward(ctx, input, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                stride, padding, dilation, groups, momentum, eps, activation, negative_slope, ops):
        fwd, bwd, _ = ops
        out, conv_out, mean, rstd = fwd(input, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                        stride, padding, dilation, groups, momentum, eps, activation, negative_slope)
        ctx.save_for_backward(input, weight, conv_out, mean, rstd, bn_weight, bn_bias, residual)
        ctx.args = (stride, padding, dilation, groups, eps, activation, negative_slope)
        ctx.bwd = bwd
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, conv_out, mean, rstd, bn_weight, bn_bias, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[6]]
        dx, dw, dgamma, dbeta, dres = ctx.bwd(grad_output, input, weight, conv_out, mean, rstd, bn_weight, bn_bias,
                                              residual, *ctx.args, mask)
        return (dx if mask[0] else None, dw if mask[1] else None,
                dgamma if mask[2] and bn_weight is not None else None,
                dbeta if mask[3] and bn_bias is not None else None,
                None, None, dres if mask[4] else None,
                None, None, None, None, None, None, None, None, None)


class FusedConvBNEvalFunction(torch.autograd.Function):
    """Autograd for an eval fused conv + BN op: the folded conv forward (``eval_conv`` on
    :func:`fold_bn`'s weight and bias, one launch) and the unfolded backward, the
    ``eval_bwd`` op :func:`define_fused_ops` registered."""

    @staticmethod
    def forward(ctx, input, weight, bn_weight, bn_bias, running_mean, running_var, residual, geom, groups, eps,
                activation, negative_slope, ops, eval_conv):
        folded_weight, folded_bias = fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps)
        out = eval_conv(input, folded_weight, folded_bias, residual, geom, activation, negative_slope)
        ctx.save_for_backward(input, weight, bn_weight, bn_bias, running_mean, running_var, residual)
        ctx.args = (*geom.op_args(), groups, eps, activation, negative_slope)
        ctx.eval_bwd = ops[2]
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bn_weight, bn_bias, running_mean, running_var, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[6]]
        dx, dw, dgamma, dbeta, dres = ctx.eval_bwd(grad_output, input, weight, bn_weight, bn_bias, running_mean,
                                                   running_var, residual, *ctx.args, mask)
        return (dx if mask[0] else None, dw if mask[1] else None,
                dgamma if mask[2] and bn_weight is not None else None,
                dbeta if mask[3] and bn_bias is not None else None,
                None, None, dres if mask[4] else None,
                None, None, None, None, None, None, None)


def check_fused_args(op: str, geom: ConvGeometryBase, input, bn_weight, bn_bias, running_mean, running_var,
                     training: bool, residual: Optional[torch.Tensor]) -> None:
    """The checks of a fused op beyond its conv's: the residual and BatchNorm's
    parameters and statistics against the conv's output."""
    check_residual(op, residual, input, geom.out_shape)
    check_bn_args(op, geom.c_out, input, bn_weight, bn_bias, running_mean, running_var, training, geom.positions,
                  names=("bn_weight", "bn_bias"), matches="the conv's {c} output channels",
                  shape_name="a conv output of shape", shape=geom.out_shape)


def run_fused_triton(ops, eval_conv: Callable, input, weight, bn_weight, bn_bias, running_mean, running_var,
                     geom: ConvGeometryBase, groups: int, *, training: bool, momentum: float, eps: float,
                     activation: Optional[str], residual: Optional[torch.Tensor],
                     negative_slope: float) -> torch.Tensor:
    """The triton backend of a fused op on checked arguments.

    Args:
        ops: ``(fwd, bwd, eval_bwd)`` from :func:`define_fused_ops`.
        eval_conv: ``(input, weight, bias, residual, geom, activation_code,
            negative_slope)`` -> the conv with its epilogue, run on the folded BN in eval.
    """
    code = ACTIVATION_CODES[activation]
    if training:
        return FusedConvBNFunction.apply(input, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                         *geom.op_args(), groups, momentum, eps, code, negative_slope, ops)
    return FusedConvBNEvalFunction.apply(input, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                         geom, groups, eps, code, negative_slope, ops, eval_conv)
