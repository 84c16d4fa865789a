"""CIFAR ResNet (depth 6n+2) of He et al. as used by Cohen et al. (2019).

Module names and layout match the published checkpoints exactly (`conv1, bn1, relu, layer1..3,
avgpool, fc`; BasicBlocks with `conv1/bn1/conv2/bn2/downsample`, downsample = Sequential(1x1 conv,
BN) where the shape changes), so their state dicts load strictly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class GlobalAvgPool2d(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1); bit-identical to the reference AvgPool2d(8) on 8x8 maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=x.shape[-2:])


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity (or 1x1 conv + BN) shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)  # never writes into x: x may be a returned feature map


def make_stage(in_ch: int, out_ch: int, n_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_ch, out_ch, stride)]
    blocks += [BasicBlock(out_ch, out_ch) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """CIFAR ResNet-`depth` (20, 32, 44, 56, 110, ...; 8 for tiny tests) on normalised 32x32 input.

    Stage outputs: layer1 (16, H, W), layer2 (32, H/2, W/2), layer3 (64, H/4, W/4). The global
    average pool takes any size; on 32x32 inputs it is exactly the reference's AvgPool2d(8).
    """

    feature_channels = [16, 32, 64]

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, n >= 1 (8, 20, 110), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(16, 16, n, stride=1)
        self.layer2 = make_stage(16, 32, n, stride=2)
        self.layer3 = make_stage(32, 64, n, stride=2)
        self.avgpool = GlobalAvgPool2d()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # same distributions as the reference: N(0, 2/fan_out), BN 1/0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, 3, H, W) normalised -> logits (B, K), [layer1, layer2, layer3] outputs."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        f1 = self.layer1(x)  # (B, 16, H, W)
        f2 = self.layer2(f1)  # (B, 32, H/2, W/2)
        f3 = self.layer3(f2)  # (B, 64, H/4, W/4)
        logits = self.fc(torch.flatten(self.avgpool(f3), 1))  # (B, K)
        return logits, [f1, f2, f3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]
