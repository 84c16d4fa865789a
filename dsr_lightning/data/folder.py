"""Folders of image files: any ImageFolder tree (root/{train,val,test}/<class>/<image>) and
ImageNet in torchvision's layout. Images are decoded lazily, one item at a time."""

from __future__ import annotations

import os
from pathlib import Path

import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as tvt
from torchvision.datasets.folder import find_classes

from dsr_lightning.errors import ConfigError, DataError

from .base import IMAGENET_MEAN, IMAGENET_STD, SmoothingDataModule

FOLDER_LAYOUT = ("<root>/train/<class>/<image>, <root>/test/<class>/<image> and optionally "
                 "<root>/val/<class>/<image> (one sub-folder per class, the same class folders "
                 "in each; .png/.jpg/... files)")
IMAGENET_LAYOUT = ("<root>/meta.bin (or ILSVRC2012_devkit_t12.tar.gz, from which torchvision "
                   "writes it), <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, as "
                   "torchvision.datasets.ImageNet expects (nothing is downloaded)")


class ImageLoader:
    """path -> PIL image in `mode` ("RGB" or "L"). A file that cannot be decoded raises one
    DataError naming it (picklable: DataLoader workers use it)."""

    def __init__(self, mode: str = "RGB"):
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert(self.mode)  # convert() decodes: errors come here
        except Exception as e:  # UnidentifiedImageError, truncated data, decompression bomb, ...
            raise DataError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e}). "
                            "Replace or remove the file") from None


