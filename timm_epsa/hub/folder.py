"""A model as a folder the Hub serves and timm loads: ``model.safetensors``, ``config.json`` and a card.

``model.safetensors`` and ``config.json`` are what timm's own ``save_for_hf`` writes, adjusted so
that transformers loads the folder too (:mod:`timm_epsa.hub.config_json`); ``timm.create_model('hf-hub:<repo>')``
reads it like any timm repo. The ``README.md`` is the model card of :mod:`timm_epsa.hub.cards`. A folder
is checked by loading it back the way users will, and before it is published its ``config.json`` is
checked against its weights (:func:`check_config_fits_weights`).
"""
import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional

import timm
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..escaping import first_line
from ..models.epsanet import MODEL_NAMES
from ..models.measure import ModelFacts, measure_model
from .cards import IMAGENET_1K, CardDataset, render_model_card
from .checkpoint import (
    MAX_SIDE, MIN_EXPORT_SIDE, CheckpointError, CheckpointMismatchError, check_fits, not_safetensors, whole_in_range)
from .config_json import save_for_hub
from .pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

__all__ = ['HubFolderError', 'check_config_fits_weights', 'check_config_json', 'verify_hub_folder', 'write_hub_folder']


class HubFolderError(RuntimeError):
    """A written folder does not load back to the model it was written from (a bug, not a bad input)."""


def write_hub_folder(
        model: nn.Module,
        folder: Path,
        repo_id: str,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        dataset: CardDataset = IMAGENET_1K,
        weights: Optional[str] = None,
        train_args: Optional[str] = None,
        log: Callable[[str], None] = lambda message: None,
) -> ModelFacts:
    """Write ``model`` (an EPSANet in eval mode) into ``folder`` as the Hub serves it, and check it loads back.

    ``config.json`` carries ``model.pretrained_cfg``, so a model built with the input size, mean/std
    and labels it was trained with is published with them. ``folder`` is meant to be the one
    :func:`timm_epsa.staging.staged_folder` yields, so that nothing unverified ever appears under
    the final name.

    Args:
        top1, top5: accuracy in percent on ``dataset``, for the model card.
        weights: one line on where the weights come from.
        train_args: the training command line, for the model card.
    """
    model_name = model.pretrained_cfg['architecture']
    log(f'measuring {model_name}')
    facts = measure_model(model_name, num_classes=model.num_classes, input_size=model.pretrained_cfg['input_size'])
    try:
        save_for_hub(model, folder)  # timm's save_for_hf, config.json loadable by transformers too
    except SafetensorError as e:  # safetensors reports a failed write (a full disk) in its own words
        # the errno as Rust shows an io::Error: "os error 28" (safetensors >= 0.6), "Os { code: 28, ..." before
        code = re.search(r'os error (\d+)|Os \{ code: (\d+)', str(e))
        if code is None:
            raise
        number = int(code.group(1) or code.group(2))
        raise OSError(number, os.strerror(number), str(folder / 'model.safetensors')) from e
    card = render_model_card(
        model_name,
        repo_id,
        facts,
        {**model.pretrained_cfg, 'num_classes': model.num_classes},
        top1=top1,
        top5=top5,
        dataset=dataset,
        weights=weights,
        train_args=train_args,
    )
    (folder / CARD_NAME).write_text(card, encoding='utf-8')
    log('verifying: strict load of the new folder, every tensor against the source, a forward pass')
    verify_hub_folder(folder, model.state_dict(), model)
    return facts


