"""Networks from a config node, from anywhere: by name (the published architectures), any
torchvision model, any `nn.Module` class (`_target_`), or a whole-network file (TorchScript). Each
build returns the network and its *recipe*: the resolved node (the architecture's arguments as
the file had them, the class count read from the network, the normalisation and where it came
from, the fusion layers, the input shape) and a hash of its weights. The rejector checkpoint keeps
the recipes, so certification, the threshold tool and the Python API rebuild exactly what was
trained (`rebuild`), whatever the config says today.

Sources (`<role>.source`):
  arch         `arch` (+ `arch_kwargs`) names a network of models.ARCHS; `path` is a file in the
               published form {'arch', 'state_dict'} (the archives of Cohen et al. / Salman et al.)
  torchvision  `model` = any torchvision.models name, `num_classes`, and either `path` = a state
               dict, or `weights` = a torchvision weights name (DEFAULT, IMAGENET1K_V2: downloaded
               by torchvision where there is internet)
  module       `net` = {_target_: any class or factory, its keyword arguments}, `path` = a state
               dict (plain, or a checkpoint's `state_dict`; `strip_prefix` for a Lightning one)
  file         `path` = a TorchScript file (torch.jit.save); a pickled whole module only with
               `trust_pickle: true` (unpickling runs code from the file)
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dsr_lightning.errors import CheckpointError, ConfigError
from dsr_lightning.identity import network_id, sketch_difference, tolerance
from dsr_lightning.logs import get_logger
from dsr_lightning.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCES,
    Classifier,
    build_arch,
    freeze,
    load_published,
    load_scripted,
    load_weights,
    read_checkpoint,
    state_sha256,
)
from dsr_lightning.models.fingerprint import run_probe

log = get_logger(__name__)
ROLES = ("classifier", "denoiser")

PUBLISHED = {
    "classifier": "the published ResNet-110 of Cohen et al. (github.com/locuslab/smoothing, "
    "'models' archive: cifar10/resnet110/noise_{noise}/checkpoint.pth.tar)",
    "denoiser": "the published denoisers of Salman et al. (github.com/microsoft/denoised-smoothing, "
    "pretrained_models archive: trained_denoisers/cifar10/...)",
}


@dataclass(frozen=True)
class DataFacts:
    """What the networks must agree with: the data set's name, class count, implied
    normalisation and image shape (C, H, W)."""

    name: str | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_shape: tuple[int, int, int] | None = None


def data_facts(datamodule) -> DataFacts:
    """The facts of a data module (its eval images' shape read from the test split, else val)."""
    shape = None
    for split in ("test", "val", "train"):
        try:
            shape = tuple(int(s) for s in datamodule.image_shape(split))
            break
        except (AttributeError, IndexError, ValueError):
            continue
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    return DataFacts(name=getattr(datamodule, "name", None),
                     num_classes=getattr(datamodule, "num_classes", None),
                     mean=None if mean is None else tuple(float(m) for m in mean),
                     std=None if std is None else tuple(float(s) for s in std),
                     image_shape=shape)


@dataclass
class Network:
    module: nn.Module
    recipe: dict


def node_dict(spec: Any) -> dict:
    """A node (DictConfig or dict) as a plain resolved dict."""
    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)
    return dict(spec or {})


def train_hint(role: str, spec, sigma: float | None) -> str:
    """The dsr-train command that makes the missing network, naming the config option (as the
    command line spells it: `denoiser=tiny`, not the network's name)."""
    from hydra.core.hydra_config import HydraConfig

    option, extra = spec.get("name"), []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        option = hc.runtime.choices.get(role) or option
        # what else decides where the file goes: the experiment and pretrained_root, as given
        extra = [o for o in hc.overrides.task
                 if o.split("=")[0].lstrip("+~") in ("experiment", "pretrained_root", "data")]
    cmd = f"dsr-train stage={role} {role}={option}"
    if role == "classifier" and float(spec.get("noise_sd") or 0) > 0:
        cmd += f" classifier.noise_sd={float(spec['noise_sd']):g}"
    if role == "denoiser" and sigma is not None:
        cmd += f" sigma={float(sigma):g}"
    return " ".join([cmd, *extra])


