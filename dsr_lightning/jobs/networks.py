"""Networks from a config node: frozen ones loaded by path, with errors that say how to get the
file, and fresh ones for the auxiliary stages."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from dsr_lightning.errors import ConfigError
from dsr_lightning.models import build_arch, load_checkpoint, read_checkpoint

PUBLISHED = {
    "classifier": "the published ResNet-110 of Cohen et al. (github.com/locuslab/smoothing, "
    "'models' archive: cifar10/resnet110/noise_{noise}/checkpoint.pth.tar)",
    "denoiser": "the published denoisers of Salman et al. (github.com/microsoft/denoised-smoothing, "
    "pretrained_models archive: trained_denoisers/cifar10/...)",
}


def train_hint(role: str, spec, sigma: float | None) -> str:
    """The train.py command that makes the missing network, naming the config option (as the
    command line spells it: `denoiser=tiny`, not the network's name)."""
    from hydra.core.hydra_config import HydraConfig

    option, extra = spec.name, []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        option = hc.runtime.choices.get(role) or option
        # what else decides where the file goes: the experiment and pretrained_root, as given
        extra = [o for o in hc.overrides.task
                 if o.split("=")[0].lstrip("+~") in ("experiment", "pretrained_root", "data")]
    cmd = f"python train.py stage={role} {role}={option}"
    if role == "classifier" and float(spec.get("noise_sd") or 0) > 0:
        cmd += f" classifier.noise_sd={float(spec.noise_sd):g}"
    if role == "denoiser" and sigma is not None:
        cmd += f" sigma={float(sigma):g}"
    return " ".join([cmd, *extra])


def sigma_of(ckpt: dict, path: str | Path) -> float | None:
    """The noise level a denoiser was trained for: recorded by our exports, else the folder name."""
    if "sigma" in ckpt:
        return float(ckpt["sigma"])
    m = re.search(r"noise_(\d+(?:\.\d+)?)", str(path))
    return float(m.group(1)) if m else None


def load_frozen(role: str, spec, sigma: float | None = None) -> nn.Module:
    """Load the frozen `role` network ('classifier' | 'denoiser') described by a config node
    (name, arch, path): eval mode, no gradients. A denoiser trained for another σ is refused."""
    path = Path(str(spec.path))
    if path.is_dir():
        raise ConfigError(f"{role}.path={path} is a folder: point it at the checkpoint file in it "
                          "(e.g. .../checkpoint.pth.tar)")
    if not path.is_file():
        hint = train_hint(role, spec, sigma)
        published = PUBLISHED[role].format(noise=f"{float(spec.get('noise_sd') or 0):.2f}")
        raise ConfigError(
            f"{role} checkpoint not found: {path}\n"
            f"  Either place {published} there (or point {role}.path=... at it),\n"
            f"  or train one here: {hint}"
        )
    if role == "denoiser" and sigma is not None:  # before the load: a mismatch costs nothing
        entries = read_checkpoint(path, mmap=True)  # tensors mapped, not read, where possible
        trained = sigma_of(entries, path) if isinstance(entries, dict) else None
        if trained is not None and abs(trained - float(sigma)) > 1e-6:
            raise ConfigError(
                f"denoiser {path} was trained for sigma={trained:g}, but sigma={float(sigma):g}: "
                f"use the denoiser for sigma={float(sigma):g} or set sigma={trained:g}"
            )
    return load_checkpoint(path, arch=spec.get("arch"))  # a different arch in the file is refused


def build_fresh(spec) -> nn.Module:
    """An untrained network of the config's arch (auxiliary stages)."""
    return build_arch(spec.arch, **dict(spec.get("arch_kwargs") or {}))

