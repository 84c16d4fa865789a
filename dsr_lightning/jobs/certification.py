"""`certify(cfg)`: certify (or predict) a data split with one of three systems, through one path:
rejection (f_R = classifier + denoiser + rejector heads, rebuilt from the rejector checkpoint),
denoised (classifier + denoiser: Salman et al.) and plain (classifier: Cohen et al.).
`certify_after_fit` runs the same function for train.py's `certify=...` after fit."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import dsr_lightning
from dsr_lightning.config import to_dict
from dsr_lightning.config.schema import ClassifierConfig, DenoiserConfig, check_certify
from dsr_lightning.errors import ConfigError
from dsr_lightning.identity import system_id
from dsr_lightning.jobs import networks
from dsr_lightning.jobs.interrupt import stop_on_signals
from dsr_lightning.jobs.networks import DataFacts, data_facts
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.models import SmoothingSystem
from dsr_lightning.results import FORMAT, ResultsFile, WriterLock
from dsr_lightning.smoothing import check_stages, default_step_size, noise_scheme
from dsr_lightning.tasks import CertificationModule, CertificationSpec, RowWriter

ATTACK_SCHEME = "smoothadv-l2/keep-weighted/v1"  # mode=attack's loss and steps (DESIGN §13)


def spec_of(cfg: DictConfig) -> CertificationSpec:
    """The certification asked for by a (checked) certify.py config, built once."""
    staged, attack = cfg.mode == "staged", cfg.mode == "attack"
    stages, weights = (check_stages(list(cfg.stages), None if cfg.stage_weights is None
                                    else list(cfg.stage_weights)) if staged else ((), ()))
    return CertificationSpec(
        mode=cfg.mode, sigma=float(cfg.sigma), N0=int(cfg.N0), N=int(cfg.N),
        alpha=float(cfg.alpha), bound=cfg.bound, seed=int(cfg.seed), split=cfg.split,
        skip=int(cfg.skip), max=int(cfg.max),
        batch="auto" if cfg.batch == "auto" else int(cfg.batch),
        images_per_step=int(cfg.images_per_step), bf16=bool(cfg.bf16),
        channels_last=bool(cfg.channels_last), compile=bool(cfg.compile),
        allow_out_of_range=bool(cfg.get("allow_out_of_range", False)),
        radius=float(cfg.radius) if staged or attack else None,
        stages=tuple(int(s) for s in stages), stage_weights=tuple(float(w) for w in weights),
        attack_steps=int(cfg.attack_steps) if attack else None,
        attack_draws=int(cfg.attack_draws) if attack else None,
        attack_step_size=(None if not attack else
                          default_step_size(cfg.radius, cfg.attack_steps)
                          if cfg.attack_step_size is None else float(cfg.attack_step_size)))


def build_system(cfg: DictConfig, data: DataFacts | None = None) -> tuple[SmoothingSystem, dict]:
    """The base classifier of the chosen system, and what it is: {networks: {role: fingerprint}
    (jobs.networks.fingerprint: each network's id and recipe, with its weights' hash and its probe
    outputs), threshold, files (where each network was read), run (a description for reports)}.
    With a rejector checkpoint (rejector_ckpt=...), system=rejection is f_R and system=denoised
    its baseline: the checkpoint's own f and D, rebuilt and checked against the outputs recorded at
    training, whatever the files on disk hold now."""
    name = cfg.system.name
    ckpt_path = cfg.get("rejector_ckpt")
    if name == "rejection" or (name == "denoised" and ckpt_path):
        if not ckpt_path:
            raise ConfigError("system=rejection needs rejector_ckpt=<a rejector checkpoint of "
                              "train.py> (or choose system=denoised|plain)")
        if not Path(ckpt_path).exists():
            raise ConfigError(f"rejector checkpoint not found: {ckpt_path}\n  Train one "
                              "with `python train.py denoiser=... sigma=...` and pass "
                              "rejector_ckpt=<run>/checkpoints/best.ckpt")
        ckpt = RunCheckpoint.read(ckpt_path)
        system, prints = ckpt.system(name, cfg.sigma,
                                     cfg.get("threshold") if name == "rejection" else None)
        _check_classes(system.num_classes, data, f"the rejector {ckpt.path}")
        run = ckpt.config
        rej = run["rejector"]
        described = {"classifier": run["classifier"]["name"], "denoiser": run["denoiser"]["name"],
                     "objective": run["denoiser"].get("objective"),
                     "noise_sd": float(run["classifier"].get("noise_sd") or 0.0)}
        if name == "rejection":
            described.update(
                T=run["T"], head=rej["head"], target=rej["target"],
                training={k: rej.get(k) for k in ("pos_weight", "correct_weight", "focal_gamma")}
                | {"epochs": (run.get("optim") or {}).get("epochs"), "seed": run.get("seed")},
                threshold_choice=ckpt.threshold_choice, wandb=ckpt.wandb)
        else:
            described.update(T=None, rejector_of=str(ckpt.path.resolve()))
        return system, {
            "networks": prints, "threshold": system.threshold if name == "rejection" else None,
            "files": {"classifier": run["classifier"].get("path"),
                      "denoiser": run["denoiser"].get("path"), "rejector": str(ckpt.path.resolve())},
            "run": described}
    clf = networks.build("classifier", cfg.classifier, data=data)
    den = networks.build("denoiser", cfg.denoiser, sigma=cfg.sigma, data=data) \
        if name == "denoised" else None
    print(networks.describe("classifier", clf.recipe), flush=True)
    if den is not None:
        print(networks.describe("denoiser", den.recipe), flush=True)
    prints = {"classifier": networks.fingerprint("classifier", clf.recipe)}
    if den is not None:
        prints["denoiser"] = networks.fingerprint("denoiser", den.recipe)
    return SmoothingSystem(clf.module, den.module if den else None), {
        "networks": prints, "threshold": None,
        "files": {"classifier": cfg.classifier.get("path") or clf.recipe.get("weights"),
                  "denoiser": cfg.denoiser.get("path") if den else None, "rejector": None},
        "run": {"classifier": cfg.classifier.name, "noise_sd": float(cfg.classifier.noise_sd),
                "denoiser": cfg.denoiser.name if den else None,
                "objective": cfg.denoiser.objective if den else None, "T": None}}


def results_path(template: str, system: str, built: dict) -> Path:
    """The results file of a system: `outfile` with `{id}` replaced by the system's id
    (identity.system_id: its networks and threshold), so two systems never share a file and the
    same system finds its file again."""
    ids = {role: fp["id"] for role, fp in built["networks"].items()}
    return Path(str(template).replace("{id}", system_id(system, ids, built["threshold"])))


def _check_classes(k: int, data: DataFacts | None, what: str) -> None:
    if data is not None and data.num_classes is not None and data.num_classes != k:
        raise ConfigError(f"{what} has {k} classes, but the data ({data.name}) has "
                          f"{data.num_classes}: certify it on the data it was trained for (drop "
                          "data=..., so the checkpoint's is used)")


def _command_line_keys() -> list[str]:
    """The keys the command line set (`classifier=x` -> 'classifier', `+a.b=1` -> 'a.b')."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]