def sigma_of(ckpt: dict, path: str | Path) -> float | None:
    """The noise level a denoiser was trained for: recorded by our exports, else the folder name."""
    if "sigma" in ckpt:
        return float(ckpt["sigma"])
    m = re.search(r"noise_(\d+(?:\.\d+)?)", str(path))
    return float(m.group(1)) if m else None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_path(role: str, node: dict, sigma: float | None, needed: bool) -> Path | None:
    """The node's weights file, checked: a folder or a missing file is one ConfigError saying
    how to get it; a denoiser's recorded σ must match (checked before any weight is read)."""
    if not node.get("path"):
        if needed:
            raise ConfigError(f"{role}.path is not set: point it at the {role}'s weights file")
        return None
    path = Path(str(node["path"]))
    if path.is_dir():
        raise ConfigError(f"{role}.path={path} is a folder: point it at the checkpoint file in it "
                          "(e.g. .../checkpoint.pth.tar)")
    if not path.is_file():
        if (node.get("source") or "arch") == "arch":
            hint = train_hint(role, node, sigma)
            published = PUBLISHED[role].format(noise=f"{float(node.get('noise_sd') or 0):.2f}")
            raise ConfigError(
                f"{role} checkpoint not found: {path}\n"
                f"  Either place {published} there (or point {role}.path=... at it),\n"
                f"  or train one here: {hint}")
        raise ConfigError(f"{role} weights not found: {path} ({role}.path=...)")
    if role == "denoiser" and sigma is not None:
        try:
            entries = read_checkpoint(path, mmap=True)  # tensors mapped, not read, where possible
        except CheckpointError:
            entries = None  # TorchScript or a pickled module: no recorded σ to compare
        trained = sigma_of(entries, path) if isinstance(entries, dict) else None
        if trained is not None and abs(trained - float(sigma)) > 1e-6:
            raise ConfigError(
                f"denoiser {path} was trained for sigma={trained:g}, but sigma={float(sigma):g}: "
                f"use the denoiser for sigma={float(sigma):g} or set sigma={trained:g}")
    return path


def _torchvision(node: dict, role: str, trained: bool, num_classes: int | None):
    import torchvision

    name = node.get("model")
    if not name:
        raise ConfigError(f"{role}.source=torchvision needs {role}.model=<a torchvision.models "
                          "name, e.g. resnet18>")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ConfigError(f"{role}.model={name!r} is not a torchvision model; known classifiers "
                          f"include resnet18, resnet50, vit_b_16, convnext_tiny "
                          "(torchvision.models.list_models())") from None
    weights = node.get("weights") if trained else None
    meta = None
    kwargs = dict(node.get("kwargs") or {})
    if weights:
        try:
            w = torchvision.models.get_model_weights(name)[str(weights)] \
                if str(weights) != "DEFAULT" else torchvision.models.get_model_weights(name).DEFAULT
        except (KeyError, ValueError):
            known = [w.name for w in torchvision.models.get_model_weights(name)]
            raise ConfigError(f"{role}.weights={weights!r}: {name} has {', '.join(known)} "
                              "(or DEFAULT)") from None
        meta = w
        k = len(w.meta.get("categories") or [])
        if num_classes is not None and k and num_classes != k:
            raise ConfigError(f"{role}.weights={w.name} has {k} classes, but num_classes="
                              f"{num_classes}: drop the weights (train or load your own with "
                              f"{role}.path=...) or use data with {k} classes")
        weights, num_classes = w, None
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        net = builder(weights=weights, **kwargs)
    except Exception as e:  # noqa: BLE001 - no network for the download, a bad argument, ...
        raise ConfigError(f"{role}: torchvision could not build {name}"
                          f"{f' with weights {weights.name}' if meta else ''}: {cause(e)}"
                          + (" (the weights are downloaded on first use: this needs internet, "
                             "or place the file in torch's hub cache, $TORCH_HOME/hub/checkpoints)"
                             if meta else "")) from None
    return net, meta


