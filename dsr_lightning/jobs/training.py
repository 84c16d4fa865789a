"""`train(cfg)`: one stage (classifier | denoiser | rejector) from a composed config; for the
rejector, the threshold choice (`rejector.threshold=auto`) and the certification (`certify=...`)
after fit."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dsr_lightning.config import to_dict
from dsr_lightning.config.schema import MANUAL_KEYS, check_train
from dsr_lightning.errors import ConfigError, TrainingError
from dsr_lightning.files import atomic_write, check_writable
from dsr_lightning.jobs import networks
from dsr_lightning.jobs.interrupt import stop_on_signals
from dsr_lightning.jobs.loggers import finish_wandb, wandb_run_record
from dsr_lightning.jobs.networks import DataFacts, data_facts
from dsr_lightning.jobs.resume import check_resume
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.threshold import choose_for_checkpoints, describe, selection_settings
from dsr_lightning.models.flops import count_flops
from dsr_lightning.tasks import ClassifierTask, DenoiserTask, RejectorTask


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.trainer.get("default_root_dir") or "outputs")


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
    if path.exists() and _main_process():
        print(f"overwrite=true: this run's {role} will replace {path}", flush=True)
    return path


def _has_weights(node) -> bool:
    """Whether a network node names weights that exist (a file, or torchvision's own)."""
    return bool(node.get("weights")) or bool(node.get("path") and Path(str(node.path)).is_file())


def build_task(cfg: DictConfig, run_config: dict,
               data: DataFacts | None = None) -> tuple[pl.LightningModule, Path | None]:
    """The stage's LightningModule and the path its network is exported to (None: rejector).
    How each network was built (its recipe) goes into `run_config["networks"]`, which every
    checkpoint of the run keeps."""
    stage = cfg.stage.name
    recipes: dict = {}
    run_config["networks"] = recipes
    if stage == "classifier":
        export = _export_target(cfg.classifier.path, cfg.overwrite, "classifier")
        net = networks.build("classifier", cfg.classifier, data=data, trained=False)
        recipes["classifier"] = net.recipe
        task = ClassifierTask(net.module, cfg.optim, noise_sd=cfg.classifier.noise_sd,
                              run_config=run_config)
        return task, export
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
        task = DenoiserTask(den.module, cfg.optim, objective=cfg.stage.objective,
                            classifier=clf.module if clf else None, run_config=run_config)
        return task, export
    if stage == "rejector":
        clf = networks.build("classifier", cfg.classifier, data=data)
        den = networks.build("denoiser", cfg.denoiser, sigma=cfg.sigma, data=data)
        recipes.update(classifier=clf.recipe, denoiser=den.recipe)
        f = clf.module
        shape = tuple(f.input_shape)
        net = _instantiate("rejector", "net", cfg.rejector.net)(
            num_classes=f.num_classes, feature_channels=f.feature_channels, image_size=shape[-1])
        for role, n in (("classifier", clf), ("denoiser", den)):
            print(networks.describe(role, n.recipe), flush=True)
        layers = clf.recipe["feature_layers"]
        print(f"rejector: {type(net).__name__}, fused with the classifier's "
              f"{', '.join(layers)} ({', '.join(map(str, f.feature_channels))} channels)"
              if layers else "rejector: no classifier feature layers (classifier.feature_layers=[] "
              "or none known for this network): the rejector runs unfused, on D(x+ε) alone",
              flush=True)
        print(_costs(f, den.module, net, shape), flush=True)
        rej = cfg.rejector
        task = RejectorTask(f, den.module, net, cfg.optim, target=rej.target, head=rej.head,
                            threshold=0.0 if rej.threshold == "auto" else rej.threshold,
                            pos_weight=rej.pos_weight, correct_weight=rej.correct_weight,
                            focal_gamma=rej.focal_gamma, run_config=run_config)
        return task, None
    raise ConfigError(f"stage={stage!r}: choose classifier, denoiser or rejector")


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
    out = []
    for name, node in nodes.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            cb = _instantiate("callbacks", name, node)
            if not isinstance(cb, Callback):
                raise ConfigError(f"callbacks.{name}: {node._target_} is not a Lightning "
                                  "Callback (pytorch_lightning.callbacks.Callback); remove it "
                                  f"(~callbacks.{name}) or point it at a callback class")
            out.append(cb)
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
    out = output_dir(cfg)
    with RunFolderLock(out) if _main_process() else nullcontext():
        return _train(cfg, tcfg, manual, out)


def _train(cfg: DictConfig, tcfg: DictConfig, manual: dict, out: Path) -> dict:
    resumed = check_resume(cfg, cfg.ckpt_path) if cfg.get("ckpt_path") else None
    pl.seed_everything(int(cfg.seed), workers=True)
    run_config = to_dict(cfg)
    datamodule = instantiate(cfg.data)
    task, export = build_task(cfg, run_config, data_facts(datamodule))
    if cfg.stage.name == "rejector" and cfg.certify.systems:
        from dsr_lightning.jobs.certification import check_plain_before_fit

        check_plain_before_fit(cfg, out / "results")
    if resumed:  # the networks built now from their files must be those the run was started with
        networks.check_unchanged(resumed["networks"], {r: n for r, n in run_config["networks"].items()
                                                       if cfg.stage.name != r},
                                 f"ckpt_path={cfg.ckpt_path}")
    task.configure_manual_optimization(
        clip_val=manual.get("gradient_clip_val"),
        clip_algorithm=manual.get("gradient_clip_algorithm"),
        accumulate=int(manual.get("accumulate_grad_batches", 1)))
    if cfg.stage.name == "rejector" and cfg.rejector.threshold == "auto" \
            and len(datamodule.dataset("val")) == 0:
        raise ConfigError("rejector.threshold=auto chooses the threshold on the validation split, "
                          "which is empty here (data.val_fraction, or a data set this small): "
                          "set data.val_fraction=0.1 (or more images), or a numeric "
                          "rejector.threshold=<logit>")
    if resumed and resumed.get("finished"):
        return _certify_finished(cfg, task, datamodule, Path(str(cfg.ckpt_path)), out)
    callbacks = _callbacks(cfg)
    best_cb, last_cb = _checkpoints(callbacks, cfg.stage.monitor)
    for folder in {c.dirpath for c in (best_cb, last_cb) if c is not None and c.dirpath}:
        check_writable(folder, "the checkpoints folder")  # a full disk stops the run before epoch 1
    loggers = _loggers(cfg, resumed)
    trainer: pl.Trainer = instantiate(tcfg, callbacks=callbacks, logger=loggers or False,
                                      enable_checkpointing=best_cb is not None or last_cb is not None,
                                      plugins=[AtomicCheckpointIO()])
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, pl.loggers.WandbLogger)),
                        None)
    wandb_runs: list = []
    ok = False
    try:
        if wandb_logger is not None and trainer.is_global_zero:
            wandb_runs = [_start_wandb(wandb_logger)]
            task.wandb_record = wandb_run_record(wandb_logger)  # the checkpoints keep the run's id
        with stop_on_signals(lambda what: _stopped(what, cfg, trainer, out)):
            trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            result = _finish(cfg, task, trainer, best_cb, last_cb, export, out, wandb_runs)
        ok = True
        return result
    finally:
        for run in wandb_runs:  # its files whole on disk when train() returns
            finish_wandb(run, exit_code=0 if ok else 1)


