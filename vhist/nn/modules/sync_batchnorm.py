"""Cross-process BatchNorm for data-parallel training, and the model conversion.

:class:`SyncBatchNorm` keeps the parameters, buffers and state_dict keys of
:class:`torch.nn.BatchNorm2d`, so a checkpoint moves freely between the two.
:func:`convert_sync_batchnorm` swaps vhist (and torch) BatchNorm modules in a model.

Fused conv + BN + activation computes its statistics inside the fused op, where no
communication can happen, so :func:`vhist.nn.conv_bn_act` (which every
:class:`vhist.nn.ConvBNAct` and the models' (conv, bn) pairs go through) runs a
(conv, :class:`SyncBatchNorm`) pair unfused, through :func:`unfused_conv_bn_act`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vhist.nn import functional as VF
from vhist.nn.modules.batchnorm import bn_forward_args, count_batch
from vhist.reference import activate


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` on vhist kernels.

    Training normalizes with the statistics of the global batch (every process in
    ``process_group``), exchanged as per-channel (count, mean, M2); see
    :mod:`vhist.ops.sync_batch_norm`. Eval, and training without an initialized process
    group, are plain batch norm.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as
            :class:`torch.nn.BatchNorm2d`.
        process_group: the group to synchronize over (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, training, momentum = bn_forward_args(self)
        out = VF.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, training, momentum,
                                 self.eps, process_group=self.process_group)
        count_batch(self)
        return out


def unfused_conv_bn_act(conv: nn.Conv2d, bn: nn.Module, input: torch.Tensor, activation: Optional[str] = "relu",
                        residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(bn(conv(input)) + residual)`` as three separate calls, so that ``bn`` runs its
    own forward (a :class:`SyncBatchNorm` exchanges its statistics there).
    :func:`vhist.nn.conv_bn_act` calls this for a :class:`SyncBatchNorm`."""
    out = bn(conv(input))
    if residual is not None:
        out = out + residual
    return activate(out, activation)


def _to_sync(bn: nn.modules.batchnorm._BatchNorm, process_group) -> SyncBatchNorm:
    sync = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         process_group=process_group)
    if bn.affine:
        with torch.no_grad():
            sync.weight = bn.weight
            sync.bias = bn.bias
    sync.running_mean = bn.running_mean
    sync.running_var = bn.running_var
    sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replaces every BatchNorm module of ``module`` (vhist's or torch's, 1-D to 3-D) with
    a :class:`SyncBatchNorm` sharing its parameters and buffers (a :class:`vhist.nn.ConvBNAct`
    then runs unfused; see :func:`vhist.nn.conv_bn_act`).

    Args:
        module: the model; its children are replaced in place.
        process_group: the group to synchronize over (None: the default group).

    Returns:
        The converted module (a new object only when ``module`` itself is a BatchNorm).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "unfused_conv_bn_act"]
