"""Export a model to ONNX Runtime or OpenVINO in the graph form measured fastest there, and check it.

The PSA layers are rewritten first (:func:`timm_epsa.deploy.rewrite.rewrite_for_runtime`); the
graph is traced with ``torch.onnx.export`` (dynamo), at batch 2 when the batch is dynamic, because
``torch.export`` specialises a traced size of 1. OpenVINO IR is converted from that graph and
saved in fp32 (``openvino.save_model`` would otherwise compress the weights to fp16). Nothing is
reported done before the runtime has run the written files on a real-sized input and matched the
eager fp32 model within ``TOLERANCE`` as :func:`output_error` measures it; a file that fails is removed.
"""
import copy
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from timm.data import resolve_model_data_config
from torch import nn

from ..escaping import first_line
from .forms import ONNXRUNTIME, OPENVINO
from .rewrite import rewrite_for_runtime
from .runtimes import ExportError, load_runner, require_runtime

__all__ = ['ExportCheckError', 'ExportReport', 'TOLERANCE', 'export_model', 'output_error']

# Largest output_error of an fp32 export: exact forms differ from eager fp32 by 2e-6 to 5e-6 (epsanet50
# and layers=(1, 1, 1, 1), 64-224 px, ONNX Runtime and OpenVINO), one PSA branch 50% off by 0.19.
TOLERANCE = 1e-4
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)  # a dynamic batch is checked at sizes other than the traced one


class ExportCheckError(ExportError):
    """The runtime's output on the exported file differs from eager PyTorch by more than ``TOLERANCE``."""


@dataclass(frozen=True)
class ExportReport:
    runtime: str
    files: Tuple[Path, ...]
    input_size: Tuple[int, int, int]
    batch_size: Optional[int]  # None: any batch size
    checked_batch_sizes: Tuple[int, ...]
    max_error: float  # the largest output_error
    # The outputs were the same for every input (a classifier of zero weights), which no wrong graph
    # before the classifier can change: max_error is then that of the features the classifier reads.
    features_checked: bool = False


def export_model(
        model: nn.Module,
        out: Path,
        runtime: str,
        batch_size: Optional[int] = None,
        img_size: Optional[int] = None,
) -> ExportReport:
    """Write ``model`` for ``runtime`` at ``out``: an ONNX file for ``onnxruntime``; for ``openvino``
    IR at ``out`` (``.xml``) and its weights beside it (``.bin``). ``model`` is left untouched.

    The batch size is dynamic unless ``batch_size`` is given; ``img_size`` defaults to the model's
    pretrained cfg (224 without one).
    """
    require_runtime(runtime)
    out = Path(out)
    if runtime == OPENVINO and out.suffix != '.xml':
        raise ExportError(f'{out}: OpenVINO IR is written as <name>.xml and <name>.bin; give a path ending in .xml')
    if batch_size is not None and batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be at least 1')
    input_size = _input_size(model, img_size)
    reference = copy.deepcopy(model).float().cpu().eval()
    graph = rewrite_for_runtime(reference, runtime)
    files = (out,) if runtime == ONNXRUNTIME else (out, out.with_suffix('.bin'))
    try:
        if runtime == ONNXRUNTIME:
            _export_onnx(graph, out, input_size, batch_size)
        else:
            _export_openvino(graph, out, input_size, batch_size)
        checked = (batch_size,) if batch_size else CHECK_BATCHES
        errors, constant = zip(*(_check(reference, runtime, out, (batch, *input_size)) for batch in checked))
        if all(constant):
            return replace(_check_features(reference, out, runtime, batch_size, img_size), files=files)
    except BaseException:
        for path in files:
            path.unlink(missing_ok=True)
        raise
    return ExportReport(runtime, files, input_size, batch_size, checked, max(errors))


def _check_features(
        reference: nn.Module, out: Path, runtime: str, batch_size: Optional[int], img_size: Optional[int],
) -> ExportReport:
    """Where ``reference``'s outputs are the same for every input, equal outputs of the runtime show
    nothing about the graph before the classifier: export and check that graph, the features the
    classifier reads (the same rewrite of the same layers), in a temporary file beside ``out``."""
    classifier = getattr(reference, 'get_classifier', lambda: None)()
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise ExportCheckError(
            "eager PyTorch's output is the same for every input, so the runtime's matching it shows nothing, and "
            "the model has no classifier to look before: export trained weights")
    features = copy.deepcopy(reference)
    features.reset_classifier(0)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix='.features-') as tmp:
        try:
            report = export_model(features, Path(tmp) / out.name, runtime, batch_size, img_size)
        except ExportCheckError as e:
            raise ExportCheckError(f'{e} (checked on the features before the classifier: the outputs are the same '
                                   f'for every input)') from e
    return replace(report, features_checked=True)