def implied_kwargs(net: nn.Module, given: dict) -> dict:
    """The constructor arguments a torchvision builder set itself because weights were given
    (Inception-v3 and GoogLeNet: transform_input=True; GoogLeNet drops its auxiliary heads):
    every scalar argument of the network's class that the built network holds as an attribute of
    the same name with a value other than the argument's default. Rebuilt with these (and no
    weights), the network has the same structure and computes the same function."""
    try:
        params = inspect.signature(type(net).__init__).parameters
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params.values():
        if p.name in ("self", *given) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(net, p.name, inspect.Parameter.empty)
        if isinstance(value, bool | int | float | str) and value != p.default:
            out[p.name] = value
    return out


def cause(e: BaseException, limit: int = 600) -> str:
    """An exception as one readable piece of a message: its type and text (the first lines), and
    the underlying cause where a wrapper (Hydra's InstantiationException) hides it."""
    inner = e.__cause__ or e.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    out = f"{type(e).__name__}: {text}"
    if inner is not None and type(e).__name__ == "InstantiationException":
        out += f" (caused by {cause(inner, limit)})"
    return out


def _module(node: dict, role: str):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    spec = node.get("net") or {}
    if not spec.get("_target_"):
        raise ConfigError(f"{role}.source=module needs {role}.net._target_=<a class or function "
                          f"returning an nn.Module> (its arguments: +{role}.net.<name>=<value>)")
    try:
        net = instantiate(OmegaConf.create(spec))
    except InstantiationException as e:
        raise ConfigError(f"{role}.net: cannot build {spec['_target_']!r}: {cause(e)}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{role}.net._target_={spec['_target_']} gave a {type(net).__name__}, "
                          "not an nn.Module")
    return net


def _diffusion(node: dict, role: str, sigma: float | None, trained: bool):
    """A pretrained DDPM of the diffusers library as the one-step denoiser for σ
    (models/diffusion.py): (the denoiser, what the recipe records of it)."""
    from dsr_lightning.models.diffusion import load_diffusion

    if role != "denoiser":
        raise ConfigError(f"{role}.source=diffusion: only a denoiser can be a diffusion model")
    if not trained:
        raise ConfigError("denoiser=diffusion is a pretrained model, used as it is: stage=denoiser "
                          "trains the DnCNN-type denoisers (denoiser=dncnn, tiny, ...); train the "
                          "rejector on top of it with stage=rejector")
    if sigma is None:
        raise ConfigError("denoiser=diffusion needs sigma (its timestep is the one matching sigma)")
    return load_diffusion(str(node.get("model") or ""), float(sigma))


def _model_reference(model) -> str:
    """A diffusion model as the recipe records it: a local folder as an absolute path (a rebuild
    from another working directory finds it), a hub id as it is."""
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.is_dir() else str(model)


def _normalisation(node: dict, data: DataFacts | None, meta, own) -> tuple[list, list, str]:
    """(mean, std, where they came from): the node's, else the torchvision weights', else the
    architecture's own (published classifiers), else the data's, else torchvision's convention
    for its models; anything else has to be said."""
    if node.get("mean") is not None or node.get("std") is not None:
        if node.get("mean") is None or node.get("std") is None:
            raise ConfigError("classifier.mean and classifier.std go together: set both")
        return list(node["mean"]), list(node["std"]), "the classifier node"
    if meta is not None:
        t = meta.transforms()
        return list(t.mean), list(t.std), f"the torchvision weights {meta.name}"
    if own is not None:
        return list(own[0]), list(own[1]), f"the architecture {node.get('arch')}"
    if data is not None and data.mean is not None:
        return list(data.mean), list(data.std), f"the data ({data.name})"
    if (node.get("source") or "arch") == "torchvision":
        return (list(IMAGENET_MEAN), list(IMAGENET_STD),
                "torchvision's convention (ImageNet statistics)")
    raise ConfigError("the classifier's input normalisation is unknown: set classifier.mean=[...] "
                      "classifier.std=[...] to what it was trained with (mean=[0,0,0] std=[1,1,1] "
                      "for a network that normalises itself)")


