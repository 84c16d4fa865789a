"""Folders of image files: any ImageFolder tree (root/{train,val,test}/<class>/<image>) and
ImageNet in torchvision's layout. Images are decoded lazily, one item at a time; files are listed
by `ListedFolder` (every type Pillow opens, links followed but no folder entered twice)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as tvt
from torchvision.datasets.folder import find_classes

from dsr_lightning.errors import ConfigError, DataError
from dsr_lightning.logs import get_logger

from .base import IMAGENET_MEAN, IMAGENET_STD, SmoothingDataModule, path_tag

log = get_logger(__name__)
FOLDER_LAYOUT = ("<root>/train/<class>/<image>, <root>/test/<class>/<image> and optionally "
                 "<root>/val/<class>/<image> (one sub-folder per class, the same class folders "
                 "in each; .png/.jpg/... files)")
IMAGENET_LAYOUT = ("<root>/meta.bin (or ILSVRC2012_devkit_t12.tar.gz, from which torchvision "
                   "writes it), <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, as "
                   "torchvision.datasets.ImageNet expects (nothing is downloaded)")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
NOTE_NAMES = 5  # files or links a note names (then the count of the others)


def image_extensions() -> frozenset[str]:
    """Every file suffix (lowercase, with the dot) Pillow has an opener for: its registered
    extensions whose format is in Image.OPEN (not the save-only ones, e.g. .pdf)."""
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


class ImageLoader:
    """path -> PIL image in `mode` ("RGB" or "L"). 16-bit images (modes I;16*, and 32-bit integer
    images whose values fit 16 bits) are scaled to 8 bits (round(v / 257)) first, where
    convert() would clip them to 255; float images, and integers beyond 16 bits, have no honest
    8-bit reading and raise one DataError saying to convert the file. A file that cannot be
    decoded raises one DataError naming it (picklable: DataLoader workers use it)."""

    def __init__(self, mode: str = "RGB"):
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as f:
                return _eight_bit(Image.open(f), path).convert(self.mode)  # decodes: errors here
        except DataError:
            raise
        except Exception as e:  # UnidentifiedImageError, truncated data, decompression bomb, ...
            raise DataError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e}). "
                            "Replace or remove the file") from None


def _eight_bit(img: Image.Image, path: str) -> Image.Image:
    """`img` with 8 bits per channel: 16-bit integer pixels v -> round(v / 257) (0 -> 0,
    65535 -> 255, as (v + 128) // 257 in integers); 8-bit modes unchanged."""
    if img.mode not in (*SIXTEEN_BIT, "I", "F"):
        return img
    a = np.asarray(img)  # decodes
    if img.mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise DataError(f"{path}: a 32-bit integer image with values {int(a.min())}..{int(a.max())}"
                        ", beyond 16 bits: no honest 8-bit reading. Convert it to 8 bits per "
                        "channel (e.g. a PNG or JPEG of 0..255 pixels)")
    if img.mode == "F":
        raise DataError(f"{path}: a floating-point image (mode F): its range is not known, so it "
                        "has no honest 8-bit reading. Convert it to 8 bits per channel (e.g. a "
                        "PNG or JPEG of 0..255 pixels)")
    return Image.fromarray(((a.astype(np.uint32) + 128) // 257).astype(np.uint8), "L")


def _few(names: list[str]) -> str:
    more = f" and {len(names) - NOTE_NAMES} more" if len(names) > NOTE_NAMES else ""
    return ", ".join(names[:NOTE_NAMES]) + more


class ListedFolder:
    """Mixin for torchvision's DatasetFolder family: lists the files itself (`make_dataset`, which
    DatasetFolder calls as a method), in ImageFolder's order (classes sorted, each class's
    (folder, files) sorted as os.walk's tuples), with ImageFolder's `samples`, `root`, `classes`.

    Differences, each told in one printed note per listed split: every type Pillow opens is an
    image, case-insensitively (`image_extensions`), where ImageFolder takes only its own list
    (no .jfif, .tga, .gif); any other file (README.txt, .DS_Store, Thumbs.db) is skipped; links
    are followed, but never into a folder already listed (a class folder, or one reached before)
    or into one holding the split folder (a loop, that os.walk(followlinks=True) would walk until
    the path is too long, listing the images again on every turn). A class folder without images
    raises FileNotFoundError, as ImageFolder does."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False) -> list[tuple[str, int]]:
        exts, top = image_extensions(), os.path.realpath(directory)
        classes = sorted(class_to_idx)
        seen = {(st.st_dev, st.st_ino) for st in (os.stat(os.path.join(directory, c))
                                                  for c in classes)}
        skipped, loops, samples, empty = [], [], [], []
        for c in classes:
            walked: list[tuple[str, list[str]]] = []
            _walk(os.path.join(directory, c), top, seen, walked, skipped, loops)
            found = []
            for root, files in sorted(walked):  # os.walk's tuples sorted, as ImageFolder does
                for f in sorted(files):
                    path = os.path.join(root, f)
                    (found if os.path.splitext(f)[1].lower() in exts else skipped).append(path)
            samples += [(path, class_to_idx[c]) for path in found]
            empty += [] if found else [c]
        skipped = [os.path.relpath(p, directory) for p in skipped]
        loops = [f"{os.path.relpath(link, directory)} -> {real}" for link, real in loops]
        if empty and not allow_empty:
            raise FileNotFoundError(
                f"no image files in the class folder(s) {', '.join(empty)}"
                + (f" (other files skipped: {_few(skipped)})" if skipped else ""))
        if skipped:
            log.info(f"data: {directory}: skipped {len(skipped)} file(s) that are not images "
                     f"Pillow opens: {_few(skipped)}")
        if loops:
            log.warning(f"data: {directory}: did not follow {len(loops)} link(s) to a folder "
                        f"already listed or holding this one (a loop): {_few(loops)}")
        return samples


def _walk(folder: str, top: str, seen: set, walked: list, odd: list, loops: list) -> None:
    """Depth first, links followed: (folder, its file names) into `walked` for `folder` and the
    folders below it not in `seen` (added as entered) and not holding `top` (real paths); the
    links not followed into `loops`, entries neither file nor folder (broken links) into `odd`."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot be listed ({e.strerror or e})") from None
    files = []
    for e in entries:
        if e.is_dir():  # follows links
            real = os.path.realpath(e.path)
            st = os.stat(real)
            if (st.st_dev, st.st_ino) in seen or os.path.commonpath([top, real]) == real:
                loops.append((e.path, real))
                continue
            seen.add((st.st_dev, st.st_ino))
            _walk(e.path, top, seen, walked, odd, loops)
        elif e.is_file():
            files.append(e.name)
        else:  # a broken link, a socket, ...
            odd.append(f"{e.path} (not a file: a broken link?)")
    walked.append((folder, files))


class ImageFolder(ListedFolder, torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, files listed by ListedFolder."""


class ImageNet(ListedFolder, torchvision.datasets.ImageNet):
    """torchvision's ImageNet, files listed by ListedFolder."""


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
    to round(image_size * 256 / 224) (torchvision's 256 -> 224). `name` defaults to
    `<root folder's name>-<hash of its real path>_<image_size>px` (data.base.path_tag), as
    conf/data/imagefolder.yaml names it. A missing folder, no class folders, an empty class
    folder or an image that cannot be decoded (when it is read) raise one DataError naming the
    path. Files are listed by `ListedFolder` (every image type Pillow opens; other files and
    link loops skipped, with a note).
    """

    LAYOUT = FOLDER_LAYOUT
    NEEDS = {"root": "the folder holding train/ and test/, one sub-folder per class in each"}

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
        return f"{path_tag(self.root)}_{self.image_size}px"

    def _where(self, split: str) -> str:
        return str(self.root / split)

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
            return ImageFolder(str(folder), loader=self.loader)
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

    def _where(self, split: str) -> str:
        return str(self.root / ("train" if split == "train" else "val"))

    def _missing(self, e: Exception) -> DataError:
        return DataError(f"ImageNet not found or incomplete in {self.root}: expects "
                         f"{self.LAYOUT}. Pass data.root=<that folder>. torchvision said: {e}")

    def _read_class_names(self) -> list[str]:
        if not self.root.is_dir():
            raise self._missing(FileNotFoundError(f"no folder {self.root}"))
        try:
            if not (self.root / "meta.bin").is_file():  # torchvision writes it from the devkit
                torchvision.datasets.imagenet.parse_devkit_archive(str(self.root))
        except (RuntimeError, OSError) as e:
            raise self._missing(e) from None
        wnid_to_names = self._read_meta()
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

    def _read_meta(self) -> dict[str, tuple[str, ...]]:
        """wnid -> names from meta.bin (torchvision's file: a torch-saved (wnid_to_names, val
        wnids) pair); a damaged file (random bytes, a truncated write) is one DataError saying
        how to have it written again."""
        meta = self.root / "meta.bin"
        try:
            wnid_to_names, val_wnids = torchvision.datasets.imagenet.load_meta_file(str(self.root))
            ok = isinstance(wnid_to_names, dict) and isinstance(val_wnids, list) and all(
                isinstance(v, tuple | list) and v and all(isinstance(n, str) for n in v)
                for v in wnid_to_names.values())
        except Exception as e:  # UnpicklingError, RuntimeError (a torn zip), EOFError, ...
            ok, why = False, f"{type(e).__name__} reading it"  # (torch's text: paragraphs of advice)
        else:
            why = "not torchvision's (wnid -> names, val wnids) pair"
        if not ok:
            devkit = self.root / "ILSVRC2012_devkit_t12.tar.gz"
            raise DataError(f"{meta}: damaged or not torchvision's ImageNet meta file ({why}). "
                            f"Delete it: torchvision writes it again from {devkit} (put the devkit "
                            "archive there if it is not)")
        return wnid_to_names

    def _load(self, split: str) -> Dataset:
        which = "train" if split == "train" else "val"  # test = ImageNet's val
        if self._class_names is None:  # checks meta.bin; label k = the k-th sorted wnid folder
            self._class_names = self._read_class_names()
        try:
            ds = ImageNet(str(self.root), split=which, loader=self.loader)
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
