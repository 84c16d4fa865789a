"""The Python API: a rejection system from a checkpoint, or from your own networks in memory, and
certificates for a batch of images, without configs or files.

    from dsr_lightning import api
    system = api.load_system("outputs/.../checkpoints/best.ckpt")
    cert = api.certify(system, images, N0=100, N=10_000, alpha=0.001)  # sigma: system.sigma

    system = api.train_rejector(f, D, images, labels, sigma=0.25, mean=..., std=...)
    cert = api.certify(system, test_images, test_labels)

Images are floating point (B, C, H, W) in [0, 1] (tensors or numpy arrays; one image (C, H, W) is
a batch of one); σ is in those pixel units. Every argument is checked first, as certify.py and
train.py check their keys (the same rules: smoothing.checks): a bad setting is one ConfigError, bad
images or labels one DataError, naming the argument, before anything is drawn or trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dsr_lightning.data import SmoothingDataModule
from dsr_lightning.errors import ConfigError, DataError
from dsr_lightning.jobs.console import quiet_third_party
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.models import Classifier, Rejector, SmoothingSystem, freeze
from dsr_lightning.smoothing import ImageNoise, SmoothedClassifier, check_images
from dsr_lightning.smoothing.checks import (
    BOUNDS,
    alpha_setting,
    choice_setting,
    draws_setting,
    int_setting,
    real_setting,
    sigma_setting,
    threshold_setting,
)
from dsr_lightning.tasks import RejectorTask

__all__ = ["Certificates", "certify", "load_system", "train_rejector"]


def load_system(checkpoint: str | os.PathLike, threshold: float | None = None,
                device: str | torch.device = "cpu") -> SmoothingSystem:
    """f_R of a rejector checkpoint of train.py, rebuilt from the file alone (the classifier,
    the denoiser, the heads and the chosen threshold). `threshold` (a logit: reject iff the head's
    logit > it) replaces the chosen one: any number but NaN (refused, as certify.py refuses it);
    +inf never rejects (the heads are left out), −inf rejects every draw. `system.sigma` is the
    noise level it was trained for."""
    if threshold is not None:
        threshold = threshold_setting("threshold", threshold)
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


# --- the checks of images, labels and the system (each one error naming the argument) ----------

def _images(images, allow_out_of_range: bool = False,
            escape: str | None = "allow_out_of_range=True") -> torch.Tensor:
    """`images` as float32 (B, C, H, W) where they are (a numpy array becomes a tensor; one image
    (C, H, W) a batch of one), checked finite and in [0, 1] (unless allowed) in their own dtype.
    Float32 is what certify.py certifies in and what the noise streams are drawn in: float16 and
    bfloat16 convert exactly, float64 is rounded to the nearest float32 (< 3e-8 in [0, 1])."""
    if isinstance(images, np.ndarray):
        try:
            images = torch.as_tensor(images)
        except (TypeError, RuntimeError) as e:
            raise DataError(f"images: a numpy array of dtype {images.dtype} is not an image batch "
                            f"({e}); give float images in [0, 1]") from None
    if not torch.is_tensor(images):
        raise DataError(f"images must be a torch tensor or a numpy array (B, C, H, W), got "
                        f"{type(images).__name__} (torch.stack a list of images)")
    dtype = str(images.dtype).removeprefix("torch.")
    if images.dtype == torch.bool or images.is_complex():
        raise DataError(f"images are {dtype}: give real floating point images in [0, 1]")
    if not images.is_floating_point():
        raise DataError(f"images are {dtype} (pixel values 0..255?): sigma and the radii are in "
                        "pixel units of [0,1] images, as certify.py's data modules give them: "
                        "divide them by 255 as floats (images.float() / 255)")
    if images.ndim == 3:
        images = images[None]  # one image: a batch of one
    if images.ndim != 4:
        raise DataError(f"images has shape {tuple(images.shape)}: expected a batch (B, C, H, W) or "
                        "one image (C, H, W)")
    check_images(images, allow_out_of_range, name="images", escape=escape)
    return images.to(torch.float32)


def _labels(labels, count: int) -> np.ndarray | None:
    """`labels` (a tensor, a numpy array or a sequence; one number for one image) as int64 (B,),
    checked to be integers, one per image; their range is checked against K by _label_range."""
    if labels is None:
        return None
    if torch.is_tensor(labels):
        dtype, shape = str(labels.dtype).removeprefix("torch."), tuple(labels.shape)
        integer = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    else:
        labels = np.asarray(labels)
        dtype, shape, integer = str(labels.dtype), labels.shape, labels.dtype.kind in "iu"
    shape = shape or (1,)  # one number: the label of one image
    if len(shape) != 1:
        raise DataError(f"labels has shape {shape}: expected one class index per image ({count},)")
    if shape[0] != count:
        raise DataError(f"labels has {shape[0]} entries for {count} images: one class index per "
                        "image")
    if not integer:
        raise DataError(f"labels are {dtype}: give integer class indices (labels.long() if they "
                        "are whole numbers)")
    y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else labels
    return y.reshape(count).astype(np.int64)


def _label_range(y: np.ndarray | None, k: int) -> None:
    bad = np.flatnonzero((y < 0) | (y >= k)) if y is not None else []
    if len(bad):
        values = ", ".join(str(v) for v in np.unique(y[bad])[:5])
        raise DataError(f"labels hold {values} at positions {bad[:10].tolist()}, outside 0..{k - 1} "
                        f"(the classifier's K = {k} classes)")


def _keys(keys, count: int) -> list[int]:
    if keys is None:
        return list(range(count))
    keys = keys.tolist() if isinstance(keys, (np.ndarray, torch.Tensor)) else list(keys)
    if len(keys) != count:
        raise ConfigError(f"keys has {len(keys)} entries for {count} images: one noise key per image")
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= k < 2**63
               for k in keys):
        raise ConfigError(f"keys={keys[:10]}: must be integers >= 0 (one noise stream per key, e.g. "
                          "the images' indices in their data set)")
    return [int(k) for k in keys]


def _device(module: nn.Module) -> torch.device:
    t = next((t for t in (*module.parameters(), *module.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def _fits(x: torch.Tensor, run: Callable[[torch.Tensor], object], role: str,
          classifier: nn.Module | None = None):
    """The images' shape against the networks, before any draw or training step: their channels
    against a models.Classifier's normalisation (its per-channel mean would broadcast another
    channel count without an error), then `run` on the first clean image (no noise drawn). Images
    the networks cannot take are one DataError naming their shape. Returns run's output."""
    c, h, w = x.shape[1:]

    def refuse(why: str) -> DataError:
        hint = "; channels last? pass images.permute(0, 3, 1, 2)" if w in (1, 3) and c not in (1, 3) \
            else ""
        return DataError(f"images of shape (C, H, W) = {(c, h, w)}: {why}{hint}; give images of "
                         "the shape the networks take")

    if isinstance(classifier, Classifier) and classifier[0].mean.numel() != c:
        raise refuse(f"the classifier normalises {classifier[0].mean.numel()} channels (it was "
                     f"built for {tuple(classifier.input_shape)})")
    try:
        with torch.no_grad():
            return run(x[:1])
    except Exception as e:  # noqa: BLE001 - any failure of a foreign network: say what to do
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise refuse(f"the {role} fails on one of them ({type(e).__name__}: {why})") from e


