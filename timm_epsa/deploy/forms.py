"""Which exact form each PSA branch takes for each runtime: rules from measurements on EPSANet's shapes.

``benchmarks/bench_runtimes.py`` measures the result against ResNet (``--profile``: op by op). The
figures below are epsanet50 against resnet50 in the same runtime, one thread, fp32, 224 px.

* ONNX Runtime (CPU execution provider, MLAS): its fast convolution kernels work on channel
  blocks (NCHWc, 16 channels with AVX-512, 8 with AVX2) and take a grouped convolution only when
  both its inputs and its outputs per group are multiples of the block; any other grouped
  convolution runs as an im2col + GEMM per group, 3-12x slower than depthwise convolutions of the
  same MACs, which MLAS does block. So a branch stays a grouped convolution only when its groups
  have multiples of 16 inputs and outputs; otherwise it becomes depthwise convolutions whose group
  sums reduce a reshaped tensor (0.58x as exported by torch, 0.92x so). Sums as 1x1 convolutions
  (0.91x) and block-diagonal weights of 16 outputs per group for the 8-output groups (0.86-0.89x)
  measured slower.
* OpenVINO (CPU plugin, oneDNN): grouped convolutions with fewer than 16 outputs per group run
  2-8x below the speed of those with 16. Such a branch becomes either a block-diagonal weight with
  16 outputs per group (2-16x the MACs at full speed) or depthwise convolutions (the same MACs at
  half speed) plus group sums as one 1x1 convolution per output-within-group (reducing a reshaped
  tensor would need a change of layout from oneDNN's channel blocks and back: 0.82x), whichever
  the measured throughputs make cheaper: the depthwise form for few outputs per group and large
  kernels (0.97x at batch 1, 0.95x at batch 8; as exported by torch 0.80x).
"""
from torch import nn

from .psa_graph import BranchForm

__all__ = ['ONNXRUNTIME', 'OPENVINO', 'RUNTIMES', 'branch_form']

ONNXRUNTIME = 'onnxruntime'
OPENVINO = 'openvino'
RUNTIMES = (ONNXRUNTIME, OPENVINO)

CHANNEL_BLOCK = 16  # channels per SIMD block of both runtimes' fast kernels on AVX-512
# OpenVINO CPU throughput in fp32 on EPSANet's shapes (AVX-512, one thread, in the network), GMAC/s:
# convolutions with at least 16 outputs per group, depthwise convolutions, 1x1 convolutions.
OPENVINO_GMACS = {'dense': 50.0, 'depthwise': 25.0, '1x1': 45.0}


def branch_form(runtime: str, conv: nn.Conv2d) -> BranchForm:
    """The measured fastest exact form of the PSA branch ``conv`` for ``runtime``."""
    groups = conv.groups
    if groups == 1:
        return BranchForm()
    out_per_group, in_per_group = conv.out_channels // groups, conv.in_channels // groups
    if runtime == ONNXRUNTIME:
        if out_per_group % CHANNEL_BLOCK or in_per_group % CHANNEL_BLOCK:
            return BranchForm(depthwise=True)
        return BranchForm()
    if runtime == OPENVINO:
        if out_per_group >= CHANNEL_BLOCK:
            return BranchForm()
        new_groups = fewer_groups(groups, out_per_group, CHANNEL_BLOCK)
        kernel = conv.kernel_size[0] * conv.kernel_size[1]
        branch_macs = kernel * in_per_group * conv.out_channels  # per output pixel
        block_diagonal = branch_macs * (groups // new_groups) / OPENVINO_GMACS['dense']
        sums_macs = conv.in_channels * conv.out_channels  # one 1x1 conv per output-within-group
        depthwise = branch_macs / OPENVINO_GMACS['depthwise'] + sums_macs / OPENVINO_GMACS['1x1']
        if depthwise < block_diagonal:
            return BranchForm(depthwise=True, sums_as_conv=True)
        return BranchForm(groups=new_groups)
    raise ValueError(f'unknown runtime {runtime!r}; choose from {", ".join(RUNTIMES)}')


def fewer_groups(groups: int, out_per_group: int, target: int) -> int:
    """The most groups, a divisor of ``groups``, that leave at least ``target`` outputs per group."""
    for new_groups in range(groups, 0, -1):
        if groups % new_groups == 0 and groups // new_groups * out_per_group >= target:
            return new_groups
    return 1
