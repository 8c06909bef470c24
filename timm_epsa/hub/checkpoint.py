"""Reading training checkpoints without running their code, and saying exactly how one fails to fit.

A ``.pth.tar`` is a pickle, and unpickling a stranger's file can run anything. Checkpoints are read
with ``torch.load(weights_only=True)``, which builds only tensors and plain containers, plus the one
harmless class timm's ``train.py`` stores in them (``argparse.Namespace``, its ``args``).

The formats understood are the official ``main.py`` (``state_dict`` with ``module.`` prefixes,
``best_prec1``), timm's ``train.py`` (``state_dict``, optional ``state_dict_ema``, ``arch``,
``epoch``, ``metric``, ``args``), a bare state dict, and a ``.safetensors`` file.
"""
import argparse
import math
import pickle
import re
import zipfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from torch import nn

from timm.data import resolve_data_config
from timm.models import load_state_dict

from ..escaping import first_line, one_line, utf8_path_problem

__all__ = [
    'Checkpoint', 'CheckpointError', 'CheckpointMismatchError', 'MAX_SIDE', 'MIN_EXPORT_SIDE', 'NonFiniteWeightsError',
    'check_fits', 'check_source', 'check_values', 'check_weights', 'nonfinite_weights_allowed', 'not_safetensors',
    'read_checkpoint', 'recorded_data_config', 'whole_in_range',
]

# Types a weights_only unpickler may build beyond tensors and builtin containers (timm allows the same).
SAFE_PICKLE_GLOBALS = [argparse.Namespace]
_EMA_KEYS = ('state_dict_ema', 'model_ema')  # where timm's train.py and others keep EMA weights
# How many keys of each kind a mismatch error names before summarising the rest.
_MAX_LISTED = 8
# A name a checkpoint records (its architecture, its metric) is shown only if it looks like one.
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}')
# What the preprocessing a checkpoint records may be: timm's interpolations and crop modes, sides in pixels.
_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')
_CROP_MODES = ('center', 'squash', 'border')
MAX_SIDE = 8192  # pixels: the largest image side a recorded or configured preprocessing may have
# pixels: the smallest image side export takes, from --img-size or a folder's config.json alike: the smallest
# quickstart trains at (its digits are 8x8), which exports within 3e-6 (16 px: 1e-5) of eager PyTorch
MIN_EXPORT_SIDE = 8
_CROP_PCT_RANGE = (0.1, 2.0)  # the image is resized to 1/crop_pct of the crop before it is cropped
_NONFINITE_ALLOWED: ContextVar[bool] = ContextVar('timm_epsa_nonfinite_weights_allowed', default=False)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely, or holds no weights this package can use."""


class NonFiniteWeightsError(CheckpointError):
    """Weights holding inf or nan (``timm-epsa convert --allow-nonfinite`` keeps them)."""


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
    ignored: List[str] = field(default_factory=list)  # what it records that is left out, and why


def read_checkpoint(path: Union[str, Path], ema: bool = False) -> Checkpoint:
    """Read the weights (the EMA copy with ``ema``) and training record of a checkpoint file.

    The weights are chosen and cleaned by timm's ``load_state_dict``, as ``checkpoint_path=`` and
    train.py's ``--initial-checkpoint`` choose them; a pickle is first read here for its record,
    which also refuses one that would run code.
    """
    path = Path(path)
    check_source(path)
    record = {} if path.suffix == '.safetensors' else _read_record(path)
    has_ema = any(isinstance(record.get(key), dict) for key in _EMA_KEYS)
    if ema and not has_ema:
        raise CheckpointError(f"{path} holds no EMA weights (no {' or '.join(_EMA_KEYS)}); leave out --ema")
    try:
        state_dict = load_state_dict(str(path), use_ema=ema)
    except SafetensorError as e:
        raise not_safetensors(path, e) from e
    except (AttributeError, TypeError) as e:  # what timm's key choice found is no mapping of names
        keys = _keys_not_names(record)
        if keys:
            raise CheckpointError(
                f'{path}: not a state dict of a PyTorch model, it has keys that are not parameter names '
                f'({_listed(keys)}); give a checkpoint torch.save(model.state_dict()) or timm\'s train.py wrote'
            ) from e
        raise CheckpointError(f'{path} holds no state dict (a mapping of parameter names to tensors)') from e
    except Exception as e:  # damage the memory-mapped read of the record did not touch (a storage shorter
        raise _unreadable(path, f'{type(e).__name__}: {first_line(e)}') from e  # than its header says)
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f'{path}: not a state dict, these entries are not tensors: {_listed(not_tensors)}')

    ignored = []
    args = record.get('args') if isinstance(record.get('args'), argparse.Namespace) else None
    if 'best_prec1' in record:
        kind, metric, metric_name = 'official main.py checkpoint', record['best_prec1'], 'top1'
    else:  # timm train.py records the metric it selects the best checkpoint by
        metric = record.get('metric')
        metric_name = _recorded_name(getattr(args, 'eval_metric', None), ignored, 'eval_metric')
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
        arch=_recorded_name(record.get('arch'), ignored, 'arch'),
        epoch=_recorded_number(record.get('epoch'), ignored, 'epoch', whole=True),
        metric=_recorded_number(metric, ignored, 'best_prec1' if 'best_prec1' in record else 'metric'),
        metric_name=metric_name,
        args=args,
        ignored=ignored,
    )


def check_source(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` names a regular file torch and safetensors can open."""
    problem = utf8_path_problem(str(path))
    if problem:
        raise CheckpointError(f'{problem}; rename the file')
    if path.is_dir():
        raise CheckpointError(f'{path} is a folder; give the checkpoint file in it (.pth, .pth.tar, .safetensors)')
    if not path.exists():
        raise CheckpointError(f'{path}: no such file')
    if not path.is_file():
        raise CheckpointError(f'{path} is not a regular file (a device, a pipe or a socket); give a checkpoint file')