def _sigma(system: nn.Module, sigma) -> float:
    """σ to certify with: the given one, which must equal `system.sigma` where the system has one;
    else the system's own."""
    own = getattr(system, "sigma", None)
    if own is not None:
        own = sigma_setting("system.sigma", own)
    if sigma is None:
        if own is None:
            raise ConfigError("sigma: not given and the system has no .sigma: pass sigma=<the noise "
                              "std it was built for> (pixel units of [0,1] images)")
        return own
    sigma = sigma_setting("sigma", sigma)
    if own is not None and abs(sigma - own) > 1e-9:
        raise ConfigError(f"sigma={sigma:g}, but the system was trained for system.sigma={own:g}: "
                          "certify with sigma=system.sigma (or leave sigma out), or train a "
                          "rejector for this sigma")
    return sigma


def _with_threshold(system: nn.Module, threshold) -> nn.Module:
    """The system f_R certifies with: its own threshold, or `threshold` in its place (the given
    system is not changed). A NaN threshold is refused; with +inf the heads are left out (they
    never reject: p_R = 0 is known, not estimated)."""
    heads = getattr(system, "rejector", None)
    if threshold is not None:
        t = threshold_setting("threshold", threshold)
        if heads is None or not isinstance(system, SmoothingSystem):
            raise ConfigError(f"threshold={t}: the system has no rejector to apply it to (no heads, "
                              "or loaded with threshold=inf): drop it, or load the system with "
                              "load_system(..., threshold=...)")
    elif heads is not None and hasattr(system, "threshold"):
        t = threshold_setting("system.threshold", system.threshold)
    else:
        return system
    never = math.isinf(t) and t > 0
    if not isinstance(system, SmoothingSystem) or (t == system.threshold and not never):
        return system
    return SmoothingSystem(system.classifier, system.denoiser, None if never else heads,
                           threshold=t, num_classes=system.num_classes)


