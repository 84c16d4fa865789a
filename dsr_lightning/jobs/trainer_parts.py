"""What the training job's Trainer is built from: the `callbacks` and `logger` groups instantiated
(a resumed run continues its CSV and its W&B run), the epoch timer, the atomic checkpoint writer,
the Trainer's config without the keys manual optimisation applies itself, and the W&B run started
before fit and finished whole after it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dsr_lightning.config.schema import MANUAL_KEYS
from dsr_lightning.errors import ConfigError, TrainingError
from dsr_lightning.files import atomic_write, check_writable
from dsr_lightning.jobs.loggers import finish_wandb, wandb_run_record


def instantiate_node(group: str, name: str, node: DictConfig, **kwargs):
    """instantiate(node), a bad `_target_` or argument being one ConfigError naming the node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{group}.{name}: cannot build {node.get('_target_')!r}: {first}") from e


class EpochTime(Callback):
    """`train/epoch_time_s`: wall seconds of each training epoch (the paper's Table 1 figure; the
    sweep report reads it from the CSV logs)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("train/epoch_time_s", time.perf_counter() - self._t0, on_epoch=True,
                      on_step=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic (files.atomic_write): the checkpoint is written beside
    its target and renamed over it, so a full disk or a kill mid-save never leaves a truncated
    last.ckpt in place of a good one; a failed write is one clear error."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="the checkpoint",
                     error=TrainingError, hint="The checkpoints saved before are intact: resume "
                     "from the last one (ckpt_path=...)")


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Every node of the `callbacks` group with a `_target_`, instantiated, plus the epoch timer."""
    nodes = cfg.get("callbacks") or {}
    out = []
    for name, node in nodes.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            cb = instantiate_node("callbacks", name, node)
            if not isinstance(cb, Callback):
                raise ConfigError(f"callbacks.{name}: {node._target_} is not a Lightning "
                                  "Callback (pytorch_lightning.callbacks.Callback); remove it "
                                  f"(~callbacks.{name}) or point it at a callback class")
            out.append(cb)
    return [*out, EpochTime()]


def checkpoint_callbacks(callbacks: list, monitor: str
                         ) -> tuple[ModelCheckpoint | None, ModelCheckpoint | None]:
    """(the callback keeping the best epoch by `monitor`, the one keeping the last epoch)."""
    ckpts = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    best = next((c for c in ckpts if c.monitor == monitor), None)
    last = next((c for c in ckpts if c.monitor is None), None)
    return best, last


def build_loggers(cfg: DictConfig, resumed: dict | None) -> list:
    """The configured loggers; a run resumed in place continues its CSV and its W&B run."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        kwargs = {}
        target = str(node.get("_target_", ""))
        if resumed and resumed.get("in_place") and target == "dsr_lightning.jobs.loggers.CSVLogger":
            kwargs["append"] = True
        if resumed and target.endswith("WandbLogger") and resumed.get("wandb"):
            rec = resumed["wandb"]
            kwargs.update(id=rec["id"], group=rec.get("group") or node.get("group"))
        loggers.append(instantiate_node("logger", name, node, **kwargs))
    return loggers


def trainer_config(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """The Trainer's config without the keys manual optimisation handles itself, and those keys
    (checked by the schema)."""
    tcfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    with open_dict(tcfg):
        manual = {k: v for k in MANUAL_KEYS if (v := tcfg.pop(k, None)) is not None}
    return tcfg, manual


def build_trainer(cfg: DictConfig, task, resumed: dict | None
                  ) -> tuple[pl.Trainer, ModelCheckpoint | None, ModelCheckpoint | None]:
    """The Trainer of the run (its callbacks, loggers and atomic checkpoints), the task set up for
    the clipping and accumulation it applies itself; the checkpoint folders checked writable (a
    full disk stops the run before epoch 1). Returns (trainer, best callback, last callback)."""
    tcfg, manual = trainer_config(cfg)
    task.configure_manual_optimization(
        clip_val=manual.get("gradient_clip_val"),
        clip_algorithm=manual.get("gradient_clip_algorithm"),
        accumulate=int(manual.get("accumulate_grad_batches", 1)))
    callbacks = build_callbacks(cfg)
    best_cb, last_cb = checkpoint_callbacks(callbacks, cfg.stage.monitor)
    for folder in {c.dirpath for c in (best_cb, last_cb) if c is not None and c.dirpath}:
        check_writable(folder, "the checkpoints folder")
    loggers = build_loggers(cfg, resumed)
    trainer: pl.Trainer = instantiate(tcfg, callbacks=callbacks, logger=loggers or False,
                                      enable_checkpointing=best_cb is not None or last_cb is not None,
                                      plugins=[AtomicCheckpointIO()])
    return trainer, best_cb, last_cb


def start_wandb(logger: pl.loggers.WandbLogger):
    """The W&B run, started before training: an online run without a key or a network is one
    clear error now rather than a traceback at the first logged metric."""
    try:
        return logger.experiment
    except Exception as e:  # noqa: BLE001 - wandb raises its own kinds for keys and networks
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"logger=wandb could not start its run ({type(e).__name__}: {first}). "
                          "Log in (`wandb login`, or WANDB_API_KEY) and check the network, or run "
                          "offline: logger.wandb.offline=true (the default; `wandb sync` later)"
                          ) from None


@contextmanager
def wandb_runs(trainer: pl.Trainer, task) -> Iterator[list]:
    """The W&B runs of the block ([] without logger=wandb, or on another rank): started before
    fit (the task's checkpoints keep the run's id), finished when the block ends, their files
    whole on disk, with exit code 1 if it raised."""
    logger = next((lg for lg in trainer.loggers if isinstance(lg, pl.loggers.WandbLogger)), None)
    runs: list = []
    ok = False
    try:
        if logger is not None and trainer.is_global_zero:
            runs.append(start_wandb(logger))
            task.wandb_record = wandb_run_record(logger)
        yield runs
        ok = True
    finally:
        for run in runs:
            finish_wandb(run, exit_code=0 if ok else 1)
