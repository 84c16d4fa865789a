"""Trust, class by class: independent noise on every device, nothing tuned on the test set, radii
never rounded up, a never-rejecting f_R not paying for a reject class, records that name what the
numbers depend on; no silent wrong result (resume records, one process per run folder, a lock that
cannot be defeated, non-numeric thresholds, SIGTERM, divergence with a finite loss, standard JSON,
callbacks=none, empty splits, thresholds that do not apply); clear errors instead of tracebacks;
messages that do not mislead."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_tiny
from hydra.core.hydra_config import HydraConfig

from dsr_lightning.cli import main as cli_main
from dsr_lightning.config import record_dir
from dsr_lightning.config.schema import check_certify
from dsr_lightning.data.cifar10 import load_subset
from dsr_lightning.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ResultsError,
    TrainingError,
)
from dsr_lightning.files import RunFolderLock
from dsr_lightning.jobs.certification import certify
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.threshold import main as threshold_main
from dsr_lightning.jobs.trainer_parts import AtomicCheckpointIO
from dsr_lightning.jobs.training import train
from dsr_lightning.reports import certified_accuracy, load_results
from dsr_lightning.results import CERTIFY_COLUMNS, ResultsFile, WriterLock, jsonable, read_settings
from dsr_lightning.smoothing import ImageNoise

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _certify(tiny, out: Path, *overrides: str) -> dict:
    cfg = compose_tiny(out, [tiny.override, f"outdir={out}", "N0=10", "N=64", "max=2",
                             *overrides], name="certify")
    try:
        return certify(cfg)
    finally:
        HydraConfig.instance().cfg = None


def _train(out: Path, *overrides: str) -> dict:
    try:
        return train(compose_tiny(out, list(overrides)))
    finally:
        HydraConfig.instance().cfg = None


@pytest.fixture
def auto_rejector(rejector_runs) -> dict:
    """A tiny rejector trained with threshold=auto (the default) for σ = 0.25: the session's
    seed-0 rejector (conftest), shared: a test that resumes it works on a copy."""
    return rejector_runs[0]


# --- soundness ------------------------------------------------------------------------------

def test_noise_keys_that_differ_above_bit_32_give_other_draws():
    for seed, keys in ((0, [5, 5 + (1 << 32)]), (1 << 33, [7, 7])):
        a = ImageNoise(seed, keys[:1]).draw(0, 0, 8, (3,), "cpu", torch.float32)
        b = ImageNoise(seed if keys[0] != keys[1] else 0, keys[1:]).draw(0, 0, 8, (3,), "cpu",
                                                                          torch.float32)
        assert not torch.equal(a, b)
    # the selection draws (keys 2**40 + i) are apart from certification's (key i)
    a = ImageNoise(0, [3]).draw(0, 0, 4, (2,), "cpu", torch.float32)
    b = ImageNoise(0, [(1 << 40) + 3]).draw(0, 0, 4, (2,), "cpu", torch.float32)
    assert not torch.equal(a, b)


def test_no_noise_block_repeats_over_the_cifar10_test_set_at_n_10000():
    """10,000 images x 40 blocks of 256 draws (N = 10,000): every block differs from every other
    (the audit found 17 bit-identical pairs with the hashed seeds, of which torch's CPU generator
    keeps 32 bits)."""
    noise = ImageNoise(0, range(10_000))
    first = torch.stack([torch.stack([noise.draw(b, j * 256, j * 256 + 2, (1,), "cpu",
                                                 torch.float32)[:, 0] for j in range(40)])
                         for b in range(10_000)])  # (image, block, first two draws)
    bits = first.numpy().reshape(-1, 2).view(np.uint64)  # one 64-bit word per block
    assert len(np.unique(bits)) == len(bits) == 400_000
    # at N = 100,000 the old scheme repeated draws 27392-27647 as 47616-47871 in image 2700
    blocks = [noise.draw(2700, j * 256, (j + 1) * 256, (1,), "cpu", torch.float32)
              for j in (107, 186)]
    assert not torch.equal(*blocks)


def test_the_sweep_objective_is_a_validation_figure(auto_rejector):
    choice = auto_rejector["threshold_choice"]
    assert choice["split"] == "val"
    assert auto_rejector["objective"] == choice["score"]  # never a test-split certificate


def test_radii_are_written_exactly_and_counted_exactly(tmp_path):
    path = tmp_path / "r.tsv"
    rows = [{"idx": i, "label": 0, "predict": 0, "radius": r, "correct": 1, "time": 0.0,
             "n_A": 90, "n_R": 0, "n_B": 10, "N": 100, "pA_lower": 0.8, "pAR_lower": 0.8,
             "pB_upper": 0.2, "c_hat": 0} for i, r in enumerate([0.49999951, 0.5, 0.1234567891234])]
    f = ResultsFile(path, {"format": 2, "mode": "certify"}, CERTIFY_COLUMNS)
    f.open()
    f.append(rows)
    df = load_results(path)
    assert df["radius"].tolist() == [0.49999951, 0.5, 0.1234567891234]  # no written radius rounded
    assert certified_accuracy(df, [0.5])[0] == pytest.approx(1 / 3)


def test_a_never_rejecting_rejector_is_certified_as_the_denoised_system(
        auto_rejector, tiny_pretrained, tmp_path):
    rej = _certify(tiny_pretrained, tmp_path, "system=rejection",
                   f"rejector_ckpt={auto_rejector['best']}", "threshold=inf")
    den = _certify(tiny_pretrained, tmp_path, "system=denoised")
    rec = read_settings(rej["outfile"])
    assert rec["bound"] == "cohen" and rec["threshold"] == "inf" and "_cohen_" in rej["outfile"]
    a, b = load_results(rej["outfile"]), load_results(den["outfile"])
    assert (a["n_R"] == 0).all()
    assert a["radius"].tolist() == b["radius"].tolist()  # the same draws, the same certificate
    # what the numbers depend on beyond the identity
    assert {"torch", "dsr_lightning", "device_model"} <= rec["versions"].keys()
    assert rec["versions"]["torch"] == torch.__version__


# --- silent wrong ---------------------------------------------------------------------------

def test_a_resume_never_overwrites_the_runs_record(tiny_cfg):
    assert record_dir(None, "t") == ".hydra"
    assert record_dir("outputs/run/checkpoints/last.ckpt", "t") == ".hydra/resumes/t"
    cfg = tiny_cfg("ckpt_path=x/checkpoints/last.ckpt")
    assert str(cfg.hydra.output_subdir).startswith(".hydra/resumes/")
    assert tiny_cfg().hydra.output_subdir == ".hydra"


def test_one_training_process_per_run_folder(tmp_path):
    with RunFolderLock(tmp_path):
        with pytest.raises(ConfigError, match="in use by another training process"):
            with RunFolderLock(tmp_path):
                pass
    with RunFolderLock(tmp_path):  # released
        pass


def test_the_results_lock_cannot_be_defeated_by_deleting_a_file(tmp_path):
    path = tmp_path / "x.tsv"
    with WriterLock(path).acquire():
        for leftover in tmp_path.iterdir():  # whatever looks like a stale lock
            if leftover != path:
                leftover.unlink()
        with pytest.raises(ResultsError, match="being written by"):
            WriterLock(path).acquire()
    assert not path.exists()  # created by the lock, never written: removed
    WriterLock(path).acquire().release()


@pytest.mark.parametrize("value", [float("nan"), "abc", None, True])
def test_a_checkpoint_threshold_that_is_no_number_is_refused(tmp_path, value):
    path = tmp_path / "r.ckpt"
    torch.save({"state_dict": {}, "dsr_config": {"stage": {"name": "rejector"},
                                                   "rejector": {"threshold": "auto"}},
                "dsr_threshold": {"value": value}}, path)
    with pytest.raises(CheckpointError, match="not a number"):
        RunCheckpoint.read(path).threshold()


def test_settings_records_are_standard_json():
    rec = jsonable({"threshold": float("inf"), "x": [float("-inf"), np.float32(1.5)],
                    "n": float("nan")})
    assert json.loads(json.dumps(rec, allow_nan=False)) == {"threshold": "inf",
                                                            "x": ["-inf", 1.5], "n": "nan"}


def test_non_finite_parameters_or_buffers_are_never_saved(tmp_path):
    from dsr_lightning.tasks import RejectorTask

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(2)

    optim = {"phases": [{"epochs": 1, "optimizer": {"_target_": "torch.optim.SGD",
                                                     "_partial_": True, "lr": 0.1}}]}
    task = RejectorTask(Net(), None, Net(), optim)
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)  # finite: fine
    task.rejector.bn.running_var.fill_(float("inf"))  # the loss may stay finite meanwhile
    with pytest.raises(TrainingError, match=r"non-finite values in 1 tensor\(s\) of the network "
                                            r"being trained.*rejector.bn.running_var"):
        task.on_save_checkpoint({"state_dict": task.state_dict()})


def test_callbacks_none_writes_no_checkpoint(tiny_pretrained, tmp_path):
    _train(tmp_path, tiny_pretrained.override, "stage=classifier", "callbacks=none",
           "overwrite=true", f"classifier.path={tmp_path / 'f.pth.tar'}")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_empty_split_and_inapplicable_threshold_are_refused(tiny_pretrained, tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="holds no images"):
        _certify(tiny_pretrained, tmp_path, "system=plain", "data.num_test=0")
    assert not list(tmp_path.glob("*.tsv*"))
    cfg = tiny_cfg("system=denoised", "threshold=0", name="certify")
    with pytest.raises(ConfigError, match="only system=rejection has a rejector threshold"):
        check_certify(cfg)


def _wait_for(path: Path, proc: subprocess.Popen, what) -> None:
    deadline = time.monotonic() + 180
    while not what(path):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.process
def test_sigterm_stops_certification_keeps_rows_and_says_how_to_resume(tiny_pretrained, tmp_path):
    out = tmp_path / "c.tsv"
    cmd = [sys.executable, str(REPO / "certify.py"), "experiment=tiny", tiny_pretrained.override,
           "system=plain", "N=4000", "batch=500", "images_per_step=1", "max=200",
           f"outfile={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=tiny_pretrained.cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out, proc, lambda p: p.is_file() and len(p.read_text().splitlines()) >= 2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 30  # promptly, not after the remaining images
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Run the same command again to resume" in err
    rows = out.read_text().splitlines()[1:]
    assert 1 <= len(rows) < 200 and all(len(r.split("\t")) == len(CERTIFY_COLUMNS) for r in rows)


@pytest.mark.slow
def test_sigterm_stops_training_non_zero_with_the_resume_command(tiny_pretrained, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "experiment=tiny", tiny_pretrained.override,
           "optim.epochs=50", "optim.phases.0.epochs=50", "trainer.limit_train_batches=2",
           f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tiny_pretrained.cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "last.ckpt", proc, Path.is_file)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "training stopped by SIGTERM" in err and "ckpt_path=" in err and "last.ckpt" in err


# --- clear errors instead of tracebacks -----------------------------------------------------

@pytest.mark.parametrize("args", [["--images", "0"], ["--draws", "0"], ["--alpha", "2"],
                                  ["--N", "-5"], ["--N", "0"]])
def test_threshold_tool_arguments(args, capsys):
    with pytest.raises(SystemExit) as e:
        threshold_main(["some.ckpt", *args])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_help_exits_zero_on_stdout(capsys):
    assert cli_main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_training_config_errors_before_training(tiny_pretrained, tmp_path):
    base = [tiny_pretrained.override, "sigma=0.25"]
    with pytest.raises(ConfigError, match="validation split, which is empty"):
        _train(tmp_path / "a", *base, "data.num_val=0")
    with pytest.raises(ConfigError, match="is not a Lightning Callback"):
        _train(tmp_path / "b", *base, "+callbacks.bad._target_=collections.OrderedDict")
    assert not list(tmp_path.rglob("*.ckpt"))
    with pytest.raises(CheckpointError, match="holds arch"):
        _train(tmp_path / "c", tiny_pretrained.override, "stage=denoiser", "sigma=0.25",
               f"stage.init_from={tiny_pretrained.classifier}", "overwrite=true",
               f"denoiser.path={tmp_path / 'd.pth.tar'}")


def test_a_full_disk_is_one_clear_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    good = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, good)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError, match="the disk is full"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, good)
    monkeypatch.undo()
    assert torch.load(good, weights_only=False) == {"epoch": 1}  # the good one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    if Path("/dev/full").exists():
        f = ResultsFile(tmp_path / "x.tsv", {}, CERTIFY_COLUMNS)
        with pytest.raises(ResultsError, match="the disk is full"):
            f.append([{"idx": 0}], path=Path("/dev/full"))


# --- messages that mislead ------------------------------------------------------------------

def test_a_corrupt_npz_is_not_a_valid_array_file(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError) as e:
        load_subset(bad)
    assert "not a valid NumPy array file" in str(e.value) and "allow_pickle" not in str(e.value)


def test_missing_classifier_hint_and_folder_paths(tiny_pretrained, tmp_path, tiny_cfg):
    from dsr_lightning.jobs.networks import load_frozen

    cfg = tiny_cfg("system=plain", "classifier.noise_sd=0.25",
                   f"pretrained_root={tmp_path / 'none'}", name="certify")
    with pytest.raises(ConfigError) as e:
        load_frozen("classifier", cfg.classifier)
    msg = str(e.value)
    assert "noise_0.25/checkpoint.pth.tar" in msg and "classifier.noise_sd=0.25" in msg
    cfg.classifier.path = str(tmp_path)
    with pytest.raises(ConfigError, match="is a folder"):
        load_frozen("classifier", cfg.classifier)
    with pytest.raises(CheckpointError, match="is a folder"):
        RunCheckpoint.read(tmp_path)


def test_finished_run_resumes_its_certification(auto_rejector, tiny_pretrained, tmp_path):
    """A run stopped during its in-job certification: `ckpt_path=... certify=quick` trains no
    epoch and resumes the results file (rows kept) instead of refusing 'nothing to resume'."""
    run = tmp_path / "run"  # resumed in place: a copy of the shared run folder
    shutil.copytree(auto_rejector["output_dir"], run)
    last = run / "checkpoints" / "last.ckpt"
    res = _train(run, tiny_pretrained.override, "sigma=0.25", f"ckpt_path={last}",
                 "certify=quick", "certify.max=2", "certify.N=64", "certify.N0=10")
    cert = res["certification"]["rejection"]
    first = Path(cert["file"]).read_text()
    again = _train(run, tiny_pretrained.override, "sigma=0.25", f"ckpt_path={last}",
                   "certify=quick", "certify.max=3", "certify.N=64", "certify.N0=10")
    text = Path(again["certification"]["rejection"]["file"]).read_text()
    assert text.startswith(first) and len(text.splitlines()) == len(first.splitlines()) + 1
    assert math.isfinite(again["certification"]["rejection"]["acr"])
