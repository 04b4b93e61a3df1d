"""The hand-off of a BatchNorm + activation whose apply is deferred to the consuming conv's
prologue: :class:`DeferredBNAct`, what :func:`vhist.ops.conv_bn_deferred` and
:func:`vhist.ops.batch_norm_deferred` return in training and the convs of
:mod:`vhist.ops.bn_prologue` take as input.

Its own module (below both :mod:`vhist.ops.conv` and :mod:`vhist.ops.bn_prologue`), so that
neither has to import the other for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from vhist import reference
from vhist.ops._dispatch import autocast_inputs, dispatch
from vhist.ops.batch_norm import BNActFunction, batch_norm, batch_norm_stats
from vhist.ops.common import (ACTIVATION_CODES, DEFAULT_NEGATIVE_SLOPE, activation_code, check_bn_args,
                              check_negative_slope, to_channels_last)

OP = "batch_norm_deferred"


@dataclass(frozen=True)
class DeferredBNAct:
    """``act(batch_norm(conv_output))`` in training, not applied yet: what a conv
    consumes in its prologue.

    Attributes:
        conv_output: the tensor BatchNorm normalizes (N, C, H, W), channels_last, in
            autograd: a conv's raw output (:func:`vhist.ops.conv_bn_deferred`) or any
            tensor, e.g. a concatenation (:func:`vhist.ops.batch_norm_deferred`).
        mean, rstd: its batch statistics (C,), accumulation dtype, non-differentiable.
        weight, bias: the BatchNorm affine parameters (C,) or None.
        activation: a name of :data:`vhist.ops.common.ACTIVATION_CODES`.
        eps: BatchNorm's epsilon.
        negative_slope: leaky relu's slope.
    """

    conv_output: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    activation: Optional[str]
    eps: float
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    @property
    def shape(self) -> torch.Size:
        return self.conv_output.shape

    def materialize(self, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The applied tensor ``act(BN(conv_output) + residual)`` (one apply pass)."""
        return BNActFunction.apply(self.conv_output, self.mean, self.rstd, self.weight, self.bias, residual,
                                   self.eps, ACTIVATION_CODES[self.activation], self.negative_slope)

    def prologue_args(self) -> tuple:
        """The ``pre_*`` arguments of ``vhist::conv_bn_stats_fwd`` / ``_bwd``: mean, rstd,
        weight, bias, activation code and slope."""
        return (self.mean, self.rstd, self.weight, self.bias, ACTIVATION_CODES[self.activation],
                self.negative_slope)


def as_tensor(x: Union[torch.Tensor, DeferredBNAct]) -> torch.Tensor:
    """``x`` as a tensor: a :class:`DeferredBNAct` applied, a tensor unchanged."""
    return x.materialize() if isinstance(x, DeferredBNAct) else x


# ----------------------------------------------------------------------------- BN -> act -> conv


def _deferred_triton(input, bn_weight, bn_bias, running_mean, running_var, *, training, momentum, eps, activation,
                     negative_slope):
    if not training:
        # Eval: BN on the running statistics (one elementwise pass), then the activation.
        y = batch_norm(input, running_mean, running_var, bn_weight, bn_bias, False, momentum, eps)
        return reference.activate(y, activation, negative_slope)
    x = to_channels_last(input) if input.dim() == 4 else input
    mean, rstd = batch_norm_stats(x.detach(), running_mean, running_var, momentum, eps)
    return DeferredBNAct(x, mean, rstd, bn_weight, bn_bias, activation, eps, negative_slope)


def _deferred_reference(input, bn_weight, bn_bias, running_mean, running_var, *, training, momentum, eps,
                        activation, negative_slope):
    return reference.bn_act(input, bn_weight, bn_bias, running_mean, running_var, training=training,
                            momentum=momentum, eps=eps, activation=activation, negative_slope=negative_slope)


IMPLS = {"triton": _deferred_triton, "torch": _deferred_reference}


def batch_norm_deferred(input: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], *,
                        training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                        activation: Optional[str] = "relu",
                        negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> Union[torch.Tensor, DeferredBNAct]:
    """``act(batch_norm(input))`` for a consumer that is a conv, where ``input`` is not one
    conv's output (a concatenation: DenseNet's pre-activation layers, a split conv's
    input). In training on the triton backend the BatchNorm kernels compute the batch
    statistics (running statistics updated) and a :class:`DeferredBNAct` is returned,
    whose normalize + activation :func:`vhist.ops.conv_bn_deferred` and
    :func:`vhist.ops.fused_conv_bn_act` apply in their conv's prologue (and whose
    backward, through the statistics, runs in that conv's backward); in eval, or on
    another backend, the applied tensor.

    Args:
        input: (N, C, H, W), NCHW (copied once to channels_last) or channels_last.
        bn_weight, bn_bias: optional (C,) affine parameters.
        running_mean, running_var: (C,) buffers, updated in place when training; or
            None to always use batch statistics (training only).
        training, momentum, eps: as ``F.batch_norm``.
        activation, negative_slope: as :func:`vhist.ops.conv2d`.

    Raises:
        ValueError / TypeError: as ``F.batch_norm`` for bad arguments, and an unknown
            activation.
    """
    (input,) = autocast_inputs(input)
    if input.dim() != 4:
        raise ValueError(f"{OP}: expected a 4-D input (N, C, H, W), got shape {tuple(input.shape)}")
    activation_code(OP, activation)
    negative_slope = check_negative_slope(OP, negative_slope)
    check_bn_args(OP, input.shape[1], input, bn_weight, bn_bias, running_mean, running_var, training,
                  input.numel() // input.shape[1], names=("bn_weight", "bn_bias"))
    impl = dispatch(OP, IMPLS, input.device)
    return impl(input, bn_weight, bn_bias, running_mean, running_var, training=training, momentum=momentum,
                eps=eps, activation=activation, negative_slope=negative_slope)
