from .grouped_conv import (
    conv2d_with_fast_weight_grad, conv_weight_grad, grouped_conv2d, grouped_conv_as_depthwise, prefers_depthwise)
from .psa import PSABranchConv, PyramidSqueezeAttention, SEWeight

__all__ = [
    'PSABranchConv', 'PyramidSqueezeAttention', 'SEWeight', 'conv2d_with_fast_weight_grad', 'conv_weight_grad',
    'grouped_conv2d', 'grouped_conv_as_depthwise', 'prefers_depthwise',
]
