"""Per-channel normalisation inside the classifier, so noise is added in [0,1] pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsr_lightning.errors import ConfigError

from .features import FeatureHook, check_feature_layers, default_feature_layers

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def input_size_of(size) -> tuple[int, int] | None:
    """`classifier.input_size` as (H, W): an int is a square, a pair is (H, W), None keeps the
    data's size. Anything else is one ConfigError."""
    if size is None:
        return None
    values = [size] if isinstance(size, int | float | str) else list(size)
    try:
        hw = [int(v) for v in values]
        ok = all(float(v) == h for v, h in zip(values, hw))
    except (TypeError, ValueError):
        ok = False
    if not ok or len(hw) not in (1, 2) or min(hw) < 1:
        raise ConfigError(f"classifier.input_size={size!r}: give the classifier's input size in "
                          "pixels, one number (a square, e.g. 224) or [H, W]; null: the data's size")
    return (hw[0], hw[0]) if len(hw) == 1 else (hw[0], hw[1])


class NormalizeLayer(nn.Module):
    """(x - mean) / std per channel, after resizing x to `size` (H, W) where set (bicubic with
    antialiasing, not clipped: f sees exactly its input resized, noise included for a plain
    smoothed f; a classifier that takes another resolution than the data's, e.g. a 224-px ImageNet
    model on 32-px images).
    mean/std are non-persistent buffers: they follow `.to(device/dtype)` but add nothing to the
    state dict (as in the published checkpoints)."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 size: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)  # (C,1,1)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std  # (B, C, H, W)

    def extra_repr(self) -> str:
        size = f", size={self.size}" if self.size is not None else ""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}{size}"


class Classifier(nn.Sequential):
    """Sequential(NormalizeLayer, net): takes [0,1] images, returns logits. State-dict keys are
    the net's prefixed by `1.`, exactly the layout of Cohen et al.'s published classifiers.

    Fusion features (`forward_features`) are the outputs of the net's submodules named in
    `feature_layers` (names as in `net.named_modules()`: `layer2`, `features.6`), in that order,
    captured by forward hooks (`features.FeatureHook`: registered once here, capturing only inside
    `forward_features`; no state-dict keys or buffers are added). None: `default_feature_layers`
    (Cohen's CIFAR ResNet: layer1..3, torchvision's ResNets: layer1..4, else none); []: unfused.
    List them from shallow to deep: the rejector fuses the i-th after its i-th stage. TorchScript
    nets cannot be hooked (use them unfused).

    `num_classes` comes from `net.num_classes` or `net.fc.out_features` where present, else from a
    probe: one forward of zeros (1, *input_shape) in eval mode under no_grad, which also gives
    `feature_channels`. input_shape (C, H, W) defaults to (len(mean), 32, 32); set it (or call
    `probe`) for nets that need another size. `input_size` (an int or (H, W)): the net takes
    images of that size, resized inside from whatever size the wrapper gets (NormalizeLayer), so
    noise, denoiser and rejector stay at the data's size; the fusion maps are the net's.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, feature_layers: Sequence[str] | None = None,
                 input_shape: tuple[int, int, int] | None = None,
                 input_size: int | Sequence[int] | None = None):
        super().__init__(NormalizeLayer(mean, std, input_size_of(input_size)), net)
        if isinstance(feature_layers, str):  # a single name, not its characters
            feature_layers = [feature_layers]
        names = default_feature_layers(net) if feature_layers is None else list(feature_layers)
        modules = check_feature_layers(net, names)
        self.feature_layers: list[str] = list(modules)
        self._hooks = [FeatureHook(name) for name in modules]  # plain objects: no state-dict keys
        for hook in self._hooks:
            modules[hook.name].register_forward_hook(hook)
        self.input_shape = self._shape(input_shape) if input_shape is not None else \
            (len(mean), 32, 32)
        self._probed: tuple[int, list[int]] | None = None

    @property
    def net(self) -> nn.Module:
        return self[1]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) the net takes, where it differs from the data's (resized inside); None: none."""
        return self[0].size

    @property
    def num_classes(self) -> int:
        net = self.net
        if hasattr(net, "num_classes"):
            return int(net.num_classes)
        if isinstance(getattr(net, "fc", None), nn.Linear):
            return net.fc.out_features
        return self.probe()[0]

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each fusion map ([] when unfused; probed once otherwise)."""
        return list(self.probe()[1]) if self._hooks else []

    @staticmethod
    def _shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"input_shape must be (C, H, W) of one image, got {tuple(input_shape)}")
        return shape  # type: ignore[return-value]

    def probe(self, input_shape: Sequence[int] | None = None) -> tuple[int, list[int]]:
        """(num_classes, feature_channels) from one forward of zeros (1, *input_shape) in eval mode
        under no_grad (each submodule's train/eval mode is restored after). input_shape (C, H, W)
        replaces the stored one; None keeps it. The result is cached until input_shape changes."""
        if input_shape is not None:
            shape = self._shape(input_shape)
            if shape != self.input_shape:
                self.input_shape, self._probed = shape, None
        if self._probed is not None:
            return self._probed
        ref = next((t for t in (*self.net.parameters(), *self.net.buffers())
                    if t.is_floating_point()), self[0].mean)
        x = torch.zeros(1, *self.input_shape, device=ref.device, dtype=ref.dtype)  # (1, C, H, W)
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                logits, feats = self.forward_features(x)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a foreign net: say what to do
            raise ConfigError(f"the classifier {type(self.net).__name__} fails on a probe input of "
                              f"shape {tuple(x.shape)} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); set its "
                              "input_shape=(C, H, W) to the data's") from e
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ConfigError(f"the classifier {type(self.net).__name__} returns "
                              f"{getattr(logits, 'shape', type(logits).__name__)} on one image, "
                              "not logits (1, K)")
        self._probed = (int(logits.shape[1]), [int(f.shape[1]) for f in feats])
        return self._probed

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C, H, W) in [0,1] -> logits (B, K), the maps of `feature_layers`
        [(B, C_i, H_i, W_i)] ([] when unfused)."""
        hooks = self._hooks
        if not hooks:
            return self(x), []
        for hook in hooks:
            hook.arm()
        try:
            logits = self(x)  # (B, K); the hooks keep their layers' outputs
            feats = [hook.take() for hook in hooks]
        finally:
            for hook in hooks:
                hook.disarm()
        return logits, feats
