"""Grouped convolutions with few outputs per group, computed the way the CPU runs fastest.

PSA's large-kernel branches are grouped convolutions with only one or two output channels per
group (EPSANet-50, stage 1: 9x9 with 16 groups of 4 inputs -> 1 output). oneDNN runs that shape
3-10x below the speed of its depthwise kernels, so on the CPU such a convolution is computed as
depthwise convolutions plus sums over each group's channels: the same result up to float
summation order, the same MACs, a different memory access pattern. The choice is a rule derived
from measurements (benchmarks/bench_epsanet.py measures its effect), not a per-call autotune, so
outputs do not depend on timing noise.

Training adds a second problem: oneDNN's weight gradient for large depthwise kernels is 4-10x
slower than the forward pass. :func:`depthwise_conv2d` computes that gradient as a depthwise
convolution over (channel, sample) pairs instead, 2.5-4.5x faster.
"""
from typing import List

import torch
import torch.nn.functional as F

__all__ = ['grouped_conv2d', 'grouped_conv_as_depthwise', 'depthwise_conv2d', 'prefers_depthwise']


def prefers_depthwise(out_per_group: int, groups: int) -> bool:
    """Whether a grouped convolution runs faster on the CPU as depthwise convs plus group sums.

    Measured on EPSANet's branch shapes (kernels 3-9, batch 1 and 8, both memory formats): with at
    most two outputs per group oneDNN's grouped kernels are 2-10x slower than the decomposition,
    with four they break even, with more they win.
    """
    return groups > 1 and out_per_group <= 2


def grouped_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        as_depthwise: bool,
) -> torch.Tensor:
    """``F.conv2d`` without bias, as depthwise convolutions plus sums when ``as_depthwise`` and on
    the CPU (the only device the choice was measured on)."""
    if as_depthwise and x.device.type == 'cpu':
        return grouped_conv_as_depthwise(x, weight, groups, stride, padding, dilation)
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
        y = depthwise_conv2d(x, per_output[:, m].reshape(in_chs, 1, kh, kw), stride, padding, dilation)
        outputs.append(sum_channel_groups(y, groups))
    if out_per_group == 1:
        return outputs[0]
    return interleave_channels(outputs)


def depthwise_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    """Depthwise ``F.conv2d`` whose weight gradient, when one is needed, takes the fast route."""
    if torch.jit.is_scripting() or not torch.is_grad_enabled() or not weight.requires_grad:
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])
    return _depthwise_conv2d_with_fast_weight_grad(x, weight, stride, padding, dilation)


@torch.jit.unused
def _depthwise_conv2d_with_fast_weight_grad(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    return _DepthwiseConv2d.apply(x, weight, list(stride), list(padding), list(dilation))


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise convolution with the weight gradient of :func:`depthwise_weight_grad`.

    The backward is made of differentiable ops, so double backward works, and ``setup_context``
    keeps it usable under ``torch.func`` transforms.
    """

    @staticmethod
    def forward(x, weight, stride, padding, dilation):
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        # Under autocast the forward ran in grad_out's dtype, whatever x and weight were saved in;
        # autograd casts the gradients back to the dtypes of x and weight.
        x, weight = (t.to(grad_out.dtype) for t in ctx.saved_tensors)
        stride, padding, dilation = ctx.conv_args
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], x.shape[1],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_out, weight.shape[-2:], stride, padding, dilation)
        return grad_x, grad_w, None, None, None


def depthwise_weight_grad(
        x: torch.Tensor,
        grad_out: torch.Tensor,
        kernel_size: List[int],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
) -> torch.Tensor:
    """Gradient of a depthwise convolution's weight, (C, 1, kh, kw).

    ``dW[c, i, j] = sum over samples b and outputs (h, w) of x_pad[b, c, h*s + i*d, w*s + j*d] *
    grad_out[b, c, h, w]``: for each (channel, sample) pair a correlation of the input with the
    output gradient, which is itself a depthwise convolution with the gradient as kernel (stride
    and dilation swap roles), summed over the samples.
    """
    B, C, H, W = x.shape
    pairs = x.transpose(0, 1).reshape(1, C * B, H, W)
    kernels = grad_out.transpose(0, 1).reshape(C * B, 1, grad_out.shape[2], grad_out.shape[3])
    corr = F.conv2d(pairs, kernels, None, dilation, padding, stride, C * B)
    kh, kw = kernel_size[0], kernel_size[1]
    return corr.view(C, B, corr.shape[2], corr.shape[3])[:, :, :kh, :kw].sum(1, keepdim=True)


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
