"""`certify(cfg)`: certify (or predict) a data split with one of three systems, through one path:
rejection (f_R = classifier + denoiser + rejector heads, rebuilt from the rejector checkpoint),
denoised (classifier + denoiser: Salman et al.) and plain (classifier: Cohen et al.)."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dsr_lightning.models import SmoothingSystem, build_arch, freeze
from dsr_lightning.models.checkpoint import load_state_dict_strict
from dsr_lightning.smoothing import (
    check_alpha,
    check_bound,
    check_positive,
    check_positive_int,
    check_stages,
)
from dsr_lightning.tasks.certify import (
    CERTIFY_COLUMNS,
    PREDICT_COLUMNS,
    STAGED_COLUMNS,
    CertifyModule,
    FastBase,
    ResultsFile,
    RowWriter,
)
from dsr_lightning.tasks.networks import ConfigError, load_frozen

SYSTEMS = ("rejection", "denoised", "plain")


def load_rejection_system(path: str | Path, sigma: float | None = None) -> tuple[SmoothingSystem, dict]:
    """f_R rebuilt from a rejector checkpoint of train.py alone (it holds f, D and the heads, and
    the resolved config). A σ other than the one the rejector was trained for is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rejector checkpoint not found: {path}\n  Train one with "
                          "`python train.py denoiser=... sigma=...` and pass "
                          "rejector_ckpt=<run>/checkpoints/best.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own Lightning file
    run = ckpt.get("dsr_config") if isinstance(ckpt, dict) else None
    if not run or run.get("stage", {}).get("name") != "rejector":
        raise ConfigError(f"{path} is not a rejector checkpoint of train.py (no rejector config)")
    if sigma is not None and abs(float(run["sigma"]) - float(sigma)) > 1e-9:
        raise ConfigError(f"the rejector {path} was trained for sigma={run['sigma']:g}, but "
                          f"sigma={float(sigma):g} was asked: certify with sigma={run['sigma']:g} "
                          "or train a rejector for this sigma")
    clf = build_arch(run["classifier"]["arch"], **(run["classifier"].get("arch_kwargs") or {}))
    den = build_arch(run["denoiser"]["arch"], **(run["denoiser"].get("arch_kwargs") or {}))
    rej = instantiate(OmegaConf.create(run["rejector"]["net"]))(
        num_classes=clf.num_classes, feature_channels=clf.feature_channels)
    sd = ckpt["state_dict"]
    for name, net in (("classifier", clf), ("denoiser", den), ("rejector", rej)):
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        load_state_dict_strict(net, part, source=f"{path} ({name})")
    system = SmoothingSystem(freeze(clf), freeze(den), freeze(rej),
                             threshold=run["rejector"].get("threshold", 0.0))
    return system, run


def build_system(cfg: DictConfig) -> tuple[SmoothingSystem, dict]:
    """The base classifier of the chosen system, and what it was built from (for the record)."""
    name = cfg.system.name
    if name == "rejection":
        if not cfg.get("rejector_ckpt"):
            raise ConfigError("system=rejection needs rejector_ckpt=<a rejector checkpoint of "
                              "train.py> (or choose system=denoised|plain)")
        system, run = load_rejection_system(cfg.rejector_ckpt, cfg.sigma)
        return system, {"classifier": run["classifier"]["path"], "denoiser": run["denoiser"]["path"],
                        "rejector": str(Path(cfg.rejector_ckpt).resolve())}
    if name not in SYSTEMS:
        raise ConfigError(f"system={name!r}: choose one of {', '.join(SYSTEMS)}")
    clf = load_frozen("classifier", cfg.classifier)
    den = load_frozen("denoiser", cfg.denoiser, sigma=cfg.sigma) if name == "denoised" else None
    return SmoothingSystem(clf, den), {"classifier": str(cfg.classifier.path),
                                       "denoiser": str(cfg.denoiser.path) if den else None,
                                       "rejector": None}


