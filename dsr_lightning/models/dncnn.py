"""DnCNN denoiser (Zhang et al. 2017) as trained by Salman et al. (2020) for denoised smoothing.

Layout matches the published `cifar_dncnn` / `cifar_dncnn_wide` checkpoints: one Sequential `dncnn`
= [conv(bias), ReLU] + (depth - 2) x [conv(no bias), BN(eps 1e-4, momentum 0.95), ReLU] + [conv(no
bias)]; the network predicts the noise and the output is x - dncnn(x).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DnCNN(nn.Module):
    """Residual denoiser on [0,1]-scale images: (B, C, H, W) -> (B, C, H, W), any H, W."""

    def __init__(self, image_channels: int = 3, depth: int = 17, n_channels: int = 64):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN depth must be >= 2, got {depth}")
        self.image_channels = image_channels
        layers: list[nn.Module] = [
            nn.Conv2d(image_channels, n_channels, 3, padding=1, bias=True),
            nn.ReLU(inplace=True),
        ]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(n_channels, n_channels, 3, padding=1, bias=False),
                # momentum 0.95 as published (PyTorch convention: weight of the new batch statistic)
                nn.BatchNorm2d(n_channels, eps=1e-4, momentum=0.95),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(n_channels, image_channels, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        for m in self.modules():  # orthogonal convs, last conv zero: starts as identity
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(layers[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)  # (B, C, H, W)
