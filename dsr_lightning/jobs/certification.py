"""`certify(cfg)`: certify (or predict) a data split with one of three systems, through one path:
rejection (f_R = classifier + denoiser + rejector heads, rebuilt from the rejector checkpoint),
denoised (classifier + denoiser: Salman et al.) and plain (classifier: Cohen et al.).
`certify_after_fit` runs the same function for dsr-train's `certify=...` after fit."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
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
from dsr_lightning.logs import get_logger, main_process
from dsr_lightning.models import SmoothingSystem
from dsr_lightning.results import FORMAT, ResultsFile, WriterLock
from dsr_lightning.smoothing import check_stages, default_step_size, noise_scheme
from dsr_lightning.tasks import CertificationModule, CertificationSpec, RowWriter

log = get_logger(__name__)
ATTACK_SCHEME = "smoothadv-l2/keep-weighted/v1"  # mode=attack's loss and steps (DESIGN §13)


def spec_of(cfg: DictConfig) -> CertificationSpec:
    """The certification asked for by a (checked) dsr-certify config, built once."""
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
                              "dsr-train> (or choose system=denoised|plain)")
        if not Path(ckpt_path).exists():
            raise ConfigError(f"rejector checkpoint not found: {ckpt_path}\n  Train one "
                              "with `dsr-train denoiser=... sigma=...` and pass "
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
    log.info(networks.describe("classifier", clf.recipe))
    if den is not None:
        log.info(networks.describe("denoiser", den.recipe))
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
    `dsr-certify rejector_ckpt=<best.ckpt>` alone certifies what was trained, on the data it was
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
                f"{key} is {_short(recorded)}: dsr-certify rebuilds the networks and sigma from the "
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


def _explicit_bound(cfg: DictConfig) -> bool:
    """Whether the bound was asked for by name (bound=..., certify.bound=...)."""
    return not OmegaConf.is_interpolation(cfg, "bound") or cfg.certify.bound is not None


def _bound_at(cfg: DictConfig, threshold: float, explicit: bool) -> str:
    """The bound the rejection system is certified with at `threshold`: the one asked for by name,
    else cohen for +inf (it never rejects, see _never_rejecting), else the system's own."""
    if explicit:
        return cfg.bound
    return "cohen" if math.isinf(threshold) and threshold > 0 else cfg.system.bound


def _never_rejecting(cfg: DictConfig) -> None:
    """A rejection system whose threshold is +inf never rejects: p_R = 0 is known, not estimated,
    so it is certified as the denoised system is (one bound at α, bound=cohen) instead of spending
    α/2 on each of two bounds; the file's name and record say so. (Before any file is touched.)
    A bound asked for by name (bound=..., certify.bound=...) is kept."""
    explicit = _explicit_bound(cfg)
    if cfg.system.name != "rejection" or cfg.bound == "cohen" or explicit \
            or not cfg.get("rejector_ckpt") or not Path(cfg.rejector_ckpt).is_file():
        return  # (a bound asked for by name is kept)
    t = cfg.get("threshold")
    if t is None:
        t = RunCheckpoint.read(cfg.rejector_ckpt, weights=False).threshold()
    if math.isinf(float(t)) and float(t) > 0:
        log.warning(f"certify: the rejector's threshold is +inf (it never rejects): certified with "
                    f"one bound at alpha, bound=cohen, not bound={cfg.bound}")
        with open_dict(cfg):
            cfg.bound = "cohen"


def _stopped(what: str, files: list[ResultsFile]) -> str:
    return (f"certification stopped by {what}; the rows written are kept in "
            f"{', '.join(str(f.path) for f in files)}. Run the same command again to resume: the "
            "images done are skipped")


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


@dataclass
class Certified:
    """One system a certification run writes: its name, spec (its bound), what it is (build_system's
    dict) and its results file."""

    system: str
    spec: CertificationSpec
    built: dict
    path: Path


