"""Trustworthy under misuse: one test (or family) per class of the audit. A results file has one
writer and an identity by content; resumed training checks what it resumes; inputs, settings and
rows are checked; radii stay finite; divergence stops the run; and every bad file or value is one
clear error with nothing written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import certify_tiny, cli, env, error_lines, rows, run_cli, snapshot

from dsr_lightning.errors import CheckpointError, ConfigError, ResultsError, TrainingError
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.training import train
from dsr_lightning.models import load_checkpoint
from dsr_lightning.reports import load_results
from dsr_lightning.reports import main as report_main
from dsr_lightning.smoothing import SmoothedClassifier, certify_counts, default_weights

PLAIN = ["system=plain", "N0=10", "N=50", "batch=64"]


def done_indices(path: Path) -> list[int]:
    return [int(r.split("\t")[0]) for r in rows(path)]


# --- 1. one writer ------------------------------------------------------------------------------

@pytest.mark.process
def test_two_processes_on_one_results_file(tiny_pretrained, tmp_path, capsys, caplog):
    """While one certify.py process writes a file, another process (this one) on the same file is
    refused (with the same settings or others); with wait=true it waits for the first, then finds
    every image done. No row is written twice, and the lock is gone at the end."""
    out = tmp_path / "one.tsv"
    args = [*PLAIN, "N=2000", "images_per_step=1", "max=4", f"outfile={out}"]
    first = subprocess.Popen(cli(tiny_pretrained, tmp_path / "a", *args), cwd=tiny_pretrained.cwd,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = Path(f"{out}.writer")  # who holds the lock (the lock is on the results file itself)
        deadline = time.monotonic() + 120
        while not (lock.exists() and out.exists()):
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        lock.unlink()  # a leftover-looking file deleted by hand lets no second writer in
        for other in ([], ["N=2500"]):
            with pytest.raises(ResultsError, match="is being written by.*wait=true"):
                certify_tiny(tiny_pretrained, None, tmp_path / "b", *args, *other)
        assert first.poll() is None, "the first writer ended before the refusals were checked"
        capsys.readouterr()
        caplog.clear()
        caplog.set_level(logging.INFO, logger="dsr_lightning")
        res = certify_tiny(tiny_pretrained, None, tmp_path / "w", *args, "wait=true")
        waited = capsys.readouterr().out + caplog.text  # the lines, printed or logged
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert "waiting for" in waited and "0 images to go (4 already" in waited
    assert res["done_before"] == 4 and res["todo"] == 0  # it waited, then found every image done
    assert done_indices(out) == list(range(4)) and not lock.exists()


# --- 2. identity by content ----------------------------------------------------------------------

def test_resume_refused_after_a_data_change(tiny_pretrained, tmp_path):
    out = tmp_path / "d.tsv"
    certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=2", f"outfile={out}")
    before = snapshot(out)
    with pytest.raises(ResultsError, match=r"other settings \(data: file"):
        certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=3", f"outfile={out}",
                     "data.num_test=48")  # the same split name, other images
    assert snapshot(out) == before


def test_resume_refused_after_a_checkpoint_content_change(tiny_pretrained, rejectors, tmp_path):
    """A different rejector copied to the same path (as last.ckpt changes every epoch)."""
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(rejectors[0], ckpt)
    out = tmp_path / "r.tsv"
    args = ["system=rejection", "N0=10", "N=50", "max=2", f"outfile={out}"]
    certify_tiny(tiny_pretrained, ckpt, tmp_path, *args)
    before = snapshot(out)
    shutil.copy(rejectors[1], ckpt)
    with pytest.raises(ResultsError, match=r"networks.rejector: file rejector #[0-9a-f]{16} vs "
                                           r"now rejector #[0-9a-f]{16}"):
        certify_tiny(tiny_pretrained, ckpt, tmp_path, *args, "max=3")
    assert snapshot(out) == before
    # the denoised system: its classifier's and denoiser's contents, likewise
    out = tmp_path / "den.tsv"
    den = tmp_path / "den.pth.tar"
    shutil.copy(tiny_pretrained.denoisers[0.25], den)
    dargs = ["system=denoised", "N0=10", "N=50", "max=2", f"outfile={out}", f"denoiser.path={den}"]
    certify_tiny(tiny_pretrained, None, tmp_path, *dargs)
    ck = torch.load(den, weights_only=True)
    ck["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    torch.save(ck, den)
    with pytest.raises(ResultsError, match=r"networks.denoiser: file dncnn_tiny #"):
        certify_tiny(tiny_pretrained, None, tmp_path, *dargs)


# --- 3. resumed training checks what it resumes -----------------------------------------------------

@pytest.mark.parametrize("override, key", [("sigma=0.5", "sigma"), ("T=3", "T"), ("seed=7", "seed"),
                                           ("rejector.head=clean", "rejector.head"),
                                           ("rejector.target=label", "rejector.target"),
                                           ("rejector.net.width=16", "rejector.net"),
                                           ("stage=denoiser", "stage.name")])
def test_resume_with_other_settings_is_refused(tiny_pretrained, rejectors, tiny_cfg, override,
                                               key):
    cfg = tiny_cfg(tiny_pretrained.override, override, f"ckpt_path={rejectors[0]}",
                   "optim.epochs=3", "optim.phases.0.epochs=3")
    with pytest.raises(ConfigError, match=rf"other settings[^\n]*\n(.*\n)*  {key}: checkpoint"):
        train(cfg)


def test_resume_from_a_bad_checkpoint(tiny_pretrained, rejectors, tiny_cfg, tmp_path):
    good = rejectors[0]
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt: no such file"):
        train(tiny_cfg(tiny_pretrained.override, f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    truncated = tmp_path / "t.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        train(tiny_cfg(tiny_pretrained.override, f"ckpt_path={truncated}", "optim.epochs=3",
                       "optim.phases.0.epochs=3"))
    with pytest.raises(ConfigError, match=r"has trained 1 epochs already and optim.epochs=1"):
        train(tiny_cfg(tiny_pretrained.override, f"ckpt_path={good}"))
    # the classifier stage's export is no Lightning checkpoint of train.py
    with pytest.raises(CheckpointError, match="not a checkpoint of dsr-train"):
        train(tiny_cfg(tiny_pretrained.override, f"ckpt_path={tiny_pretrained.classifier}",
                       "optim.epochs=3", "optim.phases.0.epochs=3"))


# --- 4. inputs are checked --------------------------------------------------------------------------

class Half(torch.nn.Module):
    num_classes = 2

    def forward(self, z):
        return (z.mean((1, 2, 3)) > 0.5).long()


def test_non_finite_and_out_of_range_images_are_refused():
    smoothed = SmoothedClassifier(Half(), sigma=0.25)
    x = torch.rand(3, 3, 8, 8)
    assert smoothed.certify(x, 10, 50, 0.01, 64).radius.shape == (3,)
    for bad, what in ((float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"),
                      (255.0, "outside \\[0, 1\\]"), (-0.5, "outside \\[0, 1\\]")):
        y = x.clone()
        y[1, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=what):
            smoothed.certify(y, 10, 50, 0.01, 64)
        with pytest.raises(ValueError, match=what):
            smoothed.predict(y, 50, 0.01, 64)
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        smoothed.certify(torch.where(torch.arange(3).view(3, 1, 1, 1) == 1, float("nan"), x),
                         10, 50, 0.01, 64)
    allowed = SmoothedClassifier(Half(), sigma=0.25, allow_out_of_range=True)
    assert allowed.certify(x * 255, 10, 50, 0.01, 64).prediction.tolist() == [1, 1, 1]
    y = x.clone()
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):  # never allowed
        allowed.certify(y, 10, 50, 0.01, 64)


# --- 5. impossible training settings (see also test_package's schema tests) --------------------------

@pytest.mark.parametrize("override", ["optim.epochs=-1", "optim.epochs=0",
                                      "classifier.noise_sd=-1", "optim.phases.0.optimizer.lr=-1"])
def test_impossible_classifier_settings_write_nothing(tiny_cfg, tmp_path, override):
    cfg = tiny_cfg("stage=classifier", f"pretrained_root={tmp_path / 'p'}", override,
                   out=tmp_path / "run")
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".0.", r"\[0\].")):
        train(cfg)
    assert not (tmp_path / "p").exists() and not (tmp_path / "run" / "checkpoints").exists()


# --- 6. bad rows are refused ----------------------------------------------------------------------

def test_unparsable_or_duplicated_rows_are_refused(tiny_pretrained, tmp_path):
    out = tmp_path / "rows.tsv"
    args = [*PLAIN, "max=3", f"outfile={out}"]
    certify_tiny(tiny_pretrained, None, tmp_path, *args)
    header, *body = out.read_text().split("\n")[:-1]
    good = snapshot(out)
    cases = {
        "duplicate": (header + "\n" + body[0] + "\n" + body[1] + "\n" + body[0] + "\n",
                      r"line 4: image idx 0 appears again \(first at line 2\)"),
        "unparsable": (header + "\n" + body[0] + "\n" + body[1].replace("\t", "\tx", 1) + "\n",
                       r"line 3: column label holds 'x"),
        "short": (header + "\n" + body[0] + "\n1\t2\n", r"line 3: 2 fields for 14 columns"),
    }
    for name, (text, match) in cases.items():
        out.write_text(text)
        before = out.read_bytes()
        with pytest.raises(ResultsError, match=match):
            certify_tiny(tiny_pretrained, None, tmp_path, *args, "max=4")
        assert out.read_bytes() == before, name  # refused before anything is written
        with pytest.raises(ValueError, match=match):
            load_results(out)  # the reports refuse it too
    out.write_bytes(good[0])


# --- 7. radii stay finite ----------------------------------------------------------------------------

@pytest.mark.parametrize("bound", ["paper", "runner_up", "cohen"])
def test_radius_is_finite_for_huge_counts(bound):
    N = np.array([10**3, 10**9, 10**15, 10**18, 2**62], dtype=np.int64)
    counts = np.stack([N, np.zeros_like(N), np.zeros_like(N)], 1)
    pred, radius = certify_counts(counts, np.zeros(len(N), dtype=np.int64), 0.25, 0.01, bound)
    assert np.isfinite(radius).all() and (pred == 0).all()
    assert (np.diff(radius) > 0).all()  # more draws, a larger (never infinite) radius


# --- 8. divergence is stopped; non-finite weights are refused -----------------------------------------

def poison(path: Path, out: Path) -> Path:
    ck = torch.load(path, weights_only=True)
    ck["state_dict"] = {k: torch.full_like(v, float("nan")) if k == "1.conv1.weight" else v
                        for k, v in ck["state_dict"].items()}
    torch.save(ck, out)
    return out


def test_non_finite_weights_are_refused_when_loaded(tiny_pretrained, rejectors, tmp_path):
    bad = poison(tiny_pretrained.classifier, tmp_path / "c.pth.tar")
    with pytest.raises(CheckpointError, match=r"holds non-finite weights.*\n  tensors \(1\): "
                                              r"1.conv1.weight"):
        load_checkpoint(bad)
    ck = torch.load(rejectors[0], weights_only=False)
    k = next(k for k in ck["state_dict"] if k.startswith("rejector.") and k.endswith("weight"))
    ck["state_dict"][k] = torch.full_like(ck["state_dict"][k], float("inf"))
    torch.save(ck, tmp_path / "r.ckpt")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        RunCheckpoint.read(tmp_path / "r.ckpt").rejection_system()


def test_divergence_stops_training_and_names_its_source(tiny_pretrained, tiny_cfg, tmp_path):
    # a frozen f that gives non-finite logits: a classifier file with finite but huge weights (it
    # passes the load's own check for non-finite weights: the audit's case of a classifier that
    # blows up) is refused by its probe, before any training, naming it
    ck = torch.load(tiny_pretrained.classifier, weights_only=True)
    ck["state_dict"]["1.conv1.weight"] = torch.full_like(ck["state_dict"]["1.conv1.weight"], 3e38)
    huge = tmp_path / "cifar10_classifiers" / "huge.pth.tar"
    huge.parent.mkdir()
    torch.save(ck, huge)
    load_checkpoint(huge)  # loads: every weight is finite
    cfg = tiny_cfg(tiny_pretrained.override, f"classifier.path={huge}", out=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"the classifier \(classifier.source=arch: "
                                          r"cifar_resnet8\) gives non-finite outputs"):
        train(cfg)
    assert not list((tmp_path / "a").glob("checkpoints/*.ckpt"))  # nothing saved
    # the rejector itself diverging: an absurd learning rate
    cfg = tiny_cfg(tiny_pretrained.override, "optim.phases.0.optimizer.lr=1e30", out=tmp_path / "b")
    with pytest.raises(TrainingError, match="the rejector's head logits.*lower the learning rate"):
        train(cfg)


# --- tracebacks become one clear line -------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", os.urandom(3000), b"just text\n", "truncated"])
def test_broken_rejector_checkpoint_is_one_clear_error(tiny_pretrained, rejectors, tmp_path,
                                                       content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(rejectors[0].read_bytes()[:5000] if content == "truncated" else content)
    with pytest.raises(CheckpointError, match=str(bad)):
        certify_tiny(tiny_pretrained, bad, tmp_path, "system=rejection", f"outdir={tmp_path}/res")
    assert not list((tmp_path / "res").glob("*.tsv*"))  # nothing written


def test_broken_rejector_checkpoint_on_the_command_line(tiny_pretrained, tmp_path, monkeypatch,
                                                       capsys):
    """certify.py's entry point (in process): exit status 2, one `error:` line, no traceback."""
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(os.urandom(3000))
    monkeypatch.chdir(tiny_pretrained.cwd)
    rc = run_cli(["certify", "experiment=tiny", tiny_pretrained.override,
                  f"hydra.run.dir={tmp_path / 'run'}", "system=rejection", f"rejector_ckpt={bad}",
                  f"outdir={tmp_path / 'res'}"], monkeypatch)
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"cannot read checkpoint {bad}: it is truncated or not a PyTorch checkpoint" in errors[0]
    assert not list((tmp_path / "res").glob("*.tsv*"))


