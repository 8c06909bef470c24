"""The inference runtimes a model can be exported to, imported only when an export asks for one."""
import importlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..escaping import first_line
from .forms import ONNXRUNTIME, OPENVINO, RUNTIMES

__all__ = ['DEPLOY_EXTRA', 'ExportError', 'MissingRuntimeError', 'load_runner', 'require_runtime']

DEPLOY_EXTRA = 'pip install "timm-epsa[deploy]"'

# What each export needs besides torch: the runtime itself, and onnxscript for torch.onnx.export
# (the OpenVINO IR is converted from the ONNX graph).
_PACKAGES = {
    ONNXRUNTIME: ('onnxruntime', 'onnx', 'onnxscript'),
    OPENVINO: ('openvino', 'onnx', 'onnxscript'),
}


class ExportError(RuntimeError):
    """An export that cannot be made, or that failed its check; the message is one line saying why."""


class MissingRuntimeError(ExportError):
    """A package the export needs is not installed."""


def require_runtime(runtime: str) -> None:
    """Raise :class:`MissingRuntimeError` naming the install command unless ``runtime``'s packages import."""
    if runtime not in RUNTIMES:
        raise ValueError(f'unknown runtime {runtime!r}; choose from {", ".join(RUNTIMES)}')
    for package in _PACKAGES[runtime]:
        try:
            importlib.import_module(package)
        except ImportError:
            raise MissingRuntimeError(
                f'exporting for {runtime} needs the {package} package, which is not installed: {DEPLOY_EXTRA}') from None
        except Exception as e:  # installed, but broken: a failed upgrade, a binary for another CPU or Python
            raise ExportError(
                f'exporting for {runtime} needs the {package} package, which is installed but fails to import '
                f'({type(e).__name__}: {first_line(e)}): reinstall it, pip install --force-reinstall {package}'
            ) from e


def load_runner(runtime: str, path: Path, threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the exported model at ``path`` in ``runtime`` on the CPU, in fp32."""
    require_runtime(runtime)
    if runtime == ONNXRUNTIME:
        import onnxruntime
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import openvino
    # The CPU plugin may otherwise run in bf16 where the hardware has it.
    config = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY'}
    if threads:
        config.update(INFERENCE_NUM_THREADS=threads, NUM_STREAMS=1)
    compiled = openvino.Core().compile_model(str(path), 'CPU', config)
    request = compiled.create_infer_request()
    return lambda x: request.infer([x])[0].copy()
