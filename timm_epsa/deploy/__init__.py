"""Deployment: EPSANet exported to ONNX Runtime and OpenVINO in fp32, bf16 or int8, each PSA branch in the
exact graph form measured fastest there."""
from .graph_export import BF16_TOLERANCE, MIN_AGREEMENT, ExportCheckError, ExportReport, TOLERANCE, export_model
from .forms import RUNTIMES, branch_form
from .precision import PRECISIONS
from .psa_graph import BranchForm, PSAGraph
from .rewrite import rewrite_for_runtime
from .runtimes import DEPLOY_EXTRA, ExportError, MissingRuntimeError, load_runner, require_runtime

__all__ = [
    'BF16_TOLERANCE', 'BranchForm', 'DEPLOY_EXTRA', 'ExportCheckError', 'ExportError', 'ExportReport', 'MIN_AGREEMENT',
    'MissingRuntimeError', 'PRECISIONS', 'PSAGraph', 'RUNTIMES', 'TOLERANCE', 'branch_form', 'export_model',
    'load_runner', 'require_runtime', 'rewrite_for_runtime',
]
