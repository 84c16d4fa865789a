"""The Python API in the shape of Cohen et al.'s `Smooth`: `g = dsr.load(ckpt)`, `dsr.wrap(f, D)`
or `dsr.train_rejector(...)`, then `g.certify(x, n0, n, alpha, batch_size)` and
`g.predict(x, n, alpha, batch_size)` for one image or a batch: the engine's numbers for the same
seed, typed results, and each bad argument one error naming it before any draw."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dsr_lightning as dsr
from dsr_lightning import api
from dsr_lightning.errors import ConfigError, DataError
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.models import Classifier, SmoothingSystem
from dsr_lightning.smoothing import ABSTAIN, ImageNoise, SmoothedClassifier

K, SHAPE, SIGMA = 3, (3, 8, 8), 0.25
DRAWS = dict(n0=10, n=60, alpha=0.01, batch_size=64)


class Heads(nn.Module):
    """Rejector heads (z, feats) -> (B, K): logit 4 * (mean pixel - 0.5) for every class, so f_R
    rejects bright noisy images at threshold 0."""
    num_classes = K

    def forward(self, z, feats):
        return (4 * (z.mean((1, 2, 3)) - 0.5))[:, None].expand(-1, K)


class Halve(nn.Module):
    """A 'denoiser' that visibly changes the images (x -> x / 2)."""

    def forward(self, x):
        return x / 2


def _f() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K))


def _g(heads: bool = True, threshold: float = 0.0) -> dsr.Smooth:
    return dsr.wrap(_f(), None, sigma=SIGMA, rejector=Heads() if heads else None,
                    threshold=threshold, feature_layers=[], input_shape=SHAPE)


class Calls(nn.Module):
    """Counts the noisy samples the base is given (a refusal draws none)."""

    def __init__(self, system):
        super().__init__()
        self.system, self.num_classes, self.samples = system, K, 0
        self.classifier = system.classifier  # shown, as a SmoothingSystem shows it

    def forward(self, x):
        self.samples += len(x)
        return self.system(x)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0))


# --- the engine's numbers, one image or a batch ---------------------------------------------------

@pytest.mark.parametrize("bound", [None, "paper", "runner_up", "cohen"])
def test_certify_gives_the_engines_numbers_for_the_same_seed_and_keys(x, bound):
    g = _g()
    keys = [7, 3, 0, 11, 2]
    certs = g.certify(x, **DRAWS, bound=bound, seed=5, keys=keys)
    engine = SmoothedClassifier(g.system, K, SIGMA)
    want = engine.certify(x, DRAWS["n0"], DRAWS["n"], DRAWS["alpha"], DRAWS["batch_size"],
                          bound or "paper", noise=ImageNoise(5, keys))
    assert certs.bound == (bound or "paper") and certs.alpha == 0.01 and certs.sigma == SIGMA
    for name in ("prediction", "radius", "c_hat", "n_A", "n_R", "n_B", "pA_lower", "pAR_lower",
                 "pB_upper"):
        np.testing.assert_array_equal(certs[name], getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(certs["n"], want.N)
    np.testing.assert_array_equal(certs.counts, want.counts)
    np.testing.assert_array_equal(certs.counts0, want.counts0)
    assert (certs["n0"] == DRAWS["n0"]).all() and (certs["n"] == DRAWS["n"]).all()
    assert certs["n_R"].sum() > 0  # the heads reject some draws: the test sees rejection


def test_one_image_gives_one_certificate_equal_to_its_row_of_the_batch(x):
    g = _g()
    certs = g.certify(x, **DRAWS, labels=[0, 1, 2, 0, 1])
    one = g.certify(x[3], **DRAWS, keys=[3], labels=0)
    assert isinstance(one, api.Certificate) and isinstance(certs, api.Certificates)
    assert one == certs[3]
    # a numpy image, and the default key 0: the batch's first row
    assert g.certify(x[0].numpy(), **DRAWS, labels=0) == certs[0]
    # positional, as in Cohen's code
    assert g.certify(x[0], 10, 60, 0.01, 64) == g.certify(x[0], **DRAWS)


def test_predict_gives_the_engines_predictions_for_one_image_or_a_batch(x):
    g = _g()
    got = g.predict(x, 60, 0.01, 64, seed=2)
    want = SmoothedClassifier(g.system, K, SIGMA).predict(x, 60, 0.01, 64,
                                                          noise=ImageNoise(2, range(5)))
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    one = g.predict(x[4], 60, 0.01, 64, seed=2, keys=[4])
    assert isinstance(one, int) and one == int(want[4])
    # the -inf threshold rejects every draw: no real class is ever seen, so predict abstains
    assert (g.with_threshold(-math.inf).predict(x, 60, 0.01, 64) == ABSTAIN).all()


# --- the result objects ---------------------------------------------------------------------------

def test_certificate_fields_are_typed_and_bounds_a_bound_does_not_use_are_none(x):
    g = _g()
    paper = g.certify(x[0], **DRAWS, labels=1)
    assert isinstance(paper.prediction, int) and isinstance(paper.radius, float)
    assert all(isinstance(getattr(paper, k), int) for k in ("c_hat", "n_A", "n_R", "n_B", "n0",
                                                          "n"))
    assert paper.n_A + paper.n_R + paper.n_B <= paper.n == 60 and paper.n0 == 10
    assert paper.bound == "paper" and 0 <= paper.pA_lower <= paper.pAR_lower <= 1
    assert paper.pB_upper is None and paper.label == 1
    assert paper.correct == (paper.prediction == 1)
    assert paper.abstained == (paper.prediction == ABSTAIN)
    runner = g.certify(x[0], **DRAWS, bound="runner_up")
    assert runner.pAR_lower is None and 0 <= runner.pB_upper <= 1 and runner.label is None
    assert runner.correct is None
    with pytest.raises(DataError, match="without labels"):
        runner.certifies(0.0)
    with pytest.raises(AttributeError):
        paper.radius = 1.0  # frozen


def test_certificates_are_a_sequence_with_columns_a_frame_and_certified_accuracy(x):
    g = _g(heads=False)
    y = [0, 1, 2, 0, 1]
    certs = g.certify(x, **DRAWS, labels=y)
    assert len(certs) == 5 and [c.label for c in certs] == y
    assert certs[-1] == certs[4] and len(certs[1:3]) == 2 and certs[1:3][0] == certs[1]
    np.testing.assert_array_equal(certs.radius, [c.radius for c in certs])
    np.testing.assert_array_equal(certs.prediction, certs["prediction"])
    assert ((certs.prediction == ABSTAIN) == (certs.radius == 0)).all()
    frame = certs.to_frame()
    assert list(frame.columns) == list(certs.keys()) and len(frame) == 5
    assert list(frame.columns)[:2] == ["prediction", "radius"] and "correct" in frame
    for r in (0.0, 0.1):
        want = np.mean([c.certifies(r) for c in certs])
        assert certs.certified_accuracy(r) == pytest.approx(want)
    with pytest.raises(KeyError, match="labels="):
        g.certify(x, **DRAWS)["correct"]
    with pytest.raises(IndexError):
        certs[5]
    assert "5 images" in repr(certs) and "bound='cohen'" in repr(certs)


# --- building one: wrap, with_threshold, load, train_rejector -----------------------------------

def test_wrap_without_a_rejector_is_the_denoised_baseline(x):
    f, D = _f(), Halve()
    g = dsr.wrap(f, D, sigma=SIGMA, mean=[0.5] * 3, std=[0.25] * 3, feature_layers=[],
                 input_shape=SHAPE)
    assert g.rejector is None and g.threshold is None and g.denoiser is D
    assert isinstance(g.classifier, Classifier) and g.num_classes == K
    assert not any(p.requires_grad for p in f.parameters()) and not f.training
    base = SmoothingSystem(Classifier(_f(), [0.5] * 3, [0.25] * 3, feature_layers=[]), Halve(),
                           None, num_classes=K)
    want = SmoothedClassifier(base, K, SIGMA).certify(x, 10, 60, 0.01, 64, "cohen",
                                                      noise=ImageNoise(0, range(5)))
    certs = g.certify(x, **DRAWS)
    assert certs.bound == "cohen" and (certs["n_R"] == 0).all()
    np.testing.assert_array_equal(certs.radius, want.radius)
    np.testing.assert_array_equal(certs.counts, want.counts)
    # the denoiser is applied: without it the counts differ
    assert not np.array_equal(dsr.wrap(_f(), None, sigma=SIGMA, mean=[0.5] * 3,
                                       std=[0.25] * 3, feature_layers=[], input_shape=SHAPE)
                              .certify(x, **DRAWS).counts, certs.counts)


def test_with_threshold_changes_a_copy_and_inf_is_the_baseline(x):
    g = _g(threshold=0.0)
    assert g.threshold == 0.0 and g.rejector is not None
    never = g.with_threshold(math.inf)
    assert never.rejector is None and never.threshold == math.inf
    assert g.threshold == 0.0 and g.rejector is not None  # g is not changed
    # the heads left out at +inf come back at a finite threshold
    assert never.with_threshold(0.0).rejector is g.rejector
    baseline = _g(heads=False).certify(x, **DRAWS)
    for name in baseline.keys():
        np.testing.assert_array_equal(never.certify(x, **DRAWS)[name], baseline[name])
    always = g.with_threshold(-math.inf).certify(x, **DRAWS)
    assert (always["n_R"] == DRAWS["n"]).all() and (always.prediction == ABSTAIN).all()
    assert g.with_threshold(0.5).threshold == 0.5
    with pytest.raises(ConfigError, match="threshold=nan: must be a number"):
        g.with_threshold(float("nan"))
    with pytest.raises(ConfigError, match="no rejector"):
        _g(heads=False).with_threshold(0.5)


def test_the_first_versions_certify_takes_a_smooth_and_a_threshold_for_one_call(x):
    never = _g().with_threshold(math.inf)  # heads left out, kept for another threshold
    old = api.certify(never, x, N0=10, N=60, alpha=0.01, batch=64, threshold=0.0)
    new = _g().certify(x, **DRAWS)
    assert old.keys() == new.keys() and old.bound == new.bound == "paper"
    for name in new.keys():
        np.testing.assert_array_equal(old[name], new[name], err_msg=name)
    assert never.threshold == math.inf  # not changed by the call
    with pytest.raises(ConfigError, match=r"sigma=0\.5, but the system was trained for "
                                          r"system\.sigma=0\.25"):
        api.certify(never, x, sigma=0.5, N0=10, N=60)


def test_load_holds_sigma_threshold_and_device_and_certifies(rejector):
    g = dsr.load(rejector)
    ckpt = RunCheckpoint.read(rejector)
    assert g.sigma == float(ckpt.config["sigma"]) == 0.25
    assert g.threshold == ckpt.threshold()
    assert (g.rejector is None) == (g.threshold == math.inf)  # +inf: the heads are left out
    assert g.device == torch.device("cpu") and "threshold=" in repr(g)
    assert api.load_system is dsr.load  # the first version's name
    x = torch.rand(2, *tuple(g.classifier.input_shape), generator=torch.Generator().manual_seed(1))
    certs = g.certify(x, 10, 40, 0.01, 32)
    assert certs.bound == ("cohen" if g.rejector is None else "paper") and len(certs) == 2
    at = dsr.load(rejector, threshold=1.5)
    assert at.threshold == 1.5 and at.rejector is not None
    assert at.certify(x, 10, 40, 0.01, 32).bound == "paper"
    base = dsr.load(rejector, baseline=True)
    assert base.rejector is None and base.certify(x, 10, 40, 0.01, 32).bound == "cohen"
    with pytest.raises(ConfigError, match="threshold=nan"):
        dsr.load(rejector, threshold=float("nan"))


def test_train_rejector_returns_a_smoothed_classifier_ready_to_certify():
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(16, *SHAPE, generator=gen), torch.arange(16) % K
    g = dsr.train_rejector(_f(), None, xs, ys, sigma=SIGMA, feature_layers=[], epochs=1,
                           batch_size=8, threshold=0.25)
    assert isinstance(g, dsr.Smooth) and g.sigma == SIGMA and g.threshold == 0.25
    assert g.rejector is not None and not any(p.requires_grad for p in g.rejector.parameters())
    cert = g.certify(xs[0], **DRAWS, labels=0)
    assert cert.bound == "paper" and cert.label == 0


# --- every bad argument: one error naming it, before any draw -------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"n0": 70}, "n0=70 > n=60"),
    ({"n0": 0}, "n0=0: must be an integer >= 1"),
    ({"n": 2.5}, "n=2.5: must be an integer >= 1"),
    ({"alpha": 0}, r"alpha=0: must be a number in \(0, 1\)"),
    ({"alpha": 1.0}, r"alpha=1.0: must be a number in \(0, 1\)"),
    ({"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
    ({"batch_size": 100.0}, "batch_size=100.0: must be an integer >= 1"),
    ({"seed": -1}, "seed=-1: must be an integer >= 0"),
    ({"bound": "clopper"}, "bound='clopper': choose one of paper, runner_up, cohen"),
    ({"keys": [0, 1]}, "keys has 2 entries for 5 images"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_certify_settings_out_of_range_are_one_config_error_before_any_draw(x, kw, match):
    calls = Calls(_g().system)
    g = dsr.Smooth(calls, K, SIGMA)
    with pytest.raises(ConfigError, match=match):
        g.certify(x, **{**DRAWS, **kw})
    assert calls.samples == 0


@pytest.mark.parametrize("kw, match", [
    ({"n": 0}, "n=0: must be an integer >= 1"),
    ({"alpha": float("nan")}, r"alpha=nan: must be a number in \(0, 1\)"),
    ({"batch_size": -1}, "batch_size=-1: must be an integer >= 1"),
])
def test_predict_settings_out_of_range_are_one_config_error_before_any_draw(x, kw, match):
    calls = Calls(_g().system)
    with pytest.raises(ConfigError, match=match):
        dsr.Smooth(calls, K, SIGMA).predict(x, **{"n": 60, "alpha": 0.01, "batch_size": 64, **kw})
    assert calls.samples == 0


@pytest.mark.parametrize("images, labels, match", [
    (torch.rand(8, 8), None, r"images has shape .*\(B, C, H, W\)"),
    ((torch.rand(2, *SHAPE) * 255).to(torch.uint8), None, "divide them by 255"),
    (torch.full((2, *SHAPE), 1.5), None, r"outside \[0, 1\]"),
    (torch.rand(2, *SHAPE), [0, 3], r"labels hold 3 .*outside 0\.\.2"),
    (torch.rand(2, *SHAPE), [0], "labels has 1 entries for 2 images"),
    (torch.rand(2, 1, 8, 8), None, r"images of shape \(C, H, W\) = \(1, 8, 8\)"),
])
def test_images_and_labels_that_cannot_be_certified_are_one_data_error(images, labels, match):
    calls = Calls(_g().system)
    with pytest.raises(DataError, match=match):
        dsr.Smooth(calls, K, SIGMA).certify(images, **DRAWS, labels=labels)
    assert calls.samples <= 1  # at most one clean image tried


def test_smooth_and_wrap_check_their_settings():
    system = _g().system
    with pytest.raises(ConfigError, match="sigma: required"):
        dsr.Smooth(system, K)
    with pytest.raises(ConfigError, match=r"sigma=0: must be a finite number > 0"):
        dsr.Smooth(system, K, 0)
    with pytest.raises(ConfigError, match="num_classes=4, but the base has base.num_classes=3"):
        dsr.Smooth(system, 4, SIGMA)
    with pytest.raises(ConfigError, match=r"sigma=-1: must be a finite number > 0"):
        dsr.wrap(_f(), None, sigma=-1)
    with pytest.raises(ConfigError, match="mean and std go together"):
        dsr.wrap(_f(), None, sigma=SIGMA, mean=[0.5] * 3)
    with pytest.raises(ConfigError, match=r"std=\[0.2, 0.0, 0.2\]: every value must be > 0"):
        dsr.wrap(_f(), None, sigma=SIGMA, mean=[0.5] * 3, std=[0.2, 0.0, 0.2])
    with pytest.raises(ConfigError, match="threshold=nan"):
        dsr.wrap(_f(), None, sigma=SIGMA, threshold=float("nan"))


def test_a_base_returning_logits_is_refused_with_the_wrap_hint(x):
    f = _f()
    f.num_classes = K
    with pytest.raises(ConfigError, match=r"returns \(1, 3\) for one image, not labels.*dsr\.wrap"):
        dsr.Smooth(f, K, SIGMA).certify(x, **DRAWS)


# --- the package's top level ----------------------------------------------------------------------

def test_the_top_level_names_are_the_apis_and_importing_the_package_stays_cheap():
    for name in ("load", "wrap", "train_rejector", "Smooth", "Certificate", "Certificates",
                 "ABSTAIN"):
        assert getattr(dsr, name) is getattr(api, name)
        assert name in dir(dsr)
    assert dsr.ABSTAIN == dsr.Smooth.ABSTAIN == ABSTAIN == -1
    assert dsr.data.CIFAR10SubsetDataModule and dsr.errors.ConfigError is ConfigError
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dsr.nothing  # noqa: B018
    code = "import sys, dsr_lightning; print('torch' in sys.modules or 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_first_versions_column_access_still_reads():
    """`"radius" in certs` and `certs["N"]` (the first version's dict and its column name)."""
    from dsr_lightning.api import Certificates

    certs = Certificates({"prediction": [1, -1], "radius": [0.5, 0.0], "n": [100, 100]},
                         bound="cohen", alpha=0.001, sigma=0.25)
    assert "radius" in certs and "N" in certs and "pA_lower" not in certs
    assert certs["N"].tolist() == certs["n"].tolist() == [100, 100]
    assert certs[0] in certs
