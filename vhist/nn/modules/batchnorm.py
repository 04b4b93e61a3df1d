"""BatchNorm modules: subclasses of torch's, so parameters, buffers and state_dict keys
(``num_batches_tracked`` included) are the same and torch checkpoints load unchanged."""
import torch
from torch import nn

from vhist.nn import functional as VF


class _BatchNormMixin:
    """The forward of torch's ``_BatchNorm``, on :func:`vhist.nn.functional.batch_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            # Cumulative moving average when momentum is None (as torch does).
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked + 1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Statistics are only updated while training and tracking.
        track = not self.training or self.track_running_stats
        out = VF.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        # Counted after the op, so an input the op rejects leaves the module unchanged.
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on vhist kernels (Ioffe & Szegedy, 2015)."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on vhist kernels (Ioffe & Szegedy, 2015)."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on vhist kernels (Ioffe & Szegedy, 2015)."""
