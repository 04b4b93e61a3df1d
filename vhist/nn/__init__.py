"""Drop-in ``torch.nn`` modules over vhist ops."""
from vhist.nn import functional
from vhist.nn.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["functional", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
