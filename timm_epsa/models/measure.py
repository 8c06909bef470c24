"""Parameters, MACs and PSA layout of a variant, measured on the meta device (no memory, no weights).

Model cards and ``timm-epsa info`` print these instead of figures typed in by hand, so they cannot
drift from the code.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['ModelFacts', 'measure_model']


@dataclass(frozen=True)
class ModelFacts:
    params: int
    macs: int  # multiply-accumulates of one image at ``input_size``
    input_size: Tuple[int, int, int]
    kernel_sizes: Tuple[int, ...]  # of the PSA branches
    groups: Tuple[int, ...]
    width_multiplier: float  # bottleneck width relative to ResNet's 64/128/256/512


def measure_model(
        model_name: str,
        num_classes: Optional[int] = None,
        input_size: Optional[Tuple[int, int, int]] = None,
) -> ModelFacts:
    """Measure ``model_name`` with ``num_classes`` outputs at ``input_size`` (by default those of its
    default pretrained cfg), so a fine-tuned model's card describes that model, not ImageNet's."""
    kwargs = {} if num_classes is None else {'num_classes': num_classes}
    if input_size is not None:
        kwargs['in_chans'] = input_size[0]
    model = timm.create_model(model_name, device='meta', **kwargs).eval()
    input_size = tuple(input_size or model.pretrained_cfg['input_size'])
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(1, *input_size, device='meta'))
    psa = model.layer1[0].conv2
    branches = [module for name, module in psa.named_children() if name.startswith('conv_')]
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2,
        input_size=input_size,
        kernel_sizes=tuple(conv.kernel_size[0] for conv in branches),
        groups=tuple(conv.groups for conv in branches),
        width_multiplier=model.layer1[0].conv1.out_channels / 64,
    )
