"""The inference runtimes a model can be exported to, imported only when an export asks for one."""
import importlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..escaping import first_line
from .forms import ONNXRUNTIME, OPENVINO, RUNTIMES
from .precision import BF16, FP32, INT8, PRECISIONS, openvino_config

__all__ = ['DEPLOY_EXTRA', 'ExportError', 'MissingRuntimeError', 'Runner', 'check_precision', 'default_precision',
           'load_runner', 'require_runtime']

DEPLOY_EXTRA = 'pip install "timm-epsa[deploy]"'

# What each export needs besides torch: the runtime itself, and onnxscript for torch.onnx.export
# (the OpenVINO IR is converted from the ONNX graph).
_PACKAGES = {
    ONNXRUNTIME: ('onnxruntime', 'onnx', 'onnxscript'),
    OPENVINO: ('openvino', 'onnx', 'onnxscript'),
}
_INT8_PACKAGES = {OPENVINO: ('nncf',)}  # ONNX Runtime quantizes with its own onnxruntime.quantization


class ExportError(RuntimeError):
    """An export that cannot be made, or that failed its check; the message is one line saying why."""


class MissingRuntimeError(ExportError):
    """A package the export needs is not installed."""


def require_runtime(runtime: str, precision: str = FP32) -> None:
    """Raise :class:`MissingRuntimeError` naming the install command unless the packages an export for
    ``runtime`` in ``precision`` needs import."""
    if runtime not in RUNTIMES:
        raise ValueError(f'unknown runtime {runtime!r}; choose from {", ".join(RUNTIMES)}')
    for package in _PACKAGES[runtime] + (_INT8_PACKAGES.get(runtime, ()) if precision == INT8 else ()):
        what = f'{runtime} in {precision}' if package in _INT8_PACKAGES.get(runtime, ()) else runtime
        try:
            importlib.import_module(package)
        except ImportError:
            raise MissingRuntimeError(
                f'exporting for {what} needs the {package} package, which is not installed: {DEPLOY_EXTRA}') from None
        except Exception as e:  # installed, but broken: a failed upgrade, a binary for another CPU or Python
            raise ExportError(
                f'exporting for {what} needs the {package} package, which is installed but fails to import '
                f'({type(e).__name__}: {first_line(e)}): reinstall it, pip install --force-reinstall {package}'
            ) from e


def check_precision(runtime: str, precision: str, calibration: Optional[object] = None) -> None:
    """Refuse, in one line, a precision ``runtime`` cannot run and calibration images given or missing
    for it."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; choose from {", ".join(PRECISIONS)}')
    if precision == BF16 and runtime == ONNXRUNTIME:
        raise ValueError('bf16 is not offered for onnxruntime: its CPU execution provider has no bf16 convolutions '
                         '(they would run as fp32 behind casts); export fp32 or int8 for onnxruntime, or bf16 for '
                         'openvino')
    if precision == INT8 and calibration is None:
        raise ValueError('int8 needs calibration images: give --calibration DIR, a folder of images like those the '
                         'model will see (an ImageFolder tree or a flat folder)')
    if precision != INT8 and calibration is not None:
        raise ValueError(f'--calibration is for --precision int8; a {precision} export does not use images')


def default_precision(runtime: str) -> str:
    """The precision ``runtime`` runs an fp32 file in on this CPU when compiled with its defaults."""
    if runtime == OPENVINO:
        import openvino
        return openvino.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT').get_type_name()
    return 'f32'


class Runner:
    """The exported model loaded in its runtime: ``runner(images)`` gives the logits; ``runs_in`` is the
    precision the runtime says it computes in (``f32``, ``bf16``; ``int8`` for a quantized ONNX file)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], runs_in: str):
        self.run, self.runs_in = run, runs_in

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


def load_runner(runtime: str, path: Path, threads: Optional[int] = None, precision: str = FP32) -> Runner:
    """The exported model at ``path`` run by ``runtime`` on the CPU as it was checked for ``precision``
    (:func:`timm_epsa.deploy.precision.openvino_config`)."""
    require_runtime(runtime)
    if runtime == ONNXRUNTIME:
        import onnxruntime
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return Runner(lambda x: session.run(None, {name: x})[0], 'int8' if precision == INT8 else 'f32')
    import openvino
    config = {**openvino_config(precision), 'PERFORMANCE_HINT': 'LATENCY'}
    if threads:
        config.update(INFERENCE_NUM_THREADS=threads, NUM_STREAMS=1)
    compiled = openvino.Core().compile_model(str(path), 'CPU', config)
    request = compiled.create_infer_request()
    runs_in = compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()
    return Runner(lambda x: request.infer([x])[0].copy(), f'int8 and {runs_in}' if precision == INT8 else runs_in)
