"""EPSANet (Pyramid Squeeze Attention) for timm: ``timm.create_model('epsanet50')``."""
# The one place the version is written: pyproject.toml reads it from here (setuptools' dynamic
# version), and it comes before the imports so that modules loaded by them can import it.
__version__ = '0.1.0'

from . import hub  # noqa: E402
from .layers import PyramidSqueezeAttention, SEWeight  # noqa: E402
from .models import EPSABottleneck  # noqa: E402

__all__ = ['EPSABottleneck', 'PyramidSqueezeAttention', 'SEWeight', '__version__']

hub.install()  # pretrained=True on EPSANet: safetensors from the Hub, errors that say what to do
