"""Lightning modules wiring models, data and losses; `train(cfg)` runs one stage."""

from dsr_lightning.tasks.base import FrozenAwareModule, phase_bounds
from dsr_lightning.tasks.classifier import ClassifierTask
from dsr_lightning.tasks.denoiser import DenoiserTask
from dsr_lightning.tasks.networks import ConfigError, build_fresh, load_frozen, sigma_of
from dsr_lightning.tasks.rejector import RejectorTask

__all__ = [
    "ClassifierTask", "ConfigError", "DenoiserTask", "FrozenAwareModule", "RejectorTask",
    "build_fresh", "load_frozen", "phase_bounds", "sigma_of",
]
