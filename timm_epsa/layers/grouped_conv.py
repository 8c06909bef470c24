"""Grouped convolutions with few outputs per group, computed the way the CPU runs fastest.

PSA's large-kernel branches are grouped convolutions with only one or two output channels per
group (EPSANet-50, stage 1: 9x9 with 16 groups of 4 inputs -> 1 output). oneDNN runs that shape
3-10x below the speed of its depthwise kernels, so on the CPU such a convolution is computed as
depthwise convolutions plus sums over each group's channels: the same result up to float
summation order, the same MACs, a different memory access pattern. The choice is a rule derived
from measurements (benchmarks/bench_epsanet.py measures its effect), not a per-call autotune, so
outputs do not depend on timing noise.

Training adds a second problem: oneDNN's weight gradient for large grouped and depthwise kernels
is 5-25x slower than their forward pass in NCHW. :func:`conv2d_with_fast_weight_grad` computes
that gradient as a convolution of the inputs with the output gradients instead (samples in the
channel dimension), which oneDNN runs 3.5-18x faster on EPSANet's NCHW shapes; for grouped
convolutions this route is taken in NCHW only (in channels_last it needs transposing copies, and a
channels_last training step got 3% slower with it).
"""
from typing import List

import torch
import torch.nn.functional as F

__all__ = ['grouped_conv2d', 'grouped_conv_as_depthwise', 'conv2d_with_fast_weight_grad', 'conv_weight_grad',
           'prefers_depthwise']


def prefers_depthwise(out_per_group: int, groups: int, compiled: bool = False) -> bool:
    """Whether a grouped convolution runs faster on the CPU as depthwise convs plus group sums.

    Measured on EPSANet's branch shapes (kernels 3-9, batch 1 and 8, both memory formats): with at
    most two outputs per group oneDNN's grouped kernels are 2-10x slower than the decomposition,
    with four they break even, with more they win. Under ``torch.compile`` (inductor) the group
    sums fuse into the ops around them, which moves the break-even to four outputs per group:
    compiled epsanet50 (one thread, against compiled resnet50) went from 0.97x to 1.07x at batch 1
    and from 0.89x to 0.96x at batch 8 with the decomposition up to four, and lost again with it up
    to eight (0.96x, 0.93x).

    Under bf16 autocast (oneDNN on AMX, Emerald Rapids Xeon, one thread, each model in its faster
    memory format, channels-last for both) the same limit of two is the fastest: epsanet50 against
    resnet50 at batch 1 / 8 with the decomposition never 0.61x / 0.66x, up to two 0.62x / 0.69x, up
    to four 0.55x / 0.55x, up to eight 0.41x / 0.35x; so the rule does not depend on the dtype.
    """
    return groups > 1 and out_per_group <= (4 if compiled else 2)


