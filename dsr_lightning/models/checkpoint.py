"""Architectures by name and checkpoints in the published form of Cohen et al. / Salman et al.

A checkpoint file is a dict `{'arch': name, 'state_dict': {...}}` (plus optional `arch_kwargs` for
non-standard sizes, written by our own stages, and any extra entries). Classifiers are stored as
Sequential(NormalizeLayer, net), so their keys start with `1.`; denoisers are bare. `module.`
components (DataParallel: `module.dncnn.0.weight`, `1.module.conv1.weight`) and `_orig_mod.`
(torch.compile) are ignored wherever they appear. Loading is strict.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsr_lightning.errors import CheckpointError

from .dncnn import DnCNN
from .memnet import MemNet
from .normalize import CIFAR10_MEAN, CIFAR10_STD, Classifier
from .rejector import Rejector
from .resnet import ResNet
from .system import freeze

_RESNET = re.compile(r"cifar_resnet(\d+)")
_WRAPPERS = ("module", "_orig_mod")  # DataParallel / DDP and torch.compile prefixes
_SHOW = 5  # how many keys of each kind an error message lists


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> Classifier:
        return Classifier(ResNet(depth, num_classes), mean, std)

    build.__name__ = f"cifar_resnet{depth}"
    return build


# name -> constructor(**arch_kwargs) -> nn.Module. Classifiers come wrapped in Classifier (CIFAR-10
# normalisation); denoisers and the rejector are bare. Any cifar_resnet{6n+2} is also accepted.
ARCHS: dict[str, Callable[..., nn.Module]] = {
    **{f"cifar_resnet{d}": _cifar_resnet(d) for d in (20, 32, 44, 56, 110)},
    "cifar_dncnn": partial(DnCNN, image_channels=3, depth=17, n_channels=64),
    "cifar_dncnn_wide": partial(DnCNN, image_channels=3, depth=17, n_channels=128),
    "memnet": partial(MemNet, in_channels=3, channels=64, num_memblock=3, num_resblock=6),
    "rejector": Rejector,
}


def build_arch(arch: str, **arch_kwargs: Any) -> nn.Module:
    """A fresh (randomly initialised) network of the named architecture."""
    if arch in ARCHS:
        return ARCHS[arch](**arch_kwargs)
    m = _RESNET.fullmatch(arch)
    if m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0:
        return _cifar_resnet(int(m.group(1)))(**arch_kwargs)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}, "
                     "and cifar_resnet{6n+2} for any n >= 1")


def _clean_key(key: str) -> str:
    return ".".join(p for p in key.split(".") if p not in _WRAPPERS)


def _clean(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        ck = _clean_key(k)
        if ck in out:
            raise CheckpointError(f"{source}: keys collide without wrapper prefixes: {k!r}")
        out[ck] = v
    return out


def _listing(what: str, items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"\n  {what} ({len(items)}): " + ", ".join(items[:_SHOW]) + more


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    weights_only: bool = True, mmap: bool = False) -> Any:
    """torch.load with one clear CheckpointError for a missing, empty, truncated or foreign file.
    `mmap` falls back to a plain read for files in torch's legacy (pre-zip) format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (an interrupted "
                              "copy or save?); copy or train it again")
    err: Exception | None = None
    for mm in ((True, False) if mmap else (False,)):
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mm)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
            err = e
    raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch "
                          f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          "copy or train it again") from err


def non_finite_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """The keys of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any],
                           source: str = "state dict") -> nn.Module:
    """Load strictly after removing wrapper prefixes; on any mismatch raise one CheckpointError
    listing missing keys, unexpected keys and shape mismatches. A missing BatchNorm
    `num_batches_tracked` (files from PyTorch < 0.4.1) is accepted: it never affects outputs."""
    sd = _clean(state_dict, source)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in sd.items()
              if k in expected and (not torch.is_tensor(v) or v.shape != expected[k].shape)]
    if missing or unexpected or shapes:
        msg = f"{source} does not fit {type(model).__name__}:"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if items:
                msg += _listing(what, items)
        raise CheckpointError(msg)
    if bad := non_finite_keys(sd):
        raise CheckpointError(f"{source} holds non-finite weights (NaN or Inf; a diverged "
                              "training?):" + _listing("tensors", bad))
    model.load_state_dict(sd, strict=True)  # a plain dict: BatchNorm fills num_batches_tracked
    return model


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, arch: str | None = None,
                    weights_only: bool = True) -> nn.Module:
    """The network stored at `path`, in eval mode with requires_grad False (strict load).

    `arch` overrides a missing 'arch' entry (and must agree with a present one). `weights_only`
    as in torch.load: set False only for trusted files holding arbitrary Python objects. Files
    that cannot be read, do not fit the architecture, or hold non-finite weights are refused
    with a CheckpointError naming the file.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location, weights_only=weights_only)
    form = "a dict {'arch': str, 'state_dict': {name: tensor}} (the published form)"
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected {form}, got {type(ckpt).__name__}")
    if not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: expected {form}; found keys {sorted(map(str, ckpt))}")
    file_arch = ckpt.get("arch")
    if arch is not None and file_arch is not None and arch != file_arch:
        raise CheckpointError(f"{path}: holds arch {file_arch!r}, but {arch!r} was asked for")
    arch = arch or file_arch
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: no 'arch' entry; expected {form} or pass arch=...")
    kwargs = dict(ckpt.get("arch_kwargs") or {})
    try:
        model = build_arch(arch, **kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    load_state_dict_strict(model, ckpt["state_dict"], source=f"checkpoint {path} (arch {arch!r})")
    return freeze(model)


def _plain(x: Any) -> Any:
    """Config containers (OmegaConf...) -> dict/list, readable by torch.load(weights_only=True)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str | bytes):
        return [_plain(v) for v in x]
    return x


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str,
                    arch_kwargs: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write `{'arch', 'state_dict', ['arch_kwargs'], **extra}` atomically; the result loads with
    load_checkpoint and with the published loaders. The state dict is checked against a fresh
    `build_arch(arch, **arch_kwargs)` first, so a file that would not load is never written."""
    if reserved := {"arch", "state_dict", "arch_kwargs"} & extra.keys():
        raise ValueError(f"reserved checkpoint entries passed as extra: {sorted(reserved)}")
    arch_kwargs = _plain(dict(arch_kwargs or {}))
    path = Path(path)
    sd = _clean(model.state_dict(), f"model for {path}")
    sd = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}
    try:
        ref = build_arch(arch, **arch_kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot save {path}: {e}") from e
    load_state_dict_strict(ref, sd, source=f"model to be saved as {path} (arch {arch!r})")
    ckpt = {"arch": arch, "state_dict": sd, **({"arch_kwargs": arch_kwargs} if arch_kwargs else {}),
            **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path