def build(role: str, spec, *, data: DataFacts | None = None, sigma: float | None = None,
          trained: bool = True, quiet: bool = False) -> Network:
    """The `role` network of a node: its weights loaded (trained=True: frozen, eval mode) or
    fresh (trained=False: an auxiliary stage trains it). A classifier is wrapped in `Classifier`
    (normalisation, fusion hooks); its class count is read from it and checked against the
    data's."""
    node = node_dict(spec)
    source = node.get("source") or "arch"
    if source not in SOURCES:
        raise ConfigError(f"{role}.source={source!r}: choose one of {', '.join(SOURCES)}")
    clf = role == "classifier"
    k_data = data.num_classes if data is not None else None
    recipe: dict = {"source": source, "name": node.get("name"), "path": node.get("path")}
    meta = own = None
    if source == "arch":
        if not node.get("arch"):
            raise ConfigError(f"{role}.arch is not set (an architecture name: "
                              "cifar_resnet110, cifar_dncnn, ...)")
        if trained:
            path = check_path(role, node, sigma, needed=True)
            net, arch, kwargs = load_published(path, arch=node.get("arch"))
        else:
            kwargs = dict(node.get("arch_kwargs") or {})
            if clf and k_data and "num_classes" not in kwargs:
                kwargs["num_classes"] = int(k_data)
            try:
                net = build_arch(node["arch"], **kwargs)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{role}.arch={node['arch']}: {e}") from None
            arch = node["arch"]
        recipe.update(arch=arch, arch_kwargs=kwargs)
        if isinstance(net, Classifier):
            own = (net[0].mean.flatten().tolist(), net[0].std.flatten().tolist())
            net = net.net
    elif source == "torchvision":
        k = node.get("num_classes") or (k_data if clf else None)
        path = check_path(role, node, sigma, needed=False) if trained else None
        if trained and path is None and not node.get("weights"):
            raise ConfigError(f"{role}=torchvision: give the weights, {role}.path=<a state dict> "
                              f"or {role}.weights=DEFAULT (torchvision's, downloaded)")
        net, meta = _torchvision(node if path is None else {**node, "weights": None}, role,
                                 trained, k)
        if path is not None:
            load_weights(net, path, node.get("strip_prefix"), what=role)
        kwargs = dict(node.get("kwargs") or {})
        if meta is not None:  # what the builder set for these weights, so a rebuild is the same
            kwargs.update(implied_kwargs(net, {**kwargs, "num_classes": k}))
        recipe.update(model=node["model"], num_classes=k,
                      weights=meta.name if meta is not None else None, kwargs=kwargs)
    elif source == "module":
        net = _module(node, role)
        path = check_path(role, node, sigma, needed=False) if trained else None
        if path is not None:
            load_weights(net, path, node.get("strip_prefix"), what=role)
        elif trained and not quiet:
            log.info(f"{role}: no {role}.path: {node['net']['_target_']} as it builds itself "
                     "(its own weights)")
        recipe.update(net=node["net"])
    elif source == "diffusion":
        net, info = _diffusion(node, role, sigma, trained)
        recipe.update(path=_model_reference(node.get("model")), **info)
        size, shape = info.get("sample_size"), data.image_shape if data is not None else None
        channels = (info.get("unet") or {}).get("in_channels")
        if shape and channels and int(shape[0]) != int(channels):
            raise ConfigError(f"denoiser.model={node.get('model')} denoises {channels}-channel "
                              f"images and the data's have {shape[0]}: choose a diffusion model "
                              "of the data's channels (or data of the model's)")
        if size and shape and tuple(shape[-2:]) != ((size, size) if isinstance(size, int)
                                                    else tuple(size)):
            log.warning(f"denoiser: the diffusion model was trained on {size}-px images and the "
                        f"data's are {shape[-2]}x{shape[-1]}: it denoises them, but outside what "
                        "it learned (a model of the data's size denoises better)")
    else:  # file
        path = check_path(role, node, sigma, needed=True)
        net = load_scripted(path, trust_pickle=bool(node.get("trust_pickle")), what=role)
        recipe.update(file_sha256=file_sha256(path), trust_pickle=bool(node.get("trust_pickle")))
    if trained and source in ("torchvision", "module") and node.get("path"):
        recipe["strip_prefix"] = node.get("strip_prefix")
    if clf:
        mean, std, why = _normalisation(node, data, meta, own)
        shape = data.image_shape if data is not None and data.image_shape else None
        net = Classifier(net, mean, std, feature_layers=node.get("feature_layers"),
                         input_shape=shape, input_size=node.get("input_size"))
        k = net.num_classes
        if k_data is not None and k != k_data:
            raise ConfigError(
                f"the classifier {node.get('name')} has {k} outputs, but the data "
                f"({data.name}) has {k_data} classes: use a classifier for these classes (for a "
                f"torchvision or module classifier: classifier.num_classes={k_data} with weights "
                "trained for them), or the data the classifier was trained on")
        recipe.update(num_classes=k, mean=mean, std=std, normalisation=why,
                      feature_layers=list(getattr(net, "feature_layers", []) or []),
                      input_shape=list(net.input_shape) if getattr(net, "input_shape", None)
                      else None)
        if net.input_size is not None:  # only when set: the ids of networks without it stay
            recipe["input_size"] = list(net.input_size)
    if trained:
        freeze(net)
        shape = data.image_shape if data is not None and data.image_shape else None
        recipe["probe"] = probe(role, net, recipe, shape, sigma)
    recipe["state_sha256"] = state_sha256(net)
    return Network(net, recipe)


