"""`certify(cfg)`: certify (or predict) a data split with one of three systems, through one path:
rejection (f_R = classifier + denoiser + rejector heads, rebuilt from the rejector checkpoint),
denoised (classifier + denoiser: Salman et al.) and plain (classifier: Cohen et al.).
`certify_after_fit` runs the same function for train.py's `certify=...` after fit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dsr_lightning.errors import CheckpointError, ConfigError
from dsr_lightning.models import SmoothingSystem, build_arch, freeze, read_checkpoint
from dsr_lightning.models.checkpoint import load_state_dict_strict
from dsr_lightning.results import COLUMNS, FORMAT, ResultsFile
from dsr_lightning.schema import check_certify
from dsr_lightning.smoothing import NOISE_BLOCK, check_stages
from dsr_lightning.tasks.certify import CertifyModule, FastBase, RowWriter
from dsr_lightning.tasks.networks import load_frozen

NOISE = f"image-blocks/{NOISE_BLOCK}/v1"  # the noise scheme: smoothing.ImageNoise, keyed by idx


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_rejection_system(path: str | Path, sigma: float | None = None,
                          threshold: float | None = None) -> tuple[SmoothingSystem, dict]:
    """f_R rebuilt from a rejector checkpoint of train.py alone (it holds f, D and the heads, the
    threshold and the resolved config); `threshold` replaces the checkpoint's. A σ other than the
    one the rejector was trained for is refused; so are unreadable files, other stages'
    checkpoints and non-finite weights."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rejector checkpoint not found: {path}\n  Train one with "
                          "`python train.py denoiser=... sigma=...` and pass "
                          "rejector_ckpt=<run>/checkpoints/best.ckpt")
    ckpt = read_checkpoint(path, weights_only=False)  # our own Lightning file
    run = ckpt.get("dsr_config") if isinstance(ckpt, dict) else None
    if not isinstance(run, dict) or run.get("stage", {}).get("name") != "rejector":
        raise CheckpointError(f"{path} is not a rejector checkpoint of train.py (no rejector "
                              "config); pass rejector_ckpt=<run>/checkpoints/best.ckpt of a "
                              "rejector run")
    if sigma is not None and abs(float(run["sigma"]) - float(sigma)) > 1e-9:
        raise ConfigError(f"the rejector {path} was trained for sigma={run['sigma']:g}, but "
                          f"sigma={float(sigma):g} was asked: certify with sigma={run['sigma']:g} "
                          "or train a rejector for this sigma")
    if threshold is None:
        threshold = ckpt.get("dsr_threshold", {}).get("value", run["rejector"].get("threshold", 0.0))
    if threshold == "auto":
        raise CheckpointError(f"{path}: rejector.threshold=auto was never chosen for these weights "
                              "(the run ended before the choice?); certify best.ckpt of a finished "
                              "run, or pass a checkpoint trained with a numeric threshold")
    clf = build_arch(run["classifier"]["arch"], **(run["classifier"].get("arch_kwargs") or {}))
    den = build_arch(run["denoiser"]["arch"], **(run["denoiser"].get("arch_kwargs") or {}))
    rej = instantiate(OmegaConf.create(run["rejector"]["net"]))(
        num_classes=clf.num_classes, feature_channels=clf.feature_channels)
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no state_dict; not a checkpoint of train.py")
    for name, net in (("classifier", clf), ("denoiser", den), ("rejector", rej)):
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        load_state_dict_strict(net, part, source=f"{path} ({name})")
    system = SmoothingSystem(freeze(clf), freeze(den), freeze(rej), threshold=float(threshold))
    run["_wandb"] = ckpt.get("dsr_wandb")
    run["_threshold"] = ckpt.get("dsr_threshold")
    return system, run


