"""vhist ops: each one dispatches to the active backend (see :mod:`vhist.backend`).

Importing this package registers the ``vhist::*`` custom ops with ``torch.library``.
"""
from vhist.ops.batch_norm import BatchNormFunction, BNActFunction, batch_norm
# conv2d and fused_conv_bn_act of vhist.ops.bn_prologue: vhist.ops.conv's, also taking a DeferredBNAct.
from vhist.ops.bn_prologue import (ConvBNStatsFunction, conv2d, conv_bn_deferred, fused_conv_bn_act,
                                   fused_conv_bn_relu)
from vhist.ops.common import ACTIVATION_CODES
from vhist.ops.conv_act_bn import FusedConvActBNFunction, fused_conv_act_bn
from vhist.ops.deferred import DeferredBNAct, as_tensor, batch_norm_deferred
from vhist.ops.depthwise import DepthwiseConv2dFunction, depthwise_conv2d, fused_depthwise_bn_act
from vhist.ops.fused_bn import FusedConvBNFunction
from vhist.ops.attention import AttentionFunction, attention, scaled_dot_product_attention
from vhist.ops.gelu import BiasGeluFunction, bias_gelu, gelu
from vhist.ops.layer_norm import LayerNormFunction, add_layer_norm, layer_norm, layer_norm_2d
from vhist.ops.local_response_norm import local_response_norm
from vhist.ops.sync_batch_norm import SyncBatchNormFunction, sync_batch_norm

# fused_conv_bn_relu is the design's name of fused_conv_bn_act, kept as an alias.
__all__ = ["BatchNormFunction", "batch_norm", "conv2d", "depthwise_conv2d", "fused_conv_bn_act", "fused_conv_bn_relu",
           "fused_depthwise_bn_act", "local_response_norm"]
__all__ += ["SyncBatchNormFunction", "sync_batch_norm"]
__all__ += ["LayerNormFunction", "add_layer_norm", "layer_norm", "layer_norm_2d"]
__all__ += ["DepthwiseConv2dFunction", "FusedConvBNFunction", "FusedDepthwiseBNActFunction"]
# BN + activation in the next conv's prologue (vhist.ops.bn_prologue).
__all__ += ["conv_bn_deferred", "DeferredBNAct", "ConvBNStatsFunction", "BNActFunction"]
# The activations every op with an ``activation=`` argument takes (names -> kernel codes).
__all__ += ["ACTIVATION_CODES"]
# The other layer orders: conv -> act -> BN (vhist.ops.conv_act_bn), BN -> act -> conv on
# any tensor (vhist.ops.deferred).
__all__ += ["fused_conv_act_bn", "FusedConvActBNFunction", "batch_norm_deferred"]

# The fused depthwise op's autograd is the fused conv + BN scaffold's (one class for both).
FusedDepthwiseBNActFunction = FusedConvBNFunction
__all__ += ["BiasGeluFunction", "bias_gelu", "gelu"]
__all__ += ["AttentionFunction", "attention", "scaled_dot_product_attention"]
