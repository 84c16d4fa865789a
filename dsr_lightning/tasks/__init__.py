"""Lightning modules wiring models, data and losses: the three training stages and the
certification predict loop. They take networks and plain settings, never a config."""

from dsr_lightning.tasks.base import FrozenAwareModule, phase_bounds
from dsr_lightning.tasks.classifier import ClassifierTask
from dsr_lightning.tasks.denoiser import DenoiserTask
from dsr_lightning.tasks.prediction import (
    MODES,
    AcceleratedSystem,
    CertificationModule,
    CertificationSpec,
    RowWriter,
)
from dsr_lightning.tasks.rejector import HEADS, TARGETS, RejectorTask

__all__ = [
    "HEADS", "MODES", "TARGETS", "AcceleratedSystem", "CertificationModule", "CertificationSpec",
    "ClassifierTask", "DenoiserTask", "FrozenAwareModule", "RejectorTask", "RowWriter",
    "phase_bounds",
]