def shared_systems(cfg: DictConfig, spec: CertificationSpec, built: dict,
                   explicit_bound: bool = False) -> list[Certified]:
    """The systems certified from one run's draws: the configured one, then with system=rejection
    and mode=certify its denoised baseline (`baseline=true`: the same f and D, no heads; into
    `baseline_outdir`) and the rejection system at each of `thresholds` (ablation), each with its
    own identity and results file (the file a separate run of that system would write)."""
    name = cfg.system.name
    out = [Certified(name, spec, built, results_path(cfg.outfile, name, built))]
    if name != "rejection" or spec.mode != "certify":
        return out

    def variant(system: str, threshold, bound: str, outdir: str, what: dict) -> Certified:
        v = copy.deepcopy(cfg)
        with open_dict(v):
            v.system.name, v.threshold, v.bound, v.outdir = system, threshold, bound, outdir
        return Certified(system, replace(spec, bound=bound), what,
                         results_path(v.outfile, system, what))

    if cfg.get("baseline"):
        base = {"networks": {r: built["networks"][r] for r in ("classifier", "denoiser")},
                "threshold": None, "files": built["files"],
                "run": {k: built["run"].get(k) for k in ("classifier", "denoiser", "objective",
                                                          "noise_sd")}
                | {"T": None, "rejector_of": built["files"].get("rejector")}}
        out.append(variant("denoised", None, "cohen", cfg.get("baseline_outdir") or cfg.outdir,
                           base))
    for t in cfg.get("thresholds") or []:
        out.append(variant("rejection", float(t), _bound_at(cfg, float(t), explicit_bound),
                           cfg.outdir, {**built, "threshold": float(t)}))
    paths = [c.path for c in out]
    if len(set(paths)) < len(paths):
        raise ConfigError(f"outfile={cfg.outfile} names one file, but baseline=true or thresholds="
                          "... certify several systems, each into its own file: put {id} in "
                          "outfile (as its default does), or drop outfile=...")
    return out


