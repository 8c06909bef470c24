"""``timm-epsa convert``: a training checkpoint becomes a folder the Hub serves and timm loads.

The folder holds ``model.safetensors`` and ``config.json`` exactly as timm's own ``save_for_hf``
writes them, so ``timm.create_model('hf-hub:<repo>')`` reads it like any timm repo, and a
``README.md`` model card. It is written into a hidden temporary folder beside OUT_DIR and renamed
into place only once it has been loaded back the way users will load it and checked against the
source, so an interrupted run never leaves a partial OUT_DIR, and ``force`` replaces an existing
one only with a complete result. :func:`write_hub_folder` and :func:`staged_folder` do the same for
a model in memory (``timm-epsa quickstart``).
"""
import argparse
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

import timm
import torch
from torch import nn

from timm.data import resolve_data_config
from timm.models import save_for_hf

from . import __version__
from .cards import IMAGENET_1K, CardDataset, render_model_card
from .checkpoint import Checkpoint, check_fits, read_checkpoint
from .hub import CARD_NAME, hub_repo_id
from .measure import ModelFacts, measure_model
from .models.epsanet import MODEL_NAMES

__all__ = [
    'ConversionError', 'ConvertedFolder', 'check_destination', 'convert_checkpoint', 'staged_folder', 'verify_export',
    'write_hub_folder',
]

# train.py arguments worth recording on a model card: the ones that shape the weights.
_TRAIN_ARGS = (
    'model', 'epochs', 'batch_size', 'opt', 'lr', 'momentum', 'weight_decay', 'sched', 'decay_epochs',
    'decay_rate', 'warmup_epochs', 'cooldown_epochs', 'smoothing', 'color_jitter', 'train_interpolation', 'aa',
    'reprob', 'mixup', 'cutmix', 'drop_path', 'model_ema', 'model_ema_decay', 'amp', 'img_size', 'input_size',
)


class ConversionError(RuntimeError):
    """The converted folder does not load back to the source weights (a bug, not a bad input)."""


@dataclass
class ConvertedFolder:
    path: Path
    model_name: str
    repo_id: str  # the repo the model card's examples name
    facts: ModelFacts
    checkpoint: Checkpoint


def convert_checkpoint(
        src: Union[str, Path],
        out_dir: Union[str, Path],
        model_name: str,
        ema: bool = False,
        force: bool = False,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        repo_id: Optional[str] = None,
        log: Callable[[str], None] = lambda message: None,
) -> ConvertedFolder:
    """Write ``out_dir``: ``model_name`` weights from the checkpoint ``src``, ready for ``push``.

    Args:
        ema: take the EMA weights (timm train.py's ``state_dict_ema``).
        force: replace a non-empty ``out_dir`` (only once the new folder is complete).
        top1, top5: ImageNet-1k validation accuracy in percent for the model card.
        repo_id: the repo the model card's examples name; defaults to where ``pretrained=True`` looks.
        log: receives one line per step.
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODEL_NAMES)}")
    src, out_dir = Path(src), Path(out_dir)
    check_destination(out_dir, force)
    if force and out_dir.resolve() in src.resolve().parents:
        raise FileExistsError(f'{src} is inside {out_dir}, which --force would delete; write to another folder')
    repo_id = repo_id or hub_repo_id(model_name)

    log(f'reading {src}')
    checkpoint = read_checkpoint(src, ema=ema)
    if checkpoint.has_ema and not ema:
        log('the checkpoint also holds EMA weights; converting the plain ones (pass --ema for the EMA ones)')
    model = _model_for(checkpoint, model_name)
    trained_as = f' (trained as {checkpoint.arch})' if checkpoint.arch not in (None, model_name) else ''
    check_fits(checkpoint.state_dict, model, what=f'{src}{trained_as}', architecture=model_name)
    model.load_state_dict(checkpoint.state_dict)

    with staged_folder(out_dir) as staging:
        log(f'writing {out_dir}')
        facts = write_hub_folder(
            model,
            staging,
            repo_id,
            top1=top1,
            top5=top5,
            weights=_describe_weights(checkpoint, src.name),
            train_args=_train_command(checkpoint.args),
            log=log,
        )
    return ConvertedFolder(path=out_dir, model_name=model_name, repo_id=repo_id, facts=facts, checkpoint=checkpoint)


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
    :func:`staged_folder` yields, so that nothing unverified ever appears under the final name.

    Args:
        top1, top5: accuracy in percent on ``dataset``, for the model card.
        weights: one line on where the weights come from.
        train_args: the training command line, for the model card.
    """
    model_name = model.pretrained_cfg['architecture']
    log(f'measuring {model_name}')
    facts = measure_model(model_name, num_classes=model.num_classes, input_size=model.pretrained_cfg['input_size'])
    save_for_hf(model, folder, safe_serialization=True)
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
    verify_export(folder, model.state_dict(), model)
    return facts


