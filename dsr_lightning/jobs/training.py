"""`train(cfg)`: one stage (classifier | denoiser | rejector) from a composed config; for the
rejector, the threshold choice (`rejector.threshold=auto`) and the certification (`certify=...`)
after fit. The Trainer's parts are built in jobs.trainer_parts, the run folder's lock and the atomic
writes come from files, the ROC figure from reports.roc."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from dsr_lightning.config import to_dict
from dsr_lightning.config.schema import check_train
from dsr_lightning.errors import USER_ERRORS, ConfigError
from dsr_lightning.files import RunFolderLock, check_writable
from dsr_lightning.jobs import networks
from dsr_lightning.jobs.interrupt import stop_on_signals
from dsr_lightning.jobs.networks import DataFacts, data_facts
from dsr_lightning.jobs.resume import check_resume
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.threshold import choose_for_checkpoints, describe, selection_settings
from dsr_lightning.jobs.trainer_parts import build_trainer, instantiate_node, wandb_runs
from dsr_lightning.logs import main_process
from dsr_lightning.models.flops import count_flops
from dsr_lightning.tasks import RejectorTask

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.trainer.get("default_root_dir") or "outputs")


def train(cfg: DictConfig) -> dict:
    """Run the configured stage; returns the metrics, the best checkpoint and its score, the
    outputs and, with `certify=...`, the certification of the trained system."""
    check_train(cfg)
    out = output_dir(cfg)
    with RunFolderLock(out) if main_process() else nullcontext():
        return _train(cfg, out)


def _train(cfg: DictConfig, out: Path) -> dict:
    """The job's steps: check a resume, build the data and the task, check what fit needs, fit,
    then export / choose the threshold / certify (_finish)."""
    resumed = check_resume(cfg, cfg.ckpt_path) if cfg.get("ckpt_path") else None
    pl.seed_everything(int(cfg.seed), workers=True)
    run_config = to_dict(cfg)
    datamodule = instantiate(cfg.data)
    task, export = build_task(cfg, run_config, data_facts(datamodule))
    _check_before_fit(cfg, run_config, resumed, datamodule, out)
    if resumed and resumed.get("finished"):
        return _certify_finished(cfg, task, datamodule, Path(str(cfg.ckpt_path)), out)
    trainer, best_cb, last_cb = build_trainer(cfg, task, resumed)
    with wandb_runs(trainer, task) as runs, \
            stop_on_signals(lambda what: _stopped(what, cfg, trainer, out)):
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        return _finish(cfg, task, trainer, best_cb, last_cb, export, out, runs)


def _check_before_fit(cfg: DictConfig, run_config: dict, resumed: dict | None, datamodule,
                      out: Path) -> None:
    """What must hold before an epoch is spent: the baselines certify=... asks for can be
    certified, a resumed run's networks are those it was started with, and threshold=auto has a
    validation split to choose on."""
    if cfg.stage.name == "rejector" and cfg.certify.systems:
        from dsr_lightning.jobs.certification import check_plain_before_fit

        check_plain_before_fit(cfg, out / "results")
    if resumed:  # the networks built now from their files must be those the run was started with
        networks.check_unchanged(resumed["networks"], {r: n for r, n in run_config["networks"].items()
                                                       if cfg.stage.name != r},
                                 f"ckpt_path={cfg.ckpt_path}")
    if cfg.stage.name == "rejector" and cfg.rejector.threshold == "auto" \
            and len(datamodule.dataset("val")) == 0:
        raise ConfigError("rejector.threshold=auto chooses the threshold on the validation split, "
                          "which is empty here (data.val_fraction, or a data set this small): "
                          "set data.val_fraction=0.1 (or more images), or a numeric "
                          "rejector.threshold=<logit>")


def _export_target(path: str | None, overwrite: bool, role: str = "network") -> Path:
    if not path:
        raise ConfigError(f"{role}.path is not set: it is where this stage writes the trained "
                          f"{role}; set {role}.path=<file>")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists already; pass overwrite=true to replace it, or choose "
                          "another pretrained_root=... / path")
    # before training, not after it: the folder must take the file
    check_writable(path.parent, f"the {role}'s folder", hint="Choose another pretrained_root=... "
                   f"or {role}.path=<file>")
    if path.exists() and main_process():
        log.warning("overwrite=true: this run's %s will replace %s", role, path)
    return path


def _has_weights(node) -> bool:
    """Whether a network node names weights that exist (a file, or torchvision's own)."""
    return bool(node.get("weights")) or bool(node.get("path") and Path(str(node.path)).is_file())


def build_task(cfg: DictConfig, run_config: dict,
               data: DataFacts | None = None) -> tuple[pl.LightningModule, Path | None]:
    """The stage's LightningModule, built from its config node `stage.task` (conf/stage/*.yaml:
    `_target_` and the options, interpolated from the keys users set) with the networks built
    here, and the path its network is exported to (None: rejector). How each network was built
    (its recipe) goes into `run_config["networks"]`, which every checkpoint of the run keeps."""
    stage = cfg.stage.name
    recipes: dict = {}
    run_config["networks"] = recipes
    if stage == "classifier":
        export = _export_target(cfg.classifier.path, cfg.overwrite, "classifier")
        net = networks.build("classifier", cfg.classifier, data=data, trained=False)
        recipes["classifier"] = net.recipe
        return _stage_task(cfg, run_config, net=net.module), export
    if stage == "denoiser":
        export = _export_target(cfg.denoiser.path, cfg.overwrite, "denoiser")
        init = cfg.stage.get("init_from")
        if init:  # fine-tune: the loaded network comes frozen, thaw it
            node = {**networks.node_dict(cfg.denoiser), "path": str(init)}
            den = networks.build("denoiser", node, data=data)
            den.module.requires_grad_(True).train()
        else:
            den = networks.build("denoiser", cfg.denoiser, data=data, trained=False)
        recipes["denoiser"] = den.recipe
        needs_f = cfg.stage.objective != "mse" or _has_weights(cfg.classifier)
        clf = networks.build("classifier", cfg.classifier, data=data) if needs_f else None
        if clf is not None:
            recipes["classifier"] = clf.recipe
        return _stage_task(cfg, run_config, denoiser=den.module,
                           classifier=clf.module if clf else None), export
    if stage == "rejector":
        clf = networks.build("classifier", cfg.classifier, data=data)
        den = networks.build("denoiser", cfg.denoiser, sigma=cfg.sigma, data=data)
        recipes.update(classifier=clf.recipe, denoiser=den.recipe)
        f = clf.module
        shape = tuple(f.input_shape)
        net = instantiate_node("rejector", "net", cfg.rejector.net)(
            num_classes=f.num_classes, feature_channels=f.feature_channels, image_size=shape[-1])
        _describe_rejector(clf, den, net, shape)
        threshold = cfg.rejector.threshold
        return _stage_task(cfg, run_config, classifier=f, denoiser=den.module, rejector=net,
                           threshold=0.0 if threshold == "auto" else float(threshold)), None
    raise ConfigError(f"stage={stage!r}: choose classifier, denoiser or rejector")


def _stage_task(cfg: DictConfig, run_config: dict, **built) -> pl.LightningModule:
    """`stage.task` instantiated with the networks built (and the threshold to start with) as
    keyword arguments, beside optim and the run's config: a bad `_target_` or option is one
    ConfigError naming stage.task."""
    node = cfg.stage.get("task")
    if node is None or "_target_" not in node:
        raise ConfigError(f"stage.task is not set: stage={cfg.stage.name} needs its LightningModule "
                          "(`stage.task._target_` and its options, as in the package's "
                          f"conf/stage/{cfg.stage.name}.yaml)")
    make = instantiate_node("stage", "task", node, _partial_=True)
    try:
        task = make(**built, optim=cfg.optim, run_config=run_config)
    except (TypeError, ValueError) as e:
        if isinstance(e, USER_ERRORS):  # the package's own errors say what to do already
            raise
        raise ConfigError(f"stage.task: cannot build {node._target_}: {e}") from e
    if not isinstance(task, pl.LightningModule):
        raise ConfigError(f"stage.task: {node._target_} is not a LightningModule; point "
                          "stage.task._target_ at one (dsr_lightning.tasks.*Task)")
    return task


def _describe_rejector(clf, den, net, shape: tuple[int, ...]) -> None:
    """Logs what the rejector stage trains on: f and D, the fused layers, the cost per sample."""
    for role, n in (("classifier", clf), ("denoiser", den)):
        log.info("%s", networks.describe(role, n.recipe))
    layers = clf.recipe["feature_layers"]
    if layers:
        log.info("rejector: %s, fused with the classifier's %s (%s channels)", type(net).__name__,
                 ", ".join(layers), ", ".join(map(str, clf.module.feature_channels)))
    else:
        log.info("rejector: no classifier feature layers (classifier.feature_layers=[] or none "
                 "known for this network): the rejector runs unfused, on D(x+ε) alone")
    log.info("%s", _costs(clf.module, den.module, net, shape))


def _costs(f, den, rejector, shape: tuple[int, ...]) -> str:
    """One line: the forward FLOPs per image of f, D and the rejector (the rejector's cost
    includes neither f nor D, which run anyway)."""
    x = torch.zeros(1, *shape)
    with torch.no_grad():
        feats = f.forward_features(x)[1]
        flops = [count_flops(f, x), count_flops(den, x), count_flops(rejector, x, feats)]
    f_g, d_g, r_g = (v / 1e9 for v in flops)
    return (f"cost per noisy sample at {shape[-2]}x{shape[-1]} px: classifier {f_g:.3g} GFLOP, "
            f"denoiser {d_g:.3g} GFLOP, rejector {r_g:.3g} GFLOP "
            f"({r_g / f_g if f_g else float('nan'):.2f}x the classifier)")


def _export(task, cfg: DictConfig, best: str | None, path: Path) -> None:
    """Write the best network where the next stage reads it (the final weights when no best
    checkpoint was kept): published {'arch', 'state_dict'} form for a network of models.ARCHS,
    a state dict with its recipe for any other."""
    if best:
        RunCheckpoint.read(best).load_into(task)
    role = cfg.stage.name
    recipe = task.run_config["networks"][role]
    net = task.net if role == "classifier" else task.denoiser
    extra = {"sigma": float(cfg.sigma)} if role == "denoiser" else {
        "noise_sd": float(cfg.classifier.noise_sd)}
    networks.export(path, role, net, recipe, config=to_dict(cfg), **extra)


def _certify_finished(cfg: DictConfig, task, datamodule, ckpt_path: Path, out: Path) -> dict:
    """`ckpt_path=<run>/checkpoints/last.ckpt certify=...` on a run with no epoch left: no
    training; the threshold is chosen if it never was, and the certification resumes its results
    files (the rows written before are kept, the images done are skipped)."""
    from dsr_lightning.jobs.certification import certify_after_fit

    best = ckpt_path.parent / "best.ckpt"
    target = str(best if best.is_file() else ckpt_path)
    log.info("train: %s has no epoch left; certifying %s (certify=...), resuming its results "
             "files", ckpt_path, target)
    result = {"epochs": RunCheckpoint.read(target, weights=False).epoch, "output_dir": str(out),
              "best": target if best.is_file() else "", "last": str(ckpt_path),
              "monitor": cfg.stage.monitor, "best_score": None, "metrics": {}}
    result.update(_threshold(cfg, task, datamodule, result))
    result["certification"] = certify_after_fit(cfg, target, out / "results", [])
    choice = result.get("threshold_choice")
    result["objective"] = choice["score"] if choice else None
    return result


def _overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]


def _stopped(what: str, cfg: DictConfig, trainer: pl.Trainer, out: Path) -> str:
    """What an interrupted training run says: what is kept, and the command that resumes it."""
    last = out / "checkpoints" / "last.ckpt"
    kept = (f"the checkpoints written so far are kept in {last.parent}" if last.is_file()
            else "no epoch had finished, so no checkpoint was written")
    hint = (f"resume with: dsr-train {' '.join(_overrides())} ckpt_path={last}".replace("  ", " ")
            if last.is_file() else "start it again")
    slurm = (" (under SLURM, Lightning requeues the job itself on the signal it is sent before "
             "the time limit)")
    return (f"training stopped by {what} at epoch {trainer.current_epoch}; {kept}; {hint}"
            + (slurm if what == "SIGTERM" and os.environ.get("SLURM_JOB_ID") else ""))


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
        if roc is not None:
            from dsr_lightning.reports.roc import log_rejector_roc

            roc = log_rejector_roc(roc, wandb_runs, out)
        result["roc"] = roc
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
