from .psa import PyramidSqueezeAttention, SEWeight

__all__ = ['PyramidSqueezeAttention', 'SEWeight']
