"""CIFAR-10: the full set through torchvision, and the embedded real subset shipped as an npz."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as tvt

from dsr_lightning.errors import DataError

from .base import SmoothingDataModule

SUBSET_PATH = Path(__file__).resolve().parent / "cifar10_subset" / "cifar10_subset.npz"
SUBSET_SHA256 = "b407fc95953c1239ef30d8958225dfcd1688aadeabb60c09d838c10270e6505d"


class ToFloat:
    """uint8 (C,H,W) tensor -> float32 in [0,1], bit-identical to ToTensor on the same pixels."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255)


class CIFAR10DataModule(SmoothingDataModule):
    """Full CIFAR-10 via torchvision (python pickle release under `root/cifar-10-batches-py`).

    train: RandomCrop(32, padding=4) + horizontal flip; val (seeded `val_fraction` of the
    training split) and test (official order): ToTensor only.
    """

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

    Returns the four arrays (labels as int64); raises DataError naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if check_sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != check_sha256:
            raise DataError(f"{path}: sha256 {digest} does not match the expected {check_sha256}")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, not an npz archive")
        with f:
            arrays = {k: f[k] for k in f.files}
    except DataError:
        raise
    except Exception as e:  # BadZipFile, OSError, ValueError, zlib.error, EOFError, ...
        # (NumPy's own message may advise allow_pickle, which would run code from the file)
        raise DataError(f"{path}: not a valid NumPy array file (.npz archive of arrays): "
                        f"{type(e).__name__}. Replace it with a good copy") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {missing} (has {sorted(arrays)})")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"{path}: x_{split} must be (N, 32, 32, 3) uint8 (NHWC, 0..255), "
                            f"got {x.shape} {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise DataError(f"{path}: y_{split} must be ({len(x)},) integer, "
                            f"got {y.shape} {y.dtype}")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{path}: y_{split} labels must be in 0..9, got {y.min()}..{y.max()}")
        arrays[f"y_{split}"] = y.astype(np.int64)
    return arrays


class CIFAR10SubsetDataModule(SmoothingDataModule):
    """The embedded real CIFAR-10 subset (4660 train, 932 test = test indices 0..931).

    Same transforms and split semantics as CIFAR10DataModule, applied to uint8 tensors.
    `path=None` loads the packaged file (and checks its sha256).
    """

    train_transform = tvt.Compose([tvt.RandomCrop(32, padding=4), tvt.RandomHorizontalFlip(),
                                   ToFloat()])
    eval_transform = ToFloat()

    def __init__(self, path: str | None = None, **common):
        super().__init__(**common)
        self.path = Path(path) if path is not None else SUBSET_PATH
        self._arrays = None

    def _split(self, split: str) -> Dataset:
        if self._arrays is None:
            default = self.path.resolve() == SUBSET_PATH
            self._arrays = load_subset(self.path, SUBSET_SHA256 if default else None)
        x = torch.from_numpy(self._arrays[f"x_{split}"]).permute(0, 3, 1, 2).contiguous()
        return TensorDataset(x, torch.from_numpy(self._arrays[f"y_{split}"]))  # (N,3,32,32) u8

    def _train_source(self) -> Dataset:
        return self._split("train")

    def _test_source(self) -> Dataset:
        return self._split("test")
