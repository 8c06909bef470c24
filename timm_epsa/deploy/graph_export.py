"""Export a model to ONNX Runtime or OpenVINO in the graph form measured fastest there, and check it.

The PSA layers are rewritten first (:func:`timm_epsa.deploy.rewrite.rewrite_psa`) with each branch
in the form tuned on this machine for the runtime and precision
(:func:`timm_epsa.deploy.tuning.choose_forms`), kept only where the whole model in them is not
slower than in the fixed rules' forms (:func:`timm_epsa.deploy.tuning.guard_forms`), or, with
``tune=False``, the fixed rules of :mod:`timm_epsa.deploy.forms`; the graph is traced with
``torch.onnx.export`` (dynamo), at batch 2 when the batch is dynamic, because ``torch.export``
specialises a traced size of 1. OpenVINO IR is converted from that graph and saved in fp32
(``openvino.save_model`` would otherwise compress the weights to fp16). Nothing is reported done
before the runtime has run the written files on a real-sized input and matched the eager fp32 model
within ``TOLERANCE`` in fp32 as :func:`output_error` measures it; then, for bf16, run in bf16 within
``BF16_TOLERANCE``; for int8, quantized on calibration images and agreeing with eager fp32's top-1
class on held-out images at least ``MIN_AGREEMENT`` of the time. Where the model's outputs are the
same for every input, the layers before its classifier are exported and checked as well (equal
outputs show nothing of them). A file that fails is removed.
"""
import copy
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch
from timm.data import resolve_model_data_config
from torch import nn

from ..escaping import first_line
from .calibration import CalibrationImages, calibration_images
from .forms import ONNXRUNTIME, OPENVINO, branch_form
from .precision import BF16, FP32, INT8
from .quantization import quantize, top1_agreement
from .rewrite import FormOf, rewrite_psa
from .runtimes import ExportError, check_precision, load_runner, require_runtime
from .tracing import BATCH_DIM, TRACE_BATCH, export_onnx
from .tuning import choose_forms, guard_forms

__all__ = ['BF16_TOLERANCE', 'ExportCheckError', 'ExportReport', 'MIN_AGREEMENT', 'TOLERANCE', 'export_model',
           'output_error']

# Largest output_error of an fp32 export: exact forms differ from eager fp32 by 2e-6 to 5e-6 (epsanet50
# and layers=(1, 1, 1, 1), 64-224 px, ONNX Runtime and OpenVINO), one PSA branch 50% off by 0.19.
TOLERANCE = 1e-4
# output_error of the file run in bf16 by OpenVINO, on the check's random input: 3.5x the largest measured
# (1.9e-2 to 2.9e-2: the quickstart digits model, epsanet50 with layers=(1, 1, 1, 1) at 64 px, epsanet50 at 224 px).
BF16_TOLERANCE = 0.1
MIN_AGREEMENT = 0.95  # of int8's top-1 classes with eager fp32's on the held-out images
CHECK_BATCHES = (1, 3)  # a dynamic batch is checked at sizes other than the traced one


class ExportCheckError(ExportError):
    """The exported file failed its check: its outputs differ from eager PyTorch by more than the tolerance, or
    its int8 top-1 classes agree with fp32's too rarely."""


@dataclass(frozen=True)
class ExportReport:
    runtime: str
    files: Tuple[Path, ...]
    input_size: Tuple[int, int, int]
    batch_size: Optional[int]  # None: any batch size
    checked_batch_sizes: Tuple[int, ...]
    max_error: float  # the largest output_error, the file run in fp32
    precision: str = FP32
    runs_in: str = 'f32'  # what the runtime ran the file in for the precision's check
    precision_error: Optional[float] = None  # bf16: as max_error, the file run in bf16
    agreement: Optional[float] = None  # int8: share of held-out images with fp32's top-1 class
    held_out: int = 0  # int8: images the agreement was measured on
    tuned: bool = True  # PSA branch forms timed on this machine (False: the fixed rules)
    # The outputs were the same for every input (a classifier of zero weights), which no wrong graph
    # before the classifier can change: max_error is then that of the features the classifier reads.
    features_checked: bool = False


