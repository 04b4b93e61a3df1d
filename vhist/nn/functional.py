"""Functional API that mirrors ``torch.nn.functional``; every function runs on the
active vhist backend."""
from vhist.ops.batch_norm import batch_norm
from vhist.ops.bn_prologue import conv2d, conv_bn_deferred, fused_conv_bn_act, fused_conv_bn_relu
from vhist.ops.conv_act_bn import fused_conv_act_bn
from vhist.ops.deferred import as_tensor, batch_norm_deferred
from vhist.ops.depthwise import depthwise_conv2d, fused_depthwise_bn_act
from vhist.ops.attention import attention, scaled_dot_product_attention
from vhist.ops.gelu import bias_gelu, gelu
from vhist.ops.layer_norm import add_layer_norm, layer_norm, layer_norm_2d
from vhist.ops.local_response_norm import local_response_norm
from vhist.ops.sync_batch_norm import sync_batch_norm

# fused_conv_bn_relu: the design's name of fused_conv_bn_act, kept as an alias.
__all__ = ["batch_norm", "conv2d", "depthwise_conv2d", "fused_conv_bn_act", "fused_conv_bn_relu", "fused_depthwise_bn_act",
           "local_response_norm"]
__all__ += ["sync_batch_norm", "conv_bn_deferred", "as_tensor"]
__all__ += ["fused_conv_act_bn", "batch_norm_deferred"]
__all__ += ["add_layer_norm", "layer_norm", "layer_norm_2d"]
__all__ += ["bias_gelu", "gelu"]
__all__ += ["attention", "scaled_dot_product_attention"]
