"""Frozen networks from config: load by path with errors that say how to get the file."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from dsr_lightning.models import CheckpointError, build_arch, load_checkpoint

PUBLISHED = {
    "classifier": "the published ResNet-110 of Cohen et al. (github.com/locuslab/smoothing, "
    "'models' archive: cifar10/resnet110/noise_0.00/checkpoint.pth.tar)",
    "denoiser": "the published denoisers of Salman et al. (github.com/microsoft/denoised-smoothing, "
    "pretrained_models archive: trained_denoisers/cifar10/...)",
}
TRAIN_HINT = {
    "classifier": "python train.py stage=classifier classifier={name}",
    "denoiser": "python train.py stage=denoiser denoiser={name} sigma={sigma}",
}


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


def sigma_of(ckpt: dict, path: str | Path) -> float | None:
    """The noise level a denoiser was trained for: recorded by our exports, else the folder name."""
    if "sigma" in ckpt:
        return float(ckpt["sigma"])
    m = re.search(r"noise_(\d+(?:\.\d+)?)", str(path))
    return float(m.group(1)) if m else None


def _entries(path: Path) -> dict | None:
    """The checkpoint's entries, tensors memory-mapped where the format allows (files saved in
    the legacy, pre-zip format cannot be mapped and are read whole); None if unreadable."""
    for mmap in (True, False):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:
            continue
    return None


def load_frozen(role: str, spec, sigma: float | None = None) -> nn.Module:
    """Load the frozen `role` network ('classifier' | 'denoiser') described by a config node
    (name, arch, path): eval mode, no gradients. A denoiser trained for another σ is refused."""
    path = Path(str(spec.path))
    if not path.is_file():
        hint = TRAIN_HINT[role].format(name=spec.name, sigma=sigma)
        raise ConfigError(
            f"{role} checkpoint not found: {path}\n"
            f"  Either place {PUBLISHED[role]} there (or point {role}.path=... at it),\n"
            f"  or train one here: {hint}"
        )
    if role == "denoiser" and sigma is not None:  # before the load: a mismatch costs nothing
        entries = _entries(path)
        if entries is None:  # unreadable: load_checkpoint says why, naming the file
            return load_checkpoint(path, arch=spec.get("arch"))
        trained = sigma_of(entries, path)
        if trained is not None and abs(trained - float(sigma)) > 1e-6:
            raise ConfigError(
                f"denoiser {path} was trained for sigma={trained:g}, but sigma={float(sigma):g}: "
                f"use the denoiser for sigma={float(sigma):g} or set sigma={trained:g}"
            )
    return load_checkpoint(path, arch=spec.get("arch"))  # a different arch in the file is refused


def build_fresh(spec) -> nn.Module:
    """An untrained network of the config's arch (auxiliary stages)."""
    return build_arch(spec.arch, **dict(spec.get("arch_kwargs") or {}))


__all__ = ["CheckpointError", "ConfigError", "build_fresh", "load_frozen", "sigma_of"]