def _input_size(model: nn.Module, img_size: Optional[int]) -> Tuple[int, int, int]:
    """(channels, height, width) of the images ``model`` takes: the channels its first convolution
    reads (timm leaves the pretrained cfg at 3 when a model is built with other ``in_chans``), the
    size given or the one timm resolves for the model (its pretrained cfg; 224 without one)."""
    _, height, width = resolve_model_data_config(model)['input_size']
    if img_size is not None:
        if img_size < 1:
            raise ValueError(f'img_size={img_size} must be at least 1')
        height = width = img_size
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (first_conv.in_channels if first_conv is not None else 3), height, width


def _export_onnx(graph: nn.Module, path: Path, input_size: Tuple[int, int, int], batch_size: Optional[int]) -> None:
    example = torch.randn(batch_size or TRACE_BATCH, *input_size)
    dynamic_shapes = None if batch_size else ({0: torch.export.Dim('batch', min=1)},)
    with _quiet():
        try:
            torch.onnx.export(
                graph, (example,), str(path), dynamo=True, external_data=False, optimize=True,
                input_names=['input'], output_names=['output'], dynamic_shapes=dynamic_shapes, verbose=False)
        except Exception as e:  # torch.export's and onnxscript's errors are pages long
            raise ExportError(f'torch.onnx.export failed: {first_line(e)}') from e


def _export_openvino(graph: nn.Module, path: Path, input_size: Tuple[int, int, int], batch_size: Optional[int]) -> None:
    import openvino
    with tempfile.TemporaryDirectory(dir=path.parent, prefix='.onnx-') as tmp:
        onnx_path = Path(tmp) / 'model.onnx'
        _export_onnx(graph, onnx_path, input_size, batch_size)
        ov_model = openvino.convert_model(str(onnx_path))
    openvino.save_model(ov_model, str(path), compress_to_fp16=False)


def output_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """How far ``actual`` (a runtime's output) is from ``expected`` (eager PyTorch's, finite), as the
    export check measures it: for each sample, the largest difference over its outputs divided by the
    typical spread of that sample's outputs, the median distance from their median among the outputs
    not at it (the median's magnitude where all outputs are at it: one output, or all equal); the
    largest of these. NaN where ``actual`` holds NaN.

    Relative to the spread of the sample itself, so that neither one dominant logit (a difference of
    2.6e-9 of the largest logit can be 0.06 of a typical one) nor a sample of small outputs beside one
    of large ones hides an error; a median, so that the dominant output cannot widen the spread, and
    among the outputs off the median, so that many equal ones (ReLU's zeros in pooled features) cannot
    narrow it to nothing. Within this error the classes' order changes only between logits closer than
    twice it, so the top-k classes agree but for such ties."""
    expected, actual = expected.detach().double().flatten(1), actual.detach().double().flatten(1)
    median = expected.median(1).values
    deviation = (expected - median[:, None]).abs()
    spread = deviation.where(deviation > 0, torch.nan).nanmedian(1).values
    spread = torch.where(spread.isnan(), median.abs(), spread).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((actual - expected).abs().amax(1) / spread).max())


def _check(reference: nn.Module, runtime: str, path: Path, shape: Tuple[int, ...]) -> Tuple[float, bool]:
    """The runtime's output_error on ``path`` at ``shape``, and whether eager PyTorch's outputs were all
    equal (then they show nothing of the graph before the last layer)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(x)
    if not bool(expected.isfinite().all()):
        raise ExportCheckError(
            f'eager PyTorch\'s own output holds inf or nan at batch {shape[0]}: the model\'s weights are not finite, '
            f'or so large that its activations overflow float32; export finite, trained weights')
    try:
        actual = torch.from_numpy(load_runner(runtime, path)(x.numpy()))
    except Exception as e:
        raise ExportCheckError(f'{runtime} could not run the exported {path.name}: {first_line(e)}') from e
    if actual.shape != expected.shape:
        raise ExportCheckError(
            f'{runtime} output has shape {tuple(actual.shape)} at batch {shape[0]}, eager PyTorch {tuple(expected.shape)}')
    error = output_error(expected, actual)
    if not error <= TOLERANCE:  # also catches NaN
        raise ExportCheckError(
            f'{runtime} output differs from eager PyTorch by {error:.1e} of the outputs\' spread at batch '
            f'{shape[0]}, more than {TOLERANCE:.0e}: export removed')
    flat = expected.flatten(1)
    return error, bool((flat == flat[:, :1]).all())


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx.export narrates its steps and warns about internals a user cannot act on."""
    logger = logging.getLogger('torch.onnx')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        logger.setLevel(level)