def export_model(
        model: nn.Module,
        out: Path,
        runtime: str,
        batch_size: Optional[int] = None,
        img_size: Optional[int] = None,
        precision: str = FP32,
        calibration: Optional[Union[str, Path]] = None,
        tune: bool = True,
        forms: Optional[FormOf] = None,
        min_agreement: float = MIN_AGREEMENT,
        log: Callable[[str], None] = lambda message: None,
) -> ExportReport:
    """Write ``model`` for ``runtime`` at ``out``: an ONNX file for ``onnxruntime``; for ``openvino``
    IR at ``out`` (``.xml``) and its weights beside it (``.bin``). ``model`` is left untouched.

    The batch size is dynamic unless ``batch_size`` is given; ``img_size`` defaults to the model's
    pretrained cfg (224 without one). ``precision`` is what the file is tuned and checked for
    (:mod:`timm_epsa.deploy.precision`); int8 needs ``calibration``, a folder of images
    (:mod:`timm_epsa.deploy.calibration`) and a top-1 agreement with fp32 of ``min_agreement`` on
    the held-out images. ``tune=False`` takes the fixed rules instead of timing the PSA branch forms
    on this machine; ``forms(name, conv)`` gives each branch's form instead of either.
    """
    check_precision(runtime, precision, calibration)
    require_runtime(runtime, precision)
    out = Path(out)
    if runtime == OPENVINO and out.suffix != '.xml':
        raise ExportError(f'{out}: OpenVINO IR is written as <name>.xml and <name>.bin; give a path ending in .xml')
    if batch_size is not None and batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be at least 1')
    input_size = _input_size(model, img_size)
    reference = copy.deepcopy(model).float().cpu().eval()
    images = calibration_images(calibration, reference, input_size) if precision == INT8 else None
    tuned = forms is None and tune
    if tuned:
        chosen = choose_forms(reference, runtime, precision, input_size, batch_size, log=log)
        chosen = guard_forms(reference, runtime, precision, input_size, chosen, batch_size=batch_size, log=log,
                             export=lambda forms, path: _export_onnx(
                                 rewrite_psa(reference, lambda name, conv: forms[name]), path, input_size, batch_size))
        forms = lambda name, conv: chosen[name]  # noqa: E731
    forms = forms or (lambda name, conv: branch_form(runtime, conv, precision))
    graph = rewrite_psa(reference, forms)
    files = (out,) if runtime == ONNXRUNTIME else (out, out.with_suffix('.bin'))
    checked = (batch_size,) if batch_size else CHECK_BATCHES
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix='.fp32-') if precision == INT8 else nullcontext() as tmp:
            fp32_path = Path(tmp) / out.name if tmp else out  # int8: quantized from there to out
            if runtime == ONNXRUNTIME:
                _export_onnx(graph, fp32_path, input_size, batch_size)
            else:
                _export_openvino(graph, fp32_path, input_size, batch_size)
            error, constant, _ = _check(reference, runtime, fp32_path, input_size, checked)
            report = ExportReport(runtime, files, input_size, batch_size, checked, error, precision, tuned=tuned)
            if constant:
                report = _checked_on_features(report, reference, out, img_size, forms)
            if precision == BF16:
                report = _checked_in_bf16(report, reference, out)
            elif precision == INT8:
                report = _quantized(report, reference, fp32_path, out, images, min_agreement, log)
    except BaseException:
        for path in files:
            path.unlink(missing_ok=True)
        raise
    return report


def _checked_on_features(report: ExportReport, reference: nn.Module, out: Path, img_size: Optional[int],
                         forms: FormOf) -> ExportReport:
    """Where ``reference``'s outputs are the same for every input, equal outputs of the runtime show
    nothing about the graph before the classifier: export and check that graph, the features the
    classifier reads (the same branch forms of the same layers), in a temporary file beside ``out``;
    ``report`` with that check's error."""
    classifier = getattr(reference, 'get_classifier', lambda: None)()
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise ExportCheckError(
            "eager PyTorch's output is the same for every input, so the runtime's matching it shows nothing, and "
            "the model has no classifier to look before: export trained weights")
    features = copy.deepcopy(reference)
    features.reset_classifier(0)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix='.features-') as tmp:
        try:
            checked = export_model(features, Path(tmp) / out.name, report.runtime, report.batch_size,
                                   img_size, forms=forms)
        except ExportCheckError as e:
            raise ExportCheckError(f'{e} (checked on the features before the classifier: the outputs are the same '
                                   f'for every input)') from e
    return replace(report, max_error=checked.max_error, features_checked=True)


