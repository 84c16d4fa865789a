"""Any image data set saved as a NumPy npz archive: x_* (N, H, W, C) uint8, y_* (N,) labels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as tvt

from dsr_lightning.errors import ConfigError, DataError

from .base import SmoothingDataModule, path_tag

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


class ToFloat:
    """uint8 (C,H,W) tensor -> float32 in [0,1], bit-identical to ToTensor on the same pixels."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # BadZipFile, OSError, ValueError, zlib.error, EOFError, ...
        # (NumPy's own message may advise allow_pickle, which would run code from the file)
        raise DataError(f"{path}: not a valid NumPy array file (.npz archive of arrays): "
                        f"{type(e).__name__}. Replace it with a good copy") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not an npz archive")
    arrays = {}
    with f:
        for k in f.files:
            try:
                arrays[k] = f[k]
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise DataError(f"{path}: array {k} cannot be read: {type(e).__name__}. "
                                    "Replace the file with a good copy") from None
                raise DataError(f"{path}: array {k} holds Python objects (dtype=object), which "
                                "are not loaded (that would run code from the file): save it "
                                "as numbers, or class names as a str array "
                                "(np.array(names, dtype=str))") from None
            except Exception as e:  # a damaged member: BadZipFile, zlib.error, EOFError, ...
                raise DataError(f"{path}: not a valid NumPy array file (.npz archive of arrays): "
                                f"{type(e).__name__} reading {k}. Replace it with a good copy"
                                ) from None
    return arrays


def load_npz(path: str | Path, check_sha256: str | None = None, num_classes: int | None = None,
             image_hwc: tuple[int, int, int] | None = None
             ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read and validate an image npz; returns (its arrays with labels as int64, class names).

    Required: x_train, y_train, x_test, y_test; optional: x_val with y_val, class_names (1-D str,
    label order). x_* (N, H, W, C) uint8 (NHWC, 0..255) with C 1 or 3, one (H, W, C) for all
    splits (`image_hwc`: that one exactly); y_* (N,) integers in 0..K-1 with K = `num_classes`,
    else len(class_names), else the largest label + 1 over all splits. Class names default to
    class0..class{K-1}. Any violation raises one DataError naming the file and the array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if check_sha256 is not None:
        digest = file_sha256(path)
        if digest != check_sha256:
            raise DataError(f"{path}: sha256 {digest} does not match the expected {check_sha256}")
    arrays = _read_arrays(path)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {missing} (has {sorted(arrays)})")
    if ("x_val" in arrays) != ("y_val" in arrays):
        has = "x_val" if "x_val" in arrays else "y_val"
        raise DataError(f"{path}: has {has} but not {'y_val' if has == 'x_val' else 'x_val'}: a "
                        "validation split needs both (or neither: val is then held out of train)")
    splits = ["train", "test"] + (["val"] if "x_val" in arrays else [])
    want = ("(N, {}, {}, {}) uint8".format(*image_hwc) if image_hwc is not None
            else "(N, H, W, C) uint8 with C = 1 or 3")
    hwc = image_hwc
    for split in splits:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        ok = x.dtype == np.uint8 and x.ndim == 4 and (
            x.shape[1:] == tuple(image_hwc) if image_hwc is not None
            else x.shape[3] in (1, 3) and min(x.shape[1:3]) > 0)
        if not ok:
            raise DataError(f"{path}: x_{split} must be {want} (NHWC, 0..255), "
                            f"got {x.shape} {x.dtype}")
        if hwc is None:
            hwc = x.shape[1:]
        elif x.shape[1:] != tuple(hwc):
            raise DataError(f"{path}: x_{split} images are {x.shape[1:]} (H, W, C) but x_train's "
                            f"are {tuple(hwc)}: every split needs one image shape")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise DataError(f"{path}: y_{split} must be ({len(x)},) integer, "
                            f"got {y.shape} {y.dtype}")
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: y_{split} labels must be >= 0, got {y.min()}")
        arrays[f"y_{split}"] = y.astype(np.int64)
    names = None
    if "class_names" in arrays:
        c = arrays["class_names"]
        if c.ndim != 1 or c.dtype.kind not in "US" or not len(c):
            raise DataError(f"{path}: class_names must be a 1-D str array (one name per label), "
                            f"got {c.shape} {c.dtype}")
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]
    if num_classes is not None:
        if names is not None and len(names) != num_classes:
            raise DataError(f"{path}: class_names holds {len(names)} names but num_classes is "
                            f"{num_classes}: make them agree (or drop one of them)")
        K, why = num_classes, "num_classes"
    elif names is not None:
        K, why = len(names), "class_names"
    else:
        top = [int(arrays[f"y_{s}"].max()) for s in splits if len(arrays[f"y_{s}"])]
        if not top:
            raise DataError(f"{path}: no labels in any split to tell the number of classes: "
                            "add images, or pass data.num_classes")
        K, why = max(top) + 1, None
    for split in splits:
        y = arrays[f"y_{split}"]
        if len(y) and y.max() >= K:
            raise DataError(f"{path}: y_{split} labels must be in 0..{K - 1}, got "
                            f"{y.min()}..{y.max()}" + (f" (K = {K} from {why})" if why else ""))
    return arrays, names if names is not None else [f"class{k}" for k in range(K)]


