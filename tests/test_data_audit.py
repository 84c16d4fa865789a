"""The data layer's audit: users' own files give correct images or one clear error (an `error:` line
and exit 2 through the CLI, nothing written), never a traceback or a silent wrong result. Each test
makes its files in their real formats (16-bit PNG and TIFF, JPEG as .jfif, TGA, GIF, npz, a fake
ImageNet layout, symlinks) under tmp_path."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from helpers import error_lines, make_image_folder, run_cli
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dsr_lightning.data import DataError, ImageFolderDataModule, ImageNetDataModule, NpzDataModule
from dsr_lightning.data.folder import ImageLoader
from dsr_lightning.errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    ResultsError,
    TrainingError,
)

# a 16-bit gray ramp: 0 .. 65535 in 32 steps, and what 8 bits make of it (round(v / 257))
RAMP = np.linspace(0, 65535, 32).round().astype(np.uint16)
RAMP8 = np.round(RAMP / 257).astype(np.uint8)


def _save(path, array, mode=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, fmt)


def _rgb(seed=0, size=(20, 16)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _cli_error(capsys) -> str:
    """The one `error:` line on stderr (asserting there is one and no traceback)."""
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err and "Caught" not in err, err[-3000:]
    return lines[0]


# --- 1. 16-bit images ----------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
def test_a_16_bit_png_loads_scaled_to_8_bits_not_white(tmp_path, channels):
    ramp = np.tile(RAMP, (32, 1))  # (32, 32) uint16: every row the ramp
    for split in ("train", "test"):
        _save(tmp_path / "d" / split / "gray" / "0.png", ramp)  # Pillow writes a 16-bit PNG
    assert Image.open(tmp_path / "d" / "test" / "gray" / "0.png").mode == "I;16"
    assert RAMP8[0] == 0 and RAMP8[-1] == 255 and len(set(RAMP8.tolist())) == 32
    dm = ImageFolderDataModule(root=str(tmp_path / "d"), image_size=32, resize=32,
                               channels=channels)
    x = dm.dataset("test")[0][0]  # (C, 32, 32) in [0, 1]: resize and crop at the image's size
    assert x.shape == (channels, 32, 32)
    want = torch.from_numpy(np.tile(RAMP8, (channels, 32, 1))).float()
    assert torch.equal((x * 255).round(), want)  # was 0 then 255 everywhere


def test_16_bit_tiff_32_bit_integers_and_float_images(tmp_path):
    ramp = np.tile(RAMP, (4, 1))
    load = ImageLoader("L")
    _save(tmp_path / "big_endian.tif", ramp.astype(">u2"))  # mode I;16B
    _save(tmp_path / "int32.tif", ramp.astype(np.int32))  # mode I, values within 16 bits
    for name in ("big_endian.tif", "int32.tif"):
        assert np.array_equal(np.asarray(load(str(tmp_path / name))), np.tile(RAMP8, (4, 1))), name
    _save(tmp_path / "float.tif", ramp.astype(np.float32) / 65535)  # mode F: range unknown
    _save(tmp_path / "wide.tif", ramp.astype(np.int32) * 4)  # beyond 16 bits
    for name, what in (("float.tif", "floating-point"), ("wide.tif", "beyond 16 bits")):
        with pytest.raises(DataError, match=what) as e:
            load(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and "Convert it to 8 bits" in str(e.value)


# --- 2. every image type Pillow opens; other files noted ---------------------------------------

def test_every_type_pillow_opens_is_an_image_and_other_files_are_noted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dsr_lightning")
    root = tmp_path / "d"
    for split in ("train", "test"):
        for k, c in enumerate(("cat", "dog")):
            folder = root / split / c
            _save(folder / "a.png", _rgb(k))
            _save(folder / "b.jfif", _rgb(k + 1), fmt="JPEG")
            _save(folder / "c.TGA", _rgb(k + 2))
            _save(folder / "d.gif", _rgb(k + 3))
            _save(folder / "e.JPG", _rgb(k + 4))
            if split == "train":
                (folder / "README.txt").write_text("where these came from")
                (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
                (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    dm = ImageFolderDataModule(root=str(root), image_size=16, val_fraction=0.0)
    train, test = dm.dataset("train"), dm.dataset("test")
    assert len(train) == len(test) == 10  # ImageFolder took 2 of the 5 types per class
    assert {os.path.splitext(p)[1] for p, _ in test.source.samples} == {
        ".png", ".jfif", ".TGA", ".gif", ".JPG"}
    assert all(train[i][0].shape == (3, 16, 16) for i in range(len(train)))
    notes = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(notes) == 1, notes  # one for train; test has nothing to skip
    assert str(root / "train") in notes[0] and "skipped 6 file(s)" in notes[0]
    for name in ("cat/README.txt", "cat/.DS_Store", "cat/Thumbs.db"):
        assert name in notes[0], notes[0]


# --- 3. symlink loops --------------------------------------------------------------------------

def test_a_link_loop_does_not_multiply_the_images(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dsr_lightning")
    root = make_image_folder(tmp_path / "d", train=3, test=2, size=(12, 12))

    def facts():
        dm = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.34)
        return ({s: len(dm.dataset(s)) for s in ("train", "val", "test")},
                {s: dm.fingerprint(s) for s in ("train", "val", "test")})

    before = facts()
    os.symlink("..", root / "train" / "cat" / "back")  # to train/: every class again, as cats
    caplog.clear()
    assert facts() == before  # counts and content fingerprints
    note = [r.getMessage() for r in caplog.records if "a loop" in r.getMessage()]
    caplog.clear()
    assert len(note) == 1 and "1 link(s)" in note[0] and "cat/back" in note[0], note
    os.symlink("../../..", root / "train" / "dog" / "up")  # to the root: test/ in train
    os.symlink("../owl", root / "train" / "dog" / "owls")  # another class's folder
    assert facts() == before
    note = [r.getMessage() for r in caplog.records if "a loop" in r.getMessage()]
    caplog.clear()
    assert len(note) == 1 and "3 link(s)" in note[0] and "dog/up" in note[0], note
    # a link to a folder elsewhere is still followed (once)
    outside = make_image_folder(tmp_path / "more", classes=("cat",), train=2, test=0)
    os.symlink(outside / "train" / "cat", root / "train" / "cat" / "more")
    dm = ImageFolderDataModule(root=str(root), image_size=8, val_fraction=0.34)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 3 * 3 + 2


# --- 4. names of exports ------------------------------------------------------------------------

def test_folders_of_one_name_get_their_own_names_and_export_paths(tiny_cfg, tmp_path, monkeypatch):
    a = make_image_folder(tmp_path / "x" / "pets", train=1, test=1)
    b = make_image_folder(tmp_path / "y" / "pets", train=1, test=1)

    def cfg(root):
        return tiny_cfg("stage=denoiser", "data=imagefolder", f"data.root={root}",
                        "pretrained_root=P")

    ca, cb = cfg(a), cfg(b)
    assert ca.data.name.startswith("pets-") and ca.data.name.endswith("_16px")
    assert ca.data.name != cb.data.name
    assert ca.denoiser.path != cb.denoiser.path and ca.classifier.path != cb.classifier.path
    assert f"/trained_denoisers/{ca.data.name}/" in ca.denoiser.path
    assert instantiate(ca.data).name == ca.data.name  # the module's own default agrees
    # one folder, one name: relative (against the working folder) or absolute, from anywhere
    monkeypatch.chdir(tmp_path / "x")
    assert cfg("pets").data.name == ca.data.name
    monkeypatch.chdir(tmp_path / "y")
    assert cfg("../x/pets").data.name == ca.data.name and cfg("pets").data.name == cb.data.name
    # npz files likewise: the stem and the hash of the file's path
    x = np.zeros((4, 8, 8, 1), np.uint8)
    for d in ("x", "y"):
        np.savez(tmp_path / d / "own.npz", x_train=x, y_train=np.arange(4) % 2, x_test=x,
                 y_test=np.arange(4) % 2)
    na, nb = (tiny_cfg("data=npz", f"data.path={tmp_path / d / 'own.npz'}", "~data.image_size")
              .data.name for d in ("x", "y"))
    assert na.startswith("own-") and nb.startswith("own-") and na != nb
    assert tiny_cfg("data=npz", "data.path=own.npz", "~data.image_size").data.name == nb
    assert NpzDataModule(path="own.npz").name == nb


# --- 5. unset keys; experiment=tiny with any data ----------------------------------------------

@pytest.mark.parametrize("argv, key", [
    (["train", "stage=denoiser", "experiment=tiny", "data=imagefolder"], "data.root"),
    (["certify", "system=plain", "experiment=tiny", "data=npz"], "data.path"),
], ids=["train_root", "certify_path"])
def test_an_unset_data_key_is_one_error_naming_it(tmp_path, monkeypatch, capsys, argv, key):
    rc = run_cli([*argv, f"hydra.run.dir={tmp_path / 'run'}", f"pretrained_root={tmp_path}/p",
                  *([f"outdir={tmp_path / 'res'}"] if argv[0] == "certify" else [])], monkeypatch)
    line = _cli_error(capsys)
    assert rc == 2 and f"error: {key} is not set: pass {key}=<" in line, line
    assert not (tmp_path / "res").exists() and not (tmp_path / "p").exists()


def test_experiment_tiny_with_own_data(tiny_cfg, tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "folder", train=2, test=1)
    dm = instantiate(tiny_cfg("data=imagefolder", f"data.root={root}").data)
    assert dm.image_shape() == (3, 16, 16)  # experiment=tiny's image size is the folder's
    x = np.zeros((4, 20, 20, 1), np.uint8)
    np.savez(tmp_path / "own.npz", x_train=x, y_train=np.arange(4) % 2, x_test=x,
             y_test=np.arange(4) % 2)
    # npz images are used at their stored size: the experiment's data.image_size is one error
    # naming the key and how to drop it, and without it the combination works
    rc = run_cli(["train", "stage=denoiser", "experiment=tiny", "data=npz",
                  f"data.path={tmp_path / 'own.npz'}", f"hydra.run.dir={tmp_path / 'run'}",
                  f"pretrained_root={tmp_path}/p"], monkeypatch)
    line = _cli_error(capsys)
    assert rc == 2 and "data.image_size=16 is not a setting of NpzDataModule" in line, line
    assert "add ~data.image_size to the command line" in line
    dm = instantiate(tiny_cfg("data=npz", f"data.path={tmp_path / 'own.npz'}",
                              "~data.image_size").data)
    assert dm.image_shape() == (1, 20, 20)
    with pytest.raises(ConfigError, match="data.imgsize=8 is not a setting of ImageFolder"):
        ImageFolderDataModule(root=str(root), imgsize=8)  # a misspelt key, likewise


# --- 6. an empty training split ------------------------------------------------------------------

def test_an_empty_training_split_is_one_error_before_training(tmp_path, monkeypatch, capsys):
    x = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "none.npz", x_train=x[:0], y_train=np.zeros(0, np.int64), x_test=x,
             y_test=np.arange(3) % 2)
    dm = NpzDataModule(path=str(tmp_path / "none.npz"))
    with pytest.raises(DataError, match="split=train .* holds no images") as e:
        dm.dataset("train")
    assert f"{tmp_path / 'none.npz'}: x_train" in str(e.value)
    assert len(dm.dataset("test")) == 3  # the test split alone can still be certified
    np.savez(tmp_path / "one.npz", x_train=x[:1], y_train=np.zeros(1, np.int64), x_test=x,
             y_test=np.arange(3) % 2)
    with pytest.raises(DataError, match="data.val_fraction=0.9 holds all 1 out for validation"):
        NpzDataModule(path=str(tmp_path / "one.npz"), val_fraction=0.9).dataset("train")
    # class folders in train/ with no image in them: what was found instead is named
    root = make_image_folder(tmp_path / "d", train=0, test=1)
    for c in ("cat", "dog", "owl"):
        (root / "train" / c / "notes.txt").write_text("to do: add images")
    with pytest.raises(DataError, match="no image files in the class folder") as e:
        ImageFolderDataModule(root=str(root), image_size=16).dataset("train")
    assert str(root / "train") in str(e.value) and "cat/notes.txt" in str(e.value)
    # through train.py: one error line, exit 2, before any training
    rc = run_cli(["train", "stage=denoiser", "experiment=tiny", "data=npz",
                  f"data.path={tmp_path / 'none.npz'}", "~data.image_size",
                  f"hydra.run.dir={tmp_path / 'run'}", f"pretrained_root={tmp_path}/p"],
                 monkeypatch)
    line = _cli_error(capsys)
    assert rc == 2 and "split=train" in line and "x_train" in line, line
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "p").exists()


# --- 7. a damaged ImageNet meta.bin -------------------------------------------------------------

@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_damaged_imagenet_meta_bin_says_how_to_regenerate_it(tmp_path, damage):
    root = tmp_path / "imagenet"
    wnids = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish",)}
    for split in ("train", "val"):
        for k, w in enumerate(wnids):
            _save(root / split / w / f"{w}_0.JPEG", _rgb(k), fmt="JPEG")
    torch.save((wnids, sorted(wnids)), root / "meta.bin")
    assert ImageNetDataModule(root=str(root)).class_names == ["tench", "goldfish"]
    good = (root / "meta.bin").read_bytes()
    (root / "meta.bin").write_bytes(os.urandom(400) if damage == "random" else good[:len(good) // 2])
    with pytest.raises(DataError) as e:
        ImageNetDataModule(root=str(root)).dataset("test")
    msg = str(e.value)
    assert msg.startswith(f"{root / 'meta.bin'}: damaged") and "Delete it" in msg, msg
    assert str(root / "ILSVRC2012_devkit_t12.tar.gz") in msg and "\n" not in msg


# --- 8. errors raised in DataLoader workers -----------------------------------------------------

class _Raises(Dataset):
    def __init__(self, cls):
        self.cls = cls

    def __len__(self):
        return 2

    def __getitem__(self, i):
        try:
            raise OSError("the cause")
        except OSError as e:
            raise self.cls("one: clear message") from e


@pytest.mark.parametrize("cls", [ConfigError, CheckpointError, DataError, ResultsError,
                                 TrainingError, Interrupted])
def test_an_error_from_a_worker_keeps_its_one_message(cls):
    with pytest.raises(cls) as e:
        next(iter(DataLoader(_Raises(cls), num_workers=1)))
    assert str(e.value) == "one: clear message"


def test_a_corrupt_image_read_by_a_worker_is_our_one_line(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "d", train=4, test=2)
    for p in (root / "train").rglob("*.png"):
        p.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    rc = run_cli(["train", "stage=denoiser", "experiment=tiny", "data=imagefolder",
                  f"data.root={root}", "data.num_workers=1", f"hydra.run.dir={tmp_path / 'run'}",
                  f"pretrained_root={tmp_path}/p"], monkeypatch)
    line = _cli_error(capsys)
    assert rc == 2, line
    path = line.removeprefix("error: ").split(": cannot be decoded")[0]
    with pytest.raises(DataError) as e:
        ImageLoader("RGB")(path)  # the message the worker raised
    assert line == f"error: {e.value}"


# --- 9. certification checks every image before writing -----------------------------------------

def test_certify_names_every_undecodable_image_before_writing(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "d", train=2, test=2)
    bad = [root / "test" / "cat" / "1.png", root / "test" / "owl" / "0.png"]
    keep = {p: p.read_bytes() for p in bad}
    for p in bad:
        p.write_bytes(b"GIF89a broken")
    res = tmp_path / "res"
    argv = ["certify", "experiment=tiny", "system=denoised", "data=imagefolder",
            f"data.root={root}", "classifier=module", "classifier.net._target_=helpers.MemoryBoundNet",
            "classifier.mean=[0.5,0.5,0.5]", "classifier.std=[0.25,0.25,0.25]", "denoiser=module",
            "denoiser.net._target_=torch.nn.Identity", "sigma=0.25", "N0=10", "N=50", "max=6",
            f"outdir={res}", f"hydra.run.dir={tmp_path / 'run'}", f"pretrained_root={tmp_path}/p"]
    rc = run_cli(argv, monkeypatch)
    line = _cli_error(capsys)
    assert rc == 2 and "2 of the 6 images of split=test" in line, line
    assert all(str(p) in line for p in bad), line
    assert not res.exists() or not list(res.iterdir())  # no results file was started
    for p, content in keep.items():  # replaced: the run certifies them all
        p.write_bytes(content)
    assert run_cli(argv, monkeypatch) == 0, capsys.readouterr().err[-3000:]
    (tsv,) = res.glob("*.tsv")
    assert len(tsv.read_text().splitlines()) == 1 + 6
