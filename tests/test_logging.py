"""The package logs (dsr_lightning.logs): a Hydra job's lines reach its `<job>.log` file through
conf/hydra/job_logging/dsr.yaml (every line of the package, DEBUG included) while the console
shows the plain message; per-image certification rows are INFO without a progress bar and DEBUG
under one (in the file, not on the console); the end-of-run summary is INFO; a user error is one
`error:` line on stderr (and in the file); entry points outside Hydra get the plain console."""

from __future__ import annotations

import logging
import re

import pytest
from helpers import SMALL, run_cli

from dsr_lightning.logs import BelowLevel, console, get_logger, main_process, row_level

STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\]\[([\w.]+)\]\[(\w+)\] - (.*)$")


def _records(log_file) -> list[tuple[str, str, str]]:
    """(logger, level, first line of the message) of each record in a job's log file."""
    return [m.groups() for ln in log_file.read_text().splitlines() if (m := STAMP.match(ln))]


def _certify(tiny, tmp_path, monkeypatch, name: str, *extra: str) -> tuple[int, object]:
    run_dir = tmp_path / name
    monkeypatch.chdir(tiny.cwd)
    rc = run_cli(["certify", "experiment=tiny", tiny.override, *SMALL, "trainer.accelerator=cpu",
                  f"outdir={tmp_path / 'results' / name}", f"hydra.run.dir={run_dir}", *extra],
                 monkeypatch)
    return rc, run_dir / "certify.log"


def test_certify_without_a_bar_rows_at_info_on_the_console_and_in_the_log_file(
        tiny_pretrained, tmp_path, monkeypatch, capsys):
    rc, log_file = _certify(tiny_pretrained, tmp_path, monkeypatch, "plain", "system=plain",
                            "trainer.enable_progress_bar=false")
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    rows = [ln for ln in out.splitlines() if ln.startswith("[certify]")]
    assert len(rows) == 4 and all(" idx " in r and "s/img" in r for r in rows), out
    assert not any(STAMP.match(ln) for ln in out.splitlines())  # the console: messages alone
    recs = _records(log_file)
    assert [lvl for lg, lvl, m in recs if m.startswith("[certify]")] == ["INFO"] * 4
    assert {lg for lg, _, m in recs if m.startswith("[certify]")} == {
        "dsr_lightning.tasks.prediction"}
    # what the job said before the rows and the summary after them: INFO, on both
    assert ("dsr_lightning.jobs.certification", "INFO") in {
        (lg, lvl) for lg, lvl, m in recs if "images to go" in m}
    assert "settings: " in out and "| system |" in out
    assert any(lg == "dsr_lightning.cli" and lvl == "INFO" for lg, lvl, _ in recs)
    assert "| system |" in log_file.read_text()


def test_certify_under_a_bar_rows_at_debug_in_the_log_file_only(
        tiny_pretrained, tmp_path, monkeypatch, capsys):
    rc, log_file = _certify(tiny_pretrained, tmp_path, monkeypatch, "bar", "system=plain",
                            "trainer.enable_progress_bar=true")
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "[certify]" not in out and "[certify]" not in err  # the bar is left alone
    recs = _records(log_file)
    assert [lvl for _, lvl, m in recs if m.startswith("[certify]")] == ["DEBUG"] * 4
    assert "settings: " in out and "| system |" in out  # the summary is shown all the same


def test_a_user_error_is_one_line_on_stderr_and_in_the_log_file(
        tiny_pretrained, tmp_path, monkeypatch, capsys):
    rc, log_file = _certify(tiny_pretrained, tmp_path, monkeypatch, "err", "system=rejection",
                            "rejector_ckpt=null")
    out, err = capsys.readouterr()
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rejector_ckpt" in errors[0] and "Traceback" not in err
    assert "error:" not in out
    assert [(lg, lvl) for lg, lvl, m in _records(log_file) if m.startswith("error:")] == [
        ("dsr_lightning.cli", "ERROR")]


def test_row_level():
    assert row_level(progress_bar=True) == logging.DEBUG
    assert row_level(progress_bar=False) == logging.INFO


def test_console_outside_hydra(capsys):
    log = get_logger("dsr_lightning.reports.somewhere")
    assert get_logger("reports.x").name == "dsr_lightning.reports.x"
    with console():
        log.debug("not shown")
        log.info("a table")
        log.warning("a note")
        log.error("error: a message")
    out, err = capsys.readouterr()
    assert out == "a table\n" and err == "a note\nerror: a message\n"
    log.info("gone with the console")
    assert capsys.readouterr().out == ""
    assert not logging.getLogger("dsr_lightning").handlers
    with console(logging.DEBUG):  # a second call replaces the first's handlers
        console(logging.DEBUG)
        log.debug("once")
        assert capsys.readouterr().out == "once\n"


def test_below_level_filter():
    f = BelowLevel("WARNING")
    rec = lambda level: logging.LogRecord("x", level, __file__, 1, "m", None, None)  # noqa: E731
    assert f.filter(rec(logging.INFO)) and not f.filter(rec(logging.WARNING))


def test_main_process_follows_lightnings_rank(monkeypatch):
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    assert main_process()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert not main_process()


@pytest.mark.parametrize("name", ["train", "certify"])
def test_both_jobs_select_the_configs(name):
    from dsr_lightning.config import compose

    cfg = compose(name, [])
    job, launcher = cfg.hydra.job_logging, cfg.hydra.hydra_logging
    assert job.handlers.console.formatter == "plain" and job.formatters.plain.format == "%(message)s"
    assert job.handlers.file.level == "DEBUG" and job.loggers.dsr_lightning.level == "DEBUG"
    assert launcher.formatters.plain.format == "%(message)s"


def test_lightnings_lines_go_through_the_jobs_logging(monkeypatch, caplog):
    """Lightning, imported before the job set up logging, has a stderr handler of its own and does
    not propagate; route_lightning (run by every job) hands its lines to the job's handlers."""
    from dsr_lightning.logs import route_lightning

    own = logging.StreamHandler()
    for name in ("pytorch_lightning", "lightning_fabric"):
        log = logging.getLogger(name)
        monkeypatch.setattr(log, "handlers", [own])
        monkeypatch.setattr(log, "propagate", False)
    caplog.set_level(logging.INFO, logger="pytorch_lightning")
    logging.getLogger("pytorch_lightning.trainer").info("before")
    assert "before" not in caplog.text
    route_lightning()
    logging.getLogger("pytorch_lightning.trainer").info("after")
    assert "after" in caplog.text
    for name in ("pytorch_lightning", "lightning_fabric"):
        assert logging.getLogger(name).propagate and not logging.getLogger(name).handlers


def test_training_progress_lines_at_info_without_a_bar(caplog):
    from types import SimpleNamespace

    from dsr_lightning.tasks.progress import LogProgress

    caplog.set_level(logging.DEBUG, logger="dsr_lightning")
    for bar in (None, object()):
        trainer = SimpleNamespace(progress_bar_callback=bar, is_global_zero=True,
                                  num_training_batches=10, current_epoch=0, max_epochs=2,
                                  callback_metrics={})
        cb = LogProgress(every=0.0)
        cb.on_train_epoch_start(trainer, None)
        cb.on_train_batch_end(trainer, None, None, None, 4)
        cb.on_train_epoch_end(trainer, None)
    recs = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert [(n, lvl) for n, lvl, _ in recs] == [("dsr_lightning.tasks.progress", "INFO")] * 2
    assert recs[0][2].startswith("epoch 1/2: 5/10 batches (50 %)") and "done in" in recs[1][2]
