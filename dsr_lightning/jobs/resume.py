"""What `ckpt_path=` may resume: a checkpoint of dsr-train whose method settings are those of the
run asked for. A checkpoint keeps the weights of its own settings, so resuming it under others
(another σ, T, head, target, seed, denoiser, architecture, stage, data set) would record the new
settings beside the old weights; it is refused, naming every difference."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dsr_lightning.config import to_dict
from dsr_lightning.errors import CheckpointError, ConfigError
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint

# (key path, applies to these stages): the settings a checkpoint's weights depend on
METHOD_KEYS = (
    ("stage.name", None), ("sigma", ("denoiser", "rejector")), ("T", ("rejector",)),
    ("seed", None), ("data._target_", None), ("data.val_fraction", None),
    ("classifier.arch", None), ("classifier.arch_kwargs", None), ("classifier.noise_sd", None),
    ("classifier.path", ("rejector",)),
    ("denoiser.arch", ("denoiser", "rejector")), ("denoiser.arch_kwargs", ("denoiser", "rejector")),
    ("denoiser.objective", ("denoiser", "rejector")), ("denoiser.path", ("rejector",)),
    ("stage.objective", ("denoiser",)), ("stage.init_from", ("denoiser",)),
    ("rejector.net", ("rejector",)), ("rejector.head", ("rejector",)),
    ("rejector.target", ("rejector",)), ("rejector.pos_weight", ("rejector",)),
    ("rejector.correct_weight", ("rejector",)), ("rejector.focal_gamma", ("rejector",)),
    ("stage.task", None),  # the task's options, however set (absent from older checkpoints)
)
SINCE = {"stage.task"}  # keys older checkpoints do not record: compared only where recorded


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _optimizers(cfg: dict) -> list[str]:
    return [p.get("optimizer", {}).get("_target_") for p in (cfg.get("optim") or {}).get("phases", [])]


def check_resume(cfg: DictConfig, ckpt_path: str) -> dict:
    """Checks `ckpt_path` against the composed config before anything is built. Returns
    {"epochs": epochs done, "in_place": whether the run continues in the checkpoint's own folder,
    "wandb": the W&B run record or None, "finished": no epoch left (allowed for a rejector run
    with certify=...: its certification resumes), "networks": the recipes it recorded}. Raises
    ConfigError / CheckpointError."""
    path = Path(str(ckpt_path))
    if not path.exists():
        raise ConfigError(f"ckpt_path={path}: no such file (resume from <run>/checkpoints/last.ckpt)")
    try:
        ckpt = RunCheckpoint.read(path)
    except CheckpointError as e:
        raise CheckpointError(f"ckpt_path={path}: {e}") from None
    old, new = ckpt.config, to_dict(cfg)
    stage = new["stage"]["name"]
    diff = [(k, _get(old, k), _get(new, k)) for k, stages in METHOD_KEYS
            if (stages is None or stage in stages) and _get(old, k) != _get(new, k)
            and not (k in SINCE and _get(old, k) is None)]
    if _optimizers(old) != _optimizers(new):
        diff.append(("optim.phases (optimizers)", _optimizers(old), _optimizers(new)))
    if diff:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff)
        raise ConfigError(f"ckpt_path={path} was trained with other settings; resuming it would "
                          f"mix them:\n{lines}\n  Resume with the checkpoint's settings, or start "
                          "a new run (no ckpt_path).")
    try:
        ckpt.check_finite()
    except CheckpointError as e:
        raise CheckpointError(f"ckpt_path={path}: {e}") from None
    done = ckpt.epoch
    wanted = int(cfg.optim.epochs)
    finished = done >= wanted
    if finished and not (new["stage"]["name"] == "rejector" and cfg.certify.systems):
        raise ConfigError(f"ckpt_path={path} has trained {done} epochs already and optim.epochs="
                          f"{wanted}: nothing to resume. Train longer with optim.epochs=<more than "
                          f"{done}> (the last phase continues).")
    run = path.parent.parent
    here = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    # a finished rejector run with certify=...: nothing to train, its certification (stopped
    # before it ended?) resumes from its results files
    return {"epochs": done, "in_place": here is not None and here.resolve() == run.resolve(),
            "wandb": ckpt.wandb, "finished": finished, "networks": old.get("networks")}
