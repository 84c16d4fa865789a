"""Shared datamodule logic: seeded train/val split, loaders, and the on-device Gaussian noise."""

from __future__ import annotations

import hashlib

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
SPLITS = ("train", "val", "test")


class TransformedSubset(Dataset):
    """Item i = `source[indices[i]]` (or `source[i]` if indices is None), image transformed.

    Lets train (augmented) and val (plain) views share one copy of the loaded images.
    """

    def __init__(self, source: Dataset, indices: torch.Tensor | None = None, transform=None):
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.source[i if self.indices is None else int(self.indices[i])]
        return (x if self.transform is None else self.transform(x)), int(y)


def _raw_arrays(source: Dataset) -> list[np.ndarray]:
    """The arrays behind a source data set: a TensorDataset's tensors, a torchvision data set's
    `data` and `targets`; else every item, read once."""
    if isinstance(source, TensorDataset):
        return [t.numpy() for t in source.tensors]
    if hasattr(source, "data") and hasattr(source, "targets"):
        return [np.asarray(source.data), np.asarray(source.targets)]
    items = [source[i] for i in range(len(source))]
    return [np.stack([np.asarray(x) for x, _ in items]), np.asarray([int(y) for _, y in items])]


class SmoothingDataModule(pl.LightningDataModule):
    """Base datamodule: [0,1] float images (B, 3, H, W), int64 labels, optional noisy copies.

    Subclasses implement `_train_source()` / `_test_source()` (raw datasets) and set
    `train_transform` / `eval_transform` (raw item -> float image in [0,1]).

    Every batch after device transfer is a dict `{"x": (B,C,H,W), "y": (B,)}`; for training and
    validation (incl. the sanity check) with sigma > 0 it also holds `"noisy": (B*T,C,H,W)`, T
    copies per image, image-major (row i*T + t is copy t of image i), x + sigma*N(0, I) drawn on
    x's device, NOT clipped. sigma is in pixel units of [0,1] images.
    """

    num_classes: int = 10
    class_names: list[str] = CIFAR10_CLASSES
    train_transform = None
    eval_transform = None

    def __init__(self, batch_size: int = 128, num_workers: int = 0, sigma: float = 0.0,
                 T: int = 1, val_fraction: float = 0.1, seed: int = 0, pin_memory: bool = False):
        super().__init__()
        if sigma < 0 or T < 1:
            raise ValueError(f"need sigma >= 0 and T >= 1, got sigma={sigma}, T={T}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.sigma, self.T, self.val_fraction, self.seed = float(sigma), int(T), val_fraction, seed
        self.train_set = self.val_set = self.test_set = None

    # --- data sets -------------------------------------------------------------------------
    def _train_source(self) -> Dataset:
        raise NotImplementedError

    def _test_source(self) -> Dataset:
        raise NotImplementedError

    def _num_val(self, n: int) -> int:
        return round(self.val_fraction * n)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` needs (all when None); idempotent.

        val = a fixed held-out subset of the training split chosen by `seed` (no augmentation);
        test = the official test split in order (index i = test index i).
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            src = self._train_source()
            perm = torch.randperm(len(src), generator=torch.Generator().manual_seed(self.seed))
            n_val = self._num_val(len(src))
            self.val_set = TransformedSubset(src, perm[:n_val].sort().values, self.eval_transform)
            self.train_set = TransformedSubset(src, perm[n_val:].sort().values,
                                               self.train_transform)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TransformedSubset(self._test_source(), None, self.eval_transform)

    def dataset(self, split: str) -> Dataset:
        """Dataset of `split` (train|val|test) yielding (x (C,H,W), y); built on demand."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if getattr(self, f"{split}_set") is None:
            self.prepare_data()
            self.setup("test" if split == "test" else "fit")
        return getattr(self, f"{split}_set")

    def fingerprint(self, split: str) -> str:
        """sha256 over what the split holds: the data module's kind, the raw images and labels of
        its source, and which of them the split takes (val: the seeded held-out subset). Two data
        sets, or two splits, differing in any image or label get different fingerprints."""
        ds = self.dataset(split)
        h = hashlib.sha256(f"{type(self).__name__}/{split}".encode())
        for arr in _raw_arrays(ds.source if isinstance(ds, TransformedSubset) else ds):
            h.update(str((arr.dtype, arr.shape)).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        if isinstance(ds, TransformedSubset) and ds.indices is not None:
            h.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
        return h.hexdigest()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # --- noise -----------------------------------------------------------------------------
    def add_noise(self, batch) -> dict[str, torch.Tensor]:
        """(x, y) or {"x", "y"} -> {"x", "y"[, "noisy"]}; "noisy" only when sigma > 0.

        x is returned untouched; noisy (B*T, C, H, W) = x.repeat_interleave(T) + sigma * N(0, I).
        """
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        out = {"x": x, "y": y}
        if self.sigma > 0:
            noisy = x.repeat_interleave(self.T, dim=0)  # (B*T, C, H, W), image-major
            out["noisy"] = noisy + self.sigma * torch.randn_like(noisy)
        return out

    def _noisy_stage(self) -> bool:
        t = self.trainer
        return t is None or t.training or t.validating or t.sanity_checking

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device: noise for fit/validate/sanity check (and with no trainer), else clean."""
        if self._noisy_stage():
            return self.add_noise(batch)
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return {"x": x, "y": y}
