"""``timm-epsa export``: a model name, a Hub-ready folder or a checkpoint becomes a file a runtime runs.

What ONNX Runtime gets is one ONNX file at OUT. OpenVINO's IR is two files that only work together
(``.xml``, the graph, and ``.bin``, the weights), so OUT is a folder holding ``model.xml`` and
``model.bin``: replaced as a whole, it is never an old graph beside new weights. Either is written
in a hidden sibling (:mod:`timm_epsa.staging`) and takes OUT's name only once the runtime has run
it and matched eager PyTorch (:func:`timm_epsa.deploy.export_model`).
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import timm
from torch import nn

from timm.data import resolve_model_data_config
from timm.models import split_model_name_tag

from ..escaping import first_line
from ..hub import CONFIG_NAME, WEIGHTS_NAME
from ..hub.checkpoint import CheckpointError
from ..hub.convert import model_from_checkpoint
from ..hub.folder import check_config_json
from ..models.epsanet import MODEL_NAMES, check_model_name
from ..staging import destination_path, staged_file, staged_folder
from .forms import OPENVINO
from .graph_export import CHECK_BATCHES, ExportReport, export_model
from .precision import FP32
from .runtimes import check_precision, require_runtime
from .tracing import TRACE_BATCH

__all__ = ['OPENVINO_FILES', 'ExportedModel', 'export', 'model_from_source']

OPENVINO_FILES = ('model.xml', 'model.bin')  # what an OpenVINO OUT folder holds
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.tar', '.bin', '.ckpt', '.safetensors')  # a SOURCE that names a file
# The check runs eager PyTorch, then the runtime, on a random input of the largest batch it checks. EPSANet's
# activations take 20-60 times that input's memory in eager PyTorch (epsanet50, epsanet101, epsanet50_large at
# 224-512 px, batch 1-8), and about as much again in the runtime: the input may take 1/64 of the machine's memory.
INPUT_SHARE_OF_MEMORY = 1 / 64


@dataclass
class ExportedModel:
    path: Path
    model_name: str
    source: str  # in words: random weights, a folder, a checkpoint
    report: ExportReport


def export(
        source: Union[str, Path],
        out: Union[str, Path],
        runtime: str,
        batch_size: Optional[int] = None,
        img_size: Optional[int] = None,
        model_name: Optional[str] = None,
        ema: bool = False,
        ignore_train_args: bool = False,
        force: bool = False,
        log: Optional[Callable[[str], None]] = None,
        precision: str = FP32,
        calibration: Optional[Union[str, Path]] = None,
        tune: bool = True,
) -> ExportedModel:
    """Export ``source`` (see :func:`model_from_source`, which takes ``model_name``, ``ema`` and
    ``ignore_train_args``) for ``runtime`` to ``out``, checked before it appears there; ``force``
    replaces an existing ``out``. ``batch_size`` fixes the batch (dynamic otherwise), ``img_size`` the
    image side (the model's pretrained cfg otherwise); ``precision``, ``calibration`` and ``tune`` as
    :func:`timm_epsa.deploy.export_model` takes them."""
    check_precision(runtime, precision, calibration)
    require_runtime(runtime, precision)  # before any work: the one thing a fresh install is likely to lack
    progress = log or (lambda message: None)
    out = Path(out)
    if out.name in ('.onnx', '.xml', '.bin'):  # a hidden file's name, not a suffix
        example = out.with_name('model-ir' if runtime == OPENVINO else 'model.onnx')
        raise ValueError(f'OUT {out} is a suffix without a name; give a name, e.g. {example}')
    if runtime == OPENVINO and out.suffix in ('.xml', '.bin', '.onnx'):
        raise ValueError(f'OUT {out} is a folder for openvino (it will hold {" and ".join(OPENVINO_FILES)}): give a '
                         f'folder name such as {out.with_suffix("")}-ir')
    if runtime != OPENVINO and out.suffix != '.onnx':
        raise ValueError(f'OUT {out} must end in .onnx (torch.onnx.export chooses the file format by the suffix)')
    source_path, out_path = Path(source).resolve(), destination_path(out)
    if source_path.exists() and (out_path == source_path or out_path in source_path.parents):
        raise ValueError(f'OUT {out} would replace SOURCE {source}; write to another path')
    if source_path.is_dir() and source_path in out_path.parents:
        raise ValueError(f'OUT {out} is inside the SOURCE folder {source}; write outside it')
    staged = staged_folder(out, force=force, log=log) if runtime == OPENVINO else staged_file(out, force=force, log=log)
    with staged as staging:
        model, name, described = model_from_source(source, model_name, ema, ignore_train_args, progress)
        _check_input_fits(model, img_size, batch_size)
        progress(f'exporting {name} ({described}) for {runtime} in {precision} and checking it against eager PyTorch')
        target = staging / OPENVINO_FILES[0] if runtime == OPENVINO else staging
        report = export_model(model, target, runtime, batch_size=batch_size, img_size=img_size, precision=precision,
                              calibration=calibration, tune=tune, log=progress)
    return ExportedModel(path=out, model_name=name, source=described, report=report)


def _check_input_fits(model: nn.Module, img_size: Optional[int], batch_size: Optional[int]) -> None:
    """Refuse, before anything is allocated, an input too large for this machine's memory to check
    (:data:`INPUT_SHARE_OF_MEMORY`)."""
    channels, height, width = resolve_model_data_config(model)['input_size']
    sides = (img_size, img_size) if img_size is not None else (height, width)
    batch = batch_size or max(*CHECK_BATCHES, TRACE_BATCH)
    needed = batch * channels * sides[0] * sides[1] * 4  # float32
    memory = _physical_memory()
    if memory is not None and needed > memory * INPUT_SHARE_OF_MEMORY:
        raise ValueError(
            f'checking the export runs it on a batch of {batch} images of {channels}x{sides[0]}x{sides[1]}, '
            f'{needed / 1e9:.3g} GB of input; with the activations (up to {1 / INPUT_SHARE_OF_MEMORY:.0f} times '
            f'as much) that exceeds this machine\'s {memory / 1e9:.3g} GB of memory: give a smaller --img-size or '
            f'--batch-size')


def _physical_memory() -> Optional[int]:
    """Bytes of memory this machine has, or None where the OS does not say (Windows)."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, OSError, ValueError):
        return None


def model_from_source(
        source: Union[str, Path],
        model_name: Optional[str] = None,
        ema: bool = False,
        ignore_train_args: bool = False,
        log: Callable[[str], None] = lambda message: None,
) -> Tuple[nn.Module, str, str]:
    """(model in eval mode, its architecture, where its weights come from in words) for ``source``:

    * a folder as ``timm-epsa convert`` and ``quickstart`` write it, loaded as ``local-dir:``;
    * a checkpoint file, read and checked as ``convert`` reads it (``ema``, ``ignore_train_args``),
      for ``model_name`` (or the EPSANet variant a timm train.py checkpoint records);
    * a variant's name (``epsanet50``, ``epsanet50.in1k``), with random weights: for checking a
      runtime's speed or the graph, not for predictions.
    """
    text, path = str(source), Path(source)
    if text.startswith('hf-hub:'):
        raise ValueError(f'{text}: export reads local files; download the repo first (huggingface-cli download '
                         f'<repo> --local-dir DIR) and give DIR')
    if not path.is_file() and (model_name or ema or ignore_train_args):
        raise ValueError(f'--model, --ema and --ignore-train-args are for a checkpoint file SOURCE; {text} is not one '
                         f'(a folder or a model name brings its own architecture, weights and preprocessing)')
    hides = os.sep not in text and split_model_name_tag(text)[0] in MODEL_NAMES
    if path.is_dir():
        return _model_from_folder(path, hides)
    if path.is_file():
        try:
            model, checkpoint = model_from_checkpoint(
                path, model_name, ema=ema, ignore_train_args=ignore_train_args, log=log)
        except (CheckpointError, ValueError) as e:
            if not hides:
                raise
            kind = CheckpointError if isinstance(e, CheckpointError) else ValueError
            raise kind(f'{e}; the file {text} here hides the model name {text}: run from a directory without such a '
                       f'file to export the model with random weights') from e
        return model, model.pretrained_cfg['architecture'], f'weights from {text}'
    name = split_model_name_tag(text)[0]
    if name in MODEL_NAMES:
        check_model_name(text)
        log(f'{text} is a model name: exporting it with random weights (for speed and graph checks only)')
        return timm.create_model(text).eval(), name, 'random weights'
    if os.sep in text or path.suffix in CHECKPOINT_SUFFIXES:
        raise ValueError(f'{text}: no such file or folder')
    raise ValueError(
        f"{text!r} is neither a model name ({', '.join(MODEL_NAMES)}), a folder written by timm-epsa convert or "
        f"quickstart, nor a checkpoint file")


def _model_from_folder(path: Path, hides: bool) -> Tuple[nn.Module, str, str]:
    """The model of a Hub folder, its config and weights checked before timm builds anything; ``hides``:
    the folder's path, as given, is also a model's name."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(
            f'{path} is a folder without {CONFIG_NAME}' + (
                f', which hides the model name {path}: run from a directory without such a folder to export the '
                f'model with random weights' if hides else
                ': give one written by timm-epsa convert or quickstart, a checkpoint file, or a model name'))
    name = check_config_json(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f'{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}; write the folder again with timm-epsa '
                         f'convert')
    try:
        model = timm.create_model(f'local-dir:{path}', pretrained=True).eval()
    except (AssertionError, IndexError, KeyError, TypeError) as e:  # what timm and ResNet raise on such a config
        raise ValueError(f'{config_path} does not describe a model timm can build ({type(e).__name__}: '
                         f'{first_line(e)}); write the folder again with timm-epsa convert') from e
    return model, name, f'weights from the folder {path}'