class NpzDataModule(SmoothingDataModule):
    """An npz of images (see `load_npz`): test = x_test in order; val = x_val if the file has it,
    else the seeded `val_fraction` of x_train.

    eval: uint8 -> [0,1] floats (ToTensor's values); train (`augment`): RandomCrop to the image
    size with padding min(H, W) // 8 (4 px at 32 px, as CIFAR-10) + horizontal flip, then the
    same. `name` defaults to `<the file's stem>-<hash of its real path>` (data.base.path_tag), as
    conf/data/npz.yaml names it; `num_classes` and `class_names` (from the
    `num_classes` argument, the file's class_names, or the labels) are read from the file on
    first access; `sha256`: the file's expected checksum, checked on loading.
    """

    NEEDS = {"path": "your .npz file (arrays x_train, y_train, x_test, y_test)"}

    def __init__(self, path: str, num_classes: int | None = None, augment: bool = True,
                 sha256: str | None = None, **common):
        super().__init__(**common)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ConfigError(f"data.num_classes must be a positive integer, got {num_classes!r}")
        self.path = Path(path)
        self.augment, self.sha256 = bool(augment), sha256
        self._num_classes = None if num_classes is None else int(num_classes)
        self._image_hwc: tuple[int, int, int] | None = None  # required (H, W, C); None: any
        self._arrays: dict[str, np.ndarray] | None = None
        self._class_names: list[str] | None = None

    def _default_name(self) -> str:
        return path_tag(self.path, stem=True)

    def _where(self, split: str) -> str:
        return f"{self.path}: x_{split}"

    def _load(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays, self._class_names = load_npz(self.path, self.sha256, self._num_classes,
                                                 self._image_hwc)
            h, w, _ = arrays["x_train"].shape[1:]
            self.eval_transform = ToFloat()
            self.train_transform = tvt.Compose([
                tvt.RandomCrop((h, w), padding=min(h, w) // 8), tvt.RandomHorizontalFlip(),
                ToFloat()]) if self.augment else ToFloat()
            self._arrays = arrays
        return self._arrays

    @property
    def class_names(self) -> list[str]:
        """Names in label order (loads the file on first access)."""
        self._load()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _split(self, split: str) -> Dataset:
        arrays = self._load()
        x = torch.from_numpy(arrays[f"x_{split}"]).permute(0, 3, 1, 2).contiguous()
        return TensorDataset(x, torch.from_numpy(arrays[f"y_{split}"]))  # (N,C,H,W) uint8, (N,)

    def _train_source(self) -> Dataset:
        return self._split("train")

    def _val_source(self) -> Dataset | None:
        return self._split("val") if "x_val" in self._load() else None

    def _test_source(self) -> Dataset:
        return self._split("test")
