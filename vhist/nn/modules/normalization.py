"""Local Response Normalization module."""
import torch
from torch import nn

from vhist.nn import functional as VF


class LocalResponseNorm(nn.LocalResponseNorm):
    """Drop-in for :class:`torch.nn.LocalResponseNorm` on vhist kernels.

    Like PyTorch, ``alpha`` is divided by ``size``:
    ``b_c = a_c / (k + alpha / size * sum_{window} a^2) ** beta``. The AlexNet paper
    (Krizhevsky et al., 2012, section 3.3) uses k=2, n=5, alpha=1e-4, beta=0.75 with no
    division, so its layer is ``LocalResponseNorm(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return VF.local_response_norm(input, self.size, self.alpha, self.beta, self.k)
