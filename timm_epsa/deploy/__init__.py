"""Deployment: EPSANet exported to ONNX Runtime and OpenVINO in the exact graph form each runs fastest."""
from .graph_export import ExportCheckError, ExportReport, TOLERANCE, export_model
from .forms import RUNTIMES, branch_form
from .psa_graph import BranchForm, PSAGraph
from .rewrite import rewrite_for_runtime
from .runtimes import DEPLOY_EXTRA, ExportError, MissingRuntimeError, load_runner, require_runtime

__all__ = [
    'BranchForm', 'DEPLOY_EXTRA', 'ExportCheckError', 'ExportError', 'ExportReport', 'MissingRuntimeError', 'PSAGraph',
    'RUNTIMES', 'TOLERANCE', 'branch_form', 'export_model', 'load_runner', 'require_runtime', 'rewrite_for_runtime',
]
