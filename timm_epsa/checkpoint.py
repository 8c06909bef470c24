"""Reading training checkpoints without running their code, and saying exactly how one fails to fit.

A ``.pth.tar`` is a pickle, and unpickling a stranger's file can run anything. Checkpoints are read
with ``torch.load(weights_only=True)``, which builds only tensors and plain containers, plus the one
harmless class timm's ``train.py`` stores in them (``argparse.Namespace``, its ``args``).

The formats understood are the official ``main.py`` (``state_dict`` with ``module.`` prefixes,
``best_prec1``), timm's ``train.py`` (``state_dict``, optional ``state_dict_ema``, ``arch``,
``epoch``, ``metric``, ``args``), a bare state dict, and a ``.safetensors`` file.
"""
import argparse
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from torch import nn

from timm.models import load_state_dict

__all__ = [
    'Checkpoint', 'CheckpointError', 'CheckpointMismatchError', 'check_fits', 'read_checkpoint',
]

# Types a weights_only unpickler may build beyond tensors and builtin containers (timm allows the same).
SAFE_PICKLE_GLOBALS = [argparse.Namespace]
_EMA_KEYS = ('state_dict_ema', 'model_ema')  # where timm's train.py and others keep EMA weights
# How many keys of each kind a mismatch error names before summarising the rest.
_MAX_LISTED = 8


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely, or holds no weights this package can use."""


class CheckpointMismatchError(CheckpointError):
    """A state dict that is not for the model it is loaded into; ``details`` lists the differences."""

    def __init__(self, what: str, architecture: str, details: str):
        super().__init__(f'{what} does not fit {architecture}: {details}')
        self.details = details


@dataclass
class Checkpoint:
    """The weights of a checkpoint and what its training script recorded beside them."""
    state_dict: Dict[str, torch.Tensor]
    kind: str  # which script wrote it, in words
    ema: bool  # whether ``state_dict`` holds the EMA weights
    has_ema: bool
    arch: Optional[str] = None  # model name as the training script saved it
    epoch: Optional[int] = None
    metric: Optional[float] = None  # validation metric the training script recorded
    metric_name: Optional[str] = None
    args: Optional[argparse.Namespace] = None  # timm train.py's command line


def read_checkpoint(path: Union[str, Path], ema: bool = False) -> Checkpoint:
    """Read the weights (the EMA copy with ``ema``) and training record of a checkpoint file.

    The weights are chosen and cleaned by timm's ``load_state_dict``, as ``checkpoint_path=`` and
    train.py's ``--initial-checkpoint`` choose them; a pickle is first read here for its record,
    which also refuses one that would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    record = {} if path.suffix == '.safetensors' else _read_record(path)
    has_ema = any(isinstance(record.get(key), dict) for key in _EMA_KEYS)
    if ema and not has_ema:
        raise CheckpointError(f"{path} holds no EMA weights (no {' or '.join(_EMA_KEYS)}); convert it without --ema")
    try:
        state_dict = load_state_dict(str(path), use_ema=ema)
    except SafetensorError as e:
        raise CheckpointError(f'{path} is not a valid safetensors file: {e}') from e
    except (AttributeError, TypeError) as e:  # what timm's key choice found is no mapping
        raise CheckpointError(f'{path} holds no state dict (a mapping of parameter names to tensors)') from e
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f'{path}: not a state dict, these entries are not tensors: {_listed(not_tensors)}')

    args = record.get('args') if isinstance(record.get('args'), argparse.Namespace) else None
    if 'best_prec1' in record:
        kind, metric, metric_name = 'official main.py checkpoint', record['best_prec1'], 'top1'
    else:  # timm train.py records the metric it selects the best checkpoint by
        metric, metric_name = record.get('metric'), getattr(args, 'eval_metric', None)
        if path.suffix == '.safetensors':
            kind = 'safetensors file'
        elif args is not None:
            kind = 'timm train.py checkpoint'
        else:
            kind = 'checkpoint' if 'state_dict' in record else 'state dict'
    return Checkpoint(
        state_dict=state_dict,
        kind=kind,
        ema=ema,
        has_ema=has_ema,
        arch=record.get('arch') if isinstance(record.get('arch'), str) else None,
        epoch=int(record['epoch']) if isinstance(record.get('epoch'), (int, torch.Tensor)) else None,
        metric=float(metric) if isinstance(metric, (int, float, torch.Tensor)) else None,
        metric_name=metric_name,
        args=args,
    )


def _read_record(path: Path) -> Dict[str, Any]:
    """The top-level entries of a pickled checkpoint (an empty record for a bare tensor container),
    read without letting the pickle build anything but data; tensors of a zip checkpoint are
    memory-mapped, not read."""
    try:
        with torch.serialization.safe_globals(SAFE_PICKLE_GLOBALS):
            content = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe is None:
            raise _unreadable(path) from e
        raise CheckpointError(
            f'{path}: refusing to unpickle it, it needs {unsafe}, which could run code; '
            f'only tensors, plain containers and argparse.Namespace are allowed (torch.load weights_only=True)'
        ) from e
    except Exception as e:  # what torch raises for damaged files varies: RuntimeError, EOFError, KeyError...
        raise _unreadable(path, f'{type(e).__name__}: {_first_line(e)}') from e
    return content if isinstance(content, dict) else {}


def check_fits(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        what: str,
        architecture: str,
        skip_keys: Iterable[str] = (),
        skip_shapes: Iterable[str] = (),
) -> None:
    """Raise :class:`CheckpointMismatchError` naming every tensor that is missing, unexpected or of
    another shape, so a checkpoint for another architecture is refused with the reason, not loaded
    half-way. ``skip_keys`` are left out entirely, ``skip_shapes`` only from the shape comparison:
    the tensors timm adapts itself (classifier, input conv)."""
    skip_keys, skip_shapes = set(skip_keys), set(skip_shapes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip_keys}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if k not in skip_keys}
    missing = [f'{k} {expected[k]}' for k in expected if k not in given]
    unexpected = [f'{k} {given[k]}' for k in given if k not in expected]
    reshaped = [
        f'{k} {given[k]} vs {expected[k]} in the model'
        for k in expected if k in given and k not in skip_shapes and given[k] != expected[k]
    ]
    problems = [
        f'{len(keys)} {kind}: {_listed(keys)}'
        for kind, keys in (('missing', missing), ('unexpected', unexpected), ('of another shape', reshaped))
        if keys
    ]
    if problems:
        raise CheckpointMismatchError(what, architecture, '; '.join(problems))


def _listed(items: List[str]) -> str:
    shown = ', '.join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f'{shown}, ... ({len(items) - _MAX_LISTED} more)'


def _unreadable(path: Path, detail: Optional[str] = None) -> CheckpointError:
    message = f'{path} is not a readable PyTorch checkpoint (damaged, or not written by torch.save)'
    return CheckpointError(f'{message}: {detail}' if detail else message)


def _unsafe_globals(path: Path, error: pickle.UnpicklingError) -> Optional[str]:
    """The globals a refused pickle would import, for the error message; None when the unpickler
    stopped on something else (damaged or foreign bytes) rather than on a global it refuses."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: torch's message is all there is
        names = []
    allowed = {f'{t.__module__}.{t.__qualname__}' for t in SAFE_PICKLE_GLOBALS}
    names = [n for n in names if n not in allowed]
    if names:
        return ', '.join(names)
    return 'objects other than tensors' if 'GLOBAL' in str(error) else None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