def _checked_in_bf16(report: ExportReport, reference: nn.Module, path: Path) -> ExportReport:
    """``report`` with the file at ``path``, checked in fp32, run in bf16 and checked within ``BF16_TOLERANCE``."""
    error, _, runs_in = _check(reference, report.runtime, path, report.input_size, report.checked_batch_sizes, BF16,
                               BF16_TOLERANCE)
    return replace(report, runs_in=runs_in, precision_error=error)


def _quantized(report: ExportReport, reference: nn.Module, fp32_path: Path, out: Path, images: CalibrationImages,
               min_agreement: float, log: Callable[[str], None]) -> ExportReport:
    """``report`` with the checked fp32 file at ``fp32_path`` quantized to ``out`` on ``images`` and its
    top-1 classes checked against eager fp32's on the held-out ones."""
    log(f'quantizing to int8, calibrated on {len(images.calibration)} images of {images.folder}')
    quantize(report.runtime, fp32_path, out, images)
    run = load_runner(report.runtime, out, precision=INT8)
    agreement, held_out = top1_agreement(reference, run, images, report.batch_size)
    if not agreement >= min_agreement:
        raise ExportCheckError(
            f'the int8 model agrees with eager fp32 on the top-1 class of {agreement:.1%} of {held_out} held-out '
            f'images of {images.folder}, less than {min_agreement:.0%}: export removed; calibrate on images like '
            f'those the model will see, or export fp32')
    return replace(report, runs_in=run.runs_in, agreement=agreement, held_out=held_out)


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
    export_onnx(graph, path, (example,), None if batch_size else (BATCH_DIM,))


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


def _check(reference: nn.Module, runtime: str, path: Path, input_size: Tuple[int, int, int],
           batches: Tuple[int, ...], precision: str = FP32, tolerance: float = TOLERANCE) -> Tuple[float, bool, str]:
    """The largest of the runtime's output_errors on ``path`` (loaded once) at each of ``batches``, whether
    eager PyTorch's outputs were all equal at every batch (then they show nothing of the graph before the
    last layer), and the precision the runtime ran in."""
    inputs = [torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0)) for batch in batches]
    with torch.inference_mode():
        outputs = [reference(x) for x in inputs]
    nonfinite = next((batch for batch, expected in zip(batches, outputs) if not bool(expected.isfinite().all())), None)
    if nonfinite is not None:
        raise ExportCheckError(
            f'eager PyTorch\'s own output holds inf or nan at batch {nonfinite}: the model\'s weights are not finite, '
            f'or so large that its activations overflow float32; export finite, trained weights')
    try:
        run = load_runner(runtime, path, precision=precision)
        actuals = [torch.from_numpy(run(x.numpy())) for x in inputs]
    except Exception as e:
        raise ExportCheckError(f'{runtime} could not run the exported {path.name}: {first_line(e)}') from e
    checked = [_compare(runtime, expected, actual, precision, tolerance) for expected, actual in zip(outputs, actuals)]
    return max(error for error, _ in checked), all(constant for _, constant in checked), run.runs_in


def _compare(runtime: str, expected: torch.Tensor, actual: torch.Tensor, precision: str,
             tolerance: float) -> Tuple[float, bool]:
    """The output_error of ``actual`` against eager PyTorch's ``expected`` within ``tolerance``, and whether
    ``expected``'s outputs were all equal."""
    shape = expected.shape
    if actual.shape != expected.shape:
        raise ExportCheckError(
            f'{runtime} output has shape {tuple(actual.shape)} at batch {shape[0]}, eager PyTorch {tuple(expected.shape)}')
    error = output_error(expected, actual)
    if not error <= tolerance:  # also catches NaN
        raise ExportCheckError(
            f'{runtime} output' + (f' in {precision}' if precision != FP32 else '') + f' differs from eager PyTorch '
            f'by {error:.1e} of the outputs\' spread at batch {shape[0]}, more than {tolerance:.0e}: export removed')
    flat = expected.flatten(1)
    return error, bool((flat == flat[:, :1]).all())
