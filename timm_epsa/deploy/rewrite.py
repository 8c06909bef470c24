"""Rewrite a model's PSA layers into the graph form chosen for a runtime, on a copy in eval mode."""
import copy
from typing import Callable

import torch
from torch import nn

from ..layers.psa import PyramidSqueezeAttention
from ..models.epsanet import EPSABottleneck
from .forms import branch_form
from .precision import FP32
from .psa_graph import BranchForm, PSAGraph

__all__ = ['rewrite_for_runtime']


def rewrite_for_runtime(model: nn.Module, runtime: str, precision: str = FP32) -> nn.Module:
    """A copy of ``model``, in eval mode, computing the same function with every PSA layer in the
    exact form :func:`timm_epsa.deploy.forms.branch_form` picks for ``runtime`` and ``precision`` (the
    fixed rules; exports time the forms on the machine instead, :mod:`timm_epsa.deploy.tuning`);
    ``model`` is untouched.

    In an EPSA block the BatchNorm after PSA is folded into the layer and the layer's outputs may
    come in the order its branches produce them, the block's ``conv3`` reading them in that order;
    a PSA layer anywhere else keeps its output exactly.
    """
    return rewrite_psa(model, lambda name, conv: branch_form(runtime, conv, precision))


FormOf = Callable[[str, nn.Conv2d], BranchForm]  # (a branch's name in the model, its convolution) -> its form


def rewrite_psa(model: nn.Module, form_of: FormOf) -> nn.Module:
    """:func:`rewrite_for_runtime` with the form of each branch given by ``form_of(name, conv)``,
    ``name`` as in ``model.named_modules()``."""
    model = copy.deepcopy(model).eval()
    names = {id(module): name for name, module in model.named_modules()}
    named_form = lambda conv: form_of(names[id(conv)], conv)  # noqa: E731
    if isinstance(model, PyramidSqueezeAttention):
        return _graph(model, named_form)
    for block in model.modules():
        if isinstance(block, EPSABottleneck) and isinstance(block.conv2, PyramidSqueezeAttention):
            _rewrite_block(block, named_form)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, PyramidSqueezeAttention):
                setattr(parent, name, _graph(child, named_form))
    return model


def _graph(psa: PyramidSqueezeAttention, form_of: Callable[[nn.Conv2d], BranchForm], **kwargs) -> PSAGraph:
    forms = [form_of(conv) for name, conv in psa.named_children() if name.startswith('conv_')]
    return PSAGraph(psa, forms, **kwargs)


def _rewrite_block(block: EPSABottleneck, form_of: Callable[[nn.Conv2d], BranchForm]) -> None:
    # conv3 can read PSA's outputs in any order when nothing channel-mixing or channel-specific
    # sits between them except bn2 (permuted or folded along); an anti-aliasing layer might be.
    reorder = isinstance(block.aa, nn.Identity) and isinstance(block.bn2, nn.BatchNorm2d)
    fold = reorder and _foldable(block.bn2)
    graph = _graph(block.conv2, form_of, norm=block.bn2 if fold else None, keep_order=not reorder)
    if graph.reordered:
        order = torch.tensor(graph.out_order)
        block.conv3.weight.data = block.conv3.weight.data[:, order].contiguous()
        if not fold:
            for name in ('weight', 'bias', 'running_mean', 'running_var'):
                tensor = getattr(block.bn2, name)
                if tensor is not None:
                    tensor.data = tensor.data[order].contiguous()
    block.conv2 = graph
    if fold:
        block.bn2 = nn.Identity()


def _foldable(norm: nn.Module) -> bool:
    """A plain BatchNorm2d with running statistics and an affine transform (timm's BatchNormAct2d and
    the like also apply an activation: kept as they are)."""
    return (type(norm) is nn.BatchNorm2d and norm.affine and norm.track_running_stats
            and norm.running_mean is not None)