def certify(system: nn.Module, images, labels=None, *, sigma: float | None = None, N0: int = 100,
            N: int = 10_000, alpha: float = 0.001, batch: int = 1000, bound: str | None = None,
            seed: int = 0, keys: Sequence[int] | None = None, threshold: float | None = None,
            allow_out_of_range: bool = False) -> Certificates:
    """Certify each image of `images` for the smoothed `system` (a SmoothingSystem, or any module
    mapping noisy images to labels in {0..K}, K = reject, with `.num_classes` K).

    images: (B, C, H, W), or one image (C, H, W) as a batch of one; a tensor or a numpy array;
    floating point, finite, in [0, 1] (0..255 images are refused: divide them by 255) unless
    `allow_out_of_range`. They are certified in float32 on the system's device, as certify.py
    certifies: float16 and bfloat16 convert exactly, float64 is rounded to float32 (< 3e-8 of a
    pixel). labels (optional): integer classes in 0..K-1, one per image (tensor, array, sequence).
    sigma: in pixel units; default `system.sigma` (set by load_system and train_rejector), and a
    σ other than it is refused; a module without `.sigma` needs it. N0 <= N, alpha in (0, 1),
    batch (noisy samples per forward pass) >= 1, as certify.py requires. Image i draws its noise
    from the stream keyed by (seed, keys[i]) (keys default to 0..B-1), as certify.py does with
    data-set indices. `bound`: paper (Theorem 3.1) for a system with a rejector, cohen otherwise
    (the default). `threshold` replaces a SmoothingSystem's decision threshold for this call (the
    system is not changed); NaN is refused; +inf (given or the system's own) never rejects: the
    heads are left out and, unless `bound` is given, bound=cohen, as certify.py does; −inf rejects
    every draw, so every image abstains. Every argument is checked before any draw (ConfigError
    for a setting, DataError for the images or labels, or images the system cannot take)."""
    n0, n = draws_setting(N0, N)
    alpha = alpha_setting("alpha", alpha)
    batch = int_setting("batch", batch, what=" (noisy samples per forward pass)")
    seed = int_setting("seed", seed, low=0)
    if bound is not None:
        choice_setting("bound", bound, BOUNDS)
    sigma = _sigma(system, sigma)
    k = getattr(system, "num_classes", None)
    if k is None:
        raise ConfigError("the system has no .num_classes: set it to K, the classes it predicts "
                          "(label K = reject)")
    k = int_setting("system.num_classes", k)
    system = _with_threshold(system, threshold)
    x = _images(images, allow_out_of_range)
    y = _labels(labels, len(x))
    _label_range(y, k)
    keys = _keys(keys, len(x))
    system.eval()
    x = x.to(_device(system))
    if len(x):
        out = _fits(x, system, "system", getattr(system, "classifier", None))
        if not torch.is_tensor(out) or tuple(out.shape) != (1,) or not 0 <= int(out.item()) <= k:
            what = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ConfigError(f"the system returns {what} for one image, not labels (B,) in 0..{k} "
                              f"(K = {k}: reject): wrap it so that it returns labels")
    has_rejector = getattr(system, "rejector", None) is not None
    bound = bound or ("paper" if has_rejector else "cohen")
    smoothed = SmoothedClassifier(system, k, sigma, allow_out_of_range=allow_out_of_range)
    with torch.no_grad():
        cert = smoothed.certify(x, n0, n, alpha, batch, bound, noise=ImageNoise(seed, keys))
    out = Certificates(cert.columns())
    if y is not None:
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