def grouped_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        as_depthwise: bool,
) -> torch.Tensor:
    """``F.conv2d`` without bias, computed the fastest measured way on the CPU (the only device the
    choices were measured on): as depthwise convolutions plus sums when ``as_depthwise``; otherwise,
    for a grouped convolution on an NCHW input, with the faster weight gradient."""
    if x.device.type == 'cpu':
        if as_depthwise:
            return grouped_conv_as_depthwise(x, weight, groups, stride, padding, dilation)
        if groups > 1 and x.is_contiguous():
            return conv2d_with_fast_weight_grad(x, weight, groups, stride, padding, dilation)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def grouped_conv_as_depthwise(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    """``F.conv2d(x, weight, groups=groups)`` as depthwise convolutions plus group sums.

    Output ``m`` of group ``g`` sums, over the group's inputs ``j``, input ``j`` convolved with the
    single kernel ``weight[g, m, j]``: one depthwise convolution per output-within-group, then a
    sum over each group's channels.
    """
    out_chs, in_per_group, kh, kw = weight.shape
    out_per_group = out_chs // groups
    in_chs = in_per_group * groups
    per_output = weight.view(groups, out_per_group, in_per_group, kh, kw)
    outputs: List[torch.Tensor] = []
    for m in range(out_per_group):
        y = conv2d_with_fast_weight_grad(
            x, per_output[:, m].reshape(in_chs, 1, kh, kw), in_chs, stride, padding, dilation)
        outputs.append(sum_channel_groups(y, groups))
    if out_per_group == 1:
        return outputs[0]
    return interleave_channels(outputs)


def conv2d_with_fast_weight_grad(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    """``F.conv2d`` without bias whose weight gradient, when one is needed, is :func:`conv_weight_grad`."""
    if torch.jit.is_scripting() or not torch.is_grad_enabled() or not weight.requires_grad:
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return _conv2d_with_fast_weight_grad(x, weight, groups, stride, padding, dilation)


@torch.jit.unused
def _conv2d_with_fast_weight_grad(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    return _Conv2dWithFastWeightGrad.apply(x, weight, groups, list(stride), list(padding), list(dilation))


class _Conv2dWithFastWeightGrad(torch.autograd.Function):
    """Convolution with the weight gradient of :func:`conv_weight_grad`.

    The backward is made of differentiable ops, so double backward works, and ``setup_context``
    keeps it usable under ``torch.func`` transforms.
    """

    @staticmethod
    def forward(x, weight, groups, stride, padding, dilation):
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, groups, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (groups, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        # Under autocast the forward ran in grad_out's dtype, whatever x and weight were saved in;
        # autograd casts the gradients back to the dtypes of x and weight.
        x, weight = (t.to(grad_out.dtype) for t in ctx.saved_tensors)
        groups, stride, padding, dilation = ctx.conv_args
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad(x, grad_out, weight.shape, groups, stride, padding, dilation)
        return grad_x, grad_w, None, None, None, None


def conv_weight_grad(
        x: torch.Tensor,
        grad_out: torch.Tensor,
        weight_shape: List[int],
        groups: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    """Gradient of a grouped convolution's weight, as a convolution of the inputs with the output
    gradients.

    With ``Ci`` inputs and ``Co`` outputs per group, ``dW[g*Co + o, i, p, q]`` sums over samples
    ``b`` and outputs ``(h, w)`` of ``x_pad[b, g*Ci + i, h*s + p*d, w*s + q*d] * grad_out[b, g*Co + o, h, w]``:
    a correlation of input planes with output-gradient planes, which is a convolution with the
    gradient as kernel (stride and dilation swap roles) and the samples as the summed channels.
    Each of the ``Ci`` inputs of a group becomes one image whose channels are the group's samples.
    A depthwise convolution (one input and one output per group) is instead correlated per (channel,
    sample) pair and summed over the samples afterwards: that keeps it a depthwise convolution, which
    oneDNN runs far faster than a grouped one with one output per group.
    """
    out_chs, in_per_group, kh, kw = weight_shape[0], weight_shape[1], weight_shape[2], weight_shape[3]
    B, C, H, W = x.shape
    if B == 0:  # an empty batch: the reshapes below would lose the channels, and every sum is empty
        return grad_out.new_zeros(weight_shape)
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    if in_per_group == 1 and out_chs == groups:
        pairs = x.transpose(0, 1).reshape(1, C * B, H, W)
        kernels = grad_out.transpose(0, 1).reshape(C * B, 1, Ho, Wo)
        corr = F.conv2d(pairs, kernels, None, dilation, padding, stride, C * B)
        return corr.view(C, B, corr.shape[2], corr.shape[3])[:, :, :kh, :kw].sum(1, keepdim=True)
    images = x.view(B, groups, in_per_group, H, W).permute(2, 1, 0, 3, 4).reshape(in_per_group, groups * B, H, W)
    corr = F.conv2d(images, grad_out.transpose(0, 1), None, dilation, padding, stride, groups)
    return corr[:, :, :kh, :kw].transpose(0, 1)


def sum_channel_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum each run of ``C / groups`` adjacent channels: (B, C, H, W) -> (B, groups, H, W).

    In NCHW the runs are whole planes and a plain sum is a few vector adds. In channels_last they
    are a few floats inside every pixel, which ``sum`` reduces slowly; there a 1x1 convolution with
    a 0/1 weight does the same sums as one matrix product.
    """
    if not _is_channels_last(x):
        return x.unflatten(1, [groups, x.shape[1] // groups]).sum(2)
    ones = torch.eye(groups, dtype=x.dtype, device=x.device).repeat_interleave(x.shape[1] // groups, dim=1)
    return F.conv2d(x, ones[:, :, None, None])


def interleave_channels(xs: List[torch.Tensor]) -> torch.Tensor:
    """(B, G, H, W) tensors x_0..x_{M-1} -> (B, G*M, H, W) with channel g*M + m from x_m, in the
    memory format of the inputs (a plain ``stack`` would turn channels_last into NCHW)."""
    if _is_channels_last(xs[0]):
        return torch.stack([x.permute(0, 2, 3, 1) for x in xs], dim=-1).flatten(3).permute(0, 3, 1, 2)
    return torch.stack(xs, dim=2).flatten(1, 2)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
