"""EPSANet (Pyramid Squeeze Attention) for timm: ``timm.create_model('epsanet50')``."""
from .layers import PyramidSqueezeAttention, SEWeight
from .models import EPSABottleneck

__version__ = '0.1.0'
__all__ = ['EPSABottleneck', 'PyramidSqueezeAttention', 'SEWeight', '__version__']
