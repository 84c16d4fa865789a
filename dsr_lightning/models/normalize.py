"""Per-channel normalisation inside the classifier, so noise is added in [0,1] pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class NormalizeLayer(nn.Module):
    """(x - mean) / std per channel. mean/std are non-persistent buffers: they follow
    `.to(device/dtype)` but add nothing to the state dict (as in the published checkpoints)."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)  # (C,1,1)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Classifier(nn.Sequential):
    """Sequential(NormalizeLayer, net): takes [0,1] images, returns logits. State-dict keys are
    the net's prefixed by `1.`, exactly the layout of Cohen et al.'s published classifiers."""

    def __init__(self, net: nn.Module, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD):
        super().__init__(NormalizeLayer(mean, std), net)

    @property
    def net(self) -> nn.Module:
        return self[1]

    @property
    def num_classes(self) -> int:
        net = self.net
        if hasattr(net, "num_classes"):
            return int(net.num_classes)
        if isinstance(getattr(net, "fc", None), nn.Linear):
            return net.fc.out_features
        raise AttributeError(f"cannot tell the number of classes of {type(net).__name__}")

    @property
    def feature_channels(self) -> list[int]:
        return list(getattr(self.net, "feature_channels", []))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C, H, W) in [0,1] -> logits (B, K), stage feature maps ([] if net has none)."""
        z = self[0](x)
        if hasattr(self.net, "forward_features"):
            logits, feats = self.net.forward_features(z)
            return logits, list(feats)
        return self.net(z), []
