"""Data sources for user data: image folders, any npz, ImageNet's layout; the attributes the jobs
read (name, classes, normalisation, image shape); the streaming fingerprint (unchanged values
for the existing modules, bounded memory, content-sensitive for folders)."""

from __future__ import annotations

import hashlib
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from dsr_lightning.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    CIFAR10DataModule,
    CIFAR10SubsetDataModule,
    DataError,
    ImageFolderDataModule,
    ImageNetDataModule,
    NpzDataModule,
    SmoothingDataModule,
    SyntheticDataModule,
    TransformedSubset,
)
from dsr_lightning.data.base import path_tag
from dsr_lightning.errors import ConfigError

CLASSES = ["cat", "dog", "eel"]


def _png(path, size=(40, 30), seed=0, mode="RGB"):
    """A random-pixel image file (PIL picks the format from the suffix)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _folder_tree(root, per_class=None, classes=CLASSES, size=(40, 30)):
    """root/<split>/<class>/<i>.png; per_class: {split: images per class}."""
    per_class = per_class or {"train": 4, "test": 2}
    seed = 0
    for split, n in per_class.items():
        for c in classes:
            for i in range(n):
                seed += 1
                _png(root / split / c / f"{i}.png", size, seed)
    return root


# --- image folders -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48])
def test_imagefolder_shapes_classes_and_splits(tmp_path, size):
    root = _folder_tree(tmp_path / "pets")
    dm = ImageFolderDataModule(root=str(root), image_size=size, val_fraction=0.25, batch_size=5)
    assert dm.name == f"{path_tag(root)}_{size}px" and dm.name.startswith("pets-")
    assert dm.mean is None and dm.std is None
    assert dm.class_names == CLASSES and dm.num_classes == 3
    assert dm.resize == round(size * 256 / 224)
    assert dm.image_shape("test") == (3, size, size) == dm.image_shape("train")
    train, val, test = (dm.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (9, 3, 6)
    # val: the seeded quarter of train, disjoint from it; test: folder order, labels by class
    assert set(val.indices.tolist()).isdisjoint(train.indices.tolist())
    assert [test[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert test.source.samples[2][0].endswith("dog/0.png")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 3, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(test[0][0], test[0][0])  # eval: no randomness
    assert (ImageFolderDataModule(root=str(root), image_size=size, seed=1).dataset("val").indices
            .tolist() != val.indices.tolist() or len(val) == 0)


def test_imagefolder_val_folder_grayscale_and_overrides(tmp_path):
    root = _folder_tree(tmp_path / "d", {"train": 3, "val": 1, "test": 1})
    dm = ImageFolderDataModule(root=str(root), image_size=16, channels=1, val_fraction=0.5,
                               name="mine", mean=[0.5], std=[0.25])
    assert (dm.name, dm.mean, dm.std) == ("mine", (0.5,), (0.25,))
    val, train = dm.dataset("val"), dm.dataset("train")
    assert len(val) == 3 and len(train) == 9  # val/ used whole; val_fraction unused
    assert [val[i][1] for i in range(3)] == [0, 1, 2]
    assert val.source.root.endswith("val") and train.indices is None
    assert dm.image_shape("val") == (1, 16, 16) == dm.image_shape("train")


def test_imagefolder_mismatched_classes_refused(tmp_path):
    root = _folder_tree(tmp_path / "d")
    shutil.rmtree(root / "test" / "eel")
    _png(root / "test" / "fox" / "0.png")
    dm = ImageFolderDataModule(root=str(root), image_size=16)
    with pytest.raises(DataError, match=r"missing \['eel'\], not in train \['fox'\]") as e:
        dm.dataset("test")
    assert str(root / "test") in str(e.value)


def test_imagefolder_corrupt_image_named(tmp_path):
    root = _folder_tree(tmp_path / "d")
    bad = root / "test" / "cat" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    dm = ImageFolderDataModule(root=str(root), image_size=16)
    test = dm.dataset("test")
    assert test[2][0].shape == (3, 16, 16)  # the others read
    with pytest.raises(DataError, match="cannot be decoded as an image") as e:
        test[0]
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="cannot be decoded") as e:  # through a loader, too
        next(iter(dm.test_dataloader()))
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("what", ["root", "train", "test", "no_classes", "empty_class"])
def test_imagefolder_bad_layout_names_path_and_layout(tmp_path, what):
    root = _folder_tree(tmp_path / "d")
    where = {"root": root, "train": root / "train", "test": root / "test",
             "no_classes": root / "test", "empty_class": root / "test"}[what]
    if what in ("root", "train", "test"):
        shutil.rmtree(where)
    elif what == "no_classes":
        shutil.rmtree(where)
        where.mkdir()
    else:
        for p in (where / "dog").iterdir():
            p.unlink()
    dm = ImageFolderDataModule(root=str(root), image_size=16)
    with pytest.raises(DataError) as e:
        dm.dataset("test")
    msg = str(e.value)
    assert str(where) in msg and "<root>/train/<class>/<image>" in msg, msg


def test_imagefolder_bad_settings():
    for kw in (dict(image_size=0), dict(image_size=32, resize=16), dict(channels=2)):
        with pytest.raises(ConfigError):
            ImageFolderDataModule(root="x", **kw)
    with pytest.raises(ConfigError, match="mean has 3 values, data.std 1"):
        ImageFolderDataModule(root="x", mean=[0.1, 0.2, 0.3], std=[0.2])


# --- npz -------------------------------------------------------------------------------------------

def _npz(tmp_path, name="gray", **over):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (30, 20, 20, 1), dtype=np.uint8),
                  y_train=np.arange(30) % 5,
                  x_test=rng.integers(0, 256, (7, 20, 20, 1), dtype=np.uint8),
                  y_test=np.arange(7) % 4)
    arrays.update(over)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path, arrays


def test_npz_grayscale_five_classes(tmp_path):
    path, arrays = _npz(tmp_path)
    dm = NpzDataModule(path=str(path), val_fraction=0.2, batch_size=4)
    assert dm.name == path_tag(path, stem=True) and dm.name.startswith("gray-") and dm.mean is None
    assert dm.num_classes == 5 and dm.class_names == [f"class{k}" for k in range(5)]
    assert dm.image_shape() == (1, 20, 20)
    assert (len(dm.dataset("train")), len(dm.dataset("val")), len(dm.dataset("test"))) == (24, 6, 7)
    x3, y3 = dm.dataset("test")[3]
    assert y3 == 3 and torch.equal(x3, torch.from_numpy(arrays["x_test"][3]).permute(2, 0, 1) / 255)
    train = dm.dataset("train")
    torch.manual_seed(0)
    j = int(train.indices[0])
    plain = torch.from_numpy(arrays["x_train"][j]).permute(2, 0, 1) / 255
    draws = [train[0][0] for _ in range(10)]
    assert all(d.shape == (1, 20, 20) for d in draws)
    assert any(not torch.equal(d, plain) for d in draws)  # augmented
    no_aug = NpzDataModule(path=str(path), augment=False).dataset("train")
    assert torch.equal(no_aug[0][0], torch.from_numpy(
        arrays["x_train"][int(no_aug.indices[0])]).permute(2, 0, 1) / 255)


def test_npz_own_val_class_names_and_num_classes(tmp_path):
    rng = np.random.default_rng(1)
    names = np.array(["a", "b", "c", "d", "e", "f"])
    path, _ = _npz(tmp_path, "rgb", x_train=rng.integers(0, 256, (8, 12, 16, 3), dtype=np.uint8),
                   y_train=np.arange(8) % 5, x_test=np.zeros((2, 12, 16, 3), np.uint8),
                   y_test=np.zeros(2, np.int32), x_val=np.zeros((3, 12, 16, 3), np.uint8),
                   y_val=np.array([5, 0, 1]), class_names=names)
    dm = NpzDataModule(path=str(path))
    assert dm.class_names == list(names) and dm.num_classes == 6
    assert len(dm.dataset("val")) == 3 and len(dm.dataset("train")) == 8
    assert dm.dataset("val")[0][1] == 5 and dm.image_shape("train") == (3, 12, 16)
    assert NpzDataModule(path=str(_npz(tmp_path, "k")[0]), num_classes=9).num_classes == 9


@pytest.mark.parametrize("over, what", [
    (dict(x_test=np.zeros((2, 20, 20, 3), np.uint8)), "x_test images are"),
    (dict(x_train=np.zeros((2, 20, 20, 2), np.uint8)), "x_train must be"),
    (dict(x_train=np.zeros((30, 20, 20), np.uint8)), "x_train must be"),
    (dict(y_test=np.array([0, 1, 2, 3, 4, 5, 9])), r"y_test labels must be in 0..4, got 0..9 "
                                                   r"\(K = 5 from class_names"),
    (dict(y_train=-np.ones(30, np.int64)), "y_train labels must be >= 0"),
    (dict(x_val=np.zeros((1, 20, 20, 1), np.uint8)), "has x_val but not y_val"),
    (dict(class_names=np.array(["a", None], dtype=object)), "array class_names holds Python"),
    (dict(class_names=np.array([[1, 2]])), "class_names must be a 1-D str array"),
])
def test_npz_violations_name_file_and_array(tmp_path, over, what):
    if "y_test" in over:
        over["class_names"] = np.array(list("abcde"))
    path, _ = _npz(tmp_path, **over)
    with pytest.raises(DataError, match=what) as e:
        NpzDataModule(path=str(path)).dataset("test")
    assert str(path) in str(e.value)


def test_npz_num_classes_disagrees_with_names(tmp_path):
    path, _ = _npz(tmp_path, class_names=np.array(list("abcde")))
    with pytest.raises(DataError, match="class_names holds 5 names but num_classes is 7"):
        _ = NpzDataModule(path=str(path), num_classes=7).num_classes
    with pytest.raises(DataError, match="sha256"):
        NpzDataModule(path=str(path), sha256="0" * 64).dataset("test")


# --- ImageNet's layout -------------------------------------------------------------------------

WNIDS = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus"),
         "n01484850": ("great white shark", "white shark")}


def _imagenet(root, n_train=4, n_val=2):
    root.mkdir(parents=True)
    torch.save((WNIDS, sorted(WNIDS) * n_val), root / "meta.bin")  # torchvision's meta.bin
    seed = 100
    for split, n in (("train", n_train), ("val", n_val)):
        for w in WNIDS:
            for i in range(n):
                seed += 1
                _png(root / split / w / f"{w}_{i}.JPEG", (24, 20), seed)
    return root


def test_imagenet_layout_loads_with_224_crops(tmp_path):
    root = _imagenet(tmp_path / "imagenet")
    dm = ImageNetDataModule(root=str(root), val_fraction=0.25)
    assert dm.name == "imagenet" and dm.mean == IMAGENET_MEAN
    assert dm.class_names == ["tench", "goldfish", "great white shark"] and dm.num_classes == 3
    test, val, train = dm.dataset("test"), dm.dataset("val"), dm.dataset("train")
    assert (len(test), len(val), len(train)) == (6, 3, 9)  # test = ImageNet's val folder
    assert dm.image_shape("test") == (3, 224, 224) == tuple(train[0][0].shape)
    assert [test[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert test.source.samples[0][0].startswith(str(root / "val"))


def test_imagenet_missing_layout_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="meta.bin") as e:
        ImageNetDataModule(root=str(tmp_path / "none")).dataset("test")
    assert str(tmp_path / "none") in str(e.value) and "nothing is downloaded" in str(e.value)
    root = _imagenet(tmp_path / "i")
    (root / "meta.bin").unlink()
    with pytest.raises(DataError, match="ILSVRC2012_devkit_t12.tar.gz"):
        _ = ImageNetDataModule(root=str(root)).class_names
    root = _imagenet(tmp_path / "j")
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="ILSVRC2012_img_val.tar"):
        ImageNetDataModule(root=str(root)).dataset("test")


# --- names, classes and normalisation of the existing modules ----------------------------------

def test_existing_modules_attributes():
    sub = CIFAR10SubsetDataModule()
    full = CIFAR10DataModule(root="nowhere")
    for dm in (sub, full):
        assert (dm.name, dm.num_classes, dm.class_names) == ("cifar10", 10, CIFAR10_CLASSES)
        assert (dm.mean, dm.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert sub.image_shape() == (3, 32, 32)
    syn = SyntheticDataModule(num_classes=4, image_size=8, channels=1, name="toy")
    assert (syn.name, syn.mean, syn.num_classes) == ("toy", None, 4)
    assert SyntheticDataModule().name == "synthetic"
    assert syn.image_shape("val") == (1, 8, 8)
    assert CIFAR10SubsetDataModule(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)


def test_yamls_compose_and_instantiate(tiny_cfg, tmp_path):
    root = _folder_tree(tmp_path / "pets")
    path, _ = _npz(tmp_path)
    inet = _imagenet(tmp_path / "inet")
    for opts, want in ((["data=imagefolder", f"data.root={root}", "data.image_size=32"],
                        (ImageFolderDataModule, f"{path_tag(root)}_32px", (3, 32, 32))),
                       (["data=npz", f"data.path={path}"],
                        (NpzDataModule, path_tag(path, stem=True), (1, 20, 20))),
                       (["data=imagenet", f"data.root={inet}"],
                        (ImageNetDataModule, "imagenet", (3, 224, 224)))):
        cfg = tiny_cfg(*opts, "sigma=0.5", experiment=None)
        dm = instantiate(cfg.data)
        assert isinstance(dm, want[0]) and (dm.name, dm.image_shape()) == want[1:]
        assert dm.sigma == 0.5
    assert tiny_cfg("data=imagenet", experiment=None).data.val_fraction == 0.01


# --- the fingerprint ---------------------------------------------------------------------------

def _old_fingerprint(dm: SmoothingDataModule, split: str) -> str:
    """The first release's algorithm, verbatim in effect: whole arrays stacked and copied."""
    def raw_arrays(source):
        if isinstance(source, TensorDataset):
            return [t.numpy() for t in source.tensors]
        if hasattr(source, "data") and hasattr(source, "targets"):
            return [np.asarray(source.data), np.asarray(source.targets)]
        items = [source[i] for i in range(len(source))]
        return [np.stack([np.asarray(x) for x, _ in items]),
                np.asarray([int(y) for _, y in items])]

    ds = dm.dataset(split)
    h = hashlib.sha256(f"{type(dm).__name__}/{split}".encode())
    for arr in raw_arrays(ds.source if isinstance(ds, TransformedSubset) else ds):
        h.update(str((arr.dtype, arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    if isinstance(ds, TransformedSubset) and ds.indices is not None:
        h.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
    return h.hexdigest()


class _DataTargets:
    """A torchvision-like source: .data (N, H, W, C) uint8 (not C-contiguous), .targets list."""

    def __init__(self, n):
        self.data = np.random.default_rng(n).integers(0, 256, (n, 6, 5, 3), np.uint8)[:, ::-1]
        self.targets = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.targets)


class _Items(Dataset):
    def __len__(self):
        return 11

    def __getitem__(self, i):
        return torch.full((2, 3, 3), float(i)), i % 2


class _Sources(SmoothingDataModule):
    num_classes, class_names = 3, ["a", "b", "c"]

    def __init__(self, kind, **common):
        super().__init__(**common)
        self.kind = kind

    def _train_source(self):
        return _DataTargets(40) if self.kind == "data" else _Items()

    def _test_source(self):
        return _DataTargets(9) if self.kind == "data" else _Items()


def test_fingerprint_of_existing_modules_unchanged():
    small = CIFAR10SubsetDataModule(val_fraction=0.3, seed=2)
    for dm in (small, SyntheticDataModule(seed=1), _Sources("data"), _Sources("items")):
        for split in ("train", "val", "test"):
            assert dm.fingerprint(split) == _old_fingerprint(dm, split), (type(dm), split)
    assert len({small.fingerprint(s) for s in ("train", "val", "test")}) == 3


def _peak_memory(fn) -> int:
    """The peak of Python-allocated bytes while fn() runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fingerprint_streams_in_bounded_memory(tmp_path):
    # in-memory arrays: views in chunks, never a copy of the 14 MB training images
    sub = CIFAR10SubsetDataModule()
    sub.dataset("train")
    peak = _peak_memory(lambda: sub.fingerprint("train"))
    assert peak < 1 << 20, peak
    # a folder: file by file, never reading whole files or decoding and stacking the images
    # (200 files, 2.4 MB; the images at image_size 32 as floats: 2.4 MB)
    root = tmp_path / "many"
    for i in range(200):
        _png(root / "test" / CLASSES[i % 3] / f"{i}.png", (64, 64), i)
    _folder_tree(root, {"train": 1})
    dm = ImageFolderDataModule(root=str(root), image_size=32)
    dm.dataset("test")
    peak = _peak_memory(lambda: dm.fingerprint("test"))
    files = sum(p.stat().st_size for p in (root / "test").rglob("*.png"))
    assert files > 2 << 20 and peak < 600 << 10, (files, peak)


def test_folder_fingerprint_follows_content(tmp_path):
    a = _folder_tree(tmp_path / "a", {"train": 3, "test": 2})
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)

    def fps(root, **kw):
        dm = ImageFolderDataModule(root=str(root), **{"image_size": 16, "val_fraction": 0.34,
                                                      **kw})
        return {s: dm.fingerprint(s) for s in ("train", "val", "test")}

    fa = fps(a)
    assert fps(b) == fa and len(set(fa.values())) == 3  # identical copies, wherever they are
    assert fps(a, seed=5)["val"] != fa["val"] and fps(a, seed=5)["test"] == fa["test"]
    assert fps(a, image_size=24)["test"] != fa["test"]  # another resize is another data set
    _png(b / "test" / "dog" / "1.png", (40, 30), seed=999)  # one image changes
    fb = fps(b)
    assert fb["test"] != fa["test"] and fb["train"] == fa["train"]
    shutil.copytree(a, tmp_path / "c")
    (tmp_path / "c" / "test" / "dog" / "1.png").rename(tmp_path / "c" / "test" / "eel" / "9.png")
    assert fps(tmp_path / "c")["test"] != fa["test"]  # same bytes, another label
