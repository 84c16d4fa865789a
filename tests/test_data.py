"""Data modules: shapes, ranges, splits, augmentation, file validation, and the on-device noise."""

import hashlib
import pickle
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from torchvision.transforms import ToTensor

from dsr_lightning.data import (
    CIFAR10_CLASSES,
    SUBSET_PATH,
    SUBSET_SHA256,
    CIFAR10DataModule,
    CIFAR10SubsetDataModule,
    DataError,
    SyntheticDataModule,
)
from dsr_lightning.data.cifar10 import ToFloat

# --- full CIFAR-10 through torchvision, on a fake python release ----------------------------

N_PER_BATCH = 5


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A tiny CIFAR-10 in the python-release layout (5 images per batch file).

    torchvision's CIFAR10 (download=False) md5-checks every file against the official release.
    The fake files cannot match, so the test points the md5 table (class attributes) at the
    fake files' own md5s: the real loader and its real integrity check still run, unmodified.
    """
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    # The release was pickled by Python 2 with str keys; torchvision reads it with
    # encoding="latin1", which gives str keys, so str keys are the faithful py3 equivalent.
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (N_PER_BATCH, 3072), dtype=np.uint8)  # (N, 3*32*32) CHW
        labels = rng.integers(0, 10, N_PER_BATCH).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{name}_{i}.png" for i in range(N_PER_BATCH)]}, f, 2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": N_PER_BATCH,
                     "num_vis": 3072}, f, 2)

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    C = torchvision.datasets.CIFAR10
    monkeypatch.setattr(C, "train_list", [[n, md5(n)] for n, _ in C.train_list])
    monkeypatch.setattr(C, "test_list", [[n, md5(n)] for n, _ in C.test_list])
    monkeypatch.setattr(C, "meta", {**C.meta, "md5": md5("batches.meta")})
    return tmp_path, batches


def _chw(row):  # (3072,) uint8 -> (3, 32, 32) float in [0,1], the ToTensor result
    return torch.from_numpy(row.reshape(3, 32, 32)).float().div(255)


def test_cifar10_splits_shapes_and_order(fake_cifar):
    root, batches = fake_cifar
    dm = CIFAR10DataModule(root=root, batch_size=4, val_fraction=0.2, seed=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 5, 5)
    assert dm.num_classes == 10 and dm.class_names == CIFAR10_CLASSES
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    # test index i = test_batch image i, untransformed
    data, labels = batches["test_batch"]
    test = dm.dataset("test")
    for i in range(N_PER_BATCH):
        xi, yi = test[i]
        assert yi == labels[i] and torch.equal(xi, _chw(data[i]))
    # val and train are disjoint and together the whole training split
    assert set(dm.val_set.indices.tolist()).isdisjoint(dm.train_set.indices.tolist())
    assert sorted(dm.val_set.indices.tolist() + dm.train_set.indices.tolist()) == list(range(25))


def test_cifar10_val_plain_train_augmented(fake_cifar):
    root, batches = fake_cifar
    dm = CIFAR10DataModule(root=root, val_fraction=0.2)
    all_train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    val, train = dm.dataset("val"), dm.dataset("train")
    j = int(val.indices[0])
    assert torch.equal(val[0][0], val[0][0]) and torch.equal(val[0][0], _chw(all_train[j]))
    torch.manual_seed(0)
    k = int(train.indices[0])
    draws = [train[0][0] for _ in range(10)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(d, _chw(all_train[k])) for d in draws)


def test_cifar10_missing_gives_one_clear_error(tmp_path):
    dm = CIFAR10DataModule(root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="data.download=true") as e:
        dm.setup()
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(e.value)
    assert "data.root=" in str(e.value)


# --- the embedded subset ---------------------------------------------------------------------

def test_subset_sizes_labels_and_pixels():
    ref = np.load(SUBSET_PATH)
    dm = CIFAR10SubsetDataModule(batch_size=16)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 4660 and len(dm.val_set) == 466
    assert len(dm.test_set) == 932
    x0, y0 = dm.dataset("test")[0]
    assert y0 == ref["y_test"][0]
    assert torch.equal(x0, torch.from_numpy(ref["x_test"][0]).permute(2, 0, 1).float() / 255)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(ref["y_test"][:16]))
    assert 0 <= x.min() and x.max() <= 1


def test_subset_val_plain_train_augmented():
    dm = CIFAR10SubsetDataModule()
    val, train = dm.dataset("val"), dm.dataset("train")
    assert torch.equal(val[3][0], val[3][0])
    torch.manual_seed(0)
    assert any(not torch.equal(train[3][0], dm.eval_transform(dm.train_set.source[
        int(train.indices[3])][0])) for _ in range(10))


def test_split_is_seeded():
    a = CIFAR10SubsetDataModule(seed=0).dataset("val").indices
    b = CIFAR10SubsetDataModule(seed=0).dataset("val").indices
    c = CIFAR10SubsetDataModule(seed=1).dataset("val").indices
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_subset_sha256_matches_readme():
    readme = (SUBSET_PATH.parent / "README.md").read_text()
    assert re.search(r"sha256: ([0-9a-f]{64})", readme).group(1) == SUBSET_SHA256


def test_to_float_matches_totensor():
    """Subset pixels convert exactly like torchvision's ToTensor (results line up with full set)."""
    a = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert torch.equal(ToFloat()(torch.from_numpy(a).permute(2, 0, 1)), ToTensor()(
        Image.fromarray(a)))


