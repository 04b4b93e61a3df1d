"""Conv -> activation -> BatchNorm as one op (ConvMixer's layer order, Trockman & Kolter,
2022, "Patches Are All You Need?": ``BN(GELU(conv(x)))``).

Training forward: the conv's epilogue applies the activation to the accumulator and
reduces the BatchNorm partials (count, mean, M2) of the *activated* value per tile, from a
config fixed by the shape (:func:`vhist.ops.conv.stats_config`), while it stores the
*pre-activation* ``z``; ``bn_finalize`` merges the partials (running statistics updated)
and one apply pass normalizes ``act(z)``, recomputing the activation as it loads ``z``.
So ``z`` is the one activation-sized tensor kept for the backward, as the conv -> BN ->
activation ops keep their raw conv output: the BN backward recomputes ``act(z)`` for x̂,
and its input-gradient pass multiplies by ``act'(z)`` on the way out, which gives the
gradient at ``z`` that dgrad and wgrad (with the conv bias's gradient) consume.

Eval: the conv with its activation epilogue (``vhist::conv2d_fwd``), then BatchNorm on the
running statistics (one elementwise pass); BN after a nonlinearity does not fold into the
conv.

Registered custom ops (fakes included): ``vhist::fused_conv_act_bn_fwd`` / ``_bwd``.
"""
from __future__ import annotations

from typing import Optional

import torch

from vhist import reference
from vhist.ops._dispatch import autocast_inputs, dispatch
from vhist.ops.batch_norm import batch_norm, bn_apply, bn_finalize, bn_grad_input, bn_grad_sums
from vhist.ops.common import (ACTIVATION_CODES, DEFAULT_NEGATIVE_SLOPE, acc_dtype, check_negative_slope, empty_4d,
                              op_outputs, to_channels_last)
from vhist.ops.conv import (check_conv_inputs, conv_fwd_launch, conv_geometry, dgrad_launch, eval_conv,
                            geometry_from_lists, wgrad_launch)
from vhist.ops.fused_bn import check_fused_args
from vhist.ops.op_call import custom_op

OP = "fused_conv_act_bn"


@custom_op("vhist::fused_conv_act_bn_fwd", mutates_args=("running_mean", "running_var"))
def fused_conv_act_bn_fwd(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                          stride: list[int], padding: list[int], dilation: list[int], groups: int, momentum: float,
                          eps: float, activation: int,
                          negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of ``batch_norm(act(conv2d(input, weight) + bias))``.

    Returns:
        ``(output, z, mean, rstd)``: z the pre-activation (what the backward reads), both
        channels_last; the statistics (of ``act(z)``) in the accumulation dtype.
    """
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    z, (part_mean, part_m2, part_count, _) = conv_fwd_launch(input, weight, bias, None, g, activation, stats=True,
                                                             negative_slope=negative_slope)
    mean, rstd = bn_finalize(part_mean, part_m2, part_count, running_mean, running_var, momentum, eps)
    out = bn_apply(z, mean, rstd, bn_weight, bn_bias, eps, x_activation=(activation, negative_slope))
    return out, z, mean, rstd


@fused_conv_act_bn_fwd.register_fake
def _(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, momentum,
      eps, activation, negative_slope):
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    acc = acc_dtype(input.dtype)
    return (empty_4d(g.out_shape, input, True), empty_4d(g.out_shape, input, True),
            input.new_empty((g.c_out,), dtype=acc), input.new_empty((g.c_out,), dtype=acc))


@custom_op("vhist::fused_conv_act_bn_bwd", mutates_args=())
def fused_conv_act_bn_bwd(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, z: torch.Tensor,
                          mean: torch.Tensor, rstd: torch.Tensor, bn_weight: Optional[torch.Tensor],
                          bn_bias: Optional[torch.Tensor], stride: list[int], padding: list[int],
                          dilation: list[int], groups: int, eps: float, activation: int, negative_slope: float,
                          output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Training backward of :func:`fused_conv_act_bn_fwd`.

    Args:
        output_mask: which of (input, weight, bias, bn_weight, bn_bias) need gradients.

    Returns:
        The five gradients, an entry not asked for empty; the conv bias's gradient in the
        accumulation dtype.
    """
    g = geometry_from_lists(input.shape, weight.shape, stride, padding, dilation, groups)
    want_dx, want_dw, want_db, want_dgamma, want_dbeta = output_mask
    x_activation = (activation, negative_slope)
    sum_dy, sum_dy_xhat, dgamma, dbeta = bn_grad_sums(grad_output, z, mean, rstd, bn_weight, bn_bias, eps,
                                                      want_dweight=want_dgamma, want_dbias=want_dbeta,
                                                      x_activation=x_activation)
    dx = dw = db = None
    if want_dx or want_dw or want_db:
        dz, _ = bn_grad_input(grad_output, z, mean, rstd, bn_weight, bn_bias, sum_dy, sum_dy_xhat, eps,
                              x_activation=x_activation)
        if want_dx:
            dx = dgrad_launch(dz, None, weight, g, 0, input)
        if want_dw or want_db:
            dw, db = wgrad_launch(dz, None, input, weight.shape, weight.dtype, g, 0, want_dw, want_db)
    return op_outputs(input, dx, dw, db, dgamma, dbeta)


@fused_conv_act_bn_bwd.register_fake
def _(grad_output, input, weight, z, mean, rstd, bn_weight, bn_bias, stride, padding, dilation, groups, eps,
      activation, negative_slope, output_mask):
    c, empty = weight.shape[0], input.new_empty
    return (empty_4d(input.shape, input, True) if output_mask[0] else empty((0,)),
            empty_4d(weight.shape, weight, True) if output_mask[1] else empty((0,)),
            empty((c,), dtype=acc_dtype(input.dtype)) if output_mask[2] else empty((0,)),
            empty((c,), dtype=bn_weight.dtype) if output_mask[3] and bn_weight is not None else empty((0,)),
            empty((c,), dtype=bn_bias.dtype) if output_mask[4] and bn_bias is not None else empty((0,)))


class FusedConvActBNFunction(torch.autograd.Function):
    """Autograd for the training conv -> activation -> BN op; saves the input, the weight,
    the pre-activation ``z`` and the batch statistics."""

    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                groups, momentum, eps, activation, negative_slope):
        out, z, mean, rstd = fused_conv_act_bn_fwd(input, weight, bias, bn_weight, bn_bias, running_mean,
                                                   running_var, stride, padding, dilation, groups, momentum, eps,
                                                   activation, negative_slope)
        ctx.save_for_backward(input, weight, z, mean, rstd, bn_weight, bn_bias)
        ctx.args = (stride, padding, dilation, groups, eps, activation, negative_slope)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, z, mean, rstd, bn_weight, bn_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[4]]
        dx, dw, db, dgamma, dbeta = fused_conv_act_bn_bwd(grad_output, input, weight, z, mean, rstd, bn_weight,
                                                          bn_bias, *ctx.args, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db.to(ctx.bias_dtype) if mask[2] else None,
                dgamma if mask[3] and bn_weight is not None else None,
                dbeta if mask[4] and bn_bias is not None else None) + (None,) * 10


