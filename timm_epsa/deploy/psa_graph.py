"""PSA rewritten as the graph an inference runtime runs fastest: the same function, other operations.

Every form here is exact algebra on the eager layer's weights; results differ from the eager layer
by float summation order only:

* a branch's grouped convolution as a convolution with fewer groups and a block-diagonal weight
  (more MACs, for runtimes whose kernels for few outputs per group are slower than the waste),
* or as one depthwise convolution per output-within-group plus sums over each group's channels
  (the same MACs); the sums reduce a reshaped tensor or are 1x1 convolutions with 0/1 weights
  (more MACs, but no change of memory layout in runtimes that block channels), and their results
  come out ordered output-within-group first,
* output channels left in the order a form produces them when the layer's consumer can absorb the
  order (:mod:`timm_epsa.deploy.rewrite` permutes the block's BatchNorm and ``conv3`` instead),
* the BatchNorm that follows the layer folded in: its scale multiplies the attention weights, a
  (N, C) tensor, and its shift is added to the output. Folding the scale into the branch weights
  instead would need a per-branch compensation in the SE's first layer and saves nothing more: the
  attention still has to multiply the full output.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.psa import PyramidSqueezeAttention

__all__ = ['BranchForm', 'BranchGraph', 'PSAGraph', 'block_diagonal_weight']


@dataclass(frozen=True)
class BranchForm:
    """How one PSA branch is expressed: ``depthwise`` convolutions plus group sums (a 1x1
    convolution when ``sums_as_conv``), or one convolution with ``groups`` groups (``None``: the
    branch's own; fewer: block-diagonal weight)."""
    depthwise: bool = False
    sums_as_conv: bool = False
    groups: Optional[int] = None


def block_diagonal_weight(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """The weight of ``F.conv2d(x, weight, groups=groups)`` for ``new_groups`` groups (a divisor of
    ``groups``): each new group holds ``groups / new_groups`` old ones on its diagonal, zeros elsewhere."""
    if groups % new_groups:
        raise ValueError(f'new_groups={new_groups} must divide groups={groups}')
    out_chs, in_per_group = weight.shape[:2]
    merged = groups // new_groups
    out_per_group = out_chs // groups
    dense = weight.new_zeros(out_chs, in_per_group * merged, *weight.shape[2:])
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        col = (group % merged) * in_per_group
        dense[rows, col:col + in_per_group] = weight[rows]
    return dense


class BranchGraph(nn.Module):
    """One PSA branch in a :class:`BranchForm`. ``out_order[j]`` is the branch channel that output
    channel ``j`` holds: the identity unless the depthwise form may leave its own order."""

    def __init__(self, conv: nn.Conv2d, form: BranchForm, keep_order: bool = True):
        super().__init__()
        weight = conv.weight.detach()
        self.groups = conv.groups
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        out_chs, self.in_per_group = weight.shape[:2]
        self.in_chs = self.in_per_group * self.groups
        self.out_per_group = out_chs // self.groups
        self.depthwise, self.sums_as_conv = form.depthwise, form.depthwise and form.sums_as_conv
        self.keep_order = keep_order or not self.depthwise or self.out_per_group == 1
        if self.depthwise:
            # weight[g*M + m, i] for output m of group g: one depthwise kernel per (m, input channel)
            per_output = weight.view(self.groups, self.out_per_group, self.in_per_group, *weight.shape[2:])
            for m in range(self.out_per_group):
                self.register_buffer(f'weight_{m}', per_output[:, m].reshape(self.in_chs, 1, *weight.shape[2:]).clone())
            self.conv_groups = self.in_chs
            if self.sums_as_conv:
                self.register_buffer('sum_weight', self._sum_weight(weight))
        else:
            self.conv_groups = form.groups or self.groups
            self.register_buffer('weight', block_diagonal_weight(weight, self.groups, self.conv_groups).clone())
        if self.keep_order:
            self.out_order = list(range(out_chs))
        else:
            self.out_order = [g * self.out_per_group + m for m in range(self.out_per_group) for g in range(self.groups)]

    def _sum_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """1x1 weight summing each group's depthwise outputs. Where the order may change, one such
        convolution per output-within-group takes its depthwise output to the groups' outputs (MACs:
        inputs x branch outputs); otherwise one takes all depthwise outputs, [m][input channel], to
        the branch outputs in order, [g][m] (MACs: that times the outputs per group)."""
        per_m = torch.eye(self.groups, dtype=weight.dtype).repeat_interleave(self.in_per_group, 1)
        if not self.keep_order or self.out_per_group == 1:
            return per_m[:, :, None, None].clone()
        rows_m_major = torch.block_diag(*[per_m] * self.out_per_group)
        in_order = rows_m_major.view(self.out_per_group, self.groups, -1).transpose(0, 1).reshape(-1, rows_m_major.shape[1])
        return in_order[:, :, None, None].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.depthwise:
            return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.conv_groups)
        outputs: List[torch.Tensor] = []
        for m in range(self.out_per_group):
            outputs.append(F.conv2d(
                x, getattr(self, f'weight_{m}'), None, self.stride, self.padding, self.dilation, self.in_chs))
        if self.sums_as_conv and self.keep_order and len(outputs) > 1:
            return F.conv2d(torch.cat(outputs, 1), self.sum_weight)
        if self.sums_as_conv:
            outputs = [F.conv2d(y, self.sum_weight) for y in outputs]
        else:
            outputs = [y.unflatten(1, (self.groups, self.in_per_group)).sum(2) for y in outputs]
        if len(outputs) == 1:
            return outputs[0]
        if self.keep_order:  # interleave: channel g*M + m from output m
            return torch.stack(outputs, 2).flatten(1, 2)
        return torch.cat(outputs, 1)


class PSAGraph(nn.Module):
    """:class:`PyramidSqueezeAttention` (followed by ``norm``, if given, folded in) computed from
    branches in the given forms.

    ``out_order[j]`` is the channel of the eager layer's output that output channel ``j`` holds;
    it is the identity when ``keep_order``. The SE, softmax and BatchNorm scale act on (N, S, C)
    tensors in the eager layer's order; only the pooled features and the final weights (N x C
    numbers) are gathered into and out of the branches' order.
    """

    def __init__(
            self,
            psa: PyramidSqueezeAttention,
            forms: Sequence[BranchForm],
            norm: Optional[nn.BatchNorm2d] = None,
            keep_order: bool = True,
    ):
        super().__init__()
        convs = [module for name, module in psa.named_children() if name.startswith('conv_')]
        if len(forms) != len(convs):
            raise ValueError(f'PSAGraph: {len(forms)} forms for {len(convs)} branches')
        self.num_branches, self.branch_chs = len(convs), psa.branch_chs
        # position p of the output holds branch S-1-p: the official, reversed concatenation order
        self.branches = nn.ModuleList(
            BranchGraph(conv, form, keep_order) for conv, form in reversed(list(zip(convs, forms))))
        self.out_order = [
            pos * self.branch_chs + channel for pos, branch in enumerate(self.branches) for channel in branch.out_order]
        self.reordered = self.out_order != sorted(self.out_order)
        if self.reordered:
            order = torch.tensor(self.out_order)
            self.register_buffer('to_output', order)
            self.register_buffer('to_eager', torch.argsort(order))
        self.fc1, self.act, self.fc2 = _linear(psa.se.fc1), psa.se.act, _linear(psa.se.fc2)
        self.folded = norm is not None
        if self.folded:
            scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias.detach() - norm.running_mean * scale
            self.register_buffer('scale', scale.view(self.num_branches, self.branch_chs).clone())
            self.register_buffer('shift', shift[self.out_order].view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([branch(x) for branch in self.branches], 1)
        pooled = feats.mean((2, 3))
        if self.reordered:
            pooled = pooled.index_select(1, self.to_eager)
        gates = self.fc2(self.act(self.fc1(pooled.reshape(-1, self.branch_chs))))
        attn = gates.sigmoid().view(-1, self.num_branches, self.branch_chs).softmax(1)
        if self.folded:
            attn = attn * self.scale
        attn = attn.flatten(1)
        if self.reordered:
            attn = attn.index_select(1, self.to_output)
        out = feats * attn[:, :, None, None]
        if self.folded:
            out = out + self.shift
        return out


def _linear(conv: nn.Conv2d) -> nn.Linear:
    """The SE's 1x1 convolution on pooled (N, C) descriptors, as the matrix product it is."""
    linear = nn.Linear(conv.in_channels, conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    linear.weight.data.copy_(conv.weight.detach().flatten(1))
    linear.bias.data.copy_(conv.bias.detach())
    return linear
