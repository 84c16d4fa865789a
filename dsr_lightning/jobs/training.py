"""`train(cfg)`: one stage (classifier | denoiser | rejector) from a composed config; for the
rejector, the threshold choice (`rejector.threshold=auto`) and the certification (`certify=...`)
after fit."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from dsr_lightning.config import to_dict
from dsr_lightning.config.schema import MANUAL_KEYS, check_train
from dsr_lightning.errors import ConfigError
from dsr_lightning.jobs.loggers import wandb_run_record
from dsr_lightning.jobs.networks import build_fresh, load_frozen
from dsr_lightning.jobs.resume import check_resume
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.threshold import choose_for_checkpoints, describe, selection_settings
from dsr_lightning.models import load_checkpoint, save_checkpoint
from dsr_lightning.tasks import ClassifierTask, DenoiserTask, RejectorTask


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.trainer.get("default_root_dir") or "outputs")


def _export_target(path: str, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists already; pass overwrite=true to replace it, or choose "
                          "another pretrained_root=... / path")
    return path


def build_task(cfg: DictConfig, run_config: dict) -> tuple[pl.LightningModule, Path | None]:
    """The stage's LightningModule and the path its network is exported to (None: rejector)."""
    stage = cfg.stage.name
    if stage == "classifier":
        export = _export_target(cfg.classifier.path, cfg.overwrite)
        task = ClassifierTask(build_fresh(cfg.classifier), cfg.optim,
                              noise_sd=cfg.classifier.noise_sd, run_config=run_config)
        return task, export
    if stage == "denoiser":
        export = _export_target(cfg.denoiser.path, cfg.overwrite)
        init = cfg.stage.get("init_from")
        if init:  # fine-tune: the loaded network comes frozen, thaw it
            den = load_checkpoint(init).requires_grad_(True).train()
        else:
            den = build_fresh(cfg.denoiser)
        needs_f = cfg.stage.objective != "mse" or Path(cfg.classifier.path).is_file()
        clf = load_frozen("classifier", cfg.classifier) if needs_f else None
        task = DenoiserTask(den, cfg.optim, objective=cfg.stage.objective, classifier=clf,
                            run_config=run_config)
        return task, export
    if stage == "rejector":
        clf = load_frozen("classifier", cfg.classifier)
        den = load_frozen("denoiser", cfg.denoiser, sigma=cfg.sigma)
        net = instantiate(cfg.rejector.net)(num_classes=clf.num_classes,
                                            feature_channels=clf.feature_channels)
        rej = cfg.rejector
        task = RejectorTask(clf, den, net, cfg.optim, target=rej.target, head=rej.head,
                            threshold=0.0 if rej.threshold == "auto" else rej.threshold,
                            pos_weight=rej.pos_weight, correct_weight=rej.correct_weight,
                            focal_gamma=rej.focal_gamma, run_config=run_config)
        return task, None
    raise ConfigError(f"stage={stage!r}: choose classifier, denoiser or rejector")


def _export(task, cfg: DictConfig, best: str | None, path: Path) -> None:
    """Write the best network in the published {'arch', 'state_dict'} form, where the next stage
    reads (the final weights when no best checkpoint was kept)."""
    if best:
        RunCheckpoint.read(best).load_into(task)
    spec = cfg.classifier if cfg.stage.name == "classifier" else cfg.denoiser
    net = task.net if cfg.stage.name == "classifier" else task.denoiser
    extra = {"sigma": float(cfg.sigma)} if cfg.stage.name == "denoiser" else {
        "noise_sd": float(cfg.classifier.noise_sd)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, net, arch=spec.arch, arch_kwargs=dict(spec.get("arch_kwargs") or {}),
                    config=to_dict(cfg), **extra)


def _log_roc(curve: tuple[torch.Tensor, torch.Tensor], wandb_runs: list, out: Path) -> Path:
    """The rejector's validation ROC (fpr, tpr): a PNG beside the run, a curve in the W&B run."""
    fpr, tpr = (t.cpu().numpy() for t in curve)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label="rejector")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="Rejector ROC (validation, b = 1[f(D(x+ε)) ≠ ref])")
    ax.legend(loc="lower right")
    png = out / "roc.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    for run in wandb_runs:
        import wandb

        table = wandb.Table(data=[[float(a), float(b)] for a, b in zip(fpr, tpr)],
                            columns=["fpr", "tpr"])
        run.log({"val/roc": wandb.plot.line(table, "fpr", "tpr", title="Rejector ROC"),
                 "val/roc_png": wandb.Image(str(png))})
    return png


class EpochTime(Callback):
    """`train/epoch_time_s`: wall seconds of each training epoch (the paper's Table 1 figure; the
    sweep report reads it from the CSV logs)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("train/epoch_time_s", time.perf_counter() - self._t0, on_epoch=True,
                      on_step=False)


def _instantiate(group: str, name: str, node: DictConfig, **kwargs):
    """instantiate(node), a bad `_target_` or argument being one ConfigError naming the node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{group}.{name}: cannot build {node.get('_target_')!r}: {first}") from e