def adopt_checkpoint(cfg: DictConfig, given: list[str] | None = None) -> None:
    """system=rejection (or system=denoised, the rejector's baseline) with rejector_ckpt=...: the
    networks, σ and (unless data=... is given) the data come from the rejector checkpoint, so
    `certify.py rejector_ckpt=<best.ckpt>` alone certifies what was trained, on the data it was
    trained for. A command-line setting of the classifier, the denoiser or σ that disagrees with
    the checkpoint is refused, naming the key."""
    if cfg.system.name not in ("rejection", "denoised") or not cfg.get("rejector_ckpt") \
            or not Path(cfg.rejector_ckpt).is_file():
        return
    ckpt = RunCheckpoint.read(cfg.rejector_ckpt, weights=False)
    if ckpt.stage != "rejector":
        return  # refused with its own message when the system is built
    run = ckpt.config
    given = _command_line_keys() if given is None else given
    mine = to_dict(cfg)
    for key in given:
        top = key.split(".")[0]
        if top not in ("classifier", "denoiser", "sigma"):
            continue
        have = OmegaConf.select(OmegaConf.create(mine), key, default=None)
        recorded = OmegaConf.select(OmegaConf.create({k: run.get(k) for k in
                                                      ("classifier", "denoiser", "sigma")}),
                                    key, default=None)
        if _differs(have, recorded) and key == "sigma":
            raise ConfigError(f"the rejector {ckpt.path} was trained for sigma={recorded:g}, but "
                              f"sigma={have:g} was asked: drop sigma=... (the checkpoint's is "
                              "used) or train a rejector for this sigma")
        if _differs(have, recorded):
            raise ConfigError(
                f"{key}={_short(have)} disagrees with the rejector checkpoint {ckpt.path}, whose "
                f"{key} is {_short(recorded)}: certify.py rebuilds the networks and sigma from the "
                f"checkpoint; drop {key}=... (or train a rejector for it)")
    data_given = any(k == "data" for k in given)
    with open_dict(cfg):
        cfg.sigma = run["sigma"]
        for role, kind in (("classifier", ClassifierConfig), ("denoiser", DenoiserConfig)):
            recorded = {k: v for k, v in run[role].items() if k in cfg[role]}
            cfg[role] = OmegaConf.merge(OmegaConf.structured(kind), recorded)
        if not data_given:
            node = OmegaConf.create(run["data"])
            for key in given:  # data.<key>=... on the command line still applies
                if key.startswith("data."):
                    OmegaConf.update(node, key[5:], OmegaConf.select(cfg, key), force_add=True)
            cfg.data = node


