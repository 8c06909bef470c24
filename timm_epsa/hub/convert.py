"""``timm-epsa convert``: a training checkpoint becomes a Hub-ready folder.

The checkpoint is read without running its code (:mod:`timm_epsa.hub.checkpoint`), checked against the
architecture (names, shapes, kinds and values of its tensors, the preprocessing it records), loaded
into the model and written as a Hub folder (:mod:`timm_epsa.hub.folder`), which is loaded back and
compared with the source before it takes OUT_DIR's place (:mod:`timm_epsa.staging`, which also
locks OUT_DIR for the whole run). What the checkpoint records reaches the model card escaped
(:mod:`timm_epsa.escaping`).
"""
import argparse
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import timm
from torch import nn

from .. import __version__
from ..escaping import code_span, shell_word
from ..models.epsanet import MODEL_NAMES
from ..models.measure import ModelFacts
from ..staging import destination_path, staged_folder
from .checkpoint import Checkpoint, check_weights, nonfinite_weights_allowed, read_checkpoint, recorded_data_config
from .folder import write_hub_folder
from .repos import check_repo_id, hub_repo_id

__all__ = ['ConvertedFolder', 'convert_checkpoint', 'model_from_checkpoint']

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
        allow_nonfinite: bool = False,
        ignore_train_args: bool = False,
        log: Optional[Callable[[str], None]] = None,
) -> ConvertedFolder:
    """Write ``out_dir``: ``model_name`` weights from the checkpoint ``src``, ready for ``push``.

    Args:
        ema: take the EMA weights (timm train.py's ``state_dict_ema``).
        force: replace a non-empty ``out_dir`` (only once the new folder is complete).
        top1, top5: ImageNet-1k validation accuracy in percent for the model card.
        repo_id: the repo the model card's examples name; defaults to where ``pretrained=True`` looks.
        allow_nonfinite: convert weights holding inf or nan as they are (otherwise refused); loading the
            folder with ``pretrained=True`` refuses them too, but inside :func:`nonfinite_weights_allowed`.
        ignore_train_args: leave out the training arguments a timm train.py checkpoint records
            (config.json then gets the variant's default preprocessing, the card no training command).
        log: receives one line per step, and what was done beyond it (see :func:`staged_folder`).
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODEL_NAMES)}")
    src, out_dir = Path(src), Path(out_dir)
    repo_id = check_repo_id(repo_id) if repo_id is not None else hub_repo_id(model_name)
    if force and destination_path(out_dir) in src.resolve().parents:
        raise FileExistsError(f'{src} is inside {out_dir}, which --force would delete; write to another folder')
    progress = log or (lambda message: None)

    allowed = nonfinite_weights_allowed() if allow_nonfinite else nullcontext()  # for the load back too
    with staged_folder(out_dir, force=force, log=log) as staging, allowed:
        model, checkpoint = model_from_checkpoint(
            src, model_name, ema=ema, allow_nonfinite=allow_nonfinite, ignore_train_args=ignore_train_args,
            log=progress)
        progress(f'writing {out_dir}')
        facts = write_hub_folder(
            model,
            staging,
            repo_id,
            top1=top1,
            top5=top5,
            weights=_describe_weights(checkpoint, src.name),
            train_args=_train_command(checkpoint.args, progress),
            log=progress,
        )
    return ConvertedFolder(path=out_dir, model_name=model_name, repo_id=repo_id, facts=facts, checkpoint=checkpoint)


def model_from_checkpoint(
        src: Path,
        model_name: Optional[str],
        ema: bool = False,
        allow_nonfinite: bool = False,
        ignore_train_args: bool = False,
        log: Callable[[str], None] = lambda message: None,
) -> Tuple[nn.Module, Checkpoint]:
    """``model_name`` (None: the EPSANet variant a timm train.py checkpoint records) holding the
    weights of the checkpoint ``src`` (the EMA ones with ``ema``), in eval mode, and what the
    checkpoint records; every claim of it checked first (see :func:`convert_checkpoint` for the
    arguments). ``log`` receives what was read and left out."""
    log(f'reading {src}')
    checkpoint = read_checkpoint(src, ema=ema)
    if model_name is None:
        if checkpoint.arch not in MODEL_NAMES:
            recorded = f'records {checkpoint.arch!r}' if checkpoint.arch else 'does not record its architecture'
            raise ValueError(f"{src} {recorded}: pass --model NAME ({', '.join(MODEL_NAMES)})")
        model_name = checkpoint.arch
    if checkpoint.has_ema and not ema:
        log('the checkpoint also holds EMA weights; taking the plain ones (pass --ema for the EMA ones)')
    if ignore_train_args:
        checkpoint.args = None
    for note in checkpoint.ignored:
        log(f'left off the model card: {note}')
    model = _model_for(checkpoint, model_name, src)
    trained_as = f' (trained as {checkpoint.arch})' if checkpoint.arch not in (None, model_name) else ''
    check_weights(checkpoint.state_dict, model, what=f'{src}{trained_as}', architecture=model_name,
                  allow_nonfinite=allow_nonfinite)
    model.load_state_dict(checkpoint.state_dict)
    return model, checkpoint


def _model_for(checkpoint: Checkpoint, model_name: str, src: Path) -> nn.Module:
    """``model_name`` with the checkpoint's number of classes, in eval mode. A timm train.py checkpoint
    also gives it the preprocessing it was trained with (input size, interpolation, crop, mean/std)
    as train.py resolves it, checked, which config.json then records."""
    classifier = checkpoint.state_dict.get('fc.weight')  # fc: the classifier of every EPSANet variant
    kwargs = {'num_classes': classifier.shape[0]} if classifier is not None and classifier.ndim == 2 else {}
    model = timm.create_model(model_name, **kwargs).eval()
    if checkpoint.args is not None:
        model.pretrained_cfg.update(recorded_data_config(checkpoint.args, model, what=str(src)))
    return model


def _describe_weights(checkpoint: Checkpoint, filename: str) -> str:
    """One Markdown line on where the weights come from: the file name as code, recorded names checked."""
    parts = [f"from the {checkpoint.kind} {code_span(filename)}{' (its EMA weights)' if checkpoint.ema else ''}"]
    if checkpoint.epoch is not None:
        parts.append(f'epoch {checkpoint.epoch}')
    if checkpoint.metric is not None:
        parts.append(f'its training run recorded {checkpoint.metric_name or "metric"} {checkpoint.metric:.2f}')
    return ', '.join(parts) + f'; converted with timm-epsa {__version__}'


def _train_command(args: Optional[argparse.Namespace], log: Callable[[str], None]) -> Optional[str]:
    """The shaping part of a train.py command line, rebuilt from the Namespace a checkpoint stores,
    every value quoted as a shell word; a value no command line can hold (a mapping, a tensor) is left out."""
    if args is None:
        return None
    flags = []
    for name in _TRAIN_ARGS:
        value = getattr(args, name, None)
        if value is None or value is False or value == '':
            continue
        flag = '--' + name.replace('_', '-')
        words = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v)) for v in words):
            log(f'left off the model card: its training argument {name} ({type(value).__name__}) is not a '
                f'command-line value')
        elif value is True:
            flags.append(flag)
        else:
            flags.append(' '.join([flag, *(shell_word(str(v)) for v in words)]))
    return ' '.join(flags) or None