def verify_hub_folder(folder: Path, source: Dict[str, torch.Tensor], reference: nn.Module) -> None:
    """Load ``folder`` as timm loads a Hub repo (its config.json, then its safetensors into the named
    model, strictly) and check that every tensor equals ``source`` and the outputs equal ``reference``'s."""
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    loaded_tensors = loaded.state_dict()
    differing = [k for k, v in source.items() if not _same(loaded_tensors[k], v.to(loaded_tensors[k].dtype))]
    if differing:
        raise HubFolderError(f'{len(differing)} tensors changed in conversion, e.g. {differing[0]}')
    # The tensors are already known to be equal: the forward pass shows the model the folder builds
    # runs and computes what the source computes, which any image size shows, so a small one is used.
    x = torch.randn(1, loaded.pretrained_cfg['input_size'][0], 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output, expected = loaded(x), reference(x)
    if not torch.allclose(output, expected, rtol=1e-5, atol=1e-5, equal_nan=True):
        raise HubFolderError('the converted model does not reproduce the source model outputs')


def check_config_json(folder: Path) -> str:
    """The EPSANet variant ``folder``'s ``config.json`` names, once the fields timm reads without a
    check are checked (what the file is, its architecture, the types of its parts, its input size,
    where one too large would be allocated before anything else fails): ``ValueError`` naming the
    field otherwise. Export and push run it alike, so that no folder one refuses the other takes."""
    config_path = folder / CONFIG_NAME
    again = 'write the folder again with timm-epsa convert'
    try:
        config = json.loads(config_path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path} is not valid JSON ({first_line(e)}); {again}') from None
    if not isinstance(config, dict):
        raise ValueError(f'{config_path} is not a JSON object (it holds a {type(config).__name__}); {again}')
    if 'architecture' not in config:
        raise ValueError(f'{config_path} has no "architecture"; {again}')
    name = config['architecture']
    if name not in MODEL_NAMES:
        raise ValueError(f"{folder} holds {name!r}, not an EPSANet variant ({', '.join(MODEL_NAMES)})")
    for part in ('pretrained_cfg', 'model_args'):
        if not isinstance(config.get(part, {}), dict):
            raise ValueError(f'{config_path}: its {part} is a {type(config[part]).__name__}, not a mapping of names to '
                             f'values; {again}')
    size = config.get('pretrained_cfg', config).get('input_size')  # timm reads it from the top in old configs
    if size is not None and not (isinstance(size, list) and len(size) == 3 and all(
            whole_in_range(n, low, MAX_SIDE) for n, low in zip(size, (1, MIN_EXPORT_SIDE, MIN_EXPORT_SIDE)))):
        raise ValueError(f'{config_path} gives input_size {size}, which is not [channels, height, width] of 1 to '
                         f'{MAX_SIDE} channels and sides of {MIN_EXPORT_SIDE} to {MAX_SIDE} pixels; correct it, or '
                         f'{again}')
    return name


def check_config_fits_weights(folder: Path) -> None:
    """Raise :class:`CheckpointError` unless the network ``folder``'s ``config.json`` describes
    (``architecture``, ``model_args``, ``num_classes``: what timm's ``local-dir:`` and transformers'
    ``TimmWrapper`` build alike) holds exactly the tensors of its ``model.safetensors``, by name and shape;
    ``ValueError`` where :func:`check_config_json`, which export runs too, refuses ``config.json``.

    timm refuses such a folder when it loads it; transformers loads it, with random layers where
    weights are missing and without those it does not know, saying so only in a load report, and no
    plugin can make it strict (docs/clients.md). So a folder is checked before it is published; the
    network is built on the meta device and the weights' shapes read from the file's header.
    """
    check_config_json(folder)
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        with torch.device('meta'):  # whatever the architecture: not every timm model takes device=
            model = timm.create_model(f'local-dir:{folder}')
    except KeyError as e:  # a field timm cannot do without
        raise CheckpointError(f'{config} does not describe a model timm can build: it has no {e}') from e
    except (RuntimeError, TypeError, ValueError) as e:  # unknown architecture, arguments it does not take
        raise CheckpointError(f'{config} does not describe a model timm can build: {first_line(e)}') from e
    try:
        with safe_open(weights, framework='pt') as tensors:
            shapes = {k: torch.empty(tensors.get_slice(k).get_shape(), device='meta') for k in tensors.keys()}
    except SafetensorError as e:
        raise not_safetensors(weights, e) from e
    try:
        check_fits(shapes, model, what=str(weights),
                   architecture=f"the {model.pretrained_cfg['architecture']} that {config} describes")
    except CheckpointMismatchError as e:
        raise CheckpointError(
            f'{e}. transformers would load it with random layers or without some of them: make config.json describe '
            f'the network the weights are for (architecture, model_args, num_classes), or convert again') from e


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, a NaN equal to a NaN (``convert --allow-nonfinite`` keeps them)."""
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
