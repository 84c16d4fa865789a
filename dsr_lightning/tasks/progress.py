"""Progress a log file can show: where Lightning's progress bar cannot (output to a file, CI,
SLURM: the bar is off unless the output is a terminal, see conf/trainer/default.yaml), one line at
least every `every` seconds and at each epoch's end, with the epoch, the batches done, the speed,
the last loss and the time left."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl

from dsr_lightning.logs import get_logger

log = get_logger(__name__)


def interactive() -> bool:
    """Whether the output is a terminal (where a progress bar redraws in place)."""
    return sys.stdout.isatty()


class LogProgress(pl.Callback):
    """One line per `every` seconds of training (and per epoch) when no progress bar is shown:
    `epoch 2/4: 40/73 batches (55 %), 3.1 batches/s, loss 0.512, ~11 s left in the epoch`."""

    def __init__(self, every: float = 30.0):
        self.every = float(every)
        self._t0 = self._last = 0.0

    def _quiet(self, trainer: pl.Trainer) -> bool:
        return trainer.progress_bar_callback is not None or not trainer.is_global_zero

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._quiet(trainer) or now - self._last < self.every:
            return
        self._last = now
        total = trainer.num_training_batches
        done, rate = batch_idx + 1, (batch_idx + 1) / max(now - self._t0, 1e-9)
        left = (total - done) / rate if isinstance(total, int) and rate > 0 else float("nan")
        log.info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {done}/{total} "
                 f"batches ({100 * done / total:.0f} %), {rate:.2f} batches/s"
                 f"{self._loss(trainer)}, ~{left:.0f} s left in the epoch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._quiet(trainer):
            return
        took = time.perf_counter() - self._t0
        left = (trainer.max_epochs - trainer.current_epoch - 1) * took
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and v.numel() == 1}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())[:4])
        log.info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done in {took:.0f} s"
                 f"{self._loss(trainer)}{', ' + shown if shown else ''}"
                 + (f"; ~{left:.0f} s of training left" if left > 0 else ""))

    @staticmethod
    def _loss(trainer: pl.Trainer) -> str:
        loss = trainer.callback_metrics.get("train/loss")
        return f", loss {float(loss):.4g}" if loss is not None and loss.numel() == 1 else ""