def test_bad_values_and_files_are_one_error_with_nothing_written(tiny_pretrained, tmp_path):
    out = tmp_path / "x.tsv"
    # sigma=nan: refused before a file is made (it used to leave a header and a NaN record)
    with pytest.raises(ConfigError, match="sigma=nan"):
        certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "sigma=nan", f"outfile={out}")
    assert not out.exists() and not Path(f"{out}.json").exists()
    # a corrupt settings record
    certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=1", f"outfile={out}")
    Path(f"{out}.json").write_text('{"mode": "certify", ')
    before = out.read_bytes()
    with pytest.raises(ResultsError, match="settings record is corrupt"):
        certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=2", f"outfile={out}")
    assert out.read_bytes() == before
    # an output path that cannot be written, found before any work
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "file" / "r.tsv", Path("/proc/nope/r.tsv")):
        with pytest.raises(ResultsError, match="cannot write the results file"):
            certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, f"outfile={where}")


def test_lost_write_restarts_the_file(tiny_pretrained, tmp_path):
    out = tmp_path / "lost.tsv"
    certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=2", f"outfile={out}")
    whole = pd.read_csv(out, sep="\t").drop(columns="time")
    out.write_bytes(b"")  # the data of a lost write; the record is still there
    res = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=2", f"outfile={out}")
    assert res["done_before"] == 0 and res["todo"] == 2
    pd.testing.assert_frame_equal(whole, pd.read_csv(out, sep="\t").drop(columns="time"))


