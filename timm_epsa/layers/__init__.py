from .grouped_conv import depthwise_conv2d, grouped_conv2d, grouped_conv_as_depthwise, prefers_depthwise
from .psa import PSABranchConv, PyramidSqueezeAttention, SEWeight

__all__ = [
    'PSABranchConv', 'PyramidSqueezeAttention', 'SEWeight', 'depthwise_conv2d', 'grouped_conv2d',
    'grouped_conv_as_depthwise', 'prefers_depthwise',
]