def _bad_npz(tmp_path, **over):
    arrays = dict(x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.zeros(4, np.int64),
                  x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.zeros(2, np.int64))
    arrays.update(over)
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize("over, what", [
    (dict(x_train=np.zeros((4, 3, 32, 32), np.uint8)), "x_train must be"),
    (dict(x_test=np.zeros((2, 32, 32, 3), np.float32)), "x_test must be"),
    (dict(y_train=np.zeros(5, np.int64)), "y_train must be"),
    (dict(y_test=np.zeros(2, np.float32)), "y_test must be"),
    (dict(y_test=np.array([0, 10])), "labels must be in 0..9"),
    (dict(y_train=None), "missing arrays"),
])
def test_subset_malformed_file(tmp_path, over, what):
    path = _bad_npz(tmp_path, **over)
    with pytest.raises(DataError, match=what) as e:
        CIFAR10SubsetDataModule(path=str(path)).setup()
    assert str(path) in str(e.value)


def test_subset_valid_custom_file(tmp_path):
    dm = CIFAR10SubsetDataModule(path=str(_bad_npz(tmp_path)), val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3, 1, 2)


@pytest.mark.parametrize("content", [b"junk" * 100, b"", "npy", "truncated"])
def test_subset_unreadable_file(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content == "npy":
        np.save(tmp_path / "arr.npy", np.zeros(3))
        (tmp_path / "arr.npy").rename(path)
    elif content == "truncated":
        path.write_bytes(SUBSET_PATH.read_bytes()[:100_000])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as e:
        CIFAR10SubsetDataModule(path=str(path)).setup()
    assert str(path) in str(e.value)


def test_subset_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        CIFAR10SubsetDataModule(path=str(tmp_path / "none.npz")).dataset("test")
    assert str(tmp_path / "none.npz") in str(e.value)


# --- noise -----------------------------------------------------------------------------------

def test_noise_shape_order_and_statistics():
    B, T, sigma = 8, 16, 0.5
    dm = SyntheticDataModule(sigma=sigma, T=T)
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 32, 32).contiguous()
    y = torch.arange(B)
    x0 = x.clone()
    out = dm.add_noise([x, y])  # no trainer attached: treated as training
    assert set(out) == {"x", "y", "noisy"}
    assert out["x"] is x and torch.equal(x, x0) and torch.equal(out["y"], y)
    noisy = out["noisy"]
    assert noisy.shape == (B * T, 3, 32, 32) and noisy.device == x.device
    # image-major: rows i*T .. i*T+T-1 are copies of image i (image i is the constant i)
    per_image = noisy.view(B, T, -1).mean(dim=(1, 2))
    assert torch.allclose(per_image, torch.arange(B, dtype=torch.float32), atol=0.02)
    eps = noisy - x.repeat_interleave(T, 0)
    assert abs(eps.std().item() - sigma) < 0.02 * sigma
    assert abs(eps.mean().item()) < 0.01
    assert eps.min() < -1 and eps.max() > 1  # unclipped (x + eps leaves [0,1] too)
    assert (out["noisy"] < 0).any() and (out["noisy"] > B).any()


