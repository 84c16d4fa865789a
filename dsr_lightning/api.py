"""The Python API: a rejection system from a checkpoint, or from your own networks in memory, and
certificates for a batch of images, without configs or files.

    from dsr_lightning import api
    system = api.load_system("outputs/.../checkpoints/best.ckpt")
    cert = api.certify(system, images, sigma=system.sigma, N0=100, N=10_000, alpha=0.001)

    system = api.train_rejector(f, D, images, labels, sigma=0.25, mean=..., std=...)
    cert = api.certify(system, test_images, sigma=0.25)

Images are float tensors (B, C, H, W) in [0, 1]; σ is in those pixel units.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dsr_lightning.data import SmoothingDataModule
from dsr_lightning.jobs.console import quiet_third_party
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.models import Classifier, Rejector, SmoothingSystem, freeze
from dsr_lightning.smoothing import ImageNoise, SmoothedClassifier
from dsr_lightning.tasks import RejectorTask

__all__ = ["Certificates", "certify", "load_system", "train_rejector"]


def load_system(checkpoint: str | os.PathLike, threshold: float | None = None,
                device: str | torch.device = "cpu") -> SmoothingSystem:
    """f_R of a rejector checkpoint of train.py, rebuilt from the file alone (the classifier,
    the denoiser, the heads and the chosen threshold; `threshold` replaces it). `system.sigma` is
    the noise level it was trained for."""
    ckpt = RunCheckpoint.read(checkpoint)
    system = ckpt.rejection_system(threshold=threshold).to(device)
    system.sigma = float(ckpt.config["sigma"])
    return system


class Certificates(dict):
    """Per-image arrays by name: prediction (-1: abstain), radius, n_A, n_R, n_B, N, and, with
    labels, correct (prediction == label). `certified_accuracy(r)` is the share of images
    predicted correctly with radius >= r."""

    def certified_accuracy(self, radius: float = 0.0) -> float:
        if "correct" not in self:
            raise ValueError("certify(...) was called without labels")
        ok = (self["correct"] == 1) & (self["radius"] >= radius)
        return float(ok.mean()) if len(ok) else float("nan")


def certify(system: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *,
            sigma: float, N0: int = 100, N: int = 10_000, alpha: float = 0.001,
            batch: int = 1000, bound: str | None = None, seed: int = 0,
            keys: Sequence[int] | None = None) -> Certificates:
    """Certify each image of `images` (B, C, H, W in [0, 1]) for the smoothed `system`
    (a SmoothingSystem, or any module mapping noisy images to labels in {0..K}, K = reject).
    Image i draws its noise from the stream keyed by (seed, keys[i]) (keys default to 0..B-1), as
    certify.py does with data-set indices. `bound`: paper (Theorem 3.1) for a system with a
    rejector, cohen otherwise (the default)."""
    system.eval()
    device = next(system.parameters()).device
    has_rejector = getattr(system, "rejector", None) is not None
    bound = bound or ("paper" if has_rejector else "cohen")
    smoothed = SmoothedClassifier(system, system.num_classes, sigma)
    keys = list(range(len(images))) if keys is None else [int(k) for k in keys]
    with torch.no_grad():
        cert = smoothed.certify(images.to(device), N0, N, alpha, batch, bound,
                                noise=ImageNoise(seed, keys))
    out = Certificates(cert.columns())
    if labels is not None:
        y = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        out["correct"] = (out["prediction"] == y).astype(np.int64)
    return out


class _Arrays(SmoothingDataModule):
    """In-memory images and labels as a data module (val: a seeded held-out part)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, **common):
        super().__init__(**common)
        self.images, self.labels = images.float().cpu(), labels.long().cpu()
        self.num_classes = num_classes
        self.class_names = [str(k) for k in range(num_classes)]

    def _train_source(self) -> Dataset:
        return TensorDataset(self.images, self.labels)

    def _test_source(self) -> Dataset:
        return TensorDataset(self.images[:0], self.labels[:0])


def train_rejector(classifier: nn.Module, denoiser: nn.Module | None, images: torch.Tensor,
                   labels: torch.Tensor, *, sigma: float, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None,
                   feature_layers: Sequence[str] | None = None, rejector: nn.Module | None = None,
                   T: int = 4, epochs: int = 1, batch_size: int = 32, lr: float = 1e-3,
                   threshold: float = 0.0, accelerator: str = "auto", seed: int = 0,
                   progress: bool = False) -> SmoothingSystem:
    """Train rejector heads for your own frozen `classifier` f and `denoiser` D, in memory.

    f maps [0,1] images to logits unless wrapped: with `mean`/`std` it is wrapped in their
    normalisation (a `models.Classifier` is used as it is). `feature_layers`: f's module names
    whose outputs the rejector fuses (None: the defaults for known ResNets, else unfused).
    `rejector`: your own heads (a module taking (z, feats) -> (B, K)); default a small ResNet-like
    rejector (`models.Rejector`, width 16, one block per stage). Returns the rejection system f_R
    with `threshold` (logit; reject iff the head's logit > it)."""
    quiet_third_party()
    pl.seed_everything(seed, verbose=False)
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: give both (f's input normalisation) or "
                         "neither (f normalises its own inputs)")
    if not isinstance(classifier, Classifier):
        if mean is None:
            channels = images.shape[1]
            mean, std = [0.0] * channels, [1.0] * channels  # f normalises its own inputs
        classifier = Classifier(classifier, mean, std, feature_layers=feature_layers,
                                input_shape=tuple(images.shape[1:]))
    freeze(classifier)
    if denoiser is not None:
        freeze(denoiser)
    k = classifier.num_classes
    if rejector is None:
        rejector = Rejector(k, classifier.feature_channels, in_channels=images.shape[1], width=16,
                            blocks=(1, 1, 1, 1), fc_hidden=(64, 32), stem="auto",
                            image_size=images.shape[-1])
    optim = {"epochs": epochs, "phases": [{"epochs": epochs, "optimizer": {
        "_target_": "torch.optim.Adam", "_partial_": True, "lr": lr}}]}
    task = RejectorTask(classifier, denoiser, rejector, optim, threshold=threshold)
    data = _Arrays(images, labels, k, batch_size=batch_size, sigma=sigma, T=T, val_fraction=0.1,
                   seed=seed)
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=progress,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    system = SmoothingSystem(classifier, denoiser, freeze(rejector), threshold=threshold,
                             num_classes=k)
    system.sigma = float(sigma)
    return system
