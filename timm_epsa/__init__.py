"""EPSANet (Pyramid Squeeze Attention) for timm: ``timm.create_model('epsanet50')``."""
from . import hub
from .layers import PyramidSqueezeAttention, SEWeight
from .models import EPSABottleneck

__version__ = '0.1.0'
__all__ = ['EPSABottleneck', 'PyramidSqueezeAttention', 'SEWeight', '__version__']

hub.install()  # pretrained=True on EPSANet: safetensors from the Hub, errors that say what to do
