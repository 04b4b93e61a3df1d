"""What a converted graph calls: vhist's functional ops, with the semantics of the
PyTorch layers they replace.

Each function here is one node of a rewritten graph (the converter's tracer keeps them
whole, so converting a converted model finds them again and changes nothing). A
BatchNorm given as a module keeps its module semantics: batch statistics in training or
without running statistics, the cumulative average for ``momentum=None``,
``num_batches_tracked`` counted after a successful call, and a SyncBatchNorm runs its
own forward, which synchronizes the statistics across processes.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from vhist.convert.activations import torch_activation
from vhist.nn import functional as VF
from vhist.nn.modules.batchnorm import bn_forward_args, count_batch
from vhist.nn.modules.sync_batchnorm import SyncBatchNorm
from vhist.ops import DeferredBNAct

SYNC_BATCH_NORMS = (SyncBatchNorm, nn.SyncBatchNorm)


def _is_depthwise(input: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    channels = input.shape[-3]
    return groups > 1 and groups == channels and weight.shape[0] % channels == 0


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fits(residual: Optional[torch.Tensor], input: torch.Tensor, weight: torch.Tensor, stride, padding,
          dilation) -> bool:
    """Whether ``residual`` has exactly the conv output's shape and dtype, as the fused
    epilogues need (the matcher sees dataflow, not shapes: an add that broadcasts, or
    promotes the dtype, runs as PyTorch's after the conv)."""
    if residual is None:
        return True
    input = input.conv_output if isinstance(input, DeferredBNAct) else input
    if residual.dtype != input.dtype or residual.dim() != input.dim():
        return False
    size = []
    for x, k, s, p, d in zip(input.shape[-2:], weight.shape[-2:], _pair(stride), _pair(padding), _pair(dilation)):
        if p == "same":
            size.append(x)
            continue
        p = 0 if p == "valid" else p
        size.append((x + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(residual.shape) == (*input.shape[:-3], weight.shape[0], *size)


def conv(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
         groups: int, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
         act_kwargs: Optional[dict] = None) -> torch.Tensor:
    """``act(conv2d(input, weight, bias) + residual)``: the dense conv with its epilogue
    (:func:`vhist.nn.functional.conv2d`), a depthwise conv on
    :func:`vhist.nn.functional.depthwise_conv2d` (its residual and activation as PyTorch's,
    since that op has no epilogue argument)."""
    act_kwargs = act_kwargs or {}
    if not _fits(residual, input, weight, stride, padding, dilation):
        out = conv(input, weight, bias, stride, padding, dilation, groups)
        return torch_activation(out + residual, activation, act_kwargs)
    if not _is_depthwise(input, weight, groups):
        return VF.conv2d(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                         residual=residual, **act_kwargs)
    unbatched = input.dim() == 3
    out = VF.depthwise_conv2d(input.unsqueeze(0) if unbatched else input, weight, bias, stride, padding, dilation)
    out = out.squeeze(0) if unbatched else out
    if residual is not None:
        out = out + residual
    return torch_activation(out, activation, act_kwargs)


def conv_bn(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
            groups: int, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
            momentum: float, eps: float, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
            act_kwargs: Optional[dict] = None, defer: bool = False) -> Union[torch.Tensor, DeferredBNAct]:
    """``act(batch_norm(conv2d(input, weight, bias)) + residual)`` on the fused op with
    ``F.batch_norm``'s arguments: :func:`vhist.nn.functional.fused_conv_bn_act` (dense) or
    :func:`vhist.nn.functional.fused_depthwise_bn_act`; a conv bias before BatchNorm goes
    through :func:`vhist.nn.functional.conv_bn_deferred` (the bias only moves the batch
    mean, and the running mean with it). The converter passes a residual only without a
    conv bias, and a conv bias only to a dense conv.

    With ``defer`` (a dense conv whose output only dense fused convs consume), the result
    is :func:`vhist.nn.functional.conv_bn_deferred`'s: in training on the triton backend a
    :class:`~vhist.ops.DeferredBNAct` whose BN + activation the consuming convs apply in
    their prologue (the zoo's hand-off, CUTLASS's mainloop fusion), else the tensor.
    ``input`` may be such a :class:`~vhist.ops.DeferredBNAct`."""
    act_kwargs = act_kwargs or {}
    if not _fits(residual, input, weight, stride, padding, dilation):
        out = conv_bn(input, weight, bias, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean,
                      running_var, training, momentum, eps)
        return torch_activation(out + residual, activation, act_kwargs)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, training=training, momentum=momentum, eps=eps,
                  activation=activation, **act_kwargs)
    if bias is not None or defer:
        out = VF.conv_bn_deferred(input, weight, bn_weight, bn_bias, running_mean, running_var, bias=bias,
                                  groups=groups, **kwargs)
        return out if defer else VF.as_tensor(out)
    if _is_depthwise(input, weight, groups):
        return VF.fused_depthwise_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var,
                                         residual=residual, **kwargs)
    return VF.fused_conv_bn_act(input, weight, bn_weight, bn_bias, running_mean, running_var, groups=groups,
                                residual=residual, **kwargs)


def conv_bn_module(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                   dilation, groups: int, bn: nn.Module, activation: Optional[str] = None,
                   residual: Optional[torch.Tensor] = None, act_kwargs: Optional[dict] = None,
                   defer: bool = False) -> Union[torch.Tensor, DeferredBNAct]:
    """:func:`conv_bn` for the BatchNorm module ``bn``, with its module semantics (see the
    module docstring). A SyncBatchNorm runs as its own module after the conv (the fused
    op cannot exchange statistics mid-kernel); the converter gives it no activation or
    residual."""
    if isinstance(bn, SYNC_BATCH_NORMS):
        return bn(conv(input, weight, bias, stride, padding, dilation, groups))
    running_mean, running_var, training, momentum = bn_forward_args(bn)
    out = conv_bn(input, weight, bias, stride, padding, dilation, groups, bn.weight, bn.bias, running_mean,
                  running_var, training, momentum, bn.eps, activation, residual, act_kwargs, defer)
    count_batch(bn)
    return out


def has_layer_orders() -> bool:
    """Whether vhist's ops have the conv -> act -> BN op and the deferred BN -> act of a
    tensor (:func:`vhist.nn.functional.fused_conv_act_bn`, ``batch_norm_deferred``)."""
    return hasattr(VF, "fused_conv_act_bn") and hasattr(VF, "batch_norm_deferred")


def conv_act_bn(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                groups: int, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                momentum: float, eps: float, activation: Optional[str] = None,
                act_kwargs: Optional[dict] = None) -> torch.Tensor:
    """``batch_norm(act(conv2d(input, weight, bias)))`` (ConvMixer's order) on
    :func:`vhist.nn.functional.fused_conv_act_bn`, with ``F.batch_norm``'s arguments."""
    return VF.fused_conv_act_bn(input, weight, bn_weight, bn_bias, running_mean, running_var, bias=bias,
                                stride=stride, padding=padding, dilation=dilation, groups=groups,
                                activation=activation, training=training, momentum=momentum, eps=eps,
                                **(act_kwargs or {}))


def conv_act_bn_module(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                       dilation, groups: int, bn: nn.Module, activation: Optional[str] = None,
                       act_kwargs: Optional[dict] = None) -> torch.Tensor:
    """:func:`conv_act_bn` for the BatchNorm module ``bn`` (module semantics; the
    converter gives it no SyncBatchNorm)."""
    running_mean, running_var, training, momentum = bn_forward_args(bn)
    out = conv_act_bn(input, weight, bias, stride, padding, dilation, groups, bn.weight, bn.bias, running_mean,
                      running_var, training, momentum, bn.eps, activation, act_kwargs)
    count_batch(bn)
    return out


def bn_act(input: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
           running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
           momentum: float, eps: float, activation: Optional[str] = None,
           act_kwargs: Optional[dict] = None) -> Union[torch.Tensor, DeferredBNAct]:
    """``act(batch_norm(input))`` for convs to consume, where ``input`` is no conv's output
    (DenseNet's concatenation): :func:`vhist.nn.functional.batch_norm_deferred`, whose
    normalize + activation the consuming convs apply in their prologue (training, triton
    backend), else the tensor."""
    return VF.batch_norm_deferred(input, bn_weight, bn_bias, running_mean, running_var, training=training,
                                  momentum=momentum, eps=eps, activation=activation, **(act_kwargs or {}))


def bn_act_module(input: torch.Tensor, bn: nn.Module, activation: Optional[str] = None,
                  act_kwargs: Optional[dict] = None) -> Union[torch.Tensor, DeferredBNAct]:
    """:func:`bn_act` for the BatchNorm module ``bn`` (module semantics)."""
    running_mean, running_var, training, momentum = bn_forward_args(bn)
    out = bn_act(input, bn.weight, bn.bias, running_mean, running_var, training, momentum, bn.eps, activation,
                 act_kwargs)
    count_batch(bn)
    return out


def local_response_norm(input: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """``F.local_response_norm`` on :func:`vhist.nn.functional.local_response_norm`."""
    return VF.local_response_norm(input, size, alpha, beta, k)


# What the converter's tracer keeps whole (a converted graph's own nodes).
CALLS = (conv, conv_bn, conv_bn_module, conv_act_bn, conv_act_bn_module, bn_act, bn_act_module, local_response_norm)
