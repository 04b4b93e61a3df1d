"""BatchNorm modules: subclasses of torch's, so parameters, buffers and state_dict keys
(``num_batches_tracked`` included) are the same and torch checkpoints load unchanged."""
import torch
from torch import nn

from vhist.nn import functional as VF


def is_tracking(bn: nn.Module) -> bool:
    """Whether this forward of the BatchNorm module ``bn`` updates its running statistics
    and counts the batch in ``num_batches_tracked``."""
    return bn.training and bn.track_running_stats and bn.num_batches_tracked is not None


def bn_forward_args(bn: nn.Module) -> tuple:
    """What torch's ``_BatchNorm.forward`` hands ``F.batch_norm``, for the module ``bn``.

    Returns:
        ``(running_mean, running_var, training, momentum)``: the buffers (None when the
        statistics are not kept in training), whether to normalize with batch statistics
        (training, or no running statistics), and the factor of the running average (the
        cumulative average ``1 / (batches + 1)`` when ``bn.momentum`` is None).
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if is_tracking(bn) and bn.momentum is None:
        momentum = 1.0 / float(bn.num_batches_tracked + 1)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    # Statistics are only updated while training and tracking.
    keep = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep else None, bn.running_var if keep else None, use_batch_stats, momentum)


def count_batch(bn: nn.Module) -> None:
    """Counts a forward in ``num_batches_tracked`` when tracking; called after the op, so
    that an input the op rejects leaves the module unchanged."""
    if is_tracking(bn):
        bn.num_batches_tracked.add_(1)


class _BatchNormMixin:
    """The forward of torch's ``_BatchNorm``, on :func:`vhist.nn.functional.batch_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, training, momentum = bn_forward_args(self)
        out = VF.batch_norm(input, running_mean, running_var, self.weight, self.bias, training, momentum, self.eps)
        count_batch(self)
        return out


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on vhist kernels (Ioffe & Szegedy, 2015)."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on vhist kernels (Ioffe & Szegedy, 2015)."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on vhist kernels (Ioffe & Szegedy, 2015)."""
