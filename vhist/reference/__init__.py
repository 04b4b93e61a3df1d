"""Pure-PyTorch references: the ``torch`` backend of every op, and what the tests and
benchmarks compare the kernels against. Nothing here imports vhist kernels."""
from vhist.reference.batch_norm import batch_norm
from vhist.reference.conv import (ACTIVATIONS, activate, activation_backward, bn_act, conv2d, fused_conv_act_bn,
                                  fused_conv_bn_act, fused_conv_bn_relu)
from vhist.reference.depthwise import depthwise_conv2d, fused_depthwise_bn_act
from vhist.reference.attention import attention
from vhist.reference.gelu import bias_gelu
from vhist.reference.layer_norm import add_layer_norm, layer_norm, layer_norm_2d
from vhist.reference.local_response_norm import local_response_norm

__all__ = ["activate", "batch_norm", "conv2d", "depthwise_conv2d", "fused_conv_bn_act", "fused_conv_bn_relu",
           "fused_depthwise_bn_act", "local_response_norm"]
__all__ += ["ACTIVATIONS", "activation_backward", "bn_act", "fused_conv_act_bn"]
__all__ += ["add_layer_norm", "bias_gelu", "layer_norm", "layer_norm_2d"]
__all__ += ["attention"]