def test_report_names_a_binary_file(tmp_path, capsys):
    bad = tmp_path / "b.tsv"
    bad.write_bytes(b"idx\tlabel\x00\xff\xfe" + os.urandom(200))
    assert report_main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a results file" in err and "Traceback" not in err


def test_stage_weights_default_to_the_stages_given(tiny_pretrained, tmp_path):
    assert default_weights(2) == pytest.approx((0.3, 0.7))
    assert default_weights(3) == pytest.approx((0.1, 0.2, 0.7))
    assert default_weights(1) == (1.0,)
    res = certify_tiny(tiny_pretrained, None, tmp_path, "system=plain", "mode=staged",
                       "radius=0.1", "stages=[10,50]", "N=50", "N0=10", "max=2",
                       f"outdir={tmp_path}")
    assert json.loads(Path(res["settings"]).read_text())["stage_weights"] == pytest.approx(
        [0.3, 0.7])


def test_an_image_gets_the_same_draws_however_the_run_is_cut(tiny_pretrained, tmp_path):
    """Per-image noise: the rows of images 0..5 are the same in steps of 1, 2 and 4 images,
    with another batch size, and when certified from index 3 on only."""
    frames = []
    for i, over in enumerate((["images_per_step=1"], ["images_per_step=4", "batch=37"],
                              ["images_per_step=2", "batch=200"])):
        res = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=6", *over,
                           f"outfile={tmp_path / f'{i}.tsv'}")
        frames.append(pd.read_csv(res["outfile"], sep="\t").drop(columns="time"))
    for f in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], f)
    # image 3 alone, from a file that has 0..2 done (a resumed run starting at 3)
    part = tmp_path / "part.tsv"
    shutil.copy(tmp_path / "0.tsv", part)
    shutil.copy(tmp_path / "0.tsv.json", f"{part}.json")
    lines = part.read_text().split("\n")
    part.write_text("\n".join(lines[:4]) + "\n")
    certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "max=6", "images_per_step=3",
                 f"outfile={part}")
    pd.testing.assert_frame_equal(frames[0], pd.read_csv(part, sep="\t").drop(columns="time"))
