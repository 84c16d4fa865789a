"""The config schema. Structured configs (dataclasses registered in Hydra's ConfigStore as
`train_schema` and `certify_schema`, first in the defaults lists of train.yaml and certify.yaml)
give every key its type, so `optim.epochs=two`, `sigma=abc` or `T=1.5` is refused when the config
is composed, with Hydra's one-paragraph message naming the key. `check_train` / `check_certify`
then check ranges and choices (`sigma=-1`, `T=0`, a negative learning rate, ...) before anything is
built or written, raising one ConfigError that names the key and says what to do.

Group nodes whose keys differ between options (data, trainer, logger, callbacks) are open maps:
their values are checked by the classes they instantiate.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from dsr_lightning.data.base import SPLITS
from dsr_lightning.errors import ConfigError
from dsr_lightning.models.checkpoint import SOURCES
from dsr_lightning.models.normalize import input_size_of
from dsr_lightning.models.system import SYSTEMS
from dsr_lightning.smoothing.checks import BOUNDS, draws_setting, sigma_setting, threshold_setting
from dsr_lightning.smoothing.checks import alpha_setting as _alpha
from dsr_lightning.smoothing.checks import choice_setting as _choice
from dsr_lightning.smoothing.checks import int_setting as _int
from dsr_lightning.smoothing.checks import real_setting as _real
from dsr_lightning.smoothing.staged import check_stages
from dsr_lightning.smoothing.threshold import OBJECTIVES as SELECTION_OBJECTIVES
from dsr_lightning.tasks.base import CLIP_ALGORITHMS
from dsr_lightning.tasks.denoiser import OBJECTIVES
from dsr_lightning.tasks.prediction import MODES
from dsr_lightning.tasks.rejector import HEADS, TARGETS

STAGES = ("classifier", "denoiser", "rejector")
# Trainer arguments that Lightning refuses under manual optimisation: the tasks apply them
MANUAL_KEYS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


@dataclass
class NetConfig:
    """How a network is built (jobs/networks.py): by architecture name and a published-form file
    (source=arch), a torchvision model, any nn.Module class, or a whole-network file."""
    name: str = MISSING
    source: str = "arch"       # arch | torchvision | module | file
    arch: str | None = None    # source=arch: a name of models.ARCHS
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None   # source=torchvision: a torchvision.models name; source=diffusion:
    #                            a diffusers hub id or a save_pretrained folder
    weights: str | None = None  # source=torchvision: DEFAULT, IMAGENET1K_V2, ... (downloaded)
    kwargs: dict[str, Any] = field(default_factory=dict)  # source=torchvision: more arguments
    num_classes: int | None = None  # torchvision/module: null = the data's class count
    net: dict[str, Any] = field(default_factory=dict)  # source=module: _target_ and arguments
    path: str | None = None    # the weights (arch: published form; torchvision/module: a state
    #                            dict; file: TorchScript)
    strip_prefix: str | None = None  # keys under this prefix only, without it ('model.')
    trust_pickle: bool = False  # source=file: allow a pickled whole module (runs its code)


@dataclass
class ClassifierConfig(NetConfig):
    noise_sd: float = 0.0  # > 0: Cohen et al.'s Gaussian-augmented classifier (pixel units)
    mean: list[float] | None = None  # input normalisation (null: weights', arch's, data's)
    std: list[float] | None = None
    feature_layers: list[str] | None = None  # fused into the rejector (null: the defaults)
    input_size: Any = None  # the classifier's input size (224 or [H, W]), resized inside; null: data's


@dataclass
class DenoiserConfig(NetConfig):
    objective: str = "mse_obj"  # the published folder of the training objective


@dataclass
class ThresholdSelection:
    """rejector.threshold=auto: the decision threshold chosen on validation draws (DESIGN §5)."""
    objective: str = "acr"     # acr: mean certified radius | accuracy: certified accuracy at radius
    radius: float = 0.0        # objective=accuracy: the radius
    images: int = 200          # validation images
    draws: int = 100           # noise draws per image
    batch: int = 512           # samples per forward pass
    N: int | None = None       # the N and alpha the objective assumes (null: certify.N, certify.alpha)
    alpha: float | None = None


@dataclass
class RejectorConfig:
    net: dict[str, Any] = MISSING
    target: str = "clean_pred"
    head: str = "noisy"
    threshold: Any = "auto"    # a logit (reject iff head logit > threshold) or "auto"
    pos_weight: float = 0.5    # BCE weight of the b = 1 (reject) terms
    correct_weight: float = 1.0  # BCE weight of b = 0 terms whose noisy prediction is right
    focal_gamma: float = 0.0   # > 0: focal loss (1 - p_t)^gamma * BCE
    selection: ThresholdSelection = field(default_factory=ThresholdSelection)


@dataclass
class PhaseConfig:
    epochs: int = MISSING
    optimizer: dict[str, Any] = MISSING
    scheduler: dict[str, Any] | None = None


@dataclass
class OptimConfig:
    epochs: int = MISSING
    lr: float | None = None
    phases: list[PhaseConfig] = MISSING


@dataclass
class StageConfig:
    name: str = MISSING
    monitor: str = MISSING
    mode: str = MISSING
    objective: str | None = None
    init_from: str | None = None
    # the stage's LightningModule: _target_ and its options (conf/stage/*.yaml), built by the job
    # with the networks it builds (jobs.training.build_task)
    task: dict[str, Any] | None = None


@dataclass
class CertifySettings:
    """The keys of dsr-certify; in dsr-train the `certify` group (none | quick | paper | full)."""
    systems: list[str] = field(default_factory=list)  # dsr-train: certified after fit
    # the rejection system at other thresholds, from the same draws (ablation; each its own file)
    thresholds: list[float] = field(default_factory=list)
    N0: int = 100
    N: int = 10_000
    alpha: float = 0.01
    skip: int = 1
    max: int = -1
    batch: Any = 1000          # samples per forward pass, or auto: the largest that fits
    images_per_step: int = 4
    bound: str | None = None   # null: the system's own (paper for rejection, cohen otherwise)
    mode: str = "certify"
    split: str = "test"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False      # torch.compile the networks (GPU; pays on long runs)
    radius: float | None = None
    stages: list[int] = field(default_factory=lambda: [100, 1000, 10_000])
    stage_weights: list[float] | None = None
    # mode=attack: PGD on the smoothed classifier within the L2 ball of `radius` (DESIGN §13)
    attack_steps: int = 10     # normalised-gradient ascent steps
    attack_draws: int = 32     # noise draws per step (fresh each step)
    attack_step_size: float | None = None  # null: 2.5 * radius / attack_steps
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # reports


@dataclass
class SystemConfig:
    name: str = MISSING
    bound: str = MISSING
    tag: str = MISSING


@dataclass
class CommonConfig:
    """The keys train.yaml and certify.yaml share."""
    sigma: float = 0.25
    T: int = 20
    seed: int = 0
    pretrained_root: str = "pretrained_models"
    run_name: str = MISSING
    data: dict[str, Any] = MISSING
    classifier: ClassifierConfig = MISSING
    denoiser: DenoiserConfig = MISSING
    trainer: dict[str, Any] = MISSING
    logger: dict[str, Any] = field(default_factory=dict)
    certify: CertifySettings = field(default_factory=CertifySettings)


@dataclass
class TrainConfig(CommonConfig):
    ckpt_path: str | None = None
    overwrite: bool = False
    rejector: RejectorConfig = MISSING
    optim: OptimConfig = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    stage: StageConfig = MISSING


@dataclass
class CertifyConfig(CommonConfig):
    T: int = 1  # (training only: the data modules read it)
    rejector_ckpt: str | None = None
    system: SystemConfig = MISSING
    # dsr-certify's own keys: the `certify` node's values unless set here (N=..., alpha=...)
    N0: int = II("certify.N0")
    N: int = II("certify.N")
    alpha: float = II("certify.alpha")
    skip: int = II("certify.skip")
    max: int = II("certify.max")
    batch: Any = II("certify.batch")
    images_per_step: int = II("certify.images_per_step")
    mode: str = II("certify.mode")
    split: str = II("certify.split")
    bf16: bool = II("certify.bf16")
    channels_last: bool = II("certify.channels_last")
    compile: bool = II("certify.compile")
    radius: float | None = II("certify.radius")
    stages: list[int] = II("certify.stages")
    stage_weights: list[float] | None = II("certify.stage_weights")
    attack_steps: int = II("certify.attack_steps")
    attack_draws: int = II("certify.attack_draws")
    attack_step_size: float | None = II("certify.attack_step_size")
    bound: str = MISSING
    outdir: str = "results"
    outfile: str = MISSING
    outfile_tag: dict[str, str] = field(default_factory=dict)
    threshold: float | None = None  # rejection: override the checkpoint's decision threshold
    # rejection, mode=certify: more systems from the same draws, each into its own results file
    baseline: bool = False     # the denoised baseline (the same f and D, no heads)
    baseline_outdir: str = II("outdir")
    thresholds: list[float] = II("certify.thresholds")  # f_R at other thresholds (ablation)
    wait: bool = False         # another process writes the same results file: wait for it
    allow_out_of_range: bool = False  # certify images with values outside [0, 1]
    # dsr-train's groups that experiments set; dsr-certify rebuilds them from the checkpoint
    rejector: Any = None
    optim: Any = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="certify_schema", node=CertifyConfig)


# --- ranges and choices -----------------------------------------------------------------------
# The rules a key shares with an argument of the Python API (sigma, N0/N, alpha, the threshold, and
# the generic number/integer/choice rules) are written once, in smoothing.checks (`*_setting`).


def check_optim(optim: DictConfig) -> None:
    _int("optim.epochs", optim.epochs, what=" (epochs to train)")
    if not optim.phases:
        raise ConfigError("optim.phases is empty: give at least one phase (epochs, optimizer)")
    for i, p in enumerate(optim.phases):
        _int(f"optim.phases[{i}].epochs", p.epochs)
        lr = p.optimizer.get("lr")
        if lr is not None:
            _real(f"optim.phases[{i}].optimizer.lr", lr, low=0, what=" (a learning rate)")
    if optim.get("lr") is not None:
        _real("optim.lr", optim.lr, low=0, what=" (a learning rate)")


def check_threshold(value) -> float | str:
    if value == "auto":
        return value
    return _real("rejector.threshold", value, what=" (a logit; reject iff the head's logit > it) "
                 "or 'auto' (chosen on the validation split)")


def check_rejector(rej: DictConfig) -> None:
    _choice("rejector.target", rej.target, TARGETS)
    _choice("rejector.head", rej.head, HEADS)
    check_threshold(rej.threshold)
    _real("rejector.pos_weight", rej.pos_weight, low=0)
    _real("rejector.correct_weight", rej.correct_weight, low=0)
    _real("rejector.focal_gamma", rej.focal_gamma, low=0, strict=False)
    sel = rej.selection
    _choice("rejector.selection.objective", sel.objective, SELECTION_OBJECTIVES)
    _real("rejector.selection.radius", sel.radius, low=0, strict=False)
    for k in ("images", "draws", "batch"):
        _int(f"rejector.selection.{k}", sel[k])
    if sel.N is not None:
        _int("rejector.selection.N", sel.N)
    if sel.alpha is not None:
        _alpha("rejector.selection.alpha", sel.alpha)


def check_certify_settings(c, prefix: str = "") -> None:
    """The certification numbers (dsr-certify's top level, or dsr-train's `certify` node)."""
    _alpha(f"{prefix}alpha", c.alpha)
    _, n = draws_setting(c.N0, c.N, prefix)
    for k in ("images_per_step", "skip"):
        _int(f"{prefix}{k}", c[k])
    if c.batch != "auto":
        _int(f"{prefix}batch", c.batch, what=" (noisy samples per forward pass) or auto (the "
             "largest that fits)")
    if isinstance(c.max, bool) or not isinstance(c.max, numbers.Integral) or c.max < -1:
        raise ConfigError(f"{prefix}max={c.max}: must be an integer >= 0 (stop before this index) "
                          "or -1 (the whole split)")
    _choice(f"{prefix}mode", c.mode, MODES)
    _choice(f"{prefix}split", c.split, SPLITS)
    if c.bound is not None:
        _choice(f"{prefix}bound", c.bound, BOUNDS)
    _int(f"{prefix}attack_steps", c.attack_steps, what=" (PGD steps of mode=attack)")
    _int(f"{prefix}attack_draws", c.attack_draws, what=" (noise draws per PGD step of mode=attack)")
    if c.attack_step_size is not None:
        _real(f"{prefix}attack_step_size", c.attack_step_size, low=0,
              what=" (the L2 length of a PGD step; null: 2.5 * radius / attack_steps)")
    if c.mode == "attack":
        if c.radius is None:
            raise ConfigError(f"{prefix}mode=attack attacks within an L2 ball: set {prefix}radius=<ε> "
                              "(pixel units of [0,1] images, like sigma)")
        _real(f"{prefix}radius", c.radius, low=0, what=" (the attack's ε)")
    if c.mode == "staged":
        if c.radius is None:
            raise ConfigError(f"{prefix}mode=staged certifies at one target radius: set "
                              f"{prefix}radius=<r> (L2, pixel units of [0,1] images, like sigma)")
        _real(f"{prefix}radius", c.radius, low=0)
        weights = None if c.stage_weights is None else list(c.stage_weights)
        try:
            stages, _ = check_stages(list(c.stages or []), weights)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e
        if stages[-1] != n:
            raise ConfigError(f"{prefix}mode=staged: {prefix}N={n} must equal the last of "
                              f"{prefix}stages={list(stages)} (N names the results file and its "
                              f"record): set {prefix}N={stages[-1]}")


def check_trainer(trainer: DictConfig) -> None:
    """The trainer node: callbacks and loggers come from their groups; the keys manual
    optimisation applies itself (MANUAL_KEYS) in range."""
    for key, how in (("callbacks", "the callbacks group: callbacks=[default,early_stopping] or "
                                   "+callbacks.<name>._target_=..."),
                     ("logger", "the logger group: logger=wandb or +logger.<name>._target_=...")):
        if key in trainer:
            raise ConfigError(f"trainer.{key} is not read: set {key} through {how}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        _real("trainer.gradient_clip_val", clip, low=0)
    algo = trainer.get("gradient_clip_algorithm")
    if algo is not None:
        _choice("trainer.gradient_clip_algorithm", algo, CLIP_ALGORITHMS)
    if trainer.get("accumulate_grad_batches") is not None:
        _int("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches)


def _keeps_checkpoints(callbacks) -> bool:
    return any(str((node or {}).get("_target_", "")).endswith("ModelCheckpoint")
               for node in (callbacks or {}).values() if isinstance(node, DictConfig))


def check_networks(cfg: DictConfig) -> None:
    """The classifier and denoiser nodes: a known source, and what that source needs."""
    for role in ("classifier", "denoiser"):
        node = cfg[role]
        source = _choice(f"{role}.source", node.source, SOURCES)
        if source == "torchvision" and role == "denoiser":
            raise ConfigError("denoiser.source=torchvision: torchvision has no denoisers; give "
                              "yours as denoiser=module (a class and a state dict) or denoiser=file")
        if source == "diffusion" and role == "classifier":
            raise ConfigError("classifier.source=diffusion: only the denoiser can be a diffusion "
                              "model (denoiser=diffusion denoiser.model=<hub id or folder>)")
        if source == "diffusion" and not node.get("model"):
            raise ConfigError("denoiser=diffusion needs denoiser.model=<a diffusers hub id, e.g. "
                              "google/ddpm-cifar10-32, or a save_pretrained folder>")
        if source == "diffusion" and (cfg.get("stage") or {}).get("name") == "denoiser":
            raise ConfigError("denoiser=diffusion is a pretrained model, used as it is: stage=denoiser "
                              "trains no diffusion model; train the rejector on top of it "
                              "(stage=rejector, the default)")
        if role == "classifier":
            input_size_of(node.get("input_size"))
        if node.get("num_classes") is not None:
            _int(f"{role}.num_classes", node.num_classes, low=2)
        if role == "classifier" and (node.mean is None) != (node.std is None):
            raise ConfigError("classifier.mean and classifier.std go together: set both (the "
                              "input normalisation f was trained with) or neither")
        if role == "classifier" and node.mean is not None and len(node.mean) != len(node.std):
            raise ConfigError(f"classifier.mean has {len(node.mean)} values, classifier.std "
                              f"{len(node.std)}: one per image channel each")
        if role == "classifier" and node.std is not None and any(v <= 0 for v in node.std):
            raise ConfigError(f"classifier.std={list(node.std)}: every value must be > 0")


def check_data(data: DictConfig) -> None:
    """Every mandatory key of the data node (`???` in conf/data/*.yaml: data.root, data.path) is
    set; else one ConfigError naming the key and what to give (the data module's NEEDS), before
    anything reads it (OmegaConf's own error would be a traceback)."""
    for key in data:
        if OmegaConf.is_missing(data, key):
            target = str(data.get("_target_", "the data module"))
            try:
                from hydra.utils import get_class

                hint = get_class(target).NEEDS[key]
            except Exception:  # noqa: BLE001 - a class of the user's, or no hint: say it plainly
                hint = "value"
            raise ConfigError(f"data.{key} is not set: pass data.{key}=<{hint}> "
                              f"({target.rsplit('.', 1)[-1]} has no default for it)")


def check_train(cfg: DictConfig) -> None:
    """Ranges and choices of a composed dsr-train config; raises one ConfigError naming the key."""
    stage = _choice("stage", cfg.stage.name, STAGES)
    check_data(cfg.data)
    check_networks(cfg)
    # the classifier stage has no use for sigma (classifier.noise_sd is its noise)
    sigma_setting("sigma", cfg.sigma, strict=stage != "classifier")
    _int("T", cfg.T, what=" (noisy copies per image per step)")
    _int("seed", cfg.seed, low=0)
    _real("classifier.noise_sd", cfg.classifier.noise_sd, low=0, strict=False,
          what=" (0: a clean classifier; > 0: Gaussian augmentation, pixel units)")
    check_optim(cfg.optim)
    _choice("stage.mode", cfg.stage.mode, ("min", "max"))
    if stage == "denoiser":
        _choice("stage.objective", cfg.stage.objective, OBJECTIVES)
    if stage == "rejector":
        check_rejector(cfg.rejector)
    if "batch_size" in cfg.data:
        _int("data.batch_size", cfg.data.batch_size)
    check_trainer(cfg.trainer)
    if cfg.certify.systems:
        if stage == "rejector" and not _keeps_checkpoints(cfg.get("callbacks")):
            raise ConfigError("certify=... certifies the trained rejector's checkpoint: keep the "
                              "model_checkpoint or last callback (callbacks=default)")
        for s in cfg.certify.systems:
            _choice("certify.systems[...]", s, ("rejection", "denoised", "plain"))
        check_certify_settings(cfg.certify, "certify.")
        if cfg.certify.mode != "certify":
            raise ConfigError(f"certify.mode={cfg.certify.mode}: the training job certifies with "
                              "mode=certify; run dsr-certify for predict, staged or attack")
        for t in cfg.certify.thresholds:
            threshold_setting("certify.thresholds", t)
        if cfg.certify.thresholds and "rejection" not in cfg.certify.systems:
            raise ConfigError("certify.thresholds=... are thresholds of the rejection system: add "
                              "rejection to certify.systems, or drop them")


def check_shared(cfg: DictConfig, baseline: bool, thresholds: list, prefix: str = "") -> None:
    """baseline=true and thresholds=[...] (more systems from the same draws) need the rejection
    system in mode=certify; every threshold a number (inf: never reject)."""
    if not baseline and not thresholds:
        return
    what = "baseline=true" if baseline else f"{prefix}thresholds={thresholds}"
    if cfg.system.name != "rejection":
        raise ConfigError(f"{what} certifies other systems from the draws of the rejection system: "
                          f"use system=rejection (not {cfg.system.name}), or drop it")
    if cfg.mode != "certify":
        raise ConfigError(f"{what} works with mode=certify (not mode={cfg.mode}): drop it, or "
                          "certify each system in its own run")
    for t in thresholds:
        threshold_setting(f"{prefix}thresholds", t)


def check_certify(cfg: DictConfig) -> None:
    """Ranges and choices of a composed dsr-certify config; raises one ConfigError naming the key."""
    _choice("system", cfg.system.name, SYSTEMS)
    check_data(cfg.data)
    check_networks(cfg)
    sigma_setting("sigma", cfg.sigma)
    _int("seed", cfg.seed, low=0)
    check_certify_settings(cfg)
    if cfg.get("threshold") is not None:
        t = threshold_setting("threshold", cfg.threshold)
        if cfg.system.name != "rejection":
            raise ConfigError(f"threshold={t}: only system=rejection has a rejector threshold; "
                              f"drop it for system={cfg.system.name}")
    check_shared(cfg, cfg.get("baseline"), list(cfg.get("thresholds") or []))
    bound = _choice("bound", cfg.bound, BOUNDS)
    if cfg.system.name != "rejection" and bound != "cohen":
        raise ConfigError(f"bound={bound} needs a reject class; system={cfg.system.name} has none: "
                          "use bound=cohen")
