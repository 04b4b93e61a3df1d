"""Drop-in ``torch.nn`` modules over vhist ops."""
from vhist.nn import functional
from vhist.nn.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from vhist.nn.modules.conv import Conv2d, ConvBNAct, conv_bn_act, is_depthwise
from vhist.nn.modules.activation import GELU
from vhist.nn.modules.normalization import LayerNorm, LayerNorm2d, LocalResponseNorm
from vhist.nn.modules.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["functional", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv2d", "ConvBNAct", "conv_bn_act", "is_depthwise", "LocalResponseNorm"]
__all__ += ["SyncBatchNorm", "convert_sync_batchnorm"]
__all__ += ["LayerNorm", "LayerNorm2d"]
__all__ += ["GELU"]