def build_system(cfg: DictConfig) -> tuple[SmoothingSystem, dict]:
    """The base classifier of the chosen system, and what it was built from: the paths, the
    sha256 of each checkpoint's content, and a description for reports."""
    name = cfg.system.name
    if name == "rejection":
        if not cfg.get("rejector_ckpt"):
            raise ConfigError("system=rejection needs rejector_ckpt=<a rejector checkpoint of "
                              "train.py> (or choose system=denoised|plain)")
        system, run = load_rejection_system(cfg.rejector_ckpt, cfg.sigma, cfg.get("threshold"))
        path = Path(cfg.rejector_ckpt).resolve()
        return system, {
            "classifier": run["classifier"]["path"], "denoiser": run["denoiser"]["path"],
            "rejector": str(path), "classifier_sha256": None, "denoiser_sha256": None,
            "rejector_sha256": sha256_of(path), "threshold": system.threshold,
            "run": {"classifier": run["classifier"]["name"], "denoiser": run["denoiser"]["name"],
                    "objective": run["denoiser"].get("objective"), "T": run["T"],
                    "head": run["rejector"]["head"], "target": run["rejector"]["target"],
                    "threshold_choice": run["_threshold"], "wandb": run["_wandb"]}}
    clf = load_frozen("classifier", cfg.classifier)
    den = load_frozen("denoiser", cfg.denoiser, sigma=cfg.sigma) if name == "denoised" else None
    return SmoothingSystem(clf, den), {
        "classifier": str(cfg.classifier.path), "denoiser": str(cfg.denoiser.path) if den else None,
        "rejector": None, "classifier_sha256": sha256_of(cfg.classifier.path),
        "denoiser_sha256": sha256_of(cfg.denoiser.path) if den else None, "rejector_sha256": None,
        "run": {"classifier": cfg.classifier.name, "noise_sd": float(cfg.classifier.noise_sd),
                "denoiser": cfg.denoiser.name if den else None,
                "objective": cfg.denoiser.objective if den else None, "T": None}}


def settings_of(cfg: DictConfig, sources: dict, data: dict, device: str) -> dict:
    """The settings record of a results file (results.IDENTITY_KEYS and a description)."""
    staged = cfg.mode == "staged"
    return {"format": FORMAT, "mode": cfg.mode, "system": cfg.system.name,
            "sigma": float(cfg.sigma), "N0": int(cfg.N0), "N": int(cfg.N),
            "alpha": float(cfg.alpha), "bound": cfg.bound, "split": cfg.split,
            "seed": int(cfg.seed), "noise": NOISE, "device": device, "bf16": bool(cfg.bf16),
            "channels_last": bool(cfg.channels_last), "compile": bool(cfg.compile), "data": data,
            **sources,
            "skip": int(cfg.skip), "max": int(cfg.max), "batch": int(cfg.batch),
            # mode=staged only (absent, i.e. None, in the other modes' records)
            **({"radius": float(cfg.radius), "stages": [int(s) for s in cfg.stages],
                "stage_weights": list(check_stages(list(cfg.stages), _weights(cfg))[1])}
               if staged else {})}


def _weights(cfg: DictConfig) -> list[float] | None:
    return None if cfg.stage_weights is None else list(cfg.stage_weights)


def _device_type(trainer: pl.Trainer) -> str:
    try:
        return trainer.strategy.root_device.type
    except Exception:  # noqa: BLE001 - strategies that know their device only later
        return str(type(trainer.accelerator).__name__).removesuffix("Accelerator").lower()


def _main_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def certify(cfg: DictConfig) -> dict:
    """Certify the configured split; rows stream to cfg.outfile, written by this process alone.
    Returns the paths, the counts, the summary of the whole file and its Markdown table row."""
    check_certify(cfg)
    results = ResultsFile(cfg.outfile, {}, COLUMNS[cfg.mode])
    main = _main_process()
    if main:
        results.lock(wait=bool(cfg.get("wait", False)))  # before any work: writable, and ours
    try:
        system, sources = build_system(cfg)
        datamodule = instantiate(cfg.data)
        dataset = datamodule.dataset(cfg.split)  # prepares and sets up what it needs
        writer = RowWriter(results)
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[writer], logger=False,
                                          use_distributed_sampler=False)
        data = {"name": type(datamodule).__name__, "split_size": len(dataset),
                "fingerprint": datamodule.fingerprint(cfg.split)}
        results.settings = settings_of(cfg, sources, data, _device_type(trainer))
        # checked under the lock, as the file is about to be written; the shards of a killed
        # multi-device run are folded in (main process only)
        done = results.merge_parts() if main else results.check()
        stop = len(dataset) if int(cfg.max) < 0 else min(int(cfg.max), len(dataset))
        todo = [i for i in range(0, stop, int(cfg.skip)) if i not in done]
        if main:
            results.open()
        print(f"certify: {len(todo)} images to go ({len(done)} already in {results.path})",
              flush=True)
        if todo:
            base = FastBase(system, bf16=cfg.bf16, channels_last=cfg.channels_last,
                            compile=cfg.compile)
            staged = {"radius": float(cfg.radius), "stages": list(cfg.stages),
                      "stage_weights": _weights(cfg)} if cfg.mode == "staged" else {}
            module = CertifyModule(base, cfg.sigma, int(cfg.N0), int(cfg.N), float(cfg.alpha),
                                   int(cfg.batch), cfg.bound, cfg.mode, int(cfg.seed), dataset,
                                   todo, int(cfg.images_per_step),
                                   allow_out_of_range=bool(cfg.get("allow_out_of_range", False)),
                                   **staged)
            trainer.predict(module, return_predictions=False)
    finally:
        if main:
            results.release()
    out = {"outfile": str(results.path), "settings": str(results.meta), "todo": len(todo),
           "done_before": len(done), "system": cfg.system.name,
           "wandb": sources["run"].get("wandb")}
    if main and cfg.mode == "certify":
        from dsr_lightning.reports import markdown_table, summary_frame

        frame = summary_frame([results.path], radii=list(cfg.certify.radii))
        out.update(frame=frame, table=markdown_table(frame), acr=float(frame["acr"].iloc[0]),
                   acc={float(r): float(frame[f"acc@{r:g}"].iloc[0]) for r in cfg.certify.radii})
        if cfg.get("logger") and cfg.logger.get("wandb"):
            out["wandb_run"] = log_certify_run(cfg, out)
    return out


