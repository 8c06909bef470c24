"""``torch.onnx.export`` as the exports use it: dynamo, one file, quiet, one-line failures.

``torch.export`` specialises a traced size of 1, so a dynamic batch is traced at
:data:`TRACE_BATCH`.
"""
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from ..escaping import first_line
from .runtimes import ExportError

__all__ = ['BATCH_DIM', 'TRACE_BATCH', 'export_onnx']

TRACE_BATCH = 2
BATCH_DIM = {0: torch.export.Dim('batch', min=1)}  # a tensor's dynamic_shapes entry: its first dimension dynamic


def export_onnx(
        graph: nn.Module,
        path: Path,
        args: Tuple[object, ...],
        dynamic_shapes: Optional[Tuple[object, ...]] = None,
        input_names: Sequence[str] = ('input',),
        output_names: Sequence[str] = ('output',),
        rewrite: bool = True,
) -> None:
    """``torch.onnx.export`` of ``graph`` called on ``args`` to the file ``path``, optimized by
    onnxscript: constants folded (the runtimes' fast kernels need constant weights and biases, which
    the exporter computes), and with ``rewrite`` its pattern rewrites too, whose time grows faster
    than the graph (minutes for the tuner's bank of a hundred candidates)."""
    with _quiet():
        try:
            program = torch.onnx.export(
                graph, args, dynamo=True, optimize=rewrite, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dynamic_shapes, verbose=False)
            if not rewrite:
                import onnxscript.optimizer
                onnxscript.optimizer.fold_constants(program.model)
                onnxscript.optimizer.remove_unused_nodes(program.model)
            program.save(str(path), external_data=False)
        except Exception as e:  # torch.export's and onnxscript's errors are pages long
            raise ExportError(f'torch.onnx.export failed: {first_line(e)}') from e


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