def _what(role: str, recipe: dict) -> str:
    """The network as the user named it: 'the classifier (module my_pkg.Net)'."""
    source = recipe.get("source") or "arch"
    what = {"arch": recipe.get("arch"), "torchvision": recipe.get("model"),
            "module": (recipe.get("net") or {}).get("_target_"), "file": recipe.get("path"),
            "diffusion": recipe.get("path"),
            "rejector": (recipe.get("net") or {}).get("_target_")}.get(source)
    return f"the {role} ({role}.source={source}: {what})"


def check_output(role: str, out, x: torch.Tensor, what: str) -> None:
    """A network's output on a batch x must be what certification uses: a classifier's or the
    rejector's logits (B, K), a denoiser's image of x's shape; finite. ConfigError otherwise."""
    shape = tuple(x.shape)
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        want = "an image tensor of its input's shape" if role == "denoiser" else "a logits tensor (B, K)"
        raise ConfigError(f"{what} returns a {kind} on a probe batch of shape {shape}, not {want}: "
                          "make its forward return that tensor (e.g. wrap it in a module whose "
                          "forward picks it out of the output)")
    if role == "denoiser" and tuple(out.shape) != shape:
        raise ConfigError(f"{what} maps a probe batch of shape {shape} to {tuple(out.shape)}: a "
                          "denoiser must return images of its input's shape (the data's: "
                          f"{shape[1:]})")
    if role != "denoiser" and (out.dim() != 2 or len(out) != len(x)):
        raise ConfigError(f"{what} returns a tensor of shape {tuple(out.shape)} on a probe batch of "
                          f"shape {shape}, not logits ({len(x)}, K)")
    if not torch.isfinite(out).all():
        raise ConfigError(f"{what} gives non-finite outputs (NaN or Inf) on a probe batch of the "
                          f"data's shape {shape}: a broken or diverged network, whose certificates "
                          "would mean nothing. Check its weights and its forward")


def probe(role: str, net, recipe: dict, shape, sigma: float | None = None,
          what: str | None = None) -> dict | None:
    """Run the network (a module, or a function of a batch) once on the probe batch of the data's
    image `shape` (a denoiser's or the rejector's with their noise σ added) before any work: a
    network that fails there, returns something other than what certification uses, or gives
    non-finite values is one ConfigError naming it. Returns the probe record
    (models.fingerprint.run_probe); None without a shape."""
    if shape is None:
        return None
    what = what or _what(role, recipe)

    def forward(x: torch.Tensor) -> torch.Tensor:
        try:
            out = net(x)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a foreign network: say which
            raise ConfigError(f"{what} fails on a probe batch of the data's shape "
                              f"{tuple(x.shape)}{f' (noisy, σ = {sigma:g})' if sigma else ''}: "
                              f"{cause(e)}. It must take the data's images (B, C, H, W) in "
                              "[0, 1]: check its input size and channels, or the data's "
                              "(data.image_size, data.channels)") from None
        check_output(role, out, x, what)
        return out

    return run_probe(forward, shape, sigma if role != "classifier" else None,
                     device=_device_of(net))