def _differs(a, b) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-9
    return a != b


def _short(v) -> str:
    text = str(v)
    return text if len(text) <= 120 else text[:117] + "..."


def settings_of(spec: CertificationSpec, system: str, built: dict, data: dict,
                device: torch.device) -> dict:
    """The settings record of a results file: results.IDENTITY_KEYS (the spec's own, then the
    system, the noise, the data and each network as built), then what else the numbers depend on
    (the versions, the device model) and a description (files, run)."""
    return {"format": FORMAT, **spec.record(), "system": system,
            "noise": noise_scheme(device.type), "device": device.type, "data": data,
            "networks": built["networks"], "threshold": built["threshold"],
            "attack": ATTACK_SCHEME if spec.mode == "attack" else None,
            "files": built["files"], "run": built["run"],
            "versions": {"dsr_lightning": dsr_lightning.__version__, "torch": torch.__version__,
                         "device_model": _device_model(device)}}


def _never_rejecting(cfg: DictConfig) -> None:
    """A rejection system whose threshold is +inf never rejects: p_R = 0 is known, not estimated,
    so it is certified as the denoised system is (one bound at α, bound=cohen) instead of spending
    α/2 on each of two bounds; the file's name and record say so. (Before any file is touched.)
    A bound asked for by name (bound=..., certify.bound=...) is kept."""
    explicit = not OmegaConf.is_interpolation(cfg, "bound") or cfg.certify.bound is not None
    if cfg.system.name != "rejection" or cfg.bound == "cohen" or explicit \
            or not cfg.get("rejector_ckpt") or not Path(cfg.rejector_ckpt).is_file():
        return  # (a bound asked for by name is kept)
    t = cfg.get("threshold")
    if t is None:
        t = RunCheckpoint.read(cfg.rejector_ckpt, weights=False).threshold()
    if math.isinf(float(t)) and float(t) > 0:
        print(f"certify: the rejector's threshold is +inf (it never rejects): certified with one "
              f"bound at alpha, bound=cohen, not bound={cfg.bound}", flush=True)
        with open_dict(cfg):
            cfg.bound = "cohen"


def _stopped(what: str, results: ResultsFile) -> str:
    return (f"certification stopped by {what}; the rows written are kept in {results.path}. "
            "Run the same command again to resume: the images done are skipped")


