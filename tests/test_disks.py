"""Full and read-only disks (docs/DESIGN.md §12): every file the package writes whole goes through
files.atomic_write, so a failing disk at any point of a write is one clear error naming the file
and the cause, the file that was there is whole and no temporary file is left; a stage checks its
folders before training, not after it. Tests run as root (here and in CI), where chmod stops
nothing: a full or read-only disk is simulated by making the write call itself fail with the errno
a real one gives, at the exact point it would."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from helpers import compose_tiny, error_lines, run_cli
from hydra.core.hydra_config import HydraConfig

import dsr_lightning.files as files
from dsr_lightning.errors import ResultsError, TrainingError, WriteError
from dsr_lightning.jobs import networks
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.trainer_parts import AtomicCheckpointIO
from dsr_lightning.jobs.training import train
from dsr_lightning.models import build_arch, load_checkpoint, save_checkpoint
from dsr_lightning.results import CERTIFY_COLUMNS, ResultsFile

CAUSES = {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only file system"}
CODES = pytest.mark.parametrize("code", sorted(CAUSES), ids=lambda c: errno.errorcode[c])


def failing(code: int, real=None, after: int = 0):
    """A stand-in for a write call that fails as a full (ENOSPC) or read-only (EROFS) disk does.
    With `real` (torch.save), part of the file is written first: the disk fills mid-write."""

    def fail(*args, **kwargs):
        if real is not None and len(args) > 1 and hasattr(args[1], "write"):
            args[1].write(b"\0" * 1000)
        raise OSError(code, os.strerror(code))

    return fail


def only_ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- every atomic writer: one error, the old file whole, no temporary file ----------------------

def _export_arch(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    save_checkpoint(path, build_arch("cifar_resnet8"), arch="cifar_resnet8", noise_sd=0.0)


def _export_module(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    networks.export(path, "denoiser", nn.Conv2d(3, 3, 3, padding=1),
                    {"source": "module", "_target_": "torch.nn.Conv2d"}, sigma=0.25)


@CODES
@pytest.mark.parametrize("point", ["torch.save", "os.replace"])
@pytest.mark.parametrize("write", [_export_arch, _export_module], ids=["arch", "module"])
def test_a_failing_disk_at_an_export_is_one_error_and_keeps_the_network(tmp_path, monkeypatch,
                                                                         write, point, code):
    path = tmp_path / "nets" / "checkpoint.pth.tar"
    write(path, seed=0)
    before = path.read_bytes()
    if point == "torch.save":
        monkeypatch.setattr(torch, "save", failing(code, real=torch.save))
    else:
        monkeypatch.setattr(os, "replace", failing(code))
    with pytest.raises(WriteError) as e:
        write(path, seed=1)
    monkeypatch.undo()
    msg = str(e.value)
    assert str(path) in msg and CAUSES[code] in msg and "unchanged" in msg and "To fix" in msg
    assert path.read_bytes() == before and only_ours(path.parent) == [path.name]
    if write is _export_arch:
        load_checkpoint(path)  # still loads


def test_a_read_only_disk_at_a_training_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    # (a full disk there: tests/test_trust.py)
    good = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, good)
    monkeypatch.setattr(os, "replace", failing(errno.EROFS))
    with pytest.raises(TrainingError, match="read-only file system") as e:
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, good)
    monkeypatch.undo()
    assert "resume from the last one" in str(e.value)
    assert torch.load(good, weights_only=False) == {"epoch": 1}
    assert only_ours(tmp_path) == ["last.ckpt"]


def test_write_threshold_under_a_full_disk_keeps_the_checkpoint_whole(rejector, tmp_path,
                                                                      monkeypatch):
    ckpt = tmp_path / "best.ckpt"
    shutil.copy(rejector, ckpt)
    before = ckpt.read_bytes()
    run = RunCheckpoint.read(ckpt)
    monkeypatch.setattr(torch, "save", failing(errno.ENOSPC, real=torch.save))
    with pytest.raises(WriteError, match="the disk is full") as e:
        run.write_threshold({**(run.threshold_choice or {}), "value": 1.5})
    monkeypatch.undo()
    assert str(ckpt) in str(e.value) and "chooses the threshold again" in str(e.value)
    assert ckpt.read_bytes() == before and only_ours(tmp_path) == ["best.ckpt"]
    assert RunCheckpoint.read(ckpt).threshold_choice == run.threshold_choice  # whole, as it was


@pytest.mark.parametrize("full_at", ["record", "header"])
def test_a_results_file_under_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch, full_at):
    """The disk fills as the settings record or the header is fsynced: one ResultsError, nothing
    temporary left, and what is left is started again by the next run."""
    out = tmp_path / "r.tsv"
    results = ResultsFile(out, {"format": 2, "mode": "certify", "sigma": 0.25}, CERTIFY_COLUMNS)
    fsync = os.fsync

    def fsync_until_full(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if (".json" in name) == (full_at == "record") and name != tmp_path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(ResultsError, match="the disk is full"):
        results.open()
    monkeypatch.undo()
    left = only_ours(tmp_path)
    assert left == (["r.tsv", "r.tsv.json"] if full_at == "header" else []), left
    if full_at == "header":  # the record is whole, the results file empty: a lost write
        assert out.stat().st_size == 0
    assert results.check() == set()  # the next run starts the file again
    results.open()
    assert out.read_text() == "\t".join(CERTIFY_COLUMNS) + "\n"


def test_atomic_write_removes_its_temporary_file_whatever_fails(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def interrupted(f):
        f.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not an OSError: propagates as it is
        files.atomic_write(path, interrupted)
    assert path.read_bytes() == b"old" and only_ours(tmp_path) == ["f"]
    files.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and only_ours(tmp_path) == ["f"]
    with pytest.raises(WriteError, match="a part of the path is a file") as e:
        files.atomic_write(path / "below" / "g", lambda f: f.write(b"x"))
    assert f"cannot write the file {path / 'below' / 'g'}" in str(e.value)


# --- the checks before training -----------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    """A stage that reaches Trainer.fit fails the test: the check must come before any epoch."""
    monkeypatch.setattr(pl.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))


def _probe_fails(monkeypatch, folder: Path, code: int) -> None:
    """check_writable's probe in `folder` (and only there) fails as a full/read-only disk would."""
    real = os.open

    def fake(path, *args, **kwargs):
        if Path(path).parent == folder and Path(path).name.startswith(".probe"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("folder", ["export", "checkpoints"])
@CODES
def test_a_stage_refuses_an_unwritable_folder_before_training(tmp_path, monkeypatch, no_training,
                                                              folder, code):
    root, run = tmp_path / "pretrained", tmp_path / "run"
    cfg = compose_tiny(run, ["stage=classifier", f"pretrained_root={root}"])
    target = Path(cfg.classifier.path).parent if folder == "export" else run / "checkpoints"
    _probe_fails(monkeypatch, target, code)
    try:
        with pytest.raises(WriteError) as e:
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert str(target) in str(e.value) and CAUSES[code] in str(e.value)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.pth.tar"))


def test_an_export_path_below_a_file_is_one_error_before_training(tmp_path, monkeypatch,
                                                                  no_training, capsys):
    """Through the CLI as a user runs it (root included: no permission trick): one `error:` line,
    exit status 2, no epoch."""
    (tmp_path / "a_file").write_text("")
    status = run_cli(["train", "stage=classifier", "experiment=tiny", "trainer.accelerator=cpu",
                      f"pretrained_root={tmp_path / 'a_file' / 'x'}",
                      f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 2, err
    (line,) = error_lines(err)
    assert "a part of the path is a file" in line and "pretrained_root" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_overwrite_announces_the_network_it_replaces(tmp_path, monkeypatch, caplog):
    root, run = tmp_path / "pretrained", tmp_path / "run"
    cfg = compose_tiny(run, ["stage=classifier", f"pretrained_root={root}", "overwrite=true"])
    path = Path(cfg.classifier.path)
    _export_arch(path, seed=0)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(pl.Trainer, "fit", stop)
    try:
        with pytest.raises(Stop):
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    lines = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert lines == [f"overwrite=true: this run's classifier will replace {path}"]