def _device_of(net) -> torch.device:
    """Where a network's tensors are (the CPU for a plain function or a network without any)."""
    if not isinstance(net, nn.Module):
        return torch.device("cpu")
    t = next((t for t in (*net.parameters(), *net.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def fingerprint(role: str, recipe: dict) -> dict:
    """What a results record holds of a network: its id (identity.network_id) and its recipe
    (with the weights' hash and the probe record)."""
    return {"id": network_id(role, recipe), "recipe": recipe}


def verify(role: str, net: nn.Module, recipe: dict, where: str) -> None:
    """A rebuilt network against its recipe: its probe outputs must be the recorded ones (within
    identity.tolerance), else CheckpointError naming the network and the difference. A recipe
    without a probe (a checkpoint of an earlier release) cannot be checked: nothing is done."""
    recorded = recipe.get("probe")
    if not recorded:
        return
    now = probe(role, net, recipe, recorded["shape"], recorded.get("sigma"))
    diff = sketch_difference(recorded["sketch"], now["sketch"])
    tol = tolerance(recorded.get("device"), now["device"])
    if diff > tol:
        raise CheckpointError(
            f"{_what(role, recipe)} rebuilt from {where} is not the network that was trained: on "
            f"the probe batch its outputs differ from the recorded ones by {diff:.3g} of their "
            f"scale (tolerance {tol:g}). It holds state outside its weights (a buffer that is not "
            "saved, a random draw in its constructor), or its code or a constructor argument "
            "changed since; certify with the code and arguments it was trained with")


def check_unchanged(recorded: dict | None, now: dict, where: str) -> None:
    """A resumed run's networks, as built now from their files and nodes, must be those its
    checkpoint recorded at the start (the same id: weights and recipe); else CheckpointError naming
    each network that changed (a weights file replaced since training, say)."""
    changed = []
    for role, recipe in (now or {}).items():
        old = (recorded or {}).get(role)
        if not old or "state_sha256" not in old:
            continue  # an earlier release's checkpoint: nothing recorded to compare
        if network_id(role, old) != network_id(role, recipe):
            part = "weights" if old.get("state_sha256") != recipe.get("state_sha256") else "recipe"
            changed.append(f"{role} ({part} differ: {recipe.get('path') or recipe.get('name')})")
    if changed:
        raise CheckpointError(
            f"{where} was trained with other networks than those built now: "
            f"{'; '.join(changed)}. A weights file replaced since training would mix two networks "
            "in one run: restore the files it was trained with, or start a new run")


def rebuild(role: str, recipe: dict) -> nn.Module:
    """The structure a recipe describes, with fresh weights (the caller loads the recorded ones):
    no download, no weights file read, except a `file` network's own file (checked against the
    recorded hash)."""
    source = recipe.get("source") or "arch"
    if source == "arch":
        net = build_arch(recipe["arch"], **(recipe.get("arch_kwargs") or {}))
        if isinstance(net, Classifier):
            net = net.net
    elif source == "torchvision":
        import torchvision

        kwargs = dict(recipe.get("kwargs") or {})
        if recipe.get("num_classes") is not None:
            kwargs["num_classes"] = int(recipe["num_classes"])
        net = torchvision.models.get_model(recipe["model"], weights=None, **kwargs)
    elif source == "module":
        net = _module({"net": recipe["net"]}, role)
    elif source == "diffusion":
        net = _rebuild_diffusion(role, recipe)
    else:
        path = Path(str(recipe["path"]))
        if not path.is_file():
            raise CheckpointError(f"the {role} was built from the file {path}, which is gone: "
                                  "put it back (its structure is not in the checkpoint)")
        if recipe.get("file_sha256") and file_sha256(path) != recipe["file_sha256"]:
            raise CheckpointError(f"the {role} file {path} changed since the rejector was trained "
                                  "(its sha256 differs): restore the original file")
        net = load_scripted(path, trust_pickle=bool(recipe.get("trust_pickle")), what=role)
    if role == "classifier":
        shape = recipe.get("input_shape")
        net = Classifier(net, recipe["mean"], recipe["std"],
                         feature_layers=recipe.get("feature_layers"),
                         input_shape=tuple(shape) if shape else None,
                         input_size=recipe.get("input_size"))
    return net


def _rebuild_diffusion(role: str, recipe: dict) -> nn.Module:
    """A diffusion denoiser from its model (folder or hub id), with the model's own weights (a
    rejector checkpoint does not hold them): refused unless its configuration and timestep are
    those recorded at training (the weights' hash is checked by the caller, RunCheckpoint, as for
    every network)."""
    from dsr_lightning.models.diffusion import load_diffusion

    try:
        net, info = load_diffusion(str(recipe["path"]), float(recipe["sigma"]))
    except ConfigError as e:
        raise CheckpointError(f"the {role} was the diffusion model {recipe['path']}, which cannot be "
                              f"loaded now: {e}") from None
    for key in ("unet", "scheduler", "timestep"):
        if recipe.get(key) is not None and info[key] != recipe[key]:
            raise CheckpointError(f"the diffusion model {recipe['path']} changed since the rejector "
                                  f"was trained on it: its {key} differs from the recorded one. "
                                  "Restore the model it was trained with")
    return net


def describe(role: str, recipe: dict) -> str:
    """One line: what the network is and where it came from."""
    source = recipe.get("source") or "arch"
    what = {"arch": recipe.get("arch"), "torchvision": f"torchvision {recipe.get('model')}",
            "module": (recipe.get("net") or {}).get("_target_"),
            "file": f"file {recipe.get('path')}",
            "diffusion": "a diffusers DDPM"}[source]
    weights = recipe.get("weights") or recipe.get("path") or "its own weights"
    line = f"{role}: {recipe.get('name')} = {what} ({weights})"
    if source == "diffusion":
        line += (f", one step at timestep {recipe['timestep']} (alpha_bar {recipe['alpha_bar']:.4g}, "
                 f"{recipe['prediction_type']}; its noise level within "
                 f"{100 * recipe['noise_mismatch']:.2g}% of sigma's)")
    if role == "classifier":
        mean = ", ".join(f"{m:.4g}" for m in recipe["mean"])
        std = ", ".join(f"{s:.4g}" for s in recipe["std"])
        line += (f", {recipe['num_classes']} classes, input {tuple(recipe.get('input_shape') or ())}"
                 f", normalised by mean ({mean}) std ({std}) from {recipe['normalisation']}")
    return line


def export(path: str | Path, role: str, module: nn.Module, recipe: dict, **extra: Any) -> Path:
    """Write a trained network where the next stage reads it: a network of models.ARCHS in the
    published form {'arch', 'state_dict', 'arch_kwargs'} (loads with the published loaders), any
    other as {'state_dict', 'dsr_network': recipe} (loads with source=torchvision|module and
    path=<file>). Atomic (files.atomic_write): a failed write is one WriteError, the file that
    was there whole, no temporary file left."""
    from dsr_lightning.files import atomic_write
    from dsr_lightning.models import save_checkpoint

    path = Path(path)
    if (recipe.get("source") or "arch") == "arch":
        return save_checkpoint(path, module, arch=recipe["arch"],
                               arch_kwargs=recipe.get("arch_kwargs") or {}, **extra)
    inner = module.net if isinstance(module, Classifier) else module
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    # the recipe's probe and weights' hash are those of the network before this stage trained it
    how = {k: v for k, v in recipe.items() if k not in ("probe", "state_sha256")}
    ckpt = {"state_dict": state, "dsr_network": {"role": role, **how}, **extra}
    return atomic_write(path, lambda f: torch.save(ckpt, f), what="the network file")


def load_frozen(role: str, spec, sigma: float | None = None,
                data: DataFacts | None = None) -> nn.Module:
    """The frozen `role` network of a node (eval mode, no gradients). A denoiser trained for
    another σ is refused."""
    return build(role, spec, data=data, sigma=sigma).module


def build_fresh(role: str, spec, data: DataFacts | None = None) -> nn.Module:
    """An untrained network of the node (auxiliary stages)."""
    return build(role, spec, data=data, trained=False).module
