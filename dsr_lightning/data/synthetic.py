"""Tiny, learnable, in-memory random data for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .base import SmoothingDataModule


class SyntheticDataModule(SmoothingDataModule):
    """A fixed random prototype per class + per-sample Gaussian noise (`sample_noise`), in [0,1].

    Prototypes are smooth (a random 4x4 pattern upsampled), so classes differ both in pixel
    layout and in mean colour: a linear layer or a conv + global pooling learns them in a few
    steps. Deterministic given `seed` and the sizes; no augmentation; `val_fraction` is unused
    (val has `num_val` samples drawn like the training ones). name "synthetic".
    """

    DEFAULT_NAME = "synthetic"

    def __init__(self, num_train: int = 256, num_val: int = 64, num_test: int = 64,
                 image_size: int = 32, channels: int = 3, num_classes: int = 10,
                 sample_noise: float = 0.2, **common):
        super().__init__(**common)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.image_size, self.channels, self.sample_noise = image_size, channels, sample_noise
        self.num_classes = num_classes
        self.class_names = [f"class{k}" for k in range(num_classes)]
        low = torch.rand(num_classes, channels, 4, 4, generator=self._gen(0))
        self.prototypes = F.interpolate(low, size=(image_size, image_size), mode="bilinear",
                                        align_corners=False)  # (K, C, H, W) in [0,1]

    def _gen(self, stream: int) -> torch.Generator:
        # separate streams: prototypes, train+val, test (changing num_test leaves train fixed)
        return torch.Generator().manual_seed(self.seed * 3 + stream)

    def sample(self, n: int, g: torch.Generator) -> TensorDataset:
        """n samples: y uniform over classes, x = clamp(prototype[y] + sample_noise * N(0, I))."""
        y = torch.randint(self.num_classes, (n,), generator=g)  # (n,)
        eps = torch.randn(n, self.channels, self.image_size, self.image_size, generator=g)
        x = (self.prototypes[y] + self.sample_noise * eps).clamp(0, 1)  # (n, C, H, W)
        return TensorDataset(x, y)

    def _num_val(self, n: int) -> int:
        return self.num_val

    def _train_source(self) -> Dataset:
        return self.sample(self.num_train + self.num_val, self._gen(1))

    def _test_source(self) -> Dataset:
        return self.sample(self.num_test, self._gen(2))