def verify_export(folder: Path, source: Dict[str, torch.Tensor], reference: nn.Module) -> None:
    """Load ``folder`` as timm loads a Hub repo (its config.json, then its safetensors into the named
    model, strictly) and check that every tensor equals ``source`` and the outputs equal ``reference``'s."""
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    loaded_tensors = loaded.state_dict()
    differing = [k for k, v in source.items() if not torch.equal(loaded_tensors[k], v.to(loaded_tensors[k].dtype))]
    if differing:
        raise ConversionError(f'{len(differing)} tensors changed in conversion, e.g. {differing[0]}')
    # The tensors are already known to be equal: the forward pass shows the model the folder builds
    # runs and computes what the source computes, which any image size shows, so a small one is used.
    x = torch.randn(1, loaded.pretrained_cfg['input_size'][0], 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output, expected = loaded(x), reference(x)
    if not torch.allclose(output, expected, rtol=1e-5, atol=1e-5, equal_nan=True):
        raise ConversionError('the converted model does not reproduce the source model outputs')


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse to write ``out_dir`` over something: a file, or a non-empty folder unless ``force``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'{out_dir} exists and is not a folder')
    if force or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    raise FileExistsError(
        f'{out_dir} is not empty; pass --force to replace it (it is replaced only once the new folder is complete)')


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out_dir`` to write into, renamed to ``out_dir`` when the block
    completes (replacing what is there) and deleted if it raises: ``out_dir`` is only ever absent,
    the old folder whole, or the new one complete."""
    staging = _hidden_sibling(out_dir, 'partial')
    staging.mkdir(parents=True)
    try:
        yield staging
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _model_for(checkpoint: Checkpoint, model_name: str) -> nn.Module:
    """``model_name`` with the checkpoint's number of classes, in eval mode. A timm train.py checkpoint
    also gives it the preprocessing it was trained with (input size, interpolation, crop, mean/std)
    as train.py resolves it, which config.json then records."""
    classifier = checkpoint.state_dict.get('fc.weight')  # fc: the classifier of every EPSANet variant
    kwargs = {'num_classes': classifier.shape[0]} if classifier is not None and classifier.ndim == 2 else {}
    model = timm.create_model(model_name, **kwargs).eval()
    if checkpoint.args is not None:
        model.pretrained_cfg.update(resolve_data_config(vars(checkpoint.args), model=model))
    return model


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted last."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = _hidden_sibling(out_dir, 'old')
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old)


def _hidden_sibling(out_dir: Path, suffix: str) -> Path:
    """A unique hidden path beside ``out_dir``: same filesystem, so renames between them are atomic."""
    return out_dir.with_name(f'.{out_dir.name}.{uuid.uuid4().hex[:8]}.{suffix}')


def _describe_weights(checkpoint: Checkpoint, filename: str) -> str:
    parts = [f"from the {checkpoint.kind} `{filename}`{' (its EMA weights)' if checkpoint.ema else ''}"]
    if checkpoint.epoch is not None:
        parts.append(f'epoch {checkpoint.epoch}')
    if checkpoint.metric is not None:
        parts.append(f'its training run recorded {checkpoint.metric_name or "metric"} {checkpoint.metric:.2f}')
    return ', '.join(parts) + f'; converted with timm-epsa {__version__}'


def _train_command(args: Optional[argparse.Namespace]) -> Optional[str]:
    """The shaping part of a train.py command line, rebuilt from the Namespace a checkpoint stores."""
    if args is None:
        return None
    flags = []
    for name in _TRAIN_ARGS:
        value = getattr(args, name, None)
        if value is None or value is False or value == '':
            continue
        flag = '--' + name.replace('_', '-')
        if value is True:
            flags.append(flag)
        else:
            flags.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return ' '.join(flags) or None
