"""MemNet denoiser (Tai et al. 2017) as trained by Salman et al. (2020) for denoised smoothing.

Layout matches the published `memnet` checkpoints: `feature_extractor`, `reconstructor` and every
unit are BN -> ReLU -> Conv Sequentials (`bn`, `relu`, `conv`; conv without bias);
`dense_memory` is a ModuleList of MemoryBlocks, each with `recursive_unit` (ModuleList of residual
blocks `relu_conv1`, `relu_conv2`) and a 1x1 `gate_unit` over the concatenation of its short-term
outputs and all earlier long-term memories. Output = reconstructor(out) + x.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BNReLUConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, k: int = 3, s: int = 1, p: int = 1):
        super().__init__()
        self.add_module("bn", nn.BatchNorm2d(in_ch))
        self.add_module("relu", nn.ReLU(inplace=True))  # acts on bn's output, never on the input
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, k, s, p, bias=False))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.relu_conv1 = BNReLUConv(channels, channels)
        self.relu_conv2 = BNReLUConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_conv2(self.relu_conv1(x)) + x


class MemoryBlock(nn.Module):
    """The `index`-th (1-based) memory block: its gate sees num_resblock + index feature maps."""

    def __init__(self, channels: int, num_resblock: int, index: int):
        super().__init__()
        self.recursive_unit = nn.ModuleList(ResidualBlock(channels) for _ in range(num_resblock))
        self.gate_unit = BNReLUConv((num_resblock + index) * channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, memories: list[torch.Tensor]) -> torch.Tensor:
        short = []
        for block in self.recursive_unit:
            x = block(x)
            short.append(x)
        return self.gate_unit(torch.cat(short + memories, 1))  # short-term first, then long-term


class MemNet(nn.Module):
    """Residual denoiser on [0,1]-scale images: (B, C, H, W) -> (B, C, H, W), any H, W."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_memblock: int = 3,
                 num_resblock: int = 6):
        super().__init__()
        self.image_channels = in_channels
        # registration order as published, so state-dict key order matches too
        self.feature_extractor = BNReLUConv(in_channels, channels)
        self.reconstructor = BNReLUConv(channels, in_channels)
        self.dense_memory = nn.ModuleList(
            MemoryBlock(channels, num_resblock, i + 1) for i in range(num_memblock))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.feature_extractor(x)  # (B, channels, H, W)
        memories = [out]
        for block in self.dense_memory:
            out = block(out, memories)
            memories.append(out)
        return self.reconstructor(out) + x
