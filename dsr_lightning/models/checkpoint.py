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
from dsr_lightning.files import atomic_write

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


# How a network can be given (jobs/networks.py): by published architecture name, as a torchvision
# model, as any nn.Module class, as a whole-network file (TorchScript), or (denoisers) a pretrained
# diffusion model of the diffusers library (models/diffusion.py)
SOURCES = ("arch", "torchvision", "module", "file", "diffusion")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_resnet50(num_classes: int = 1000, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> Classifier:
    """The ImageNet ResNet-50 of Cohen et al.'s published models (torchvision's architecture behind
    ImageNet normalisation; their files hold `1.module.<torchvision key>`)."""
    import torchvision

    return Classifier(torchvision.models.resnet50(weights=None, num_classes=num_classes), mean, std)


# name -> constructor(**arch_kwargs) -> nn.Module. Classifiers come wrapped in Classifier (with the
# normalisation of the data they were published for); denoisers and the rejector are bare. Any
# cifar_resnet{6n+2} is also accepted. The names are those of the published archives.
ARCHS: dict[str, Callable[..., nn.Module]] = {
    **{f"cifar_resnet{d}": _cifar_resnet(d) for d in (20, 32, 44, 56, 110)},
    "resnet50": _imagenet_resnet50,
    "cifar_dncnn": partial(DnCNN, image_channels=3, depth=17, n_channels=64),
    "cifar_dncnn_wide": partial(DnCNN, image_channels=3, depth=17, n_channels=128),
    "imagenet_dncnn": partial(DnCNN, image_channels=3, depth=17, n_channels=64),
    "memnet": partial(MemNet, in_channels=3, channels=64, num_memblock=3, num_resblock=6),
    "imagenet_memnet": partial(MemNet, in_channels=3, channels=64, num_memblock=3, num_resblock=6),
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
    """The network stored at `path` in the published form (see `load_published`)."""
    return load_published(path, map_location, arch=arch, weights_only=weights_only)[0]


def load_published(path: str | os.PathLike, map_location: Any = "cpu", *, arch: str | None = None,
                   weights_only: bool = True) -> tuple[nn.Module, str, dict]:
    """(the network stored at `path`, its arch, the arch_kwargs it was built with): eval mode,
    requires_grad False, strict load.

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
    return freeze(model), arch, _plain(kwargs)


def _plain(x: Any) -> Any:
    """Config containers (OmegaConf...) -> dict/list, readable by torch.load(weights_only=True)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str | bytes):
        return [_plain(v) for v in x]
    return x


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str,
                    arch_kwargs: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write `{'arch', 'state_dict', ['arch_kwargs'], **extra}` atomically (files.atomic_write: a
    failed write is one WriteError, the previous file whole, no temporary file left); the result
    loads with load_checkpoint and with the published loaders. The state dict is checked against a
    fresh `build_arch(arch, **arch_kwargs)` first, so a file that would not load is never written."""
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
    return atomic_write(path, lambda f: torch.save(ckpt, f), what="the network file")


# --- networks from anywhere: plain state dicts, TorchScript, pickled modules -----------------

def state_dict_of(path: str | os.PathLike, strip_prefix: str | None = None) -> dict[str, Any]:
    """The state dict in a weights file: a plain `{name: tensor}` dict, or the `state_dict` entry
    of a published-form or Lightning checkpoint. `strip_prefix` ('model.') keeps only the keys
    under it, without it (a Lightning module's attribute)."""
    raw = read_checkpoint(path, weights_only=True)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state dict ({{name: tensor}}) or a checkpoint "
                              f"holding one under 'state_dict', got {type(raw).__name__}")
    sd = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
    if not all(isinstance(k, str) for k in sd) or not any(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path}: no tensors found (keys: {sorted(map(str, sd))[:_SHOW]}); "
                              "expected a state dict or a checkpoint with a 'state_dict' entry")
    if strip_prefix:
        p = strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."
        kept = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if not kept:
            raise CheckpointError(f"{path}: no key starts with strip_prefix={strip_prefix!r} (keys "
                                  f"start with: {sorted({k.split('.')[0] for k in sd})[:_SHOW]})")
        sd = kept
    return dict(sd)


def load_weights(net: nn.Module, path: str | os.PathLike, strip_prefix: str | None = None,
                 what: str = "network") -> nn.Module:
    """Load the weights file at `path` into `net` strictly. Without `strip_prefix`, a file whose
    keys all carry one extra leading component (`1.` of the published classifiers, `net.`/`model.`
    of a Lightning module) loads too; any other mismatch is one CheckpointError listing the keys."""
    sd = state_dict_of(path, strip_prefix)
    source = f"{what} weights {path}"
    expected = set(_clean(net.state_dict(), "model"))
    keys = set(_clean(sd, source))
    heads = {k.split(".", 1)[0] for k in keys}
    if not strip_prefix and keys - expected and len(heads) == 1 and all("." in k for k in keys):
        head = heads.pop()
        stripped = {k.split(".", 1)[1]: v for k, v in _clean(sd, source).items()}
        if set(stripped) <= expected:
            return load_state_dict_strict(net, stripped, source=f"{source} (prefix {head!r} "
                                                                 "removed)")
    try:
        return load_state_dict_strict(net, sd, source=source)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n  (keys under a module prefix, e.g. a Lightning checkpoint's "
                              "'model.': set strip_prefix=model)") from None


def load_scripted(path: str | os.PathLike, *, trust_pickle: bool = False,
                  what: str = "network") -> nn.Module:
    """A whole network in one file: TorchScript (torch.jit.save), or, only with `trust_pickle`, a
    pickled nn.Module (torch.save(model)): unpickling runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - not TorchScript: see what else it is
        script_error = e
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise CheckpointError(f"cannot read {what} file {path}: neither TorchScript nor a "
                                  f"PyTorch file ({type(script_error).__name__}: "
                                  f"{str(script_error).splitlines()[0][:160]}); copy it again"
                                  ) from None
        raw = None
    if raw is not None:
        raise CheckpointError(f"{path} holds weights only ({type(raw).__name__}), not a whole "
                              f"network: build the network by name and load them (source "
                              "torchvision or module, with path=<this file>)")
    if not trust_pickle:
        raise CheckpointError(f"{path} is a pickled Python object (torch.save of a whole module), "
                              "not TorchScript: loading it runs code from the file. If you trust "
                              "it, set trust_pickle=true on the network's node; better, save it "
                              "with torch.jit.save(torch.jit.script(model)) or save its state_dict")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise CheckpointError(f"{path}: the pickled object is a {type(obj).__name__}, not an "
                              "nn.Module")
    return obj


def state_sha256(module: nn.Module) -> str:
    """sha256 of a network's weights (names, dtypes, shapes, bytes): its identity whatever file
    format it came in."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(_clean(module.state_dict(), "model").items()):
        h.update(k.encode())
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