def _recorded_number(value: Any, ignored: List[str], name: str, whole: bool = False) -> Optional[float]:
    """A number the checkpoint records beside its weights (a Python number or a one-element tensor),
    or None, noted in ``ignored``, for anything else: it only describes the weights on the card."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if value is None:
        return None
    if not _number(value, 0 if whole else -math.inf, math.inf) or (whole and value != int(value)):
        is_tensor = isinstance(value, torch.Tensor)
        what = f'a tensor of shape {tuple(value.shape)}' if is_tensor else one_line(repr(value))[:40]
        ignored.append(f"its {name} ({what}) is not {'a whole number' if whole else 'a finite number'}")
        return None
    return int(value) if whole else float(value)


def _recorded_name(value: Any, ignored: List[str], name: str) -> Optional[str]:
    if value is None or (isinstance(value, str) and _NAME.fullmatch(value)):
        return value
    ignored.append(f'its {name} ({one_line(repr(value))[:40]}) is not a name')
    return None


def _keys_not_names(record: Mapping[Any, Any]) -> List[str]:
    """Keys that are not strings, in the record or in a mapping it holds, for an error message."""
    mappings = [record, *(v for v in record.values() if isinstance(v, Mapping))]
    return [f'{k!r} ({type(k).__name__})' for m in mappings for k in m if not isinstance(k, str)]


@contextmanager
def nonfinite_weights_allowed() -> Iterator[None]:
    """Inside the block, :func:`check_values` lets inf and nan through on every route, ``pretrained=True``
    included: for weights known to hold them, such as a folder ``convert --allow-nonfinite`` wrote
    (which convert itself loads back inside it)."""
    token = _NONFINITE_ALLOWED.set(True)
    try:
        yield
    finally:
        _NONFINITE_ALLOWED.reset(token)


def not_safetensors(path: Union[str, Path], error: SafetensorError) -> CheckpointError:
    """The error for a file read as safetensors that is not one (safetensors' own message names no file)."""
    return CheckpointError(
        f'{path} is not a valid safetensors file ({first_line(error)}): it is damaged, or was written by something '
        f'else under that name; write it again (timm-epsa convert, or safetensors.torch.save_file)')


def check_weights(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        what: str,
        architecture: str,
        skip_keys: Iterable[str] = (),
        skip_shapes: Iterable[str] = (),
        allow_nonfinite: bool = False,
) -> None:
    """The check weights pass before they reach an EPSANet, on every route that loads them (``convert``,
    ``export`` of a checkpoint, ``pretrained=True`` from the Hub, a file or a folder): the names and
    shapes of :func:`check_fits` (with its ``skip_keys`` and ``skip_shapes``), then the kinds and
    values of :func:`check_values`. ``what`` names the weights in the errors."""
    check_fits(state_dict, model, what, architecture, skip_keys=skip_keys, skip_shapes=skip_shapes)
    check_values(state_dict, model, what, allow_nonfinite=allow_nonfinite)


def check_values(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        what: str,
        allow_nonfinite: bool = False,
) -> None:
    """Raise :class:`CheckpointError` for a tensor the model would take but should not: one of
    another kind than its slot (integers or booleans where the model has floats: quantized or
    damaged weights, which ``load_state_dict`` would silently cast), non-finite floats
    (:class:`NonFiniteWeightsError`, unless ``allow_nonfinite`` or inside :func:`nonfinite_weights_allowed`), or
    negative BatchNorm variances.
    Tensors the model has no slot for are :func:`check_fits`' to report (or for timm to drop)."""
    slots = model.state_dict()
    for key, tensor in state_dict.items():
        slot = slots.get(key)
        if slot is None:
            continue
        if tensor.layout != torch.strided:
            raise CheckpointError(
                f'{what}: {key} is a {str(tensor.layout).removeprefix("torch.")} tensor, where the model has a dense '
                f'one; save the checkpoint with dense tensors (tensor.to_dense())')
        if tensor.dtype == torch.bool or tensor.is_complex() or tensor.is_floating_point() != slot.is_floating_point():
            raise CheckpointError(
                f'{what}: {key} holds {tensor.dtype} values where the model has {slot.dtype} ones (quantized or '
                f'damaged weights), which loading would silently cast; use the float checkpoint, or cast the tensor '
                f'yourself if its values are meant as they are')
        if not tensor.is_floating_point():
            continue
        cast = f' once cast to the model\'s {slot.dtype}' if tensor.dtype != slot.dtype else ''
        tensor = tensor.to(slot.dtype)  # the values as the model will hold them: 1e300 is inf in float32
        if not (allow_nonfinite or _NONFINITE_ALLOWED.get()):
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            if bad:
                raise NonFiniteWeightsError(
                    f'{what}: {key} holds {bad} non-finite values (inf or nan){cast}: the training run diverged or '
                    f'the file is damaged; use another checkpoint')
        if key.endswith('.running_var') and bool((tensor < 0).any()):
            raise CheckpointError(
                f'{what}: {key} holds negative variances, which no BatchNorm can have: the file is damaged; '
                f'use another checkpoint')


def recorded_data_config(args: argparse.Namespace, model: nn.Module, what: str) -> Dict[str, Any]:
    """The preprocessing timm's ``resolve_data_config`` makes of a train.py checkpoint's arguments
    for ``model``, each argument it reads checked first: a value no preprocessing can have (a side of
    0 pixels, a std of 0, an unknown interpolation) raises :class:`CheckpointError` naming it."""
    recorded = vars(args)
    channels = model.pretrained_cfg['input_size'][0]

    def refuse(name: str, why: str) -> CheckpointError:
        return CheckpointError(
            f"{what}: its training arguments record {name}={one_line(repr(recorded[name]))[:60]}, {why}; pass "
            f"--ignore-train-args to use {model.pretrained_cfg['architecture']}'s default preprocessing instead")

    for name in ('in_chans', 'chans'):
        if recorded.get(name) is not None and not whole_in_range(recorded[name], channels, channels):
            raise refuse(name, f'but the weights take {channels} input channels')
    sides = ()
    if recorded.get('input_size') is not None:
        size = recorded['input_size']
        if not isinstance(size, (list, tuple)) or len(size) != 3 or not whole_in_range(size[0], channels, channels):
            raise refuse('input_size', f'which is not ({channels}, height, width) for weights of {channels} channels')
        sides = size[1:]
    elif recorded.get('img_size') is not None:
        sides = (recorded['img_size'],)
    if not all(whole_in_range(side, 1, MAX_SIDE) for side in sides):
        raise refuse('input_size' if recorded.get('input_size') is not None else 'img_size',
                     f'but image sides are whole numbers of pixels from 1 to {MAX_SIDE}')
    if recorded.get('interpolation') and recorded['interpolation'] not in _INTERPOLATIONS:
        raise refuse('interpolation', f"which is not one of timm's: {', '.join(_INTERPOLATIONS)}")
    if recorded.get('crop_mode') and recorded['crop_mode'] not in _CROP_MODES:
        raise refuse('crop_mode', f"which is not one of timm's: {', '.join(_CROP_MODES)}")
    if recorded.get('crop_pct') and not _number(recorded['crop_pct'], *_CROP_PCT_RANGE):
        raise refuse('crop_pct', f'which is not a number from {_CROP_PCT_RANGE[0]} to {_CROP_PCT_RANGE[1]}')
    for name, low in (('mean', -math.inf), ('std', 0.)):
        values = recorded.get(name)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) not in (1, channels) or not all(
                _number(v, low, math.inf) and v != low for v in values):
            why = 'positive' if name == 'std' else 'finite'
            raise refuse(name, f'which is not 1 or {channels} {why} numbers')
    return resolve_data_config(recorded, model=model)


def _number(value: Any, low: float, high: float) -> bool:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and low <= value <= high


def whole_in_range(value: Any, low: int, high: int) -> bool:
    """An int (not a bool) from ``low`` to ``high``: what a size read from a JSON or pickled file must be."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


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
        raise _unreadable(path, f'{type(e).__name__}: {first_line(e)}') from e
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


