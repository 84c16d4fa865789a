"""The Python API checks its arguments as certify.py and train.py check their keys: one ConfigError
(a setting) or DataError (images, labels) naming the argument, before any draw or training step;
and what it accepts beyond tensors (numpy arrays, one image, other float precisions) gives the
certificates of the float32 batch."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from dsr_lightning import api
from dsr_lightning.errors import ConfigError, DataError
from dsr_lightning.models import Classifier, SmoothingSystem

K, SHAPE = 3, (3, 8, 8)
SETTINGS = dict(sigma=0.25, N0=10, N=40, alpha=0.01, batch=64)


class Heads(nn.Module):
    """A rejector (z, feats) -> (B, K): head logit = 4 * (mean pixel - 0.5), the same for all
    classes, so f_R rejects bright noisy images at threshold 0."""
    num_classes = K

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, z, feats):
        return (self.scale * (z.mean((1, 2, 3)) - 0.5))[:, None].expand(-1, K)


def _f() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K))


def _system(threshold: float = 0.0, sigma: float | None = 0.25, heads: bool = True) -> SmoothingSystem:
    clf = Classifier(_f(), [0.0] * 3, [1.0] * 3, feature_layers=[], input_shape=SHAPE)
    system = SmoothingSystem(clf, None, Heads() if heads else None, threshold=threshold,
                             num_classes=K)
    if sigma is not None:
        system.sigma = sigma
    return system


class Calls(nn.Module):
    """Counts the noisy samples the system is given (to see that a refusal drew none); shows its
    classifier, as a SmoothingSystem does."""

    def __init__(self, system):
        super().__init__()
        self.system, self.num_classes, self.sigma, self.samples = system, K, system.sigma, 0
        self.classifier = system.classifier

    def forward(self, x):
        self.samples += len(x)
        return self.system(x)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def y() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 1])


def _certify(system, images, labels=None, **kw) -> api.Certificates:
    return api.certify(system, images, labels, **{**SETTINGS, **kw})


def _same(a: api.Certificates, b: api.Certificates) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True)
                                        for k in a.keys())


# --- 1. the threshold ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), "0.5", True])
def test_a_threshold_that_is_not_a_number_is_refused_by_certify(x, bad):
    with pytest.raises(ConfigError, match="threshold=.*: must be a number"):
        _certify(_system(), x, threshold=bad)


def test_a_system_whose_own_threshold_is_nan_is_refused(x):
    with pytest.raises(ConfigError, match="system.threshold=nan: must be a number"):
        _certify(_system(threshold=float("nan")), x)


def test_a_threshold_for_a_system_without_heads_is_refused(x):
    with pytest.raises(ConfigError, match="threshold=0.5: .*no rejector"):
        _certify(_system(heads=False), x, threshold=0.5)


def test_load_system_refuses_a_nan_threshold(rejector):
    for bad in (float("nan"), "0.5"):
        with pytest.raises(ConfigError, match="threshold=.*: must be a number"):
            api.load_system(rejector, threshold=bad)


def test_train_rejector_refuses_a_nan_threshold(x, y):
    with pytest.raises(ConfigError, match="threshold=nan: must be a number"):
        api.train_rejector(_f(), None, x, y, sigma=0.25, threshold=float("nan"))


def test_a_threshold_replaces_the_systems_for_one_call_and_infinities_are_defined(x):
    system = _system(threshold=0.0)
    base = _certify(system, x)
    assert system.threshold == 0.0 and base["n_R"].sum() > 0  # the heads reject some draws
    # +inf: never reject, certified as the system without heads (bound=cohen), as certify.py does
    never = _certify(system, x, threshold=float("inf"))
    assert _same(never, _certify(_system(heads=False), x))
    assert (never["n_R"] == 0).all() and system.threshold == 0.0 and system.rejector is not None
    # −inf: every draw rejected, so every image abstains
    always = _certify(system, x, threshold=float("-inf"))
    assert (always["n_R"] == SETTINGS["N"]).all() and (always["prediction"] == -1).all()
    # the system's own +inf threshold: the same as the override
    assert _same(_certify(_system(threshold=float("inf")), x), never)


# --- 2., 3. 0..255 images and other precisions --------------------------------------------------

@pytest.mark.parametrize("kind", ["uint8", "uint8 numpy", "float 0..255", "int64"])
def test_0_255_images_are_refused_with_the_divide_by_255_hint(x, y, kind):
    big = {"uint8": (x * 255).to(torch.uint8), "uint8 numpy": (x * 255).to(torch.uint8).numpy(),
           "float 0..255": x * 255, "int64": (x * 255).long()}[kind]
    with pytest.raises(DataError, match=r"images.*divide .*by 255"):
        _certify(_system(), big)
    with pytest.raises(DataError, match=r"images.*divide .*by 255"):
        api.train_rejector(_f(), None, big, y, sigma=0.25)


def test_float64_float16_and_bfloat16_images_are_certified_in_float32(x):
    system = _system()
    for dtype in (torch.float16, torch.bfloat16):  # exact in float32: the same certificates
        low = x.to(dtype)
        assert _same(_certify(system, low), _certify(system, low.float()))
    # float64: rounded to float32 (the noise is drawn in float32, as certify.py draws it)
    assert _same(_certify(system, x.double()), _certify(system, x))


def test_complex_or_bool_images_are_refused(x):
    for bad in (x > 0.5, x.to(torch.complex64)):
        with pytest.raises(DataError, match="images"):
            _certify(_system(), bad)


# --- 4., 5. numpy arrays and one image ----------------------------------------------------------

def test_numpy_images_and_labels_give_the_certificates_of_tensors(x, y):
    system = _system()
    want = _certify(system, x, y)
    assert _same(_certify(system, x.numpy(), y.numpy()), want)
    assert _same(_certify(system, x.double().numpy(), list(y.tolist())), want)


def test_one_image_is_a_batch_of_one(x, y):
    system = _system()
    want = _certify(system, x[:1], y[:1])
    assert len(want["prediction"]) == 1
    assert _same(_certify(system, x[0], y[:1]), want)
    assert _same(_certify(system, x[0].numpy(), int(y[0])), want)


@pytest.mark.parametrize("shape", [(8, 8), (1, 4, 3, 8, 8), (32,)])
def test_images_of_another_rank_are_refused_naming_the_shape_expected(shape):
    with pytest.raises(DataError, match=r"images has shape .*\(B, C, H, W\)"):
        _certify(_system(), torch.rand(shape))


def test_train_rejector_takes_numpy_images_and_labels(x, y):
    xs = np.random.default_rng(0).random((16, *SHAPE))  # float64 in [0, 1)
    ys = np.arange(16) % K
    system = api.train_rejector(_f(), None, xs, ys, sigma=0.25, feature_layers=[], epochs=1,
                                batch_size=8)
    assert system.sigma == 0.25 and system.num_classes == K
    assert len(_certify(system, xs[:2], ys[:2])["prediction"]) == 2


# --- 6. labels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 1, 2]), "labels has 3 entries for 4 images"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), "labels are float32.*integer class"),
    (torch.tensor([0, 1, 3, 1]), r"labels hold 3 .*outside 0\.\.2"),
    (np.array([0, -1, 2, 1]), r"labels hold -1 .*outside 0\.\.2"),
    (torch.tensor([[0, 1], [2, 1]]), "labels has shape"),
], ids=["length", "float", "K", "negative", "rank"])
def test_wrong_labels_are_refused(x, labels, match):
    with pytest.raises(DataError, match=match):
        _certify(_system(), x, labels)
    with pytest.raises(DataError, match=match):
        api.train_rejector(_f(), None, x, labels, sigma=0.25)


# --- 7., 8. sigma -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -0.25, float("nan"), float("inf"), "0.25", True])
def test_a_sigma_out_of_range_is_refused(x, y, bad):
    bare = _system(sigma=None)
    with pytest.raises(ConfigError, match=r"sigma=.*: must be a finite number > 0 \(the Gaussian"):
        _certify(bare, x, sigma=bad)
    with pytest.raises(ConfigError, match=r"sigma=.*: must be a finite number > 0"):
        api.train_rejector(_f(), None, x, y, sigma=bad)


def test_sigma_other_than_the_systems_is_refused_naming_both(x):
    with pytest.raises(ConfigError, match=r"sigma=0\.5.*system\.sigma=0\.25"):
        _certify(_system(sigma=0.25), x, sigma=0.5)


def test_sigma_defaults_to_the_systems_and_is_required_without_one(x):
    unset = {k: v for k, v in SETTINGS.items() if k != "sigma"}
    system = _system(sigma=0.25)
    assert _same(api.certify(system, x, **unset), _certify(system, x, sigma=0.25))
    with pytest.raises(ConfigError, match="sigma: not given and the system has no .sigma"):
        api.certify(_system(sigma=None), x, **unset)
    bare = _system(sigma=None)  # a module without .sigma: certified with the sigma given
    assert _same(_certify(bare, x, sigma=0.25), api.certify(system, x, **unset))


# --- 9. N0, N, alpha, batch, seed, keys, bound ---------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"N0": 50, "N": 40}, "N0=50 > N=40"),
    ({"N0": 0}, "N0=0: must be an integer >= 1"),
    ({"N": 0, "N0": 0}, "N0=0: must be an integer >= 1"),
    ({"N": 2.5}, "N=2.5: must be an integer >= 1"),
    ({"alpha": 0}, r"alpha=0: must be a number in \(0, 1\)"),
    ({"alpha": 1.0}, r"alpha=1.0: must be a number in \(0, 1\)"),
    ({"alpha": float("nan")}, r"alpha=nan: must be a number in \(0, 1\)"),
    ({"batch": 0}, "batch=0: must be an integer >= 1"),
    ({"batch": 100.0}, "batch=100.0: must be an integer >= 1"),
    ({"seed": -1}, "seed=-1: must be an integer >= 0"),
    ({"bound": "clopper"}, "bound='clopper': choose one of paper, runner_up, cohen"),
    ({"keys": [0, 1, 2]}, "keys has 3 entries for 4 images"),
    ({"keys": [0, 1, -2, 3]}, "keys.*integers >= 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_certification_settings_out_of_range_are_refused_before_any_draw(x, kw, match):
    system = Calls(_system())
    with pytest.raises(ConfigError, match=match):
        _certify(system, x, **kw)
    assert system.samples == 0


# --- 10. images the system cannot take ----------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (float("nan"), r"images holds NaN or Inf values \(images at positions \[2\]"),
    (float("-inf"), r"images holds NaN or Inf values \(images at positions \[2\]"),
    (1.5, r"images has values in .*outside \[0, 1\]"),
])
def test_non_finite_or_out_of_range_images_are_one_data_error_before_any_draw(x, y, bad, match):
    x = x.clone()
    x[2, 1, 3, 3] = bad
    system = Calls(_system())
    with pytest.raises(DataError, match=match):
        _certify(system, x)
    assert system.samples == 0
    with pytest.raises(DataError, match=match):
        api.train_rejector(_f(), None, x, y, sigma=0.25)


def test_out_of_range_images_are_certified_when_allowed(x):
    cert = _certify(_system(heads=False), x * 2 - 0.5, allow_out_of_range=True)
    assert len(cert["prediction"]) == len(x)


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (4, 3, 16, 16), (4, 8, 8, 3)],
                         ids=["channels", "size", "channels_last"])
def test_images_the_system_cannot_take_are_one_data_error_before_any_draw(y, shape):
    images = torch.rand(shape)
    system = Calls(_system())
    with pytest.raises(DataError, match=re.escape(f"images of shape (C, H, W) = {tuple(shape[1:])}")):
        _certify(system, images)
    assert system.samples <= 1  # one clean image tried, no noise drawn
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, K))  # 3 x 8 x 8
    with pytest.raises(DataError, match=re.escape(f"images of shape (C, H, W) = {tuple(shape[1:])}")):
        api.train_rejector(conv, None, images, y, sigma=0.25)


def test_channels_last_images_get_the_permute_hint():
    with pytest.raises(DataError, match=r"permute\(0, 3, 1, 2\)"):
        _certify(_system(), torch.rand(4, 8, 8, 3))


# --- train_rejector's own settings --------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"T": 0}, "T=0: must be an integer >= 1"),
    ({"epochs": 0}, "epochs=0: must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
    ({"lr": -1e-3}, "lr=-0.001: must be a finite number > 0"),
    ({"seed": -1}, "seed=-1: must be an integer >= 0"),
    ({"mean": [0.5] * 2, "std": [0.2] * 2}, "mean has 2 values, std 2: one per image channel"),
    ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, r"std=\[0.2, 0.0, 0.2\]: every value must be > 0"),
])
def test_train_rejector_settings_out_of_range_are_refused(x, y, kw, match):
    with pytest.raises(ConfigError, match=match):
        api.train_rejector(_f(), None, x, y, sigma=0.25, **kw)


def test_mean_and_std_with_a_wrapped_classifier_are_refused(x, y):
    f = Classifier(_f(), [0.0] * 3, [1.0] * 3, feature_layers=[], input_shape=SHAPE)
    with pytest.raises(ConfigError, match="already a models.Classifier"):
        api.train_rejector(f, None, x, y, sigma=0.25, mean=[0.5] * 3, std=[0.2] * 3)


class Logits(nn.Module):
    """f alone: logits (B, K), not labels."""
    num_classes = K

    def __init__(self):
        super().__init__()
        self.f = _f()

    def forward(self, x):
        return self.f(x)


def test_a_module_returning_logits_not_labels_is_refused_before_any_draw(x):
    with pytest.raises(ConfigError, match=r"the system returns .*\(1, 3\).* not labels \(B,\) in 0\.\.3"):
        _certify(Logits(), x)