def test_noise_fresh_and_dict_input():
    dm = SyntheticDataModule(sigma=0.25, T=2)
    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64)
    a, b = dm.add_noise({"x": x, "y": y})["noisy"], dm.on_after_batch_transfer((x, y), 0)["noisy"]
    assert a.shape == b.shape == (8, 3, 8, 8) and not torch.equal(a, b)


def test_sigma_zero_has_no_noisy_key():
    dm = SyntheticDataModule(sigma=0.0, T=4)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    out = dm.on_after_batch_transfer([x, y], 0)
    assert set(out) == {"x", "y"} and out["x"] is x


def test_bad_args():
    with pytest.raises(ValueError):
        SyntheticDataModule(sigma=-0.1)
    with pytest.raises(ValueError):
        SyntheticDataModule(T=0)
    with pytest.raises(ValueError):
        SyntheticDataModule(val_fraction=1.0)
    with pytest.raises(ValueError):
        SyntheticDataModule().dataset("validation")


class _BatchProbe(pl.LightningModule):
    """Asserts the batch form that each stage receives through the real Trainer hooks."""

    def __init__(self, B, T):
        super().__init__()
        self.lin, self.B, self.T, self.seen = torch.nn.Linear(3 * 32 * 32, 10), B, T, []

    def _check(self, batch, noisy):
        x, y = batch["x"], batch["y"]
        assert x.shape == (self.B, 3, 32, 32) and y.shape == (self.B,) and y.dtype == torch.int64
        assert ("noisy" in batch) == noisy
        if noisy:
            assert batch["noisy"].shape == (self.B * self.T, 3, 32, 32)
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def training_step(self, batch, i):
        self.seen.append("train")
        return self._check(batch, noisy=True)

    def validation_step(self, batch, i):
        self.seen.append("sanity" if self.trainer.sanity_checking else "val")
        self._check(batch, noisy=True)

    def test_step(self, batch, i):
        self.seen.append("test")
        self._check(batch, noisy=False)

    def predict_step(self, batch, i):
        self.seen.append("predict")
        self._check(batch, noisy=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hook_through_trainer():
    dm = SyntheticDataModule(num_train=16, num_val=8, num_test=8, batch_size=4, sigma=0.5, T=3)
    model = _BatchProbe(B=4, T=3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=1, num_sanity_val_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    assert model.seen == ["sanity", "train", "train", "val", "test", "test", "predict", "predict"]


# --- synthetic -------------------------------------------------------------------------------

def _tensors(ds):
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)


def test_synthetic_deterministic_by_seed():
    a, b, c = (SyntheticDataModule(seed=s) for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        (xa, ya), (xb, yb) = _tensors(a.dataset(split)), _tensors(b.dataset(split))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(_tensors(a.dataset("test"))[0], _tensors(c.dataset("test"))[0])
    x, y = _tensors(a.dataset("train"))
    assert x.shape == (256, 3, 32, 32) and len(a.dataset("val")) == 64 and 0 <= x.min()
    assert x.max() <= 1 and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_synthetic_learnable():
    dm = SyntheticDataModule(seed=0)
    xte, yte = _tensors(dm.dataset("test"))
    # nearest prototype is (almost) a perfect classifier
    d = torch.cdist(xte.flatten(1), dm.prototypes.flatten(1))
    assert (d.argmin(1) == yte).float().mean() > 0.95
    # a linear layer, and a conv + global average pooling net, learn it in a few full-batch steps
    x, y = _tensors(dm.dataset("train"))
    nn = torch.nn
    for make in (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)),
                 lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))):
        torch.manual_seed(0)
        net = make()
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        losses = []
        for _ in range(40):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        acc = (net(xte).argmax(1) == yte).float().mean()
        print(f"synthetic: loss {losses[0]:.3f} -> {losses[-1]:.3f}, test acc {acc:.3f}")
        assert losses[-1] < 0.3 * losses[0] and acc > 0.9
