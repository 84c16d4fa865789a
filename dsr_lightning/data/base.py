"""Shared datamodule logic: seeded train/val split, loaders, the on-device Gaussian noise, and the
streaming content fingerprint of a split."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import DatasetFolder

from dsr_lightning.errors import ConfigError, DataError

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
ARRAY_CHUNK = 4 << 20  # bytes of an in-memory array hashed per update (a view, no copy if C-order)
FILE_CHUNK = 256 << 10  # bytes of a file read per update


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


# --- the fingerprint's streams -------------------------------------------------------------------
# Sources held as arrays (a TensorDataset, torchvision's CIFAR10 with .data/.targets) hash, per
# array, str((dtype, shape)) then its C-order bytes: the bytes the first release hashed from whole
# copies (`np.ascontiguousarray(arr).tobytes()`), now fed in chunks of views, so the values are
# unchanged. Folder sources hash their files; any other source, its items one at a time.

def _source_arrays(source: Dataset) -> list[np.ndarray] | None:
    """The arrays behind an in-memory source (views, no copy), or None for any other source."""
    if isinstance(source, TensorDataset):
        return [t.numpy() for t in source.tensors]
    if hasattr(source, "data") and hasattr(source, "targets"):
        return [np.asarray(source.data), np.asarray(source.targets)]
    return None


def _array_chunks(arr: np.ndarray) -> Iterator[np.ndarray]:
    """arr's C-order bytes as consecutive C-contiguous row blocks of about ARRAY_CHUNK bytes
    (views when arr is C-contiguous; else one block copied at a time)."""
    if arr.ndim == 0:
        yield np.ascontiguousarray(arr)
        return
    row = max(1, arr[:1].nbytes)
    step = max(1, ARRAY_CHUNK // row)
    for i in range(0, len(arr), step):
        yield np.ascontiguousarray(arr[i:i + step])


def _hash_array(h, arr: np.ndarray) -> None:
    h.update(str((arr.dtype, arr.shape)).encode())
    for block in _array_chunks(arr):
        h.update(block.reshape(-1).view(np.uint8))


def _hash_items(h, source: Dataset) -> None:
    """Any other source, one item at a time: the bytes np.stack of all images and the int64 label
    array would give (same header, same order), never holding more than one image."""
    n = len(source)
    if n == 0:
        h.update(b"empty")
        return
    labels = np.empty(n, dtype=np.int64)  # (N,), 8 bytes an item
    first = None
    for i in range(n):
        x, y = source[i]
        a = np.asarray(x)
        if first is None:
            first = (a.dtype, a.shape)
            h.update(str((a.dtype, (n, *a.shape))).encode())
        elif (a.dtype, a.shape) != first:
            raise DataError(f"item {i} of the data set is {a.dtype} {a.shape}, item 0 is "
                            f"{first[0]} {first[1]}: every image of a split must have one shape")
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        labels[i] = int(y)
    _hash_array(h, labels)


def _hash_files(h, source: DatasetFolder, indices: torch.Tensor | None) -> None:
    """A folder source, file by file in the split's order (only the files the split takes): each
    file's path relative to the data set's root, its size and bytes, its label."""
    h.update(f"files/{len(source)}\n".encode())
    order = range(len(source)) if indices is None else np.asarray(indices).tolist()
    buf = bytearray(FILE_CHUNK)
    view = memoryview(buf)
    for i in order:
        path, label = source.samples[i]
        rel = Path(os.path.relpath(path, source.root)).as_posix()
        try:
            with open(path, "rb") as f:
                h.update(f"{rel}\0{os.fstat(f.fileno()).st_size}\0".encode())
                while n := f.readinto(buf):
                    h.update(view[:n])
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e}); the data set changed "
                            "since it was listed? Restore the file or start again") from e
        h.update(f"\0{int(label)}\n".encode())


def path_tag(path, stem: bool = False) -> str:
    """`<name>-<8 hex digits>`: a folder's name (a file's stem with `stem`) and a hash of its
    absolute real path (relative paths against the current folder, links resolved), so two data
    sets of one name in different places never share the paths named after them (exports, runs)
    and one place has one tag from any working directory. 'none' for no path."""
    if path is None or str(path) == "":
        return "none"
    real = os.path.realpath(os.path.expanduser(str(path)))
    p = Path(real)
    return f"{p.stem if stem else p.name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"


def _settings(cls: type) -> list[str]:
    """The keyword settings a data module class takes: its constructors' named parameters along
    the MRO, down to SmoothingDataModule's (each passes the rest on as **common)."""
    keys = []
    for c in cls.__mro__:
        if "__init__" in c.__dict__:
            keys += [n for n, p in inspect.signature(c.__init__).parameters.items()
                     if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if c is SmoothingDataModule:
            break
    return sorted(set(keys))


def _stats(key: str, value: Sequence[float] | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"data.{key} must be a list of numbers (one per channel), got "
                          f"{value!r}") from None
    if not out:
        raise ConfigError(f"data.{key} must name one number per channel, got an empty list")
    return out


class SmoothingDataModule(pl.LightningDataModule):
    """Base datamodule: [0,1] float images (B, C, H, W), int64 labels, optional noisy copies.

    Subclasses implement `_train_source()` / `_test_source()` (raw datasets; `_val_source()`
    too when the data set has its own validation split) and set `train_transform` /
    `eval_transform` (raw item -> float image in [0,1]) at the latest in `_train_source()`.

    What the jobs read about the data (cheap: no image is decoded):
      name         the data set's name for paths and records (the constructor's `name`, else the
                   module's default: DEFAULT_NAME, a root folder's or a file's name);
      num_classes, class_names
                   the label set (set by the constructor, or, for data modules that read them
                   from their files, read on first access: their docstrings say which);
      mean, std    the per-channel normalisation the data implies (the constructor's `mean`,
                   `std`, else DEFAULT_MEAN / DEFAULT_STD; None: none implied);
      image_shape(split)
                   (C, H, W) of the split's images (reads one item).

    Every batch after device transfer is a dict `{"x": (B,C,H,W), "y": (B,)}`; for training and
    validation (incl. the sanity check) with sigma > 0 it also holds `"noisy": (B*T,C,H,W)`, T
    copies per image, image-major (row i*T + t is copy t of image i), x + sigma*N(0, I) drawn on
    x's device, NOT clipped. sigma is in pixel units of [0,1] images.
    """

    DEFAULT_NAME: str = ""
    NEEDS: dict[str, str] = {}  # setting -> what to give, for the ones without a default
    DEFAULT_MEAN: tuple[float, ...] | None = None
    DEFAULT_STD: tuple[float, ...] | None = None
    num_classes: int
    class_names: list[str]
    train_transform = None
    eval_transform = None

    def __init__(self, batch_size: int = 128, num_workers: int = 0, sigma: float = 0.0,
                 T: int = 1, val_fraction: float = 0.1, seed: int = 0, pin_memory: bool = False,
                 name: str | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, **unknown):
        super().__init__()
        if unknown:  # keys the config sets that this module does not take (e.g. an experiment's)
            given = ", ".join(f"data.{k}={v!r}" for k, v in unknown.items())
            drop = " ".join(f"~data.{k}" for k in unknown)
            raise ConfigError(
                f"{given} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of "
                f"{type(self).__name__} (its settings: {', '.join(_settings(type(self)))}). Drop "
                f"it; if an experiment sets it (experiment=tiny sets data.image_size), add {drop} "
                "to the command line")
        if sigma < 0 or T < 1:
            raise ValueError(f"need sigma >= 0 and T >= 1, got sigma={sigma}, T={T}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.sigma, self.T, self.val_fraction, self.seed = float(sigma), int(T), val_fraction, seed
        if name is not None and (not str(name) or "/" in str(name)):
            raise ConfigError(f"data.name must be a non-empty name without '/', got {name!r}")
        self._name = None if name is None else str(name)
        self.mean = _stats("mean", mean) if mean is not None else self.DEFAULT_MEAN
        self.std = _stats("std", std) if std is not None else self.DEFAULT_STD
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.std must be positive, got {list(self.std)}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(f"data.mean has {len(self.mean)} values, data.std {len(self.std)}: "
                              "give one per channel in each")
        self.train_set = self.val_set = self.test_set = None

    @property
    def name(self) -> str:
        """The data set's name (paths, records): the constructor's `name`, else the default."""
        return self._name if self._name is not None else self._default_name()

    def _default_name(self) -> str:
        return self.DEFAULT_NAME

    # --- data sets -------------------------------------------------------------------------
    def _train_source(self) -> Dataset:
        raise NotImplementedError

    def _test_source(self) -> Dataset:
        raise NotImplementedError

    def _val_source(self) -> Dataset | None:
        """The data set's own validation split, or None: val is then held out of train."""
        return None

    def _num_val(self, n: int) -> int:
        return round(self.val_fraction * n)

    def _where(self, split: str) -> str:
        """Where the split's images are (a folder, a file's arrays), for messages."""
        return f"{type(self).__name__}, split {split}"

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` needs (all when None); idempotent.

        val = the data set's own validation split if it has one (`_val_source`), else a fixed
        held-out subset of the training split chosen by `seed` (no augmentation in either);
        test = the official test split in order (index i = test index i). For "fit" (and None)
        the training split must hold images: else one DataError naming where it was read, before
        any training (val and test alone, e.g. to certify them, need none).
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            src = self._train_source()
            val = self._val_source()
            if val is not None:
                self.val_set = TransformedSubset(val, None, self.eval_transform)
                self.train_set = TransformedSubset(src, None, self.train_transform)
            else:
                perm = torch.randperm(len(src), generator=torch.Generator().manual_seed(self.seed))
                n_val = self._num_val(len(src))
                self.val_set = TransformedSubset(src, perm[:n_val].sort().values,
                                                 self.eval_transform)
                self.train_set = TransformedSubset(src, perm[n_val:].sort().values,
                                                   self.train_transform)
        if stage in (None, "fit") and len(self.train_set) == 0:
            n = len(self.train_set.source)
            held = (f"; data.val_fraction={self.val_fraction} holds all {n} out for validation"
                    if n else "")
            raise DataError(f"split=train of data {self.name!r} holds no images "
                            f"({self._where('train')}{held}): nothing to train on. Add images "
                            + ("or lower data.val_fraction" if n else "there (or choose other data)"))
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TransformedSubset(self._test_source(), None, self.eval_transform)

    def dataset(self, split: str) -> Dataset:
        """Dataset of `split` (train|val|test) yielding (x (C,H,W), y); built on demand."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if getattr(self, f"{split}_set") is None:
            self.prepare_data()
            self.setup({"test": "test", "train": "fit"}.get(split, "validate"))
        return getattr(self, f"{split}_set")

    def image_shape(self, split: str = "test") -> tuple[int, int, int]:
        """(C, H, W) of the split's images as the model sees them (reads and transforms item 0)."""
        ds = self.dataset(split)
        if len(ds) == 0:
            raise DataError(f"split={split} of data {self.name!r} holds no images: its image "
                            "shape is unknown")
        c, h, w = ds[0][0].shape
        return int(c), int(h), int(w)

    def check_decodable(self, split: str, indices: Sequence[int] | None = None) -> None:
        """Every image `indices` (all if None) of `split` takes decodes, else ONE DataError listing
        every file that does not (the first few, and the count). For sources that decode files
        lazily (image folders): a job that writes as it goes (certification) checks up front, so
        a bad file is replaced before any row is written, not found halfway (when replacing it
        would change the data set and the started file could not be resumed). A no-op for
        in-memory sources. Decodes in a few threads (Pillow releases the GIL while decoding)."""
        ds = self.dataset(split)
        src, sub = (ds.source, ds.indices) if isinstance(ds, TransformedSubset) else (ds, None)
        if not isinstance(src, DatasetFolder):
            return
        order = range(len(ds)) if indices is None else indices
        paths = [src.samples[int(i) if sub is None else int(sub[int(i)])][0] for i in order]

        def bad(path: str) -> str | None:
            try:
                src.loader(path)
            except DataError as e:  # our loaders' message names the file
                return str(e)
            except Exception as e:  # noqa: BLE001 - another loader's: name the file here
                return f"{path}: cannot be decoded ({type(e).__name__}: {e})"
            return None

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            errors = [e for e in pool.map(bad, paths) if e is not None]
        if errors:
            more = f" | ... and {len(errors) - 5} more" if len(errors) > 5 else ""
            raise DataError(f"{len(errors)} of the {len(paths)} images of split={split} to be "
                            "used cannot be decoded (nothing is written until all do): "
                            + " | ".join(errors[:5]) + more)

    def _fingerprint_extra(self) -> str:
        """What else decides the images a split yields (e.g. a resize), hashed after the data;
        '' (nothing hashed) for data modules whose sources are already at model size."""
        return ""

    def fingerprint(self, split: str) -> str:
        """sha256 over what the split holds: the data module's kind, the raw images and labels of
        its source, and which of them the split takes (val: the seeded held-out subset). Two data
        sets, or two splits, differing in any image or label get different fingerprints.

        Streamed in bounded memory: in-memory arrays in chunks of views (the same value as
        hashing whole copies), folder data sets file by file (only the files the split takes:
        relative path, bytes, label; then the indices), other sources item by item.
        """
        ds = self.dataset(split)
        src, indices = (ds.source, ds.indices) if isinstance(ds, TransformedSubset) else (ds, None)
        h = hashlib.sha256(f"{type(self).__name__}/{split}".encode())
        if isinstance(src, DatasetFolder):
            _hash_files(h, src, indices)
        elif (arrays := _source_arrays(src)) is not None:
            for arr in arrays:
                _hash_array(h, arr)
        else:
            _hash_items(h, src)
        if indices is not None:
            h.update(np.asarray(indices, dtype=np.int64).tobytes())
        if extra := self._fingerprint_extra():
            h.update(f"\n{extra}".encode())
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
