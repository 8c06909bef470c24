"""Hub folders that Hugging Face transformers loads as well as timm.

transformers 5.x loads a timm repo through ``TimmWrapperConfig`` / ``TimmWrapperModel``: it turns the
top-level ``num_classes`` of ``config.json`` into ``num_labels`` and calls
``timm.create_model(architecture, num_classes=num_labels, **model_args)`` (``num_classes=0`` for
``TimmWrapperModel``). timm's ``save_for_hf`` (1.0.31) also records ``num_classes`` in
``model_args``, so every such folder, timm's own resnet18 included, fails there with ``got multiple
values for keyword argument 'num_classes'``.

The copy in ``model_args`` carries nothing timm needs: timm copies the top-level ``num_classes``
into the pretrained cfg, which is where ``create_model`` takes the default number of classes from.
Dropping it is the whole fix. ``in_chans`` and ``global_pool`` stay in ``model_args``: transformers
passes neither itself, and they are what rebuild the network the weights belong to in both
libraries (a one-channel stem; a pooling other than ``'avg'``, which has no weights, so without it a
reloaded model would load cleanly and compute something else).

transformers names the classes from a top-level ``label_names`` only (else ImageNet's, when timm
recognises an ImageNet class count, else ``LABEL_<i>``), while ``save_for_hf`` leaves the names of a
fine-tuned model in the pretrained cfg; they are copied up, which timm reads the same way.
"""
import json
from pathlib import Path
from typing import Any, Dict

from torch import nn

from timm.models import save_for_hf

from .pretrained import CONFIG_NAME

__all__ = ['ARGS_TRANSFORMERS_PASSES', 'save_for_hub', 'transformers_compatible']

# Keyword arguments transformers' TimmWrapper gives timm.create_model itself, from its own config.
ARGS_TRANSFORMERS_PASSES = ('num_classes',)


def transformers_compatible(config: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a timm ``config.json`` dict whose ``model_args`` leave out what transformers passes itself
    and whose class names are where transformers looks for them."""
    config = dict(config)
    label_names = config.get('pretrained_cfg', {}).get('label_names')
    if label_names and 'label_names' not in config:
        config['label_names'] = label_names
    if 'model_args' in config:
        model_args = {k: v for k, v in config['model_args'].items() if k not in ARGS_TRANSFORMERS_PASSES}
        if model_args:
            config['model_args'] = model_args  # in place: same key order as timm writes
        else:
            del config['model_args']  # as timm writes it when there is nothing to record
    return config


def save_for_hub(model: nn.Module, folder: Path) -> None:
    """timm's ``save_for_hf`` (safetensors only), with a ``config.json`` that transformers loads too."""
    save_for_hf(model, folder, safe_serialization=True)
    config_path = Path(folder) / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding='utf-8'))
    config_path.write_text(json.dumps(transformers_compatible(config), indent=2), encoding='utf-8')
