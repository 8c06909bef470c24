"""Which exact form each PSA branch takes for each runtime and precision: the fixed rules, from
measurements on EPSANet's shapes.

Exports time the candidate forms on the exporting machine instead (:mod:`timm_epsa.deploy.tuning`)
and keep a rule's form unless another is clearly faster there; ``--no-tune`` takes the rules as
they are. ``benchmarks/bench_runtimes.py`` measures the result against ResNet (``--profile``: op by
op). Figures are epsanet50 against resnet50 in the same runtime and precision, 224 px, batch 1 / 8.

fp32, measured on an AMD EPYC (Zen 4, AVX-512, one thread):

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

On an Intel Xeon with AMX (Emerald Rapids, one thread) both fp32 rules stay the best of the forms
measured (ONNX Runtime 0.77x / 0.88x, every branch grouped 0.33x / 0.39x, block-diagonal 16 0.46x /
0.48x; OpenVINO rules and tuned forms level at 0.86-0.94x). bf16 and int8, measured there:

* OpenVINO bf16 (oneDNN on AMX): dense convolutions run so fast that waste pays: every grouped
  branch block-diagonal with at least 16 outputs per group (0.65x / 0.70x; fully dense stage-1
  branches included) against the fp32 rule's depthwise forms 0.40x / 0.41x, every branch grouped
  0.60x, block-diagonal 32 0.57x / 0.61x, depthwise everywhere 0.27x.
* OpenVINO int8 (NNCF): the same rule, 0.61x / 0.64x against int8 resnet50 (fp32 rule 0.41x /
  0.33x, block-diagonal 32 0.50x / 0.40x, every branch grouped 0.45x / 0.31x, dense 0.32x).
* ONNX Runtime int8 (QDQ): MLAS's int8 convolutions are fast for dense and depthwise kernels and
  slow for groups of few outputs: block-diagonal with 16 outputs per group, except the 9x9 branches
  with one or two outputs per group, which become depthwise convolutions with 1x1 sums (0.47x /
  0.44x; block-diagonal 16 everywhere 0.38x / 0.39x, the fp32 rule 0.40x / 0.29x).
"""
from torch import nn

from .precision import BF16, FP32, INT8
from .psa_graph import BranchForm

__all__ = ['ONNXRUNTIME', 'OPENVINO', 'RUNTIMES', 'branch_form']

ONNXRUNTIME = 'onnxruntime'
OPENVINO = 'openvino'
RUNTIMES = (ONNXRUNTIME, OPENVINO)

CHANNEL_BLOCK = 16  # channels per SIMD block of both runtimes' fast kernels on AVX-512
# OpenVINO CPU throughput in fp32 on EPSANet's shapes (AVX-512, one thread, in the network), GMAC/s:
# convolutions with at least 16 outputs per group, depthwise convolutions, 1x1 convolutions.
OPENVINO_GMACS = {'dense': 50.0, 'depthwise': 25.0, '1x1': 45.0}


def branch_form(runtime: str, conv: nn.Conv2d, precision: str = FP32) -> BranchForm:
    """The measured fastest exact form of the PSA branch ``conv`` for ``runtime`` in ``precision``."""
    groups = conv.groups
    if groups == 1:
        return BranchForm()
    out_per_group, in_per_group = conv.out_channels // groups, conv.in_channels // groups
    if runtime == ONNXRUNTIME and precision == FP32:
        if out_per_group % CHANNEL_BLOCK or in_per_group % CHANNEL_BLOCK:
            return BranchForm(depthwise=True)
        return BranchForm()
    if runtime == OPENVINO and precision == FP32:
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
    if runtime not in RUNTIMES or precision not in (BF16, INT8) or (runtime, precision) == (ONNXRUNTIME, BF16):
        raise ValueError(f'no {precision} rule for {runtime!r}')
    if out_per_group >= CHANNEL_BLOCK:
        return BranchForm()
    if runtime == ONNXRUNTIME and out_per_group <= 2 and min(conv.kernel_size) >= 9:
        return BranchForm(depthwise=True, sums_as_conv=True)
    return BranchForm(groups=fewer_groups(groups, out_per_group, CHANNEL_BLOCK))


def fewer_groups(groups: int, out_per_group: int, target: int) -> int:
    """The most groups, a divisor of ``groups``, that leave at least ``target`` outputs per group."""
    for new_groups in range(groups, 0, -1):
        if groups % new_groups == 0 and groups // new_groups * out_per_group >= target:
            return new_groups
    return 1
