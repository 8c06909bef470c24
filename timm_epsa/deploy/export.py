"""``timm-epsa export``: a model name, a Hub-ready folder or a checkpoint becomes a file a runtime runs.

What ONNX Runtime gets is one ONNX file at OUT. OpenVINO's IR is two files that only work together
(``.xml``, the graph, and ``.bin``, the weights), so OUT is a folder holding ``model.xml`` and
``model.bin``: replaced as a whole, it is never an old graph beside new weights. Either is written
in a hidden sibling (:mod:`timm_epsa.staging`) and takes OUT's name only once the runtime has run
it and matched eager PyTorch (:func:`timm_epsa.deploy.export_model`).
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import timm
from torch import nn

from timm.models import split_model_name_tag

from ..escaping import first_line
from ..hub import CONFIG_NAME, WEIGHTS_NAME
from ..hub.convert import model_from_checkpoint
from ..models.epsanet import MODEL_NAMES, check_model_name
from ..staging import staged_file, staged_folder
from .forms import OPENVINO
from .graph_export import ExportReport, export_model
from .precision import FP32
from .runtimes import check_precision, require_runtime

__all__ = ['OPENVINO_FILES', 'ExportedModel', 'export', 'model_from_source']

OPENVINO_FILES = ('model.xml', 'model.bin')  # what an OpenVINO OUT folder holds
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.tar', '.bin', '.ckpt', '.safetensors')  # a SOURCE that names a file


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
        force: bool = False,
        log: Optional[Callable[[str], None]] = None,
        precision: str = FP32,
        calibration: Optional[Union[str, Path]] = None,
        tune: bool = True,
) -> ExportedModel:
    """Export ``source`` (see :func:`model_from_source`) for ``runtime`` to ``out``, checked before it
    appears there; ``force`` replaces an existing ``out``. ``batch_size`` fixes the batch (dynamic
    otherwise), ``img_size`` the image side (the model's pretrained cfg otherwise); ``precision``,
    ``calibration`` and ``tune`` as :func:`timm_epsa.deploy.export_model` takes them."""
    check_precision(runtime, precision, calibration)
    require_runtime(runtime, precision)  # before any work: the one thing a fresh install is likely to lack
    progress = log or (lambda message: None)
    out = Path(out)
    if runtime == OPENVINO and out.suffix in ('.xml', '.bin'):
        raise ValueError(f'OUT {out} is a folder for openvino (it will hold {" and ".join(OPENVINO_FILES)}): give a '
                         f'folder name such as {out.with_suffix("")}-ir')
    if runtime != OPENVINO and out.suffix != '.onnx':
        raise ValueError(f'OUT {out} must end in .onnx (torch.onnx.export chooses the file format by the suffix)')
    source_path, out_path = Path(source).resolve(), out.resolve()
    if source_path.exists() and (out_path == source_path or out_path in source_path.parents):
        raise ValueError(f'OUT {out} would replace SOURCE {source}; write to another path')
    if source_path.is_dir() and source_path in out_path.parents:
        raise ValueError(f'OUT {out} is inside the SOURCE folder {source}; write outside it')
    staged = staged_folder(out, force=force, log=log) if runtime == OPENVINO else staged_file(out, force=force, log=log)
    with staged as staging:
        model, name, described = model_from_source(source, model_name, ema, progress)
        progress(f'exporting {name} ({described}) for {runtime} in {precision} and checking it against eager PyTorch')
        target = staging / OPENVINO_FILES[0] if runtime == OPENVINO else staging
        report = export_model(model, target, runtime, batch_size=batch_size, img_size=img_size, precision=precision,
                              calibration=calibration, tune=tune, log=progress)
    return ExportedModel(path=out, model_name=name, source=described, report=report)


def model_from_source(
        source: Union[str, Path],
        model_name: Optional[str] = None,
        ema: bool = False,
        log: Callable[[str], None] = lambda message: None,
) -> Tuple[nn.Module, str, str]:
    """(model in eval mode, its architecture, where its weights come from in words) for ``source``:

    * a folder as ``timm-epsa convert`` and ``quickstart`` write it, loaded as ``local-dir:``;
    * a checkpoint file, read and checked as ``convert`` reads it, for ``model_name`` (or the
      EPSANet variant a timm train.py checkpoint records);
    * a variant's name (``epsanet50``, ``epsanet50.in1k``), with random weights: for checking a
      runtime's speed or the graph, not for predictions.
    """
    text, path = str(source), Path(source)
    if text.startswith('hf-hub:'):
        raise ValueError(f'{text}: export reads local files; download the repo first (huggingface-cli download '
                         f'<repo> --local-dir DIR) and give DIR')
    if not path.is_file() and (model_name or ema):
        raise ValueError(f'--model and --ema are for a checkpoint file SOURCE; {text} is not one (a folder or a '
                         f'model name brings its own architecture and weights)')
    if path.is_dir():
        return _model_from_folder(path)
    if path.is_file():
        model, checkpoint = model_from_checkpoint(path, model_name, ema=ema, log=log)
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


def _model_from_folder(path: Path) -> Tuple[nn.Module, str, str]:
    """The model of a Hub folder, its config and weights checked before timm builds anything."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        hides = split_model_name_tag(path.name)[0] in MODEL_NAMES and not path.is_absolute()
        raise ValueError(
            f'{path} is a folder without {CONFIG_NAME}' + (
                f', which hides the model name {path}: run from a directory without such a folder to export the '
                f'model with random weights' if hides else
                ': give one written by timm-epsa convert or quickstart, a checkpoint file, or a model name'))
    try:
        config = json.loads(config_path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path} is not valid JSON ({first_line(e)}); write the folder again with '
                         f'timm-epsa convert') from None
    name = config.get('architecture') if isinstance(config, dict) else None
    if name not in MODEL_NAMES:
        raise ValueError(f"{path} holds {name!r}, not an EPSANet variant ({', '.join(MODEL_NAMES)})")
    if not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f'{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}; write the folder again with timm-epsa '
                         f'convert')
    model = timm.create_model(f'local-dir:{path}', pretrained=True).eval()
    return model, name, f'weights from the folder {path}'