def _callbacks(cfg: DictConfig) -> list[Callback]:
    """Every node of the `callbacks` group with a `_target_`, instantiated, plus the epoch timer."""
    nodes = cfg.get("callbacks") or {}
    out = [_instantiate("callbacks", name, node) for name, node in nodes.items()
           if isinstance(node, DictConfig) and "_target_" in node]
    return [*out, EpochTime()]


def _checkpoints(callbacks: list, monitor: str) -> tuple[ModelCheckpoint | None, ModelCheckpoint | None]:
    """(the callback keeping the best epoch by `monitor`, the one keeping the last epoch)."""
    ckpts = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    best = next((c for c in ckpts if c.monitor == monitor), None)
    last = next((c for c in ckpts if c.monitor is None), None)
    return best, last


def _loggers(cfg: DictConfig, resumed: dict | None) -> list:
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
        loggers.append(_instantiate("logger", name, node, **kwargs))
    return loggers


def _trainer_config(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """The Trainer's config without the keys manual optimisation handles itself, and those keys
    (checked by the schema)."""
    tcfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    with open_dict(tcfg):
        manual = {k: v for k in MANUAL_KEYS if (v := tcfg.pop(k, None)) is not None}
    return tcfg, manual


def train(cfg: DictConfig) -> dict:
    """Run the configured stage; returns the metrics, the best checkpoint and its score, the
    outputs and, with `certify=...`, the certification of the trained system."""
    check_train(cfg)
    tcfg, manual = _trainer_config(cfg)
    resumed = check_resume(cfg, cfg.ckpt_path) if cfg.get("ckpt_path") else None
    pl.seed_everything(int(cfg.seed), workers=True)
    out = output_dir(cfg)
    run_config = to_dict(cfg)
    task, export = build_task(cfg, run_config)
    task.configure_manual_optimization(
        clip_val=manual.get("gradient_clip_val"),
        clip_algorithm=manual.get("gradient_clip_algorithm"),
        accumulate=int(manual.get("accumulate_grad_batches", 1)))
    datamodule = instantiate(cfg.data)
    callbacks = _callbacks(cfg)
    best_cb, last_cb = _checkpoints(callbacks, cfg.stage.monitor)
    loggers = _loggers(cfg, resumed)
    trainer: pl.Trainer = instantiate(tcfg, callbacks=callbacks, logger=loggers or False)
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, pl.loggers.WandbLogger)),
                        None)
    wandb_runs: list = []
    ok = False
    try:
        if wandb_logger is not None and trainer.is_global_zero:
            wandb_runs = [wandb_logger.experiment]
            task.wandb_record = wandb_run_record(wandb_logger)  # the checkpoints keep the run's id
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        result = _finish(cfg, task, trainer, best_cb, last_cb, export, out, wandb_runs)
        ok = True
        return result
    finally:
        for run in wandb_runs:
            run.finish(exit_code=0 if ok else 1)


def _finish(cfg, task, trainer, best_cb, last_cb, export, out: Path, wandb_runs: list) -> dict:
    monitor = cfg.stage.monitor
    best = best_cb.best_model_path if best_cb is not None else ""
    score = best_cb.best_model_score if best_cb is not None else None
    result = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "monitor": monitor, "best_score": None if score is None else float(score),
        "best": best, "last": last_cb.best_model_path if last_cb is not None else "",
        "output_dir": str(out), "epochs": trainer.current_epoch,
    }
    roc = None
    if isinstance(task, RejectorTask) and task.val_roc.update_count:
        roc = task.roc_curve()  # on every rank: under DDP it gathers all ranks' states
    if not trainer.is_global_zero:
        return result
    if export is not None:
        _export(task, cfg, best, export)
        result["export"] = str(export)
    if isinstance(task, RejectorTask):
        result["roc"] = _log_roc(roc, wandb_runs, out) if roc is not None else None
        result.update(_threshold(cfg, task, trainer.datamodule, result))
        if cfg.certify.systems:
            from dsr_lightning.jobs.certification import certify_after_fit

            result["certification"] = certify_after_fit(cfg, result["best"] or result["last"],
                                                        out / "results", wandb_runs)
    # what a sweeper optimises: a validation figure, never a test-split certificate (an optimising
    # sweeper would tune on the test set): the threshold choice's estimated objective on the
    # validation draws, else the monitored validation metric
    choice = result.get("threshold_choice")
    result["objective"] = choice["score"] if choice else result["best_score"]
    return result


def _threshold(cfg: DictConfig, task: RejectorTask, datamodule, result: dict) -> dict:
    """The threshold f_R certifies with: the configured one, or (threshold=auto) the one chosen
    now, once for each kept checkpoint, on the validation split (DESIGN §5)."""
    settings = selection_settings(cfg)
    if settings is None:
        return {"threshold": float(cfg.rejector.threshold), "threshold_note": "configured"}
    paths = [result.get("best"), result.get("last")]
    if not any(paths):
        return {}
    choice = choose_for_checkpoints(task, datamodule.dataset("val"), settings, paths)
    return {"threshold": choice["value"], "threshold_note": describe(choice),
            "threshold_choice": choice}
