"""rejector.threshold=auto: the decision threshold of f_R chosen on validation draws only, stored in
every checkpoint and used by certify.py; it finds a known optimum; the loss options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import certify_tiny

from dsr_lightning.jobs.threshold import main as threshold_main
from dsr_lightning.results import jsonable
from dsr_lightning.smoothing.threshold import candidates, choose_threshold, estimate


def known_problem(seed=0, images=60, n=100, right=0.7):
    """Every image's label is 0; f is right on a fraction `right` of the draws. The heads' logits
    separate exactly: right draws in (-3, 0.5), wrong ones in (1.5, 4). Any t in [0.5, 1.5)
    rejects every wrong draw and no right one, which maximises both p_A and p_A + p_R."""
    rng = np.random.default_rng(seed)
    is_right = rng.random((images, n)) < right
    pred = np.where(is_right, 0, rng.integers(1, 3, (images, n)))
    logit = np.where(is_right, rng.uniform(-3, 0.5, (images, n)), rng.uniform(1.5, 4, (images, n)))
    return {"pred": pred, "logit": logit, "label": np.zeros(images, dtype=np.int64)}


@pytest.mark.parametrize("objective", ["acr", "accuracy"])
def test_auto_finds_the_known_optimum(objective):
    draws = known_problem()
    choice = choose_threshold(draws, num_classes=3, sigma=0.5, N=1000, alpha=0.01,
                              objective=objective, radius=0.4)
    assert 0.5 <= choice["value"] < 1.5
    assert choice["reject_rate_f_right"] == 0 and choice["reject_rate_f_wrong"] == 1
    never = estimate(draws, np.inf, 3, 0.5, 1000, 0.01)
    best = estimate(draws, choice["value"], 3, 0.5, 1000, 0.01)
    assert best["pAR"] == 1 and never["pAR"] == pytest.approx(best["pA"])
    assert best["acr"] > never["acr"] and choice["score_never_reject"] < choice["score"]
    # rejecting right draws too (t below the gap) costs p_A and the objective
    low = estimate(draws, 0.0, 3, 0.5, 1000, 0.01)
    assert low["pA"] < best["pA"] and low["acr"] < best["acr"]


def test_never_rejecting_wins_when_the_heads_know_nothing():
    draws = known_problem()
    draws["logit"] = np.random.default_rng(1).normal(size=draws["logit"].shape)  # uninformative
    choice = choose_threshold(draws, 3, 0.5, 1000, 0.01)
    assert choice["score"] >= choice["score_never_reject"]
    assert np.isinf(candidates(draws["logit"])[-1])


@pytest.fixture(scope="module")
def auto_runs(rejector_runs):
    """Two tiny rejectors with threshold=auto, identical but for
    the test split's images: the session's seed-0 rejector and its twin with data.num_test=48."""
    return {"a": rejector_runs[0], "b": rejector_runs["other_test"]}


def test_the_threshold_depends_on_the_validation_split_only(auto_runs):
    a, b = (torch.load(auto_runs[k]["best"], map_location="cpu", weights_only=False)
            for k in "ab")
    assert a["dsr_config"]["data"]["num_test"] != b["dsr_config"]["data"]["num_test"]
    ta, tb = a["dsr_threshold"], b["dsr_threshold"]
    assert ta["split"] == "val" and ta["images"] == 16 and ta["draws"] == 16
    assert ta["value"] == tb["value"] and ta["score"] == tb["score"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_every_checkpoint_carries_its_threshold_and_certify_uses_it(auto_runs, tiny_pretrained,
                                                                    tmp_path):
    res = auto_runs["a"]
    for path in (res["best"], res["last"]):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert ckpt["dsr_config"]["rejector"]["threshold"] == "auto"
        assert np.isfinite(ckpt["dsr_threshold"]["value"]) or ckpt["dsr_threshold"]["value"] > 0
    chosen = torch.load(res["best"], map_location="cpu", weights_only=False)["dsr_threshold"]
    assert res["threshold"] == chosen["value"]
    args = ["system=rejection", "N0=10", "N=50", "max=2", f"outdir={tmp_path}"]
    out = certify_tiny(tiny_pretrained, Path(res["best"]), tmp_path, *args)
    # standard JSON (no Infinity or NaN constants): a never-rejecting threshold is the text 'inf'
    rec = json.loads(Path(out["settings"]).read_text(), parse_constant=pytest.fail)
    assert float(rec["threshold"]) == chosen["value"]
    assert rec["run"]["threshold_choice"] == jsonable(chosen)
    forced = certify_tiny(tiny_pretrained, Path(res["best"]), tmp_path, *args, "threshold=-5")
    assert "_t-5_" in Path(forced["outfile"]).name  # its own file: another f_R
    assert json.loads(Path(forced["settings"]).read_text())["threshold"] == -5


def test_threshold_cli(auto_runs, capsys):
    assert threshold_main([auto_runs["a"]["best"], "--images", "8", "--draws", "8"]) == 0
    out = capsys.readouterr().out
    assert "| threshold | reject % |" in out and "(chosen)" in out and "| inf" in out


def test_loss_options_on_a_hand_batch():
    from dsr_lightning.tasks import RejectorTask

    logit = torch.tensor([2.0, -1.0, 0.5, -0.5])
    b = torch.tensor([1.0, 0.0, 0.0, 1.0])
    right = torch.tensor([False, True, False, False])
    bce = F.binary_cross_entropy_with_logits(logit, b, reduction="none")
    optim = {"phases": [{"epochs": 1, "optimizer": {"_target_": "torch.optim.SGD",
                                                     "_partial_": True, "lr": 0.1}}]}

    def task(**kw):
        return RejectorTask(torch.nn.Identity(), None, torch.nn.Identity(), optim, **kw)

    assert task().loss(logit, b, right) == pytest.approx(bce.mean().item())
    w = torch.tensor([0.5, 3.0, 1.0, 0.5])  # pos_weight on b = 1, correct_weight on right b = 0
    assert task(pos_weight=0.5, correct_weight=3.0).loss(logit, b, right) == pytest.approx(
        (w * bce).mean().item())
    p = torch.sigmoid(logit)
    p_t = torch.where(b > 0, p, 1 - p)
    assert task(focal_gamma=2.0).loss(logit, b, right) == pytest.approx(
        ((1 - p_t) ** 2 * bce).mean().item())
