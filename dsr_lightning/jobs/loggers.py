"""Lightning's loggers with two fixes the runs need: a CSV logger that continues its metrics.csv
when a run is resumed in place (Lightning's deletes it), and a W&B logger that keeps
`log_model=true` working offline (the default here; the artifacts are kept with the offline run and
uploaded by `wandb sync`) and resumes a run by id."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Continues an existing metrics.csv: its header's keys are known, nothing is deleted."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class CSVLogger(pl.loggers.CSVLogger):
    """`append=True` (set by train() when a run resumes in its own folder) continues the run's
    metrics.csv; otherwise Lightning's behaviour."""

    def __init__(self, *args: Any, append: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.append = append

    @property
    def experiment(self):
        if self._experiment is None and self.append:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment


class WandbLogger(pl.loggers.WandbLogger):
    """Lightning's WandbLogger; `log_model` also works with `offline=True`: checkpoints become
    artifacts of the offline run (uploaded with it by `wandb sync`)."""

    def __init__(self, *args: Any, offline: bool = False, log_model: bool | str = False,
                 **kwargs: Any):
        super().__init__(*args, offline=offline, log_model=False if offline else log_model,
                         **kwargs)
        self._log_model = log_model


def wandb_run_record(logger: pl.loggers.WandbLogger) -> dict:
    """What a checkpoint keeps of its W&B run, so a resume or a certification joins it."""
    run = logger.experiment
    return {"id": run.id, "project": run.project, "group": run.group, "name": run.name,
            "tags": list(run.tags or ())}


def finish_wandb(run, exit_code: int = 0) -> None:
    """Finish a W&B run whose files are then whole on disk. `run.finish()` returns before W&B's
    service has closed the run, so an offline run's `run-<id>.wandb` could still grow after it (seen
    under load: a reader got a file without its last records). When no other W&B run is active in
    this process, its service is shut down too (`wandb.teardown()`), which waits until it has
    written everything and exited; the next run starts a new one."""
    import wandb

    run.finish(exit_code=exit_code)
    if wandb.run is None:
        wandb.teardown()
