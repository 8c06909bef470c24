"""``timm-epsa convert``: a training checkpoint becomes a Hub-ready folder.

The checkpoint is read without running its code (:mod:`timm_epsa.checkpoint`), checked against the
architecture, loaded into the model and written as a Hub folder (:mod:`timm_epsa.hub_folder`),
which is loaded back and compared with the source before it takes OUT_DIR's name
(:mod:`timm_epsa.staging`).
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import timm
from torch import nn

from timm.data import resolve_data_config

from . import __version__
from .checkpoint import Checkpoint, check_fits, read_checkpoint
from .hub_folder import write_hub_folder
from .hub_repos import hub_repo_id
from .measure import ModelFacts
from .models.epsanet import MODEL_NAMES
from .staging import check_destination, staged_folder

__all__ = ['ConvertedFolder', 'convert_checkpoint']

# train.py arguments worth recording on a model card: the ones that shape the weights.
_TRAIN_ARGS = (
    'model', 'epochs', 'batch_size', 'opt', 'lr', 'momentum', 'weight_decay', 'sched', 'decay_epochs',
    'decay_rate', 'warmup_epochs', 'cooldown_epochs', 'smoothing', 'color_jitter', 'train_interpolation', 'aa',
    'reprob', 'mixup', 'cutmix', 'drop_path', 'model_ema', 'model_ema_decay', 'amp', 'img_size', 'input_size',
)


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