def _fused_triton(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, stride, padding, dilation,
                  groups, activation, negative_slope, training, momentum, eps):
    g = conv_geometry(OP, input.shape, weight.shape, stride, padding, dilation, groups)
    code = ACTIVATION_CODES[activation]
    input = to_channels_last(input)
    if training:
        return FusedConvActBNFunction.apply(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                            *g.op_args(), g.groups, momentum, eps, code, negative_slope)
    y = eval_conv(input, weight, bias, None, g, code, negative_slope)
    return batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, momentum, eps)


def _fused_reference(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, **kwargs):
    return reference.fused_conv_act_bn(input, weight, bn_weight, bn_bias, running_mean, running_var, bias=bias,
                                       **kwargs)


IMPLS = {"triton": _fused_triton, "torch": _fused_reference}


def fused_conv_act_bn(input: torch.Tensor, weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
                      bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                      running_var: Optional[torch.Tensor], *, bias: Optional[torch.Tensor] = None, stride=1,
                      padding=0, dilation=1, groups: int = 1, activation: Optional[str] = "relu",
                      negative_slope: float = DEFAULT_NEGATIVE_SLOPE, training: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5) -> torch.Tensor:
    """``batch_norm(act(conv2d(input, weight, bias)))`` as one op, running statistics
    included (see :func:`vhist.reference.fused_conv_act_bn`): the conv -> activation -> BN
    order of ConvMixer.

    Args:
        input: (N, C_in, H, W), NCHW or channels_last.
        weight, bias: the conv's (C_out, C_in / groups, KH, KW) weight and optional (C_out,) bias.
        bn_weight, bn_bias: optional (C_out,) BatchNorm affine parameters.
        running_mean, running_var: (C_out,) buffers, updated in place when training; or
            None to always use batch statistics (training only).
        stride, padding, dilation, groups: as :func:`vhist.ops.conv2d`.
        activation, negative_slope: as :func:`vhist.ops.conv2d`.
        training: batch statistics of the activated output (and running-stat update) or
            the running ones.
        momentum, eps: as ``F.batch_norm`` (a module with ``momentum=None`` passes
            ``1 / num_batches_tracked``, as ``nn.BatchNorm2d`` does).

    Returns:
        (N, C_out, OH, OW); channels_last on the triton backend.
    """
    input, weight, bias = autocast_inputs(input, weight, bias)
    g = check_conv_inputs(OP, input, weight, bias, None, stride, padding, dilation, groups, activation)
    check_fused_args(OP, g, input, bn_weight, bn_bias, running_mean, running_var, training, None)
    negative_slope = check_negative_slope(OP, negative_slope)
    impl = dispatch(OP, IMPLS, input.device)
    return impl(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=stride, padding=padding,
                dilation=dilation, groups=groups, activation=activation, negative_slope=negative_slope,
                training=training, momentum=momentum, eps=eps)
