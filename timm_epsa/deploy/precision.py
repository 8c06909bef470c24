"""The precision an export is made, tuned and checked for, and how each runtime is told to run it.

* ``fp32``: the file holds fp32 weights and runs in fp32; ONNX Runtime always does, OpenVINO only
  when compiled with ``INFERENCE_PRECISION_HINT`` ``f32``: on CPUs with AMX (and some with
  AVX512-BF16) its CPU plugin runs bf16 by default.
* ``bf16``: OpenVINO only. The IR keeps fp32 weights (the plugin converts them to bf16 when it
  compiles, so a bf16 file would only lose the fp32 check) and is compiled with the hint ``bf16``.
  OpenVINO does not read that hint from the IR: rt_info ``runtime_options`` is honoured for a few
  properties (``KV_CACHE_PRECISION``, ``DYNAMIC_QUANTIZATION_GROUP_SIZE``; measured with OpenVINO
  2026.4: a stored ``INFERENCE_PRECISION_HINT`` is ignored), so the hint is the user's to pass. ONNX
  Runtime's CPU execution provider has no bf16 convolutions: refused.
* ``int8``: post-training static quantization calibrated on the user's images
  (:mod:`timm_epsa.deploy.quantization`): QDQ for ONNX Runtime, NNCF for OpenVINO, whose other
  operations then run in the plugin's default precision.
"""
from typing import Dict

__all__ = ['BF16', 'FP32', 'INT8', 'PRECISIONS', 'openvino_config']

FP32, BF16, INT8 = 'fp32', 'bf16', 'int8'
PRECISIONS = (FP32, BF16, INT8)

_OPENVINO_HINTS = {FP32: 'f32', BF16: 'bf16'}  # int8: the plugin's default for the unquantized operations


def openvino_config(precision: str) -> Dict[str, str]:
    """The ``compile_model`` properties that make OpenVINO's CPU plugin run ``precision`` as exported
    and checked (for int8: nothing, the quantized operations run int8 whatever the hint)."""
    hint = _OPENVINO_HINTS.get(precision)
    return {'INFERENCE_PRECISION_HINT': hint} if hint else {}