def log_certify_run(cfg: DictConfig, out: dict) -> str:
    """certify.py logger=wandb: a W&B run (offline unless said) with the certification; a
    rejector trained with W&B links it: same group, its run id in the config."""
    from dsr_lightning.reports.wandb import log_certification

    link = out.get("wandb") or {}
    # the rejector's group and tags (its sigma, T and denoiser), not certify.yaml's T
    kwargs = {k: link[k] for k in ("group", "tags") if link.get(k)}
    logger = instantiate(cfg.logger.wandb, **kwargs)
    run = logger.experiment
    run.config.update({"certify": {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                                   if k not in ("hydra",)},
                       "rejector_run_id": link.get("id")}, allow_val_change=True)
    try:
        log_certification(run, out["system"], out["outfile"], list(cfg.certify.radii))
    finally:
        run.finish()
    return run.id


def job_config(train_cfg: DictConfig, system: str, rejector_ckpt: str | None,
               outdir: Path) -> DictConfig:
    """certify.py's config for a system certified by the training job: certify.yaml with the
    job's data, networks, σ, seed and `certify` node, on one device of the job's accelerator."""
    from dsr_lightning.config import compose, to_dict

    cfg = compose("certify", [f"system={system}"], return_hydra_config=False)
    tc = to_dict(train_cfg)
    with open_dict(cfg):
        cfg.merge_with({k: tc[k] for k in ("classifier", "denoiser", "certify")})  # typed
        cfg.data = tc["data"]  # replaced whole: data modules differ in their keys
        cfg.sigma, cfg.seed, cfg.T = tc["sigma"], tc["seed"], tc["T"]
        cfg.pretrained_root = tc["pretrained_root"]
        cfg.rejector_ckpt = rejector_ckpt
        cfg.outdir = str(outdir)
        cfg.logger = {}  # the job logs to its own W&B run (certify_after_fit)
        cfg.wait = True  # a shared baseline being written by another job: wait, then resume it
        if system != "rejection":
            cfg.bound = "cohen"  # certify.bound (e.g. runner_up) is the rejection system's
        trainer = tc["trainer"]
        cfg.trainer = {"_target_": "pytorch_lightning.Trainer",
                       "accelerator": trainer.get("accelerator", "auto"), "devices": 1,
                       "precision": "32-true", "logger": False,
                       "enable_progress_bar": trainer.get("enable_progress_bar", True),
                       "enable_model_summary": False,
                       "default_root_dir": str(outdir)}
    return cfg


def certify_after_fit(train_cfg: DictConfig, rejector_ckpt: str, outdir: Path,
                      wandb_runs: list) -> dict:
    """train.py certify=...: certify the trained f_R and each other system of certify.systems
    (the denoised baseline: the same classifier and denoiser, no rejector) on the same images and
    noise, through certify(); log each to the job's W&B run. Returns {system: summary}."""
    from dsr_lightning.config import is_multirun, sweep_dir

    # The baselines do not depend on the job's rejector: in a sweep, the jobs that share one (the
    # same σ, classifier and denoiser) share its results file in <sweep>/baselines: the first job
    # writes it, the others wait for the lock and find it done.
    shared = sweep_dir() / "baselines" if is_multirun() else outdir
    out = {}
    for system in train_cfg.certify.systems:
        ckpt = str(rejector_ckpt) if system == "rejection" else None
        cfg = job_config(train_cfg, system, ckpt, outdir if system == "rejection" else shared)
        res = certify(cfg)
        out[system] = {"file": res["outfile"], "acr": res["acr"], "acc": res["acc"],
                       "table": res["table"]}
        if wandb_runs:
            from dsr_lightning.reports.wandb import log_certification

            for run in wandb_runs:
                log_certification(run, system, res["outfile"], list(train_cfg.certify.radii))
    return out