def _device_model(device: torch.device) -> str:
    """The accelerator's model (GPU models differ in their noise streams and rounding)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _device(trainer: pl.Trainer) -> torch.device:
    try:
        return trainer.strategy.root_device
    except Exception:  # noqa: BLE001 - strategies that know their device only later
        return torch.device(str(type(trainer.accelerator).__name__)
                            .removesuffix("Accelerator").lower())


def _main_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def certify(cfg: DictConfig, adopt: bool = True) -> dict:
    """Certify the configured split; rows stream to cfg.outfile, written by this process alone.
    Returns the paths, the counts, the summary of the whole file and its Markdown table row.
    `adopt`: take the networks, σ and data of the rejector checkpoint (adopt_checkpoint)."""
    check_certify(cfg)
    if adopt:
        adopt_checkpoint(cfg)
    _never_rejecting(cfg)
    spec = spec_of(cfg)
    main = _main_process()
    if main:
        WriterLock(cfg.outfile).prepare()  # before any work: the folder is there and writable
    datamodule = instantiate(cfg.data)
    dataset = datamodule.dataset(spec.split)  # prepares and sets up what it needs
    system, built = build_system(cfg, data_facts(datamodule))
    if len(dataset) == 0:
        raise ConfigError(f"split={spec.split} of data={type(datamodule).__name__} holds no "
                          "images: nothing to certify (choose another split, or data with "
                          "images in it)")
    path = results_path(cfg.outfile, cfg.system.name, built)
    print("certify: " + ", ".join(f"{role} {fp['recipe'].get('name') or ''} #{fp['id']}"
                                  for role, fp in built["networks"].items())
          + f" -> {path}", flush=True)
    lock = WriterLock(path)
    if main:
        lock.acquire(wait=bool(cfg.get("wait", False)))  # the file is ours from here on
    try:
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=False,
                                          use_distributed_sampler=False)
        data = {"name": type(datamodule).__name__, "split_size": len(dataset),
                "fingerprint": datamodule.fingerprint(spec.split)}
        results = ResultsFile(path, settings_of(spec, cfg.system.name, built, data,
                                                _device(trainer)), spec.columns)
        # checked under the lock, as the file is about to be written; the shards of a killed
        # multi-device run are folded in (main process only)
        done = results.merge_parts() if main else results.check()
        todo = [i for i in spec.indices(len(dataset)) if i not in done]
        # every image to certify decodes, before a row is written (all bad files named at once)
        datamodule.check_decodable(spec.split, todo)
        if main:
            results.open()
        print(f"certify: {len(todo)} images to go ({len(done)} already in {results.path})",
              flush=True)
        if todo:
            trainer.callbacks.append(RowWriter(results))
            with stop_on_signals(lambda what: _stopped(what, results)):
                trainer.predict(CertificationModule(system, spec, dataset, todo),
                                return_predictions=False)
    finally:
        if main:
            lock.release()
    out = {"outfile": str(results.path), "settings": str(results.meta), "todo": len(todo),
           "done_before": len(done), "system": cfg.system.name,
           "wandb": built["run"].get("wandb")}
    if main and spec.mode == "certify":
        from dsr_lightning.reports import markdown_table, summary_frame

        frame = summary_frame([results.path], radii=list(cfg.certify.radii))
        out.update(frame=frame, table=markdown_table(frame), acr=float(frame["acr"].iloc[0]),
                   acc={float(r): float(frame[f"acc@{r:g}"].iloc[0]) for r in cfg.certify.radii})
        if cfg.get("logger") and cfg.logger.get("wandb"):
            out["wandb_run"] = log_certify_run(cfg, out)
    if main and spec.mode == "attack":
        from dsr_lightning.reports.attack import attack_summary, format_summary
        from dsr_lightning.results import read_table

        out["attack"] = attack_summary(read_table(results.path), results.settings)
        print(format_summary(out["attack"]), flush=True)
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
        from dsr_lightning.jobs.loggers import finish_wandb

        finish_wandb(run)  # its files whole on disk when this returns
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
        # the baseline is the checkpoint's own f and D (not the files, which may have changed)
        ckpt = str(rejector_ckpt) if system in ("rejection", "denoised") else None
        cfg = job_config(train_cfg, system, ckpt, outdir if system == "rejection" else shared)
        res = certify(cfg, adopt=False)
        out[system] = {"file": res["outfile"], "acr": res["acr"], "acc": res["acc"],
                       "table": res["table"]}
        if wandb_runs:
            from dsr_lightning.reports.wandb import log_certification

            for run in wandb_runs:
                log_certification(run, system, res["outfile"], list(train_cfg.certify.radii))
    return out
