"""Naive EPSANet written from REFERENCE.md's definition, the oracle the package is tested against.

Deliberately literal and slow: one convolution call per branch, the shared SE called once per
branch, a softmax over the stacked gates, and the reversed concatenation done by prepending in a
loop. Module and parameter names follow the official code, so its state dict is an
official-format state dict.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class NaiveSEWeight(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))


class NaivePSA(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1,
                 kernel_sizes: Sequence[int] = (3, 5, 7, 9), groups: Sequence[int] = (1, 4, 8, 16),
                 reduction: int = 16):
        super().__init__()
        self.num_branches = len(kernel_sizes)
        split = out_chs // self.num_branches
        for i, (k, g) in enumerate(zip(kernel_sizes, groups)):
            conv = nn.Conv2d(in_chs, split, k, stride, dilation * (k - 1) // 2, dilation, groups=g, bias=False)
            setattr(self, f'conv_{i + 1}', conv)
        self.se = NaiveSEWeight(split, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [getattr(self, f'conv_{i + 1}')(x) for i in range(self.num_branches)]
        gates = torch.stack([self.se(f) for f in feats], dim=1)  # (B, S, C, 1, 1)
        weights = torch.softmax(gates, dim=1)
        out = None
        for i, f in enumerate(feats):
            weighted = f * weights[:, i]
            out = weighted if out is None else torch.cat((weighted, out), dim=1)
        return out


class NaiveEPSABlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, width: int, stride: int, psa_kwargs: dict):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = NaivePSA(width, width, stride=stride, **psa_kwargs)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class NaiveEPSANet(nn.Module):
    """``width_mult=2`` with groups 32 is this project's Large variant; 1 with (1, 4, 8, 16) is Small."""

    def __init__(self, layers: Sequence[int], width_mult: int = 1, num_classes: int = 1000,
                 psa_kwargs: dict = None):
        super().__init__()
        psa_kwargs = psa_kwargs or {}
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage_blocks = []
            for j in range(blocks):
                stride = 2 if stage > 0 and j == 0 else 1
                stage_blocks.append(NaiveEPSABlock(inplanes, planes, planes * width_mult, stride, psa_kwargs))
                inplanes = planes * 4
            setattr(self, f'layer{stage + 1}', nn.Sequential(*stage_blocks))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so eval-mode
    outputs exercise them (fresh BNs are an identity in eval mode and would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)
