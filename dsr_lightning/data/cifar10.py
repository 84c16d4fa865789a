"""CIFAR-10: the full set through torchvision, and the embedded real subset shipped as an npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision
from torch.utils.data import Dataset
from torchvision import transforms as tvt

from dsr_lightning.errors import DataError

from .base import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, SmoothingDataModule
from .npz import NpzDataModule, ToFloat, load_npz

__all__ = ["SUBSET_PATH", "SUBSET_SHA256", "CIFAR10DataModule", "CIFAR10SubsetDataModule",
           "ToFloat", "load_subset"]

SUBSET_PATH = Path(__file__).resolve().parent / "cifar10_subset" / "cifar10_subset.npz"
SUBSET_SHA256 = "b407fc95953c1239ef30d8958225dfcd1688aadeabb60c09d838c10270e6505d"
CIFAR10_HWC = (32, 32, 3)


class CIFAR10DataModule(SmoothingDataModule):
    """Full CIFAR-10 via torchvision (python pickle release under `root/cifar-10-batches-py`).

    train: RandomCrop(32, padding=4) + horizontal flip; val (seeded `val_fraction` of the
    training split) and test (official order): ToTensor only. name "cifar10", CIFAR-10's
    classes and normalisation.
    """

    DEFAULT_NAME, DEFAULT_MEAN, DEFAULT_STD = "cifar10", CIFAR10_MEAN, CIFAR10_STD
    num_classes = 10
    class_names = CIFAR10_CLASSES
    train_transform = tvt.Compose([tvt.RandomCrop(32, padding=4), tvt.RandomHorizontalFlip(),
                                   tvt.ToTensor()])
    eval_transform = tvt.ToTensor()

    def __init__(self, root: str = "data/cifar10", download: bool = False, **common):
        super().__init__(**common)
        self.root, self.download = str(root), download

    def prepare_data(self) -> None:
        if self.download:  # rank 0 only under DDP; setup() then reads with download=False
            for train in (True, False):
                torchvision.datasets.CIFAR10(self.root, train=train, download=True)

    def _load(self, train: bool) -> Dataset:
        try:  # images come out as PIL; the views apply the transforms
            return torchvision.datasets.CIFAR10(self.root, train=train, download=False)
        except RuntimeError as e:
            where = Path(self.root).resolve() / torchvision.datasets.CIFAR10.base_folder
            raise DataError(
                f"CIFAR-10 not found or corrupted in {where} (expects the python release: "
                "data_batch_1..5, test_batch, batches.meta with their official md5). Pass "
                "data.download=true to download it there, or data.root=<folder holding "
                f"cifar-10-batches-py>. torchvision said: {e}") from e

    def _train_source(self) -> Dataset:
        return self._load(train=True)

    def _test_source(self) -> Dataset:
        return self._load(train=False)


def load_subset(path: str | Path, check_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read and validate a CIFAR-10 npz: x_* (N,32,32,3) uint8, y_* (N,) integer in 0..9.

    Returns the file's arrays (labels as int64); raises DataError naming the file otherwise.
    """
    return load_npz(path, check_sha256, num_classes=10, image_hwc=CIFAR10_HWC)[0]


class CIFAR10SubsetDataModule(NpzDataModule):
    """The embedded real CIFAR-10 subset (4660 train, 932 test = test indices 0..931).

    An NpzDataModule held to CIFAR-10's shape (32x32x3, labels 0..9) with its classes and
    normalisation, name "cifar10"; same transforms and split semantics as CIFAR10DataModule,
    applied to uint8 tensors. `path=None` loads the packaged file (and checks its sha256).
    """

    DEFAULT_NAME, DEFAULT_MEAN, DEFAULT_STD = "cifar10", CIFAR10_MEAN, CIFAR10_STD

    def __init__(self, path: str | None = None, **common):
        path = Path(path) if path is not None else SUBSET_PATH
        packaged = path.resolve() == SUBSET_PATH
        super().__init__(path=str(path), num_classes=10,
                         sha256=SUBSET_SHA256 if packaged else None, **common)
        self._image_hwc = CIFAR10_HWC

    def _default_name(self) -> str:
        return self.DEFAULT_NAME

    @property
    def class_names(self) -> list[str]:
        return list(CIFAR10_CLASSES)

    @property
    def num_classes(self) -> int:
        return 10
