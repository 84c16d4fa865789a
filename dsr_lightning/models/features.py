"""Fusion features of any classifier: the outputs of named submodules, captured by forward hooks.

The rejector is fused with the classifier's intermediate feature maps. Instead of asking every
network for a `forward_features`, the classifier wrapper (`normalize.Classifier`) registers one
`FeatureHook` per layer name (as in `net.named_modules()`: `layer2`, `features.6`) once, at
construction; a hook keeps its module's output only while armed, i.e. during one
`Classifier.forward_features` call, and is emptied after it, so nothing is held between calls and
a plain forward costs one flag test per hook. Hooks are plain picklable objects (no closures), so
a deep copy or a pickled classifier captures into its own copies.

TorchScript networks run their submodules inside the TorchScript interpreter, where Python hooks
cannot be attached (`register_forward_hook is not supported on ScriptModules`): a scripted network
can only be used unfused (`feature_layers=[]`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from dsr_lightning.errors import ConfigError

from .resnet import ResNet

_SHOW = 8  # how many valid layer names an error message lists


def default_feature_layers(net: nn.Module) -> list[str]:
    """The layers a classifier is fused at unless told otherwise: the stage outputs of the ResNets
    we know (Cohen's CIFAR ResNet: layer1..3; torchvision's ResNet family, incl. ResNeXt and wide
    ResNets: layer1..4); [] (unfused) for anything else."""
    if isinstance(net, ResNet):
        return ["layer1", "layer2", "layer3"]
    tv = sys.modules.get("torchvision.models.resnet")  # not imported: net cannot be one of its
    if tv is not None and isinstance(net, tv.ResNet):
        return ["layer1", "layer2", "layer3", "layer4"]
    return []


def _suggest(net: nn.Module) -> str:
    """A few layer names worth fusing at: the top-level children, else the first named modules."""
    top = [n for n, _ in net.named_children()]
    names = top if len(top) > 1 else [n for n, _ in net.named_modules() if n]
    more = f" ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def check_feature_layers(net: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """{name: submodule} for the requested layer names, in the given order; ConfigError for a name
    that is not a submodule, a duplicate, the network itself, or a TorchScript module."""
    modules = dict(net.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"classifier.feature_layers: {name!r} is not a layer name (use names "
                              f"as in net.named_modules(), e.g. {_suggest(net)})")
        if name not in modules:
            raise ConfigError(f"classifier.feature_layers: {type(net).__name__} has no layer "
                              f"{name!r}; valid names (as in net.named_modules()) include "
                              f"{_suggest(net)}")
        if name in out:
            raise ConfigError(f"classifier.feature_layers: {name!r} is listed twice")
        if isinstance(modules[name], torch.jit.ScriptModule):
            raise ConfigError(f"classifier.feature_layers: layer {name!r} is TorchScript, whose "
                              "submodules cannot be hooked; use the network unfused "
                              "(classifier.feature_layers=[]) or build it in Python and load its "
                              "weights")
        out[name] = modules[name]
    return out


def feature_map(name: str, output: Any) -> torch.Tensor:
    """The (B, C, H, W) map in a module's output: the tensor itself, or the first tensor of a tuple
    or list. ConfigError for token maps (B, N, C) and anything else."""
    t = output
    if isinstance(output, (tuple, list)):
        t = next((o for o in output if isinstance(o, torch.Tensor)), None)
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"classifier.feature_layers: layer {name!r} returns "
                          f"{type(output).__name__}, not a tensor (B, C, H, W); choose a "
                          "convolutional layer")
    if t.dim() == 3:
        raise ConfigError(f"classifier.feature_layers: layer {name!r} returns a token map of shape "
                          f"{tuple(t.shape)} (B, N, C; a transformer block), not a convolutional "
                          "map (B, C, H, W), which the rejector fuses; choose a convolutional "
                          "layer of the network, or use it unfused (classifier.feature_layers=[])")
    if t.dim() != 4:
        raise ConfigError(f"classifier.feature_layers: layer {name!r} returns a tensor of shape "
                          f"{tuple(t.shape)}, not a feature map (B, C, H, W); choose a "
                          "convolutional layer")
    return t


class FeatureHook:
    """Forward hook that keeps its module's output while armed.

    `arm()` before the forward, `take()` after it, `disarm()` always (forward_features does all
    three). A module that runs twice in one armed forward (a shared ReLU) is refused: its map would
    be ambiguous. The output's version counter is recorded, so `take()` refuses a map that the
    network overwrote in place after the hook saw it (a conv followed by ReLU(inplace=True)):
    the rejector would otherwise be fed the post-activation values silently.
    """

    def __init__(self, name: str):
        self.name = name
        self.armed = False
        self.out: torch.Tensor | None = None
        self.version = -1

    def arm(self) -> None:
        self.armed, self.out, self.version = True, None, -1

    def disarm(self) -> None:
        self.armed, self.out = False, None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.armed:
            return None
        if self.out is not None:
            raise ConfigError(f"classifier.feature_layers: layer {self.name!r} runs more than once "
                              "per forward (a shared module); choose a layer that runs once, e.g. "
                              "a block or stage")
        self.out = feature_map(self.name, output)
        if _tracks_version(self.out):
            self.version = self.out._version
        return None

    def take(self) -> torch.Tensor:
        """The captured map (B, C, H, W)."""
        out = self.out
        if out is None:
            raise ConfigError(f"classifier.feature_layers: layer {self.name!r} did not run in the "
                              "network's forward; choose a layer that the forward uses")
        if self.version >= 0 and _tracks_version(out) and out._version != self.version:
            raise ConfigError(f"classifier.feature_layers: the output of layer {self.name!r} is "
                              "modified in place later in the forward (e.g. by a "
                              "ReLU(inplace=True)); choose the layer after that operation")
        return out

    def __repr__(self) -> str:
        return f"FeatureHook({self.name!r})"


def _tracks_version(t: torch.Tensor) -> bool:
    """Whether t's in-place version counter can be read: not while torch.compile traces, and not
    for inference-mode tensors (which have none)."""
    return not torch.compiler.is_compiling() and not t.is_inference()
