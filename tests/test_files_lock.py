"""files.FileLock, the one lock of the package (the run folder's, the results file's), the package
importing on platforms without fcntl, and the stage's task built from its config node
`stage.task` with every override reaching it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from dsr_lightning.errors import ConfigError, ResultsError, WriteError
from dsr_lightning.files import FileLock, Locked, RunFolderLock
from dsr_lightning.results import WriterLock

REPO = Path(__file__).resolve().parent.parent


# --- the lock primitive --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path, kind):
    path = tmp_path / ("x.tsv" if kind == "file" else "run")
    if kind == "folder":
        path.mkdir()
    with FileLock(path, create=True) as first:
        assert first.held
        second = FileLock(path, create=True)
        with pytest.raises(Locked):
            second.acquire()
        assert not second.held
    assert not first.held
    with FileLock(path, create=True) as again:  # released at the end of the block
        assert again.held


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    path = tmp_path / "x"
    with pytest.raises(RuntimeError, match="boom"):
        with FileLock(path, create=True):
            raise RuntimeError("boom")
    FileLock(path).acquire().release()  # free again


def test_a_waiting_holder_says_so_once_and_gets_the_lock_when_it_is_released(tmp_path):
    path = tmp_path / "x"
    first = FileLock(path, create=True).acquire()
    said: list[float] = []
    timer = threading.Timer(0.3, first.release)
    timer.start()
    try:
        t0 = time.monotonic()
        second = FileLock(path).acquire(wait=True, poll=0.02, waiting=lambda: said.append(1))
        waited = time.monotonic() - t0
    finally:
        timer.join()
    assert second.held and said == [1] and waited >= 0.25
    second.release()


def test_a_missing_file_without_create_is_one_error(tmp_path):
    with pytest.raises(WriteError, match=r"cannot lock .*nope"):
        FileLock(tmp_path / "nope").acquire()


@pytest.mark.process
def test_a_lock_held_by_another_process_is_refused_and_released_when_it_dies(tmp_path):
    path = tmp_path / "x.tsv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dsr_lightning.files import FileLock\n"
         f"FileLock({str(path)!r}, create=True).acquire()\nprint('held', flush=True)\n"
         "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Locked):
            FileLock(path).acquire()
        with pytest.raises(ResultsError, match="is being written by"):
            WriterLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with WriterLock(path).acquire():  # the OS let it go with the process
        pass


def test_the_run_folder_lock_keeps_its_message(tmp_path):
    with RunFolderLock(tmp_path):
        with pytest.raises(ConfigError, match="in use by another training process"):
            RunFolderLock(tmp_path).acquire()


def test_the_results_writer_waits_and_logs_it(tmp_path, caplog):
    path = tmp_path / "r.tsv"
    first = WriterLock(path).acquire()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    try:
        with caplog.at_level(logging.INFO, logger="dsr_lightning"):
            second = WriterLock(path).acquire(wait=True, poll=0.02)
    finally:
        timer.join()
    second.release()
    waits = [r for r in caplog.records if r.name == "dsr_lightning.results"]
    assert len(waits) == 1 and "waiting for pid" in waits[0].getMessage()


# --- no fcntl: the package still imports ---------------------------------------------------------

NO_FCNTL = """
import importlib, sys
sys.modules["fcntl"] = None          # `import fcntl` raises ImportError, as on Windows
import dsr_lightning.files as files
import dsr_lightning.results as results
importlib.reload(files)
importlib.reload(results)
import dsr_lightning.jobs.training   # nor does the training job import it at import time
try:
    files.FileLock(sys.argv[1], create=True).acquire()
except files.WriteError as e:
    print("ERROR", e)
else:
    print("LOCKED")  # a platform with msvcrt
"""


@pytest.mark.process
def test_the_package_imports_without_fcntl_and_a_lock_says_why_it_cannot(tmp_path):
    res = subprocess.run([sys.executable, "-c", NO_FCNTL, str(tmp_path / "x")], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout.strip().splitlines()[-1]
    assert out == "LOCKED" or ("no file locks" in out and "fcntl" in out), out


# --- the task from its config node ---------------------------------------------------------------

def test_rejector_overrides_reach_the_task_built_from_its_node(tiny_pretrained, tiny_cfg):
    from dsr_lightning.jobs.training import build_task

    cfg = tiny_cfg(tiny_pretrained.override, "rejector.pos_weight=0.3", "rejector.head=clean",
                   "rejector.target=label", "rejector.correct_weight=2.0",
                   "rejector.focal_gamma=1.5", "rejector.threshold=0.7", "optim.lr=0.004")
    assert cfg.stage.task._target_ == "dsr_lightning.tasks.RejectorTask"
    task, export = build_task(cfg, {})
    assert export is None
    assert (task.pos_weight, task.head, task.target, task.correct_weight, task.focal_gamma,
            task.threshold) == (0.3, "clean", "label", 2.0, 1.5, 0.7)
    assert task.optim_cfg.lr == 0.004
    HydraConfig.instance().cfg = None


def test_the_classifier_and_denoiser_tasks_take_their_overrides(tiny_cfg):
    from dsr_lightning.jobs.training import build_task

    task, _ = build_task(tiny_cfg("stage=classifier", "classifier.noise_sd=0.5"), {})
    assert type(task).__name__ == "ClassifierTask" and task.noise_sd == 0.5
    task, _ = build_task(tiny_cfg("stage=denoiser", "stage.objective=mse"), {})
    assert type(task).__name__ == "DenoiserTask" and task.objective == "mse"


def test_a_bad_task_node_is_one_config_error(tiny_cfg):
    from dsr_lightning.jobs.training import build_task

    with pytest.raises(ConfigError, match=r"stage.task: cannot build"):
        build_task(tiny_cfg("stage=classifier", "stage.task._target_=dsr_lightning.tasks.Nope"), {})
    with pytest.raises(ConfigError, match=r"stage.task: cannot build .*ClassifierTask"):
        build_task(tiny_cfg("stage=classifier", "+stage.task.bogus=1"), {})


def test_on_windows_the_lock_is_on_a_byte_past_the_data(tmp_path, monkeypatch):
    """The msvcrt path (Windows' mandatory byte-range locks), with a stand-in msvcrt that records
    where it locks: one byte at MSVCRT_OFFSET, never the header and rows the holder writes; a lock
    held elsewhere (EACCES) is refused; a folder is locked through its `.lock` file."""
    import errno
    import types

    from dsr_lightning import files

    calls, busy = [], set()

    def locking(fd, mode, nbytes):
        where = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        calls.append((mode, where[1], nbytes))
        if mode == fake.LK_NBLCK:
            if where in busy:
                raise OSError(errno.EACCES, "locked")
            busy.add(where)
        else:
            busy.discard(where)

    fake = types.SimpleNamespace(LK_NBLCK=2, LK_UNLCK=0, locking=locking)
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    target = tmp_path / "results.tsv"
    target.write_text("header\n")
    with files.FileLock(target):
        assert calls == [(fake.LK_NBLCK, files.MSVCRT_OFFSET, 1)]
        with pytest.raises(files.Locked):
            files.FileLock(target).acquire()
        with open(target, "a") as f:  # the holder's own rows, through another handle
            f.write("row\n")
    assert calls[-1] == (fake.LK_UNLCK, files.MSVCRT_OFFSET, 1) and not busy
    with files.FileLock(tmp_path):
        assert (tmp_path / ".lock").is_file()
