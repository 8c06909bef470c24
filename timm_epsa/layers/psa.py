"""Pyramid Squeeze Attention (PSA)

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447 (ACCV 2022; v1 was titled "... Pyramid Split Attention ...")
Original code: https://github.com/murufeng/EPSANet (Apache-2.0)

The layer reproduces the official code number for number, which differs from the paper's prose in
ways that trained weights depend on:
    * every branch convolves *all* input channels (the paper speaks of splitting the input; the
      authors answered "follow the code", EPSANet issue #9),
    * one SE weight module is shared by all branches,
    * the branches are concatenated in reverse order (largest kernel first), which the BatchNorm
      after the layer has learned to expect.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import LayerType, create_act_layer, get_act_layer, register_notrace_module

from ..arguments import whole_number, whole_numbers
from ..escaping import first_line
from .grouped_conv import grouped_conv2d, prefers_depthwise

# Its device test is data-dependent control flow for torch.fx: keep the call a leaf of fx graphs
# made by tracers that do not know timm's registry (torch.fx.symbolic_trace, torchvision's feature
# extraction); fx patches the name in the globals of the module that calls it, so this is the place.
# timm's own feature extraction stops one level up, at PSABranchConv (registered below).
torch.fx.wrap('grouped_conv2d')


def _checked_input(x: torch.Tensor, in_chs: int) -> torch.Tensor:
    """``x`` if it is a batch of images with ``in_chs`` channels, else a one-line error saying what
    is wrong, before a convolution fails on it deep inside (or, for unbatched input, one of the
    group sums). A leaf of fx graphs (wrapped below): its tests are control flow fx cannot trace.

    Unbatched (C, H, W) input, which ``nn.Conv2d`` takes, is refused: under torch.compile with
    dynamic shapes inductor fails on its training graph (torch 2.14), and the BatchNorm that
    follows PSA in a network refuses it as well."""
    if x.dim() == 3:
        raise ValueError(
            f'PyramidSqueezeAttention: the input of shape {list(x.shape)} has no batch dimension; pass '
            f'(batch, {in_chs}, height, width), e.g. x.unsqueeze(0) for a single image.')
    if x.dim() != 4:
        raise ValueError(
            f'PyramidSqueezeAttention: the input of shape {list(x.shape)} is not (batch, {in_chs}, height, width); '
            f'pass a batch of images.')
    if x.shape[1] != in_chs:
        raise ValueError(
            f'PyramidSqueezeAttention: the input of shape {list(x.shape)} has {x.shape[1]} channels, the layer was '
            f'built for in_chs={in_chs}; pass {in_chs}-channel images or build the layer with in_chs={x.shape[1]}.')
    return x


torch.fx.wrap('_checked_input')


def _create_act(act_layer: LayerType) -> nn.Module:
    """An activation module the way timm layers make one (``create_act_layer``, in place where it can
    be), ``nn.Identity`` for None, with a one-line error for a name, an instance or a callable it
    cannot use (a function such as ``torch.relu``, a layer such as ``nn.Linear`` that needs arguments)."""
    if isinstance(act_layer, nn.Module):
        raise TypeError(
            f"act_layer={act_layer!r} is a module instance; pass its class or name "
            f"(e.g. nn.GELU or 'gelu', not nn.GELU()) so that each layer makes its own.")
    try:
        act_layer = get_act_layer(act_layer)
    except KeyError:
        raise ValueError(
            f'act_layer={act_layer!r} is not an activation timm knows; pass a name timm.layers.get_act_layer '
            f"takes (e.g. 'relu', 'silu', 'gelu') or an nn.Module class.") from None
    try:
        act = create_act_layer(act_layer, inplace=True)
    except TypeError as e:  # not callable, or not without arguments
        act = e
    if act is None:
        return nn.Identity()
    if not isinstance(act, nn.Module):
        why = f' ({first_line(act)})' if isinstance(act, TypeError) else f', it returns {type(act).__name__}'
        raise TypeError(
            f"act_layer={act_layer!r} does not build an activation module when called without arguments{why}; "
            f"pass a name timm knows (e.g. 'relu', 'silu', 'gelu') or an nn.Module class such as nn.ReLU.")
    return act


class SEWeight(nn.Module):
    """Squeeze-and-excitation gate that returns the weights instead of rescaling its input.

    PSA needs the raw per-branch gates so it can normalise them across branches with a softmax.
    It takes already pooled descriptors, (N, C) or (N, C, 1, 1) as the official module's pooling
    leaves them, and returns gates of the same shape: PSA pools every branch in one go and sends
    all branches through this one shared module as a single batch. The layers are 1x1
    convolutions, as in the official code, so their weights load unchanged; they run as the matrix
    products they are, which costs a fraction of a convolution call.

    Args:
        channels: Channels of the pooled descriptors (and of the gates).
        reduction: Hidden width is ``channels // reduction``; at least 1 is required.
        act_layer: Activation between the two layers: a name timm knows (``'relu'``, ``'silu'``,
            ``'gelu'``, ...), an ``nn.Module`` class, or None for none.
        device: Device of the parameters.
        dtype: Data type of the parameters.
    """

    def __init__(
            self,
            channels: int,
            reduction: int = 16,
            act_layer: LayerType = nn.ReLU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        channels = whole_number(channels, 'channels', 'SEWeight')
        reduction = whole_number(reduction, 'reduction', 'SEWeight')
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(
                f'SEWeight: channels={channels} // reduction={reduction} leaves no hidden channel; '
                f'use a reduction from 1 to {channels}.')
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True, **dd)
        self.act = _create_act(act_layer)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True, **dd)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = F.linear(pooled.flatten(1), self.fc1.weight.flatten(1), self.fc1.bias)
        x = F.linear(self.act(x), self.fc2.weight.flatten(1), self.fc2.bias)
        return x.sigmoid().view(pooled.shape)


@register_notrace_module  # a leaf in timm's fx feature extraction, as timm's own Conv2d variants
class PSABranchConv(nn.Conv2d):
    """One PSA branch: a grouped convolution computed by the faster of two equivalent algorithms.

    Same parameters and state-dict entries as ``nn.Conv2d``; only the computation differs (see
    :mod:`timm_epsa.layers.grouped_conv`), and under ``torch.compile`` the choice follows inductor's
    measurements rather than eager oneDNN's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        out_per_group = self.out_channels // self.groups
        self.as_depthwise = prefers_depthwise(out_per_group, self.groups)
        self.as_depthwise_compiled = prefers_depthwise(out_per_group, self.groups, compiled=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        as_depthwise = self.as_depthwise
        if not torch.jit.is_scripting() and torch.compiler.is_compiling():
            as_depthwise = self.as_depthwise_compiled
        return grouped_conv2d(x, self.weight, self.groups, self.stride, self.padding, self.dilation, as_depthwise)


def _psa_args(
        in_chs: int,
        out_chs: int,
        stride: int,
        dilation: int,
        kernel_sizes: Sequence[int],
        groups: Sequence[int],
) -> Tuple[int, int, int, int, Tuple[int, ...], Tuple[int, ...]]:
    """The arguments as plain ints, or a one-line error for one the convolutions would fail on later
    (or, as 0 channels, build a layer that computes nothing), with the rule that is broken."""
    where = 'PyramidSqueezeAttention'
    in_chs = whole_number(in_chs, 'in_chs', where)
    out_chs = whole_number(out_chs, 'out_chs', where)
    stride = whole_number(stride, 'stride', where)  # one int: every branch strides both sides alike
    dilation = whole_number(dilation, 'dilation', where)
    kernel_sizes = whole_numbers(kernel_sizes, 'kernel_sizes', where, each='one odd kernel size per branch')
    groups = whole_numbers(groups, 'groups', where, each='one group count per branch')
    if len(kernel_sizes) != len(groups):
        raise ValueError(
            f'{where}: kernel_sizes={kernel_sizes} and groups={groups} must be of the same length (one kernel '
            f'size and one group count per branch).')
    num_branches = len(kernel_sizes)
    if out_chs % num_branches:
        raise ValueError(
            f'{where}: out_chs={out_chs} is not divisible by the {num_branches} branches; use a multiple of '
            f'{num_branches}.')
    branch_chs = out_chs // num_branches
    for k, g in zip(kernel_sizes, groups):
        if k % 2 == 0:
            raise ValueError(
                f'{where}: kernel size {k} in kernel_sizes={kernel_sizes} must be odd so that padding keeps the '
                f'output centred.')
        if branch_chs % g or in_chs % g:
            raise ValueError(
                f'{where}: groups={g} (kernel {k}) must divide both in_chs={in_chs} and the branch width '
                f'out_chs / {num_branches} = {branch_chs}; choose a group count that divides both.')
    return in_chs, out_chs, stride, dilation, kernel_sizes, groups


class PyramidSqueezeAttention(nn.Module):
    """Multi-scale grouped convolutions re-weighted by a softmax over per-branch SE gates.

    Branch ``i`` is a ``kernel_sizes[i]`` convolution with ``groups[i]`` groups over all input channels,
    producing ``out_chs / len(kernel_sizes)`` channels. A single :class:`SEWeight` module gates every
    branch; the gates are normalised with a softmax across branches (per channel), each branch is
    scaled by its weight, and the branches are concatenated last-to-first as the official code does.

    Parameter names (``conv_1`` ... ``conv_S``, ``se.fc1``, ``se.fc2``) match the official
    ``PSAModule`` so its state dicts load strictly.

    A drop-in for a 3x3 convolution in any network (``in_chs`` -> ``out_chs`` at ``stride``) on
    batched input, (N, ``in_chs``, H, W); it traces with torch.fx and timm's feature extraction.
    Arguments and input are checked, with one-line errors, before a convolution would fail.

    Args:
        in_chs: Input channels; every branch convolves all of them.
        out_chs: Output channels, split evenly between the branches.
        stride: Stride of every branch, one int (both sides alike).
        dilation: Dilation of every branch (padding keeps the output centred).
        kernel_sizes: Kernel size of each branch, odd; one branch per entry.
        groups: Group count of each branch; each must divide ``in_chs`` and ``out_chs / len(kernel_sizes)``.
        reduction: Reduction of the shared SE gate (hidden width ``out_chs / len(kernel_sizes) // reduction``).
        act_layer: Activation inside the SE gate: a name timm knows (``'relu'``, ``'silu'``,
            ``'gelu'``, ...), an ``nn.Module`` class, or None for none.
        device: Device of the parameters.
        dtype: Data type of the parameters.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            dilation: int = 1,
            kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            groups: Sequence[int] = (1, 4, 8, 16),
            reduction: int = 16,
            act_layer: LayerType = nn.ReLU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        in_chs, out_chs, stride, dilation, kernel_sizes, groups = _psa_args(
            in_chs, out_chs, stride, dilation, kernel_sizes, groups)
        self.in_chs = in_chs
        self.num_branches = len(kernel_sizes)
        self.branch_chs = out_chs // self.num_branches
        for i, (k, g) in enumerate(zip(kernel_sizes, groups)):
            conv = PSABranchConv(
                in_chs,
                self.branch_chs,
                kernel_size=k,
                stride=stride,
                padding=dilation * (k - 1) // 2,
                dilation=dilation,
                groups=g,
                bias=False,
                **dd,
            )
            self.add_module(f'conv_{i + 1}', conv)
        self.se = SEWeight(self.branch_chs, reduction=reduction, act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _checked_input(x, self.in_chs)
        branches: List[torch.Tensor] = []
        for name, module in self.named_children():
            if name.startswith('conv_'):
                branches.insert(0, module(x))  # last branch first: the official concatenation order
        feats = torch.cat(branches, dim=1)
        B, _, H, W = feats.shape
        feats = feats.view(B, self.num_branches, self.branch_chs, H, W)
        pooled = feats.mean((3, 4)).reshape(B * self.num_branches, self.branch_chs)
        attn = self.se(pooled).view(B, self.num_branches, self.branch_chs, 1, 1).softmax(dim=1)
        return (feats * attn).reshape(B, self.num_branches * self.branch_chs, H, W)
