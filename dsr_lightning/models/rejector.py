"""The rejector: K binary heads h_1..h_K on one ResNet-34-like backbone fed with the denoised image
and, after each of its first stages, the classifier's matching (detached) feature map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import make_stage


class FeatureProjection(nn.Module):
    """A classifier feature map resized to the stage's spatial size, then 1x1 conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, feat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(feat.shape[-2:]) != tuple(size):  # average down (replicate up) to the stage grid
            feat = F.adaptive_avg_pool2d(feat, size)
        return self.relu(self.bn(self.conv(feat)))


class Rejector(nn.Module):
    """Head logits (B, K) for a denoised batch z (B, C, H, W) and the classifier's stage features.

    Backbone: CIFAR stem (conv3x3 + BN + ReLU, `width` channels), stages of BasicBlocks
    (`blocks`, widths width * (1, 2, 4, 8), strides 1, 2, 2, 2). After stage i, for each i <
    len(feature_channels), the classifier's stage-i feature (detached: the classifier never gets
    gradient) is projected to proj_channels[i] channels and concatenated; the next stage (or the
    pool) takes the concatenation. Then global average pool and len(fc_hidden) + 1 linear layers.
    proj_channels: None keeps each feature's channel count; an int or a sequence sets it.
    Logit > 0 means "reject" (sigmoid > 1/2).
    """

    def __init__(self, num_classes: int, feature_channels: Sequence[int], in_channels: int = 3,
                 width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3),
                 fc_hidden: Sequence[int] = (512, 256),
                 proj_channels: int | Sequence[int] | None = None):
        super().__init__()
        feature_channels = [int(c) for c in feature_channels]
        if len(feature_channels) > len(blocks):
            raise ValueError(f"{len(feature_channels)} feature maps but only {len(blocks)} stages")
        if proj_channels is None:
            proj_channels = feature_channels
        elif isinstance(proj_channels, int):
            proj_channels = [proj_channels] * len(feature_channels)
        proj_channels = [int(c) for c in proj_channels]
        if len(proj_channels) != len(feature_channels):
            raise ValueError("proj_channels must have one entry per feature map")
        self.num_classes, self.feature_channels = num_classes, feature_channels

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages, self.projections, self.stage_in_channels = nn.ModuleList(), nn.ModuleList(), []
        ch = width
        for i, n_blocks in enumerate(blocks):
            out_ch = width * 2**i
            self.stage_in_channels.append(ch)
            self.stages.append(make_stage(ch, out_ch, n_blocks, stride=1 if i == 0 else 2))
            ch = out_ch
            if i < len(feature_channels):
                self.projections.append(FeatureProjection(feature_channels[i], proj_channels[i]))
                ch += proj_channels[i]
        self.out_channels = ch  # channels entering the global pool

        dims = [ch, *fc_hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.fc = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, z: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """z: (B, C, H, W) denoised images in [0,1]; feats: classifier stage maps -> (B, K)."""
        if len(feats) < len(self.projections):
            raise ValueError(f"need {len(self.projections)} feature maps, got {len(feats)}")
        x = self.stem(z)  # (B, width, H, W)
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, width * 2^i, H_i, W_i)
            if i < len(self.projections):
                f = self.projections[i](feats[i].detach(), x.shape[-2:])  # (B, p_i, H_i, W_i)
                x = torch.cat([x, f.to(x.dtype)], 1)
        x = x.mean((2, 3))  # (B, out_channels)
        return self.fc(x)  # (B, K)
