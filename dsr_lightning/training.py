"""`train(cfg)`: one stage (classifier | denoiser | rejector) from a composed config."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from dsr_lightning.config import to_dict
from dsr_lightning.models import load_checkpoint, save_checkpoint
from dsr_lightning.tasks import (
    ClassifierTask,
    ConfigError,
    DenoiserTask,
    RejectorTask,
    build_fresh,
    load_frozen,
)


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
        task = RejectorTask(clf, den, net, cfg.optim, target=cfg.rejector.target,
                            head=cfg.rejector.head, threshold=cfg.rejector.threshold,
                            run_config=run_config)
        return task, None
    raise ConfigError(f"stage={stage!r}: choose classifier, denoiser or rejector")


def _export(task, cfg: DictConfig, best: str, path: Path) -> None:
    """Write the best network in the published {'arch', 'state_dict'} form, where the next stage reads."""
    if best:
        task.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    spec = cfg.classifier if cfg.stage.name == "classifier" else cfg.denoiser
    net = task.net if cfg.stage.name == "classifier" else task.denoiser
    extra = {"sigma": float(cfg.sigma)} if cfg.stage.name == "denoiser" else {
        "noise_sd": float(cfg.classifier.noise_sd)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, net, arch=spec.arch, arch_kwargs=dict(spec.get("arch_kwargs") or {}),
                    config=to_dict(cfg), **extra)


def _log_roc(curve: tuple[torch.Tensor, torch.Tensor], trainer: pl.Trainer, out: Path) -> Path:
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
    for lg in trainer.loggers:
        if isinstance(lg, pl.loggers.WandbLogger):
            import wandb

            table = wandb.Table(data=[[float(a), float(b)] for a, b in zip(fpr, tpr)],
                                columns=["fpr", "tpr"])
            lg.experiment.log({"val/roc": wandb.plot.line(table, "fpr", "tpr", title="Rejector ROC"),
                               "val/roc_png": wandb.Image(str(png))})
    return png


def train(cfg: DictConfig) -> dict:
    """Run the configured stage; returns the final metrics and where the outputs are."""
    pl.seed_everything(int(cfg.seed), workers=True)
    out = output_dir(cfg)
    run_config = to_dict(cfg)
    task, export = build_task(cfg, run_config)
    datamodule = instantiate(cfg.data)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=cfg.stage.monitor,
                           mode=cfg.stage.mode)
    # last.ckpt after every epoch: Lightning's save_last only refreshes it when `best` improves
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None,
                           save_top_k=1, enable_version_counter=False)
    loggers = [instantiate(lg) for lg in cfg.get("logger", {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[ckpt, last], logger=loggers or False)
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    result = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "best": ckpt.best_model_path, "last": last.best_model_path, "output_dir": str(out),
        "epochs": trainer.current_epoch,
    }
    roc = None
    if isinstance(task, RejectorTask) and task.val_roc.update_count:
        roc = task.roc_curve()  # on every rank: under DDP it gathers all ranks' states
    if trainer.is_global_zero:
        if export is not None:
            _export(task, cfg, ckpt.best_model_path, export)
            result["export"] = str(export)
        if isinstance(task, RejectorTask):
            result["roc"] = _log_roc(roc, trainer, out) if roc is not None else None
    for lg in trainer.loggers:
        if isinstance(lg, pl.loggers.WandbLogger):
            lg.experiment.finish()
    return result