def _certify_finished(cfg: DictConfig, task, datamodule, ckpt_path: Path, out: Path) -> dict:
    """`ckpt_path=<run>/checkpoints/last.ckpt certify=...` on a run with no epoch left: no
    training; the threshold is chosen if it never was, and the certification resumes its results
    files (the rows written before are kept, the images done are skipped)."""
    from dsr_lightning.jobs.certification import certify_after_fit

    best = ckpt_path.parent / "best.ckpt"
    target = str(best if best.is_file() else ckpt_path)
    print(f"train: {ckpt_path} has no epoch left; certifying {target} (certify=...), resuming "
          "its results files", flush=True)
    result = {"epochs": RunCheckpoint.read(target, weights=False).epoch, "output_dir": str(out),
              "best": target if best.is_file() else "", "last": str(ckpt_path),
              "monitor": cfg.stage.monitor, "best_score": None, "metrics": {}}
    result.update(_threshold(cfg, task, datamodule, result))
    result["certification"] = certify_after_fit(cfg, target, out / "results", [])
    choice = result.get("threshold_choice")
    result["objective"] = choice["score"] if choice else None
    return result


def _main_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _start_wandb(logger: pl.loggers.WandbLogger):
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


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]


def _stopped(what: str, cfg: DictConfig, trainer: pl.Trainer, out: Path) -> str:
    """What an interrupted training run says: what is kept, and the command that resumes it."""
    last = out / "checkpoints" / "last.ckpt"
    kept = (f"the checkpoints written so far are kept in {last.parent}" if last.is_file()
            else "no epoch had finished, so no checkpoint was written")
    hint = (f"resume with: python train.py {' '.join(_overrides())} ckpt_path={last}".replace("  ", " ")
            if last.is_file() else "start it again")
    slurm = (" (under SLURM, Lightning requeues the job itself on the signal it is sent before "
             "the time limit)")
    return (f"training stopped by {what} at epoch {trainer.current_epoch}; {kept}; {hint}"
            + (slurm if what == "SIGTERM" and os.environ.get("SLURM_JOB_ID") else ""))


class RunFolderLock:
    """One training process per run folder: an exclusive flock on the folder itself, held for the
    whole job (a second resume of the same last.ckpt is refused). The OS releases it when the
    process dies; no file is left to look stale."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> RunFolderLock:
        check_writable(self.folder, "the run folder", hint="Run from a writable folder, or set "
                       "hydra.run.dir=<a writable folder>", keep=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"the run folder {self.folder} is in use by another training "
                              "process (a second resume of the same checkpoint?): one process per "
                              "run. Wait for it to finish, or resume from a copy in another "
                              "folder") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic: the checkpoint is written beside its target and
    renamed over it, so a full disk or a kill mid-save never leaves a truncated last.ckpt in
    place of a good one; a failed write is one clear error."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="the checkpoint",
                     error=TrainingError, hint="The checkpoints saved before are intact: resume "
                     "from the last one (ckpt_path=...)")


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
