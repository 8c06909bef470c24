"""Post-training static int8 quantization of a checked fp32 export, and the check of its predictions.

* ONNX Runtime: ``onnxruntime.quantization.quantize_static`` in QDQ format (QuantizeLinear /
  DequantizeLinear pairs that its CPU provider fuses into int8 kernels), activations uint8 and
  weights int8 per output channel, ranges from the calibration images' minima and maxima. The
  graph is first shape-inferred and optimized by ``quant_pre_process``, as ONNX Runtime advises.
* OpenVINO: ``nncf.quantize`` (its default preset: symmetric int8 weights and activations, fast bias
  correction) on the IR, saved with fp32 for what stays unquantized.

Either way the quantized file is then judged by what a user sees: its top-1 predictions on the
held-out images against the eager fp32 model's (:func:`top1_agreement`).
"""
import io
import logging
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .calibration import CalibrationImages
from .forms import ONNXRUNTIME

__all__ = ['quantize', 'quantize_bank', 'top1_agreement']

CHECK_BATCH = 8  # held-out images per call in the check of a dynamic-batch file


def quantize(runtime: str, fp32_path: Path, out: Path, images: CalibrationImages) -> None:
    """Write the int8 form of the fp32 file ``fp32_path`` at ``out``, calibrated on ``images.calibration``."""
    feeds = (lambda: ({'input': batch.numpy()} for batch in images.batches(images.calibration)))
    if runtime == ONNXRUNTIME:
        from onnxruntime.quantization import quant_pre_process
        with tempfile.TemporaryDirectory(dir=out.parent, prefix='.quantize-') as tmp:
            prepared = Path(tmp) / 'prepared.onnx'
            # symbolic shape inference does not follow the dynamic batch of torch.export's reshapes
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            _quantize_onnx(prepared, out, feeds())
    else:
        _quantize_openvino(fp32_path, out, feeds, len(images.calibration))


def quantize_bank(runtime: str, path: Path, out: Path, inputs: Sequence[np.ndarray]) -> None:
    """The tuning's candidate bank (:class:`timm_epsa.deploy.tuning.CandidateBank`) quantized as
    :func:`quantize` quantizes a model, calibrated on one sample of ``inputs``: the values do not
    matter, only which int8 operations the runtime then runs."""
    feed = {f'x{i}': x for i, x in enumerate(inputs)}
    if runtime == ONNXRUNTIME:
        _quantize_onnx(path, out, iter([feed]))
    else:
        _quantize_openvino(path, out, lambda: iter([feed]), 1)


def _quantize_onnx(path: Path, out: Path, feeds: Iterator[Dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(feeds, None)

    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _quantize_openvino(path: Path, out: Path, feeds: Callable[[], Iterator[Dict[str, np.ndarray]]], count: int) -> None:
    import openvino

    class Feeds:  # NNCF may go over the data more than once
        def __iter__(self):
            return feeds()

    with _quiet_nncf():
        import nncf
        quantized = nncf.quantize(openvino.Core().read_model(str(path)), nncf.Dataset(Feeds()), subset_size=count)
    openvino.save_model(quantized, str(out), compress_to_fp16=False)


@contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF draws progress bars on stdout and logs its steps; importing it makes torch warn that there is
    no CUDA. The export says what it does itself."""
    loggers = [logging.getLogger(name) for name in ('nncf', 'torch.utils.cpp_extension')]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def top1_agreement(
        reference: nn.Module,
        run: Callable[[np.ndarray], np.ndarray],
        images: CalibrationImages,
        batch_size: Optional[int] = None,
) -> Tuple[float, int]:
    """(share of ``images.held_out`` whose top-1 class from ``run`` is eager fp32 ``reference``'s, how
    many images). A fixed ``batch_size`` is filled up with the batch's first image where too few are left."""
    agree = 0
    paths: Sequence[Path] = images.held_out
    for batch in images.batches(paths, batch_size or CHECK_BATCH):
        count = batch.shape[0]
        if batch_size and count < batch_size:
            batch = torch.cat([batch, batch[:1].expand(batch_size - count, *batch.shape[1:])])
        with torch.inference_mode():
            expected = reference(batch)[:count].argmax(1)
        actual = torch.from_numpy(run(batch.numpy())[:count]).argmax(1)
        agree += int((actual == expected).sum())
    return agree / len(paths), len(paths)