def _positive(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
    return value


class ImageFolderDataModule(SmoothingDataModule):
    """Images in class folders (torchvision.datasets.ImageFolder): see FOLDER_LAYOUT.

    val = root/val if it exists, else the seeded `val_fraction` of root/train; test = root/test
    in ImageFolder's order (classes sorted, then files sorted). Class names = the sub-folder
    names of root/train (read, a directory listing, on first access of `class_names` or
    `num_classes`); test/ and val/ must have the same class folders. Images are converted to RGB
    (`channels=3`) or grayscale (`channels=1`).

    eval: Resize(resize) (the shorter side) + CenterCrop(image_size) + ToTensor; train:
    Resize(resize) + RandomCrop(image_size) + RandomHorizontalFlip + ToTensor; `resize` defaults
    to round(image_size * 256 / 224) (torchvision's 256 -> 224). `name` defaults to the root
    folder's name. A missing folder, no class folders, an empty class folder or an image that
    cannot be decoded (when it is read) raise one DataError naming the path.
    """

    LAYOUT = FOLDER_LAYOUT

    def __init__(self, root: str, image_size: int = 224, resize: int | None = None,
                 channels: int = 3, **common):
        super().__init__(**common)
        self.root = Path(root)
        self.image_size = _positive("image_size", image_size)
        self.resize = (round(image_size * 256 / 224) if resize is None
                       else _positive("resize", resize))
        if self.resize < self.image_size:
            raise ConfigError(f"data.resize ({self.resize}) must be >= data.image_size "
                              f"({self.image_size}): the crop is taken from the resized image")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 3 (RGB) or 1 (grayscale), got {channels!r}")
        self.channels = channels
        self.loader = ImageLoader("RGB" if channels == 3 else "L")
        self.eval_transform = tvt.Compose([tvt.Resize(self.resize),
                                           tvt.CenterCrop(self.image_size), tvt.ToTensor()])
        self.train_transform = tvt.Compose([tvt.Resize(self.resize),
                                            tvt.RandomCrop(self.image_size),
                                            tvt.RandomHorizontalFlip(), tvt.ToTensor()])
        self._class_names: list[str] | None = None

    def _default_name(self) -> str:
        return Path(os.path.abspath(self.root)).name

    def _fingerprint_extra(self) -> str:
        # what decides the images beyond the files: a resume at another size is another data set
        return f"eval=resize{self.resize}/crop{self.image_size}/channels{self.channels}"

    # --- classes ---------------------------------------------------------------------------
    def _folder(self, split: str) -> Path:
        """The folder of `split`, which must exist (DataError otherwise)."""
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found; expected {self.LAYOUT}. Pass "
                            "data.root=<that folder>")
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; expected {self.LAYOUT}")
        return folder

    def _classes_in(self, folder: Path) -> list[str]:
        try:
            return find_classes(str(folder))[0]
        except FileNotFoundError:
            raise DataError(f"{folder}: no class folders in it; expected {self.LAYOUT}") from None

    def _read_class_names(self) -> list[str]:
        return self._classes_in(self._folder("train"))

    @property
    def class_names(self) -> list[str]:
        """The class folders' names, sorted (label k = the k-th); read on first access."""
        if self._class_names is None:
            self._class_names = self._read_class_names()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_classes(self, folder: Path) -> None:
        """`folder`'s class folders must be train's: else one DataError naming the difference."""
        have, want = set(self._classes_in(folder)), set(self.class_names)
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise DataError(
                f"{folder}: its class folders differ from the training split's (labels would not "
                f"match): missing {missing}, not in train {extra}. Give every split the same "
                "class folders")

    # --- sources ---------------------------------------------------------------------------
    def _image_folder(self, folder: Path) -> Dataset:
        try:
            return torchvision.datasets.ImageFolder(str(folder), loader=self.loader)
        except FileNotFoundError as e:  # no class folder, or a class folder without images
            raise DataError(f"{folder}: {e}; expected {self.LAYOUT}") from None

    def _load(self, split: str) -> Dataset:
        folder = self._folder(split)
        if split != "train":
            self._check_classes(folder)
        return self._image_folder(folder)

    def _train_source(self) -> Dataset:
        return self._load("train")

    def _val_source(self) -> Dataset | None:
        return self._load("val") if (self.root / "val").is_dir() else None

    def _test_source(self) -> Dataset:
        return self._load("test")


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet (ILSVRC 2012) through torchvision.datasets.ImageNet: see IMAGENET_LAYOUT.

    test = ImageNet's val split (50,000 images, in torchvision's order); val = the seeded
    `val_fraction` of train. eval: Resize(256) + CenterCrop(224) + ToTensor; train:
    RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor (`image_size`, `resize` change the
    224 and 256). class_names = the first human name of each wnid in label (sorted wnid) order,
    read from meta.bin and the class folders on first access. Nothing is downloaded; a missing
    or incomplete layout raises one DataError saying what is expected where.
    """

    DEFAULT_NAME, DEFAULT_MEAN, DEFAULT_STD = "imagenet", IMAGENET_MEAN, IMAGENET_STD
    LAYOUT = IMAGENET_LAYOUT

    def __init__(self, root: str = "data/imagenet", image_size: int = 224,
                 resize: int | None = None, **common):
        super().__init__(root=root, image_size=image_size, resize=resize, channels=3, **common)
        self.train_transform = tvt.Compose([tvt.RandomResizedCrop(self.image_size),
                                            tvt.RandomHorizontalFlip(), tvt.ToTensor()])
        self._wnids: list[str] | None = None

    def _default_name(self) -> str:
        return self.DEFAULT_NAME

    def _missing(self, e: Exception) -> DataError:
        return DataError(f"ImageNet not found or incomplete in {self.root}: expects "
                         f"{self.LAYOUT}. Pass data.root=<that folder>. torchvision said: {e}")

    def _read_class_names(self) -> list[str]:
        if not self.root.is_dir():
            raise self._missing(FileNotFoundError(f"no folder {self.root}"))
        try:
            if not (self.root / "meta.bin").is_file():  # torchvision writes it from the devkit
                torchvision.datasets.imagenet.parse_devkit_archive(str(self.root))
            wnid_to_names = torchvision.datasets.imagenet.load_meta_file(str(self.root))[0]
        except (RuntimeError, OSError) as e:
            raise self._missing(e) from None
        folders = [self.root / s for s in ("train", "val") if (self.root / s).is_dir()]
        if not folders:
            raise self._missing(FileNotFoundError(f"neither {self.root / 'train'} nor "
                                                  f"{self.root / 'val'} exists"))
        wnids = self._classes_in(folders[0])
        unknown = [w for w in wnids if w not in wnid_to_names]
        if unknown:
            raise DataError(f"{folders[0]}: class folders {unknown[:5]} are not wnids of "
                            f"{self.root / 'meta.bin'}; expected {self.LAYOUT}")
        self._wnids = wnids
        return [wnid_to_names[w][0] for w in wnids]

    def _load(self, split: str) -> Dataset:
        which = "train" if split == "train" else "val"  # test = ImageNet's val
        if self._class_names is None:  # checks meta.bin; label k = the k-th sorted wnid folder
            self._class_names = self._read_class_names()
        try:
            ds = torchvision.datasets.ImageNet(str(self.root), split=which, loader=self.loader)
        except RuntimeError as e:  # meta.bin, or the split's folder and archive, missing
            raise self._missing(e) from None
        except FileNotFoundError as e:  # no class folder, or a class folder without images
            raise DataError(f"{self.root / which}: {e}; expected {self.LAYOUT}") from None
        if ds.wnids != self._wnids:
            have, want = set(ds.wnids), set(self._wnids)
            raise DataError(f"{self.root / which}: its wnid folders differ from the other "
                            f"split's: missing {sorted(want - have)[:5]}, extra "
                            f"{sorted(have - want)[:5]}. Give train/ and val/ the same wnid "
                            "folders")
        return ds

    def _val_source(self) -> Dataset | None:
        return None  # always the seeded val_fraction of train
