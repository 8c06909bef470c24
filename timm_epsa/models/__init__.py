from .epsanet import EPSABottleneck

__all__ = ['EPSABottleneck']