def certify(cfg: DictConfig, adopt: bool = True) -> dict:
    """Certify the configured split; rows stream to the system's results file (cfg.outfile),
    written by this process alone. With system=rejection, `baseline=true` and `thresholds=[...]`
    certify more systems from the same draws (shared_systems), each into its own file. Returns
    the paths, the counts, the summary of the main file and its Markdown table row, and the same
    for each other system (`also`). `adopt`: take the networks, σ and data of the rejector
    checkpoint (adopt_checkpoint)."""
    check_certify(cfg)
    if adopt:
        adopt_checkpoint(cfg)
    explicit_bound = _explicit_bound(cfg)
    _never_rejecting(cfg)
    spec = spec_of(cfg)
    main = main_process()
    if main:
        WriterLock(cfg.outfile).prepare()  # before any work: the folder is there and writable
    datamodule = instantiate(cfg.data)
    dataset = datamodule.dataset(spec.split)  # prepares and sets up what it needs
    system, built = build_system(cfg, data_facts(datamodule))
    if len(dataset) == 0:
        raise ConfigError(f"split={spec.split} of data={type(datamodule).__name__} holds no "
                          "images: nothing to certify (choose another split, or data with "
                          "images in it)")
    systems = shared_systems(cfg, spec, built, explicit_bound)
    for c in systems:
        log.info(f"certify: {c.system}" + (f" (threshold {c.built['threshold']:g})"
                                           if c.built["threshold"] is not None else "") + ": "
                 + ", ".join(f"{role} {fp['recipe'].get('name') or ''}#{fp['id']}"
                             for role, fp in c.built["networks"].items()) + f" -> {c.path}")
    shared = [(c.built["threshold"] if c.system == "rejection" else None, c.spec.bound)
              for c in systems] if len(systems) > 1 else None
    if not shared and system.rejector is not None and math.isinf(system.threshold) \
            and system.threshold > 0:  # never rejects: the heads need not run (n_R = 0)
        system = SmoothingSystem(system.classifier, system.denoiser, None,
                                 threshold=system.threshold, num_classes=system.num_classes)
    locks = [WriterLock(c.path) for c in systems]
    try:
        if main:  # the files are ours from here on (in a fixed order: no two runs wait in a loop)
            for lock in locks:
                lock.acquire(wait=bool(cfg.get("wait", False)))
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=False,
                                          use_distributed_sampler=False)
        data = {"name": type(datamodule).__name__, "split_size": len(dataset),
                "fingerprint": datamodule.fingerprint(spec.split)}
        files = [ResultsFile(c.path, settings_of(c.spec, c.system, c.built, data,
                                                 _device(trainer)), spec.columns)
                 for c in systems]
        # checked under the locks, as the files are about to be written; the shards of a killed
        # multi-device run are folded in (main process only)
        done = [f.merge_parts() if main else f.check() for f in files]
        todo = [i for i in spec.indices(len(dataset)) if any(i not in d for d in done)]
        # every image to certify decodes, before a row is written (all bad files named at once)
        datamodule.check_decodable(spec.split, todo)
        if main:
            for f in files:
                f.open()
        for f, d in zip(files, done):
            log.info(f"certify: {sum(i not in d for i in todo)} images to go ({len(d)} already "
                     f"in {f.path})")
        if todo:
            trainer.callbacks.append(RowWriter(files, done=done, total=len(todo), names=[
                c.system if c.built["threshold"] is None or len(systems) == 1
                else f"{c.system} t={c.built['threshold']:.3g}" for c in systems])
                if shared else RowWriter(files[0], total=len(todo)))
            with stop_on_signals(lambda what: _stopped(what, files)):
                trainer.predict(CertificationModule(system, spec, dataset, todo, shared),
                                return_predictions=False)
    finally:
        if main:
            for lock in reversed(locks):
                lock.release()
    outs = [_summary(cfg, c, f, d, todo, main) for c, f, d in zip(systems, files, done)]
    out = {**outs[0], "wandb": built["run"].get("wandb"), "also": outs[1:]}
    if main and spec.mode == "certify" and cfg.get("logger") and cfg.logger.get("wandb"):
        out["wandb_run"] = log_certify_run(cfg, out)
    if main and spec.mode == "attack":
        from dsr_lightning.reports.attack import attack_summary, format_summary
        from dsr_lightning.results import read_table

        out["attack"] = attack_summary(read_table(files[0].path), files[0].settings)
        log.info(format_summary(out["attack"]))
    return out


def _summary(cfg: DictConfig, c: Certified, results: ResultsFile, done: set[int], todo: list[int],
             main: bool) -> dict:
    """What certify() says of one results file: its paths and counts, and (mode=certify) its
    table row, ACR and certified accuracies at certify.radii."""
    out = {"outfile": str(results.path), "settings": str(results.meta), "system": c.system,
           "todo": sum(i not in done for i in todo), "done_before": len(done),
           "threshold": c.built["threshold"]}
    if main and c.spec.mode == "certify":
        from dsr_lightning.reports import markdown_table, summary_frame

        frame = summary_frame([results.path], radii=list(cfg.certify.radii))
        out.update(frame=frame, table=markdown_table(frame), acr=float(frame["acr"].iloc[0]),
                   acc={float(r): float(frame[f"acc@{r:g}"].iloc[0]) for r in cfg.certify.radii})
    return out


def log_certify_run(cfg: DictConfig, out: dict) -> str:
    """dsr-certify logger=wandb: a W&B run (offline unless said) with the certification; a
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
        for res in (out, *out.get("also", [])):  # each system of the pass under its own name
            key = res["system"] if res is out or res["threshold"] is None \
                else f"rejection@{res['threshold']:g}"
            log_certification(run, key, res["outfile"], list(cfg.certify.radii))
    finally:
        from dsr_lightning.jobs.loggers import finish_wandb

        finish_wandb(run)  # its files whole on disk when this returns
    return run.id


def job_config(train_cfg: DictConfig, system: str, rejector_ckpt: str | None,
               outdir: Path) -> DictConfig:
    """dsr-certify's config for a system certified by the training job: certify.yaml with the
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
        if system == "plain":  # randomized smoothing: the job's classifier trained with noise σ
            node = OmegaConf.to_container(train_cfg.classifier, resolve=False)
            cfg.classifier = OmegaConf.merge(OmegaConf.structured(ClassifierConfig), node)
            cfg.classifier.noise_sd = tc["sigma"]  # its path follows (the published layout)
        trainer = tc["trainer"]
        cfg.trainer = {"_target_": "pytorch_lightning.Trainer",
                       "accelerator": trainer.get("accelerator", "auto"), "devices": 1,
                       "precision": "32-true", "logger": False,
                       "enable_progress_bar": trainer.get("enable_progress_bar", True),
                       "enable_model_summary": False,
                       "default_root_dir": str(outdir)}
    return cfg


