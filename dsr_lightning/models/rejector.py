"""The rejectors: K binary heads h_1..h_K (logit > threshold means "reject").

`Rejector` (the paper's): one ResNet-34-like backbone fed with the denoised image and, after each of
its first stages, the classifier's matching (detached) feature map. `FeatureRejector`: an MLP on
the classifier's globally pooled feature maps alone (no backbone of its own)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsr_lightning.errors import ConfigError

from .resnet import make_stage

STEMS = ("cifar", "strided", "auto")  # Rejector(stem=...): the config schema's choice list
AUTO_STRIDED_ABOVE = 64  # stem="auto": the strided stem for images larger than this (pixels)


def resolve_stem(stem: str, image_size: int | None) -> str:
    """The stem a Rejector builds for its `stem` choice: "cifar" or "strided" ("auto": strided
    above 64 px, cifar otherwise or when the image size is unknown)."""
    if stem not in STEMS:
        raise ConfigError(f"rejector stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if stem == "auto":
        return "strided" if image_size is not None and image_size > AUTO_STRIDED_ABOVE else "cifar"
    return stem


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

    Backbone: a stem (`width` channels), stages of BasicBlocks
    (`blocks`, widths width * (1, 2, 4, 8), strides 1, 2, 2, 2). After stage i, for each i <
    len(feature_channels), the classifier's stage-i feature (detached: the classifier never gets
    gradient) is projected to proj_channels[i] channels and concatenated; the next stage (or the
    pool) takes the concatenation. Then global average pool and len(fc_hidden) + 1 linear layers.
    proj_channels: None keeps each feature's channel count; "auto" caps it at the stage's own
    width (Cohen's CIFAR ResNets: unchanged; an ImageNet ResNet's 256..2048 channels: reduced, so
    the fusion costs no more than the stage); an int or a sequence sets it.
    Logit > 0 means "reject" (sigmoid > 1/2).

    stem: "cifar" = conv3x3 + BN + ReLU at full resolution (CIFAR ResNets'; the published state-dict
    layout); "strided" = torchvision's ResNet stem, conv7x7 stride 2 + BN + ReLU + maxpool 3x3
    stride 2, so the stages run at 1/4 resolution (at 224 px their grids, 56/28/14/7, are those of
    an ImageNet ResNet's stages, the maps fused in); "auto" = strided when image_size > 64, else
    cifar (image_size None: cifar). Both stems have the same state-dict keys (`stem.0`, `stem.1`);
    the conv's kernel differs. `stem_kind` holds the resolved choice.
    """

    def __init__(self, num_classes: int, feature_channels: Sequence[int], in_channels: int = 3,
                 width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3),
                 fc_hidden: Sequence[int] = (512, 256),
                 proj_channels: int | Sequence[int] | str | None = None, stem: str = "cifar",
                 image_size: int | None = None):
        super().__init__()
        self.stem_kind = resolve_stem(stem, image_size)
        feature_channels = [int(c) for c in feature_channels]
        if len(feature_channels) > len(blocks):
            raise ValueError(f"{len(feature_channels)} feature maps but only {len(blocks)} stages")
        if proj_channels is None:
            proj_channels = feature_channels
        elif proj_channels == "auto":
            proj_channels = [min(c, width * 2**i) for i, c in enumerate(feature_channels)]
        elif isinstance(proj_channels, int):
            proj_channels = [proj_channels] * len(feature_channels)
        proj_channels = [int(c) for c in proj_channels]
        if len(proj_channels) != len(feature_channels):
            raise ValueError("proj_channels must have one entry per feature map")
        self.num_classes, self.feature_channels = num_classes, feature_channels

        if self.stem_kind == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
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
        x = self.stem(z)  # (B, width, H, W); strided stem: (B, width, H/4, W/4)
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, width * 2^i, H_i, W_i)
            if i < len(self.projections):
                f = self.projections[i](feats[i].detach(), x.shape[-2:])  # (B, p_i, H_i, W_i)
                x = torch.cat([x, f.to(x.dtype)], 1)
        x = x.mean((2, 3))  # (B, out_channels)
        return self.fc(x)  # (B, K)


class FeatureRejector(nn.Module):
    """Head logits (B, K) from the classifier's feature maps alone: each map (detached) is globally
    average-pooled, the vectors are concatenated (sum of feature_channels) and an MLP (`hidden`
    layers with ReLU, then K outputs) gives the logits. Far cheaper than `Rejector` (no backbone):
    the classifier's features already cost nothing extra at certification. `forward(z, feats)` as
    `Rejector`'s; z is unused. `image_size` and `in_channels` are accepted (every rejector is built
    with them) and ignored, as are the backbone's sizes that an experiment may set for the
    ResNet-like rejector (`width`, `blocks`, `fc_hidden`, `stem`, `proj_channels`): this rejector
    has no backbone."""

    def __init__(self, num_classes: int, feature_channels: Sequence[int],
                 hidden: Sequence[int] = (256,), image_size: int | None = None,
                 in_channels: int = 3, width: int | None = None,
                 blocks: Sequence[int] | None = None, fc_hidden: Sequence[int] | None = None,
                 stem: str | None = None, proj_channels=None):
        super().__init__()
        feature_channels = [int(c) for c in feature_channels]
        if not feature_channels:
            raise ConfigError("rejector=features needs the classifier's feature maps, but the "
                              "classifier is unfused (feature_channels is empty): set "
                              "classifier.feature_layers=[...] to layers of its network (e.g. "
                              "[layer3, layer4] of a torchvision ResNet)")
        self.num_classes, self.feature_channels = num_classes, feature_channels
        dims = [sum(feature_channels), *(int(h) for h in hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """z: (B, C, H, W) (unused); feats: classifier maps [(B, C_i, H_i, W_i)] -> (B, K)."""
        got = [int(f.shape[1]) for f in feats]
        if got != self.feature_channels:
            raise ValueError(f"feature maps with channels {got}, built for "
                             f"{self.feature_channels}")
        pooled = torch.cat([f.detach().mean((2, 3)) for f in feats], 1)  # (B, sum C_i)
        return self.mlp(pooled.to(self.mlp[0].weight.dtype))  # (B, K)