def validate(cfg: DictConfig) -> None:
    """Every check on the numbers before anything is loaded or written."""
    if cfg.system.name not in SYSTEMS:  # first: the bound check below would blame the bound
        raise ConfigError(f"system={cfg.system.name!r}: choose one of {', '.join(SYSTEMS)}")
    try:
        check_alpha(cfg.alpha)
        n0, n = check_positive_int("N0", cfg.N0), check_positive_int("N", cfg.N)
        check_positive_int("batch", cfg.batch)
        check_positive_int("images_per_step", cfg.images_per_step)
        check_positive_int("skip", cfg.skip)
        bound = check_bound(cfg.bound)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if n0 > n:
        raise ConfigError(f"N0={n0} > N={n}: the selection draws N0 should be a small fraction of "
                          "the estimation draws N (e.g. N0=100, N=10000)")
    if float(cfg.sigma) <= 0:
        raise ConfigError(f"sigma={cfg.sigma}: the noise level must be > 0")
    if cfg.mode not in ("certify", "predict", "staged"):
        raise ConfigError(f"mode={cfg.mode!r}: choose certify, predict or staged")
    if cfg.mode == "staged":
        if cfg.get("radius") is None:
            raise ConfigError("mode=staged certifies at one target radius: set radius=<r> "
                              "(L2, pixel units of [0,1] images, like sigma)")
        try:
            check_positive("radius", cfg.radius)
            stages, _ = check_stages(list(cfg.stages or []), list(cfg.stage_weights or []))
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e
        if stages[-1] != n:
            raise ConfigError(f"mode=staged: N={n} must equal the last of stages={list(stages)} "
                              f"(N names the results file and its record): set N={stages[-1]}")
    if cfg.system.name != "rejection" and bound != "cohen":
        raise ConfigError(f"bound={bound} needs a reject class; system={cfg.system.name} has none: "
                          "use bound=cohen")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split={cfg.split!r}: choose test, val or train")


def settings_of(cfg: DictConfig, sources: dict) -> dict:
    return {"mode": cfg.mode, "system": cfg.system.name, "sigma": float(cfg.sigma),
            "N0": int(cfg.N0), "N": int(cfg.N), "alpha": float(cfg.alpha),
            "bound": cfg.bound, "split": cfg.split, "seed": int(cfg.seed), "bf16": bool(cfg.bf16),
            **sources, "skip": int(cfg.skip), "max": int(cfg.max), "batch": int(cfg.batch),
            "data": cfg.data._target_.rsplit(".", 1)[-1],
            **(staged_settings(cfg) if cfg.mode == "staged" else {})}


def staged_settings(cfg: DictConfig) -> dict:
    """mode=staged only, so records of the other modes (and files written before) stay valid."""
    return {"radius": float(cfg.radius), "stages": [int(s) for s in cfg.stages],
            "stage_weights": [float(w) for w in cfg.stage_weights]}


def certify(cfg: DictConfig) -> dict:
    """Certify the configured split; rows stream to cfg.outfile. Returns paths and counts."""
    validate(cfg)
    system, sources = build_system(cfg)
    settings = settings_of(cfg, sources)
    columns = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS,
               "staged": STAGED_COLUMNS}[cfg.mode]
    results = ResultsFile(cfg.outfile, settings, columns)
    main_process = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    # other settings are refused before anything is touched; then the shards of a killed
    # multi-device run are folded in (by the main process only)
    done = results.merge_parts() if main_process and results.path.exists() else results.check()
    dataset = instantiate(cfg.data).dataset(cfg.split)  # prepares and sets up what it needs
    stop = len(dataset) if int(cfg.max) < 0 else min(int(cfg.max), len(dataset))
    todo = [i for i in range(0, stop, int(cfg.skip)) if i not in done]
    if main_process:
        results.open()
    print(f"certify: {len(todo)} images to go ({len(done)} already in {results.path})", flush=True)
    if todo:
        base = FastBase(system, bf16=cfg.bf16, channels_last=cfg.channels_last)
        module = CertifyModule(base, cfg.sigma, int(cfg.N0), int(cfg.N), float(cfg.alpha),
                               int(cfg.batch), cfg.bound, cfg.mode, int(cfg.seed), dataset, todo,
                               int(cfg.images_per_step), **(staged_settings(cfg)
                                                            if cfg.mode == "staged" else {}))
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[RowWriter(results)], logger=False,
                                          use_distributed_sampler=False)
        trainer.predict(module, return_predictions=False)
    return {"outfile": str(results.path), "settings": str(results.meta), "todo": len(todo),
            "done_before": len(done)}