def check_plain_before_fit(train_cfg: DictConfig, outdir: Path) -> None:
    """certify.systems with `plain`: the classifier trained with noise σ must be there before the
    rejector trains, not found missing after it; and it must be another file than the job's
    classifier (a classifier whose file does not follow classifier.noise_sd, a torchvision or
    module one, would be smoothed as it is: not Cohen et al.'s baseline). One ConfigError."""
    if "plain" not in (train_cfg.certify.systems or []):
        return
    node = networks.node_dict(job_config(train_cfg, "plain", None, outdir).classifier)
    if node.get("path") == train_cfg.classifier.get("path"):
        raise ConfigError(
            f"certify.systems=[...,plain] certifies randomized smoothing of the classifier trained "
            f"with noise sigma={float(train_cfg.sigma):g}, but this classifier's file does not "
            "follow classifier.noise_sd (it is the job's own classifier): drop plain here and run "
            "dsr-certify system=plain classifier.path=<your noise-trained classifier> instead")
    networks.check_path("classifier", node, None, needed=True)


def certify_after_fit(train_cfg: DictConfig, rejector_ckpt: str, outdir: Path,
                      wandb_runs: list) -> dict:
    """dsr-train certify=...: certify the trained f_R and each other system of certify.systems
    (denoised: the checkpoint's own classifier and denoiser, no rejector; plain: randomized
    smoothing of the job's classifier trained with noise σ, classifier.noise_sd=σ) on the same
    images and noise, through certify(): in one pass, the baseline's counts (and those of f_R at
    certify.thresholds) derived from f_R's draws (DESIGN §8.2). Logs each to the job's W&B run.
    Returns {system: summary} (`rejection@<t>` for the other thresholds)."""
    from dsr_lightning.config import is_multirun, sweep_dir

    # The baselines do not depend on the job's rejector: in a sweep, the jobs that share one (the
    # same σ, classifier and denoiser: the same system id) share its results file in
    # <sweep>/baselines: the first job writes it, the others wait for the lock and find it done.
    shared = sweep_dir() / "baselines" if is_multirun() else outdir
    systems = list(train_cfg.certify.systems)
    results = []
    if "rejection" in systems:
        cfg = job_config(train_cfg, "rejection", str(rejector_ckpt), outdir)
        with open_dict(cfg):
            cfg.baseline, cfg.baseline_outdir = "denoised" in systems, str(shared)
        res = certify(cfg, adopt=False)
        results += [res, *res["also"]]
    elif "denoised" in systems:  # the baseline alone
        results.append(certify(job_config(train_cfg, "denoised", str(rejector_ckpt), shared),
                               adopt=False))
    if "plain" in systems:  # randomized smoothing of the noise-trained classifier: other draws
        results.append(certify(job_config(train_cfg, "plain", None, shared), adopt=False))
    out = {}
    for i, res in enumerate(results):
        key = res["system"] if i == 0 or res["system"] != "rejection" \
            else f"rejection@{res['threshold']:g}"
        out[key] = {"file": res["outfile"], "acr": res["acr"], "acc": res["acc"],
                    "table": res["table"]}
        if wandb_runs:
            from dsr_lightning.reports.wandb import log_certification

            for run in wandb_runs:
                log_certification(run, key, res["outfile"], list(train_cfg.certify.radii))
    return out
