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


class LayerNorm(nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` on vhist kernels (same parameters and
    state_dict; ``elementwise_affine`` and ``bias`` as torch's).

    :meth:`add_forward` folds a pre-norm block's residual add into the norm.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return VF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def add_forward(self, input: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, self(s))`` with ``s = input + residual``, in one pass."""
        return VF.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W) tensors, as timm's ``LayerNorm2d``
    (ConvNeXt, Liu et al., 2022): same parameters and state_dict; the output is
    channels_last on the triton backend."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return VF.layer_norm_2d(input, self.weight, self.bias, self.eps)
