"""Activation modules."""
import torch
from torch import nn

from vhist.nn import functional as VF


class GELU(nn.GELU):
    """Drop-in for :class:`torch.nn.GELU` on vhist's bias + GELU kernel (no bias)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return VF.gelu(input, self.approximate)
