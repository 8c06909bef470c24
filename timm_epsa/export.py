"""``timm-epsa export``: a model name, a Hub-ready folder or a checkpoint becomes a file a runtime runs.

What ONNX Runtime gets is one ONNX file at OUT. OpenVINO's IR is two files that only work together
(``.xml``, the graph, and ``.bin``, the weights), so OUT is a folder holding ``model.xml`` and
``model.bin``: replaced as a whole, it is never an old graph beside new weights. Either is written
in a hidden sibling (:mod:`timm_epsa.staging`) and takes OUT's name only once the runtime has run
it and matched eager PyTorch (:func:`timm_epsa.deploy.export_model`).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import timm
from torch import nn

from timm.models import split_model_name_tag

from .convert import model_from_checkpoint
from .deploy import ExportReport, export_model, require_runtime
from .deploy.forms import OPENVINO
from .hub import CONFIG_NAME
from .models.epsanet import MODEL_NAMES
from .staging import staged_file, staged_folder

__all__ = ['OPENVINO_FILES', 'ExportedModel', 'export', 'model_from_source']

OPENVINO_FILES = ('model.xml', 'model.bin')  # what an OpenVINO OUT folder holds


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
) -> ExportedModel:
    """Export ``source`` (see :func:`model_from_source`) for ``runtime`` to ``out``, checked before it
    appears there; ``force`` replaces an existing ``out``. ``batch_size`` fixes the batch (dynamic
    otherwise), ``img_size`` the image side (the model's pretrained cfg otherwise)."""
    require_runtime(runtime)  # before any work: the one thing a fresh install is likely to lack
    progress = log or (lambda message: None)
    out = Path(out)
    if runtime == OPENVINO and out.suffix in ('.xml', '.bin'):
        raise ValueError(f'OUT {out} is a folder for openvino (it will hold {" and ".join(OPENVINO_FILES)}): give a '
                         f'folder name such as {out.with_suffix("")}-ir')
    source_path = Path(source).resolve()
    if source_path.exists() and (out.resolve() == source_path or out.resolve() in source_path.parents):
        raise ValueError(f'OUT {out} would replace SOURCE {source}; write to another path')
    staged = staged_folder(out, force=force, log=log) if runtime == OPENVINO else staged_file(out, force=force, log=log)
    with staged as staging:
        model, name, described = model_from_source(source, model_name, ema, progress)
        progress(f'exporting {name} ({described}) for {runtime} and checking it against eager PyTorch')
        target = staging / OPENVINO_FILES[0] if runtime == OPENVINO else staging
        report = export_model(model, target, runtime, batch_size=batch_size, img_size=img_size)
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
    path = Path(source)
    if not path.is_file() and (model_name or ema):
        raise ValueError(f'--model and --ema are for a checkpoint file SOURCE; {source} is not one (a folder or a '
                         f'model name brings its own architecture and weights)')
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f'{source} is a folder without {CONFIG_NAME}: give one written by timm-epsa convert or '
                             f'quickstart, a checkpoint file, or a model name')
        model = timm.create_model(f'local-dir:{path}', pretrained=True).eval()
        name = model.pretrained_cfg.get('architecture')
        if name not in MODEL_NAMES:
            raise ValueError(f"{source} holds {name!r}, not an EPSANet variant ({', '.join(MODEL_NAMES)})")
        return model, name, f'weights from the folder {source}'
    if path.is_file():
        model, checkpoint = model_from_checkpoint(path, model_name, ema=ema, log=log)
        return model, model.pretrained_cfg['architecture'], f'weights from {source}'
    name, _ = split_model_name_tag(str(source))
    if name in MODEL_NAMES:
        log(f'{source} is a model name: exporting it with random weights (for speed and graph checks only)')
        return timm.create_model(str(source)).eval(), name, 'random weights'
    raise ValueError(
        f"{source!r} is neither a model name ({', '.join(MODEL_NAMES)}), a folder written by timm-epsa convert or "
        f"quickstart, nor a checkpoint file")