def train_rejector(classifier: nn.Module, denoiser: nn.Module | None, images,
                   labels, *, sigma: float, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None,
                   feature_layers: Sequence[str] | None = None, rejector: nn.Module | None = None,
                   T: int = 4, epochs: int = 1, batch_size: int = 32, lr: float = 1e-3,
                   threshold: float = 0.0, accelerator: str = "auto", seed: int = 0,
                   progress: bool = False) -> SmoothingSystem:
    """Train rejector heads for your own frozen `classifier` f and `denoiser` D, in memory.

    images, labels: as `certify` takes them (tensors or numpy arrays; floating point images
    (B, C, H, W) or one (C, H, W), finite, in [0, 1] (0..255 images are refused: divide them by
    255), trained on in float32; integer labels in 0..K-1, one per image, K = f's classes).
    f maps [0,1] images to logits unless wrapped: with `mean`/`std` (one per image channel, std
    > 0) it is wrapped in their normalisation (a `models.Classifier` is used as it is, so it takes
    neither). `feature_layers`: f's module names whose outputs the rejector fuses (None: the
    defaults for known ResNets, else unfused). `rejector`: your own heads (a module taking
    (z, feats) -> (B, K)); default a small ResNet-like rejector (`models.Rejector`, width 16, one
    block per stage). sigma, T, epochs, batch_size, lr and seed follow train.py's rules (sigma
    finite > 0 in pixel units, counts >= 1, lr > 0, seed >= 0). Returns the rejection system f_R
    with `threshold` (a logit; reject iff the head's logit > it; any number but NaN: +inf never
    rejects, −inf rejects every draw) and `.sigma`. Every argument is checked before training
    (ConfigError for a setting, DataError for the images or labels, or images f or D cannot take)."""
    sigma = sigma_setting("sigma", sigma)
    T = int_setting("T", T, what=" (noisy copies per image per step)")
    epochs = int_setting("epochs", epochs)
    batch_size = int_setting("batch_size", batch_size)
    lr = real_setting("lr", lr, low=0, what=" (Adam's learning rate)")
    threshold = threshold_setting("threshold", threshold)
    seed = int_setting("seed", seed, low=0)
    x = _images(images, escape=None)  # training has no other range: σ is in [0,1] pixel units
    if labels is None:
        raise DataError("labels: give one integer class per image (the rejector's validation "
                        "metrics compare f's noisy predictions with them)")
    y = _labels(labels, len(x))
    if not len(x):
        raise DataError("images holds no images: give at least one to train on")
    channels = x.shape[1]
    if (mean is None) != (std is None):
        raise ConfigError("mean and std go together: give both (f's input normalisation) or "
                          "neither (f normalises its own inputs)")
    if mean is not None:
        if isinstance(classifier, Classifier):
            raise ConfigError("mean and std: the classifier is already a models.Classifier, "
                              "which normalises with its own: drop mean and std, or pass its net")
        mean = [real_setting(f"mean[{i}]", v) for i, v in enumerate(mean)]
        std = [real_setting(f"std[{i}]", v) for i, v in enumerate(std)]
        if not len(mean) == len(std) == channels:
            raise ConfigError(f"mean has {len(mean)} values, std {len(std)}: one per image channel "
                              f"each (the images have {channels})")
        if min(std) <= 0:
            raise ConfigError(f"std={std}: every value must be > 0")
    quiet_third_party()
    pl.seed_everything(seed, verbose=False)
    if not isinstance(classifier, Classifier):
        if mean is None:
            mean, std = [0.0] * channels, [1.0] * channels  # f normalises its own inputs
        classifier = Classifier(classifier, mean, std, feature_layers=feature_layers,
                                input_shape=tuple(x.shape[1:]))
    freeze(classifier)
    z = x[:1].to(_device(classifier))
    if denoiser is not None:
        freeze(denoiser)
        z = _fits(z.to(_device(denoiser)), denoiser, "denoiser")
    _fits(z, classifier.forward_features, "classifier", classifier)
    k = classifier.num_classes
    _label_range(y, k)
    if rejector is None:
        rejector = Rejector(k, classifier.feature_channels, in_channels=channels, width=16,
                            blocks=(1, 1, 1, 1), fc_hidden=(64, 32), stem="auto",
                            image_size=x.shape[-1])
    optim = {"epochs": epochs, "phases": [{"epochs": epochs, "optimizer": {
        "_target_": "torch.optim.Adam", "_partial_": True, "lr": lr}}]}
    task = RejectorTask(classifier, denoiser, rejector, optim, threshold=threshold)
    data = _Arrays(x, torch.from_numpy(y), k, batch_size=batch_size, sigma=sigma, T=T,
                   val_fraction=0.1, seed=seed)
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=progress,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    system = SmoothingSystem(classifier, denoiser, freeze(rejector), threshold=threshold,
                             num_classes=k)
    system.sigma = sigma
    return system
