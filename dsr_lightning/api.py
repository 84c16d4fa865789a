"""The Python API: a smoothed classifier g from a checkpoint, or from your own networks in
memory, that certifies and predicts images without configs or files.

The shape is the one of Cohen et al.'s `Smooth` (`g.certify(x, n0, n, alpha, batch_size)`,
`g.predict(x, n, alpha, batch_size)`), for the smoothed classifier with rejection g_R:

    import dsr_lightning as dsr

    g = dsr.load("outputs/.../checkpoints/best.ckpt")   # sigma, threshold and networks from the file
    cert = g.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=1000)
    cert.prediction, cert.radius                         # one image (C, H, W): one Certificate

    g = dsr.wrap(f, D, sigma=0.25, mean=..., std=...)    # your networks: the denoised baseline f∘D
    g = dsr.train_rejector(f, D, images, labels, sigma=0.25, mean=..., std=...)   # f_R, trained

Images are floating point, (C, H, W) for one image or (B, C, H, W) for a batch, in [0, 1]
(tensors or numpy arrays); σ and the radii are in those pixel units. Every argument is checked
before anything is drawn or trained, with the rules dsr-certify and dsr-train apply to their keys
(smoothing.checks): a bad setting is one ConfigError, bad images or labels one DataError, naming
the argument.

The names of the first version of this module stay: `load_system` (= `load`), `certify(system,
images, labels, N0=..., N=..., batch=...)` and `train_rejector`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, overload

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
from dsr_lightning.smoothing import ABSTAIN as _ABSTAIN
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

if TYPE_CHECKING:
    import pandas as pd

ABSTAIN: int = _ABSTAIN
"""The prediction of an image g_R abstains on: -1, as in Cohen et al.'s code (and the engine's
`smoothing.ABSTAIN`)."""

Images = torch.Tensor | np.ndarray
"""Images: one (C, H, W) or a batch (B, C, H, W), floating point in [0, 1]."""
Labels = torch.Tensor | np.ndarray | Sequence[int] | int | None
"""Integer classes in 0..K-1: one per image (one int for one image)."""

__all__ = [
    "ABSTAIN", "Certificate", "Certificates", "Smooth", "certify", "load", "load_system",
    "train_rejector", "wrap",
]


# --- results --------------------------------------------------------------------------------------

def _optional(value: float) -> float | None:
    """A bound as a number, None where the bound does not use it (NaN in the columns)."""
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class Certificate:
    """The certificate of one image.

    With probability at least 1 - `alpha` over the noise, if `prediction` is not `ABSTAIN`, the
    smoothed classifier g_R predicts `prediction` at every x + δ with ||δ||₂ <= `radius`
    (pixel units of [0, 1] images, as σ).

    Attributes:
        prediction: The certified class, or `ABSTAIN` (-1).
        radius: The certified L2 radius; 0.0 when abstaining.
        c_hat: The class chosen on the `n0` selection draws, which the bounds are about (it is
            `prediction` unless the certificate abstains).
        n_A: Draws of `c_hat` among the `n` estimation draws.
        n_R: Rejected draws among the `n` estimation draws.
        n_B: Draws of the most frequent other real class among the `n` estimation draws.
        n0: Selection draws.
        n: Estimation draws.
        pA_lower: Lower confidence bound on P(f_R = c_hat).
        pAR_lower: Lower confidence bound on P(f_R ∈ {c_hat, reject}) (bound "paper"; else
            None).
        pB_upper: Upper confidence bound on the runner-up's probability (bound "runner_up";
            else None).
        bound: The radius bound: "paper" (Theorem 3.1, with rejection), "runner_up" or "cohen".
        alpha: The failure probability of the certificate.
        sigma: The noise level σ.
        label: The image's true class where labels were given, else None.
    """

    prediction: int
    radius: float
    c_hat: int | None = None
    n_A: int | None = None
    n_R: int | None = None
    n_B: int | None = None
    n0: int | None = None
    n: int | None = None
    pA_lower: float | None = None
    pAR_lower: float | None = None
    pB_upper: float | None = None
    bound: str | None = None
    alpha: float | None = None
    sigma: float | None = None
    label: int | None = None

    @property
    def abstained(self) -> bool:
        """True when g_R abstains on the image (prediction is ABSTAIN)."""
        return self.prediction == ABSTAIN

    @property
    def correct(self) -> bool | None:
        """prediction == label where the label is known, else None."""
        return None if self.label is None else self.prediction == self.label

    def certifies(self, radius: float = 0.0) -> bool:
        """True when the image is predicted correctly with a certified radius of at least
        `radius` (its contribution to the certified accuracy at that radius).

        Raises:
            DataError: The certificate has no label.
        """
        if self.label is None:
            raise DataError("certifies: this certificate was made without labels: pass "
                            "labels=... to certify")
        return bool(self.correct) and self.radius >= radius


_INT_COLUMNS = ("prediction", "c_hat", "n_A", "n_R", "n_B", "n0", "n", "label")
_BOUND_COLUMNS = ("pAR_lower", "pB_upper")
_SCALARS = ("bound", "alpha", "sigma")
# the per-image columns, in the order of Certificate's fields (plus correct, where labels are)
_COLUMNS = tuple(f.name for f in fields(Certificate) if f.name not in _SCALARS)


class Certificates(Sequence[Certificate]):
    """The certificates of a batch: a sequence of `Certificate` (`certs[i]`, `len(certs)`,
    `for c in certs`), with each field also as a column over the batch (`certs.radius`,
    `certs["radius"]`: numpy arrays of length B).

    The columns are those of `Certificate` (prediction, radius, c_hat, n_A, n_R, n_B, n0, n,
    pA_lower, pAR_lower, pB_upper; label and correct where labels were given; bounds a bound
    does not use are NaN), and `bound`, `alpha`, `sigma` are shared by the batch. `counts0`
    and `counts` (B, K+1) are the raw selection and estimation counts per class (last column:
    reject), where they are known.

    Args:
        columns: Per-image arrays by name, all of one length.
        bound: The radius bound the batch was certified with.
        alpha: The failure probability of each certificate.
        sigma: The noise level σ.
        counts0: (B, K+1) selection counts.
        counts: (B, K+1) estimation counts.
    """

    def __init__(self, columns: Mapping[str, Any], *, bound: str | None = None,
                 alpha: float | None = None, sigma: float | None = None,
                 counts0: np.ndarray | None = None, counts: np.ndarray | None = None):
        self._columns = {k: np.asarray(v) for k, v in columns.items()}
        lengths = {len(v) for v in self._columns.values()}
        if len(lengths) > 1:
            raise DataError(f"Certificates: the columns have different lengths {sorted(lengths)}")
        self._len = lengths.pop() if lengths else 0
        self.bound, self.alpha, self.sigma = bound, alpha, sigma
        self.counts0, self.counts = counts0, counts

    @property
    def prediction(self) -> np.ndarray:
        """(B,) int64: the certified classes, `ABSTAIN` (-1) where g_R abstains."""
        return self["prediction"]

    @property
    def radius(self) -> np.ndarray:
        """(B,) float64: the certified L2 radii (0.0 where g_R abstains)."""
        return self["radius"]

    @property
    def correct(self) -> np.ndarray:
        """(B,) int64: 1 where prediction == label (certify with labels=...)."""
        return self["correct"]

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """The per-image arrays by name (a new dict; the arrays are shared)."""
        return dict(self._columns)

    def keys(self):
        """The column names."""
        return self._columns.keys()

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> Certificate: ...

    @overload
    def __getitem__(self, i: slice) -> Certificates: ...

    @overload
    def __getitem__(self, i: str) -> np.ndarray: ...

    def __contains__(self, item) -> bool:
        """A column name (`"radius" in certs`, as the first version's dict answered), or a
        Certificate of the batch."""
        if isinstance(item, str):
            return item in self._columns or (item == "N" and "n" in self._columns)
        return any(item == c for c in self)

    def __getitem__(self, i):
        if isinstance(i, str):
            if i == "N" and "N" not in self._columns:  # the first version's name of `n`
                i = "n"
            if i not in self._columns:
                hint = " (certify with labels=...)" if i in ("correct", "label") else ""
                raise KeyError(f"no column {i!r}{hint}; the columns are "
                               f"{', '.join(self._columns)}")
            return self._columns[i]
        if isinstance(i, slice) or (isinstance(i, np.ndarray) and i.ndim == 1):
            counts0, counts = (None if a is None else a[i] for a in (self.counts0, self.counts))
            return Certificates({k: v[i] for k, v in self._columns.items()}, bound=self.bound,
                                alpha=self.alpha, sigma=self.sigma, counts0=counts0, counts=counts)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"Certificates indices are ints, slices or column names, not "
                            f"{type(i).__name__}")
        if not -self._len <= i < self._len:
            raise IndexError(f"certificate {i} of {self._len}")
        row = {}
        for name in _COLUMNS:
            if name not in self._columns:
                continue
            v = self._columns[name][i]
            if name in _INT_COLUMNS:
                row[name] = int(v)
            else:
                row[name] = _optional(float(v)) if name in _BOUND_COLUMNS else float(v)
        return Certificate(**row, bound=self.bound, alpha=self.alpha, sigma=self.sigma)

    def __iter__(self) -> Iterator[Certificate]:
        return (self[i] for i in range(self._len))

    def __repr__(self) -> str:
        shown = "" if "prediction" not in self._columns else \
            f", {int((self.prediction != ABSTAIN).sum())} certified"
        return (f"Certificates({self._len} images{shown}, bound={self.bound!r}, "
                f"alpha={self.alpha}, sigma={self.sigma})")

    def certified_accuracy(self, radius: float = 0.0) -> float:
        """The share of images predicted correctly with a certified radius >= `radius` (NaN for
        an empty batch).

        Raises:
            DataError: The batch was certified without labels.
        """
        if "correct" not in self._columns:
            raise DataError("certified_accuracy: the batch was certified without labels: pass "
                            "labels=... to certify")
        ok = (self["correct"] == 1) & (self["radius"] >= radius)
        return float(ok.mean()) if len(ok) else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """The columns as a pandas DataFrame, one row per image."""
        import pandas as pd

        return pd.DataFrame(self._columns)


# --- the checks of images, labels and the system (each one error naming the argument) ----------

def _images(images, allow_out_of_range: bool = False,
            escape: str | None = "allow_out_of_range=True") -> torch.Tensor:
    """`images` as float32 (B, C, H, W) where they are (a numpy array becomes a tensor; one image
    (C, H, W) a batch of one), checked finite and in [0, 1] (unless allowed) in their own dtype.
    Float32 is what dsr-certify certifies in and what the noise streams are drawn in: float16 and
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
                        "pixel units of [0,1] images, as dsr-certify's data modules give them: "
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
                              "dsr.load(..., threshold=...)")
    elif heads is not None and hasattr(system, "threshold"):
        t = threshold_setting("system.threshold", system.threshold)
    else:
        return system
    never = math.isinf(t) and t > 0
    if not isinstance(system, SmoothingSystem) or (t == system.threshold and not never):
        return system
    return SmoothingSystem(system.classifier, system.denoiser, None if never else heads,
                           threshold=t, num_classes=system.num_classes)


# --- the smoothed classifier ----------------------------------------------------------------------

def _bound(bound, has_rejector: bool) -> str:
    if bound is not None:
        return choice_setting("bound", bound, BOUNDS)
    return "paper" if has_rejector else "cohen"


def _check_base(base: nn.Module, x: torch.Tensor, k: int) -> None:
    """base on the first clean image (no noise drawn): it must take the images and return
    labels (1,) in 0..K."""
    if not len(x):
        return
    out = _fits(x, base, "system", getattr(base, "classifier", None))
    if not torch.is_tensor(out) or tuple(out.shape) != (1,) or not 0 <= int(out.item()) <= k:
        what = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"the system returns {what} for one image, not labels (B,) in 0..{k} "
                          f"(K = {k}: reject): wrap it so that it returns labels (dsr.wrap turns "
                          "a classifier returning logits into one)")


class Smooth:
    """The smoothed classifier with rejection g_R(x) = argmax over the K classes c of
    P(f_R(x + σε) = c), ε ~ N(0, I), estimated by Monte Carlo draws.

    `load`, `wrap` and `train_rejector` build one; the constructor takes a base that already
    returns labels. The arguments are those of Cohen et al.'s `Smooth(base_classifier,
    num_classes, sigma)`, but the base returns labels in {0..K} (K: reject), not logits.

    Args:
        base: The base classifier with rejection f_R: a module mapping a batch of noisy images
            (B, C, H, W) to labels (B,) in {0..K}, K = reject (e.g. a `models.SmoothingSystem`).
        num_classes: K, the real classes; None: `base.num_classes`.
        sigma: The noise level σ (the Gaussian noise std, in pixel units of [0, 1] images).
        allow_out_of_range: Certify images outside [0, 1] too (σ then means little).

    Raises:
        ConfigError: A setting is out of range (naming it).
    """

    ABSTAIN = _ABSTAIN
    """The prediction where g_R abstains (-1), as `Smooth.ABSTAIN` in Cohen et al.'s code."""

    def __init__(self, base: nn.Module, num_classes: int | None = None,
                 sigma: float | None = None, *, allow_out_of_range: bool = False):
        if not callable(base):
            raise ConfigError(f"base: a {type(base).__name__} is not a module: give one mapping "
                              "noisy images (B, C, H, W) to labels (B,) in 0..K (K: reject)")
        if sigma is None:
            raise ConfigError("sigma: required, the Gaussian noise std the base was built for "
                              "(pixel units of [0,1] images)")
        own = getattr(base, "num_classes", None)
        if num_classes is None:
            if own is None:
                raise ConfigError("num_classes: not given and the base has no .num_classes: pass "
                                  "K, the classes it predicts (label K = reject)")
            num_classes = own
        k = int_setting("num_classes", num_classes)
        if own is not None and int(own) != k:
            raise ConfigError(f"num_classes={k}, but the base has base.num_classes={own}")
        self._base = base
        self._k = k
        self._sigma = sigma_setting("sigma", sigma)
        self._allow_out_of_range = bool(allow_out_of_range)
        self._heads: nn.Module | None = None  # heads left out at threshold +inf (with_threshold)

    # -- what it is made of --

    @property
    def system(self) -> nn.Module:
        """The base classifier with rejection f_R (a `models.SmoothingSystem` for the smoothed
        classifiers of `load`, `wrap` and `train_rejector`)."""
        return self._base

    @property
    def sigma(self) -> float:
        """The noise level σ, in pixel units of [0, 1] images."""
        return self._sigma

    @property
    def num_classes(self) -> int:
        """K, the real classes (the base's label K is reject)."""
        return self._k

    @property
    def classifier(self) -> nn.Module | None:
        """The classifier f (takes [0, 1] images, returns logits), or None for a base without
        one."""
        return getattr(self._base, "classifier", None)

    @property
    def denoiser(self) -> nn.Module | None:
        """The denoiser D, or None (no denoiser, or a base without one)."""
        return getattr(self._base, "denoiser", None)

    @property
    def rejector(self) -> nn.Module | None:
        """The rejector heads, or None (the denoised baseline f∘D, or threshold +inf)."""
        return getattr(self._base, "rejector", None)

    @property
    def threshold(self) -> float | None:
        """The decision threshold (a logit: a draw is rejected iff its head's logit > it); +inf
        where the heads are left out because they never reject; None without a rejector."""
        t = getattr(self._base, "threshold", None)
        if t is None or (self.rejector is None and self._heads is None):
            return None
        return float(t)

    @property
    def device(self) -> torch.device:
        """The device of the networks (images are certified there)."""
        return _device(self._base) if isinstance(self._base, nn.Module) else torch.device("cpu")

    @property
    def allow_out_of_range(self) -> bool:
        """Whether images outside [0, 1] are certified."""
        return self._allow_out_of_range

    def to(self, device: str | torch.device) -> Smooth:
        """Moves the networks to `device`; returns self."""
        self._base.to(device)
        return self

    def with_threshold(self, threshold: float) -> Smooth:
        """The same networks at another decision threshold (this one is not changed).

        Args:
            threshold: A logit (reject iff the head's logit > it); any number but NaN. +inf never
                rejects: the heads are left out, which is the denoised baseline f∘D; -inf rejects
                every draw, so every image abstains.

        Raises:
            ConfigError: NaN, or a smoothed classifier without a rejector.
        """
        t = threshold_setting("threshold", threshold)
        base, heads = self._base, self.rejector or self._heads  # _heads: left out at +inf
        if isinstance(base, SmoothingSystem) and heads is not None:
            base = SmoothingSystem(base.classifier, base.denoiser, heads, threshold=t,
                                   num_classes=base.num_classes)
        else:
            base = _with_threshold(base, t)  # refuses: no heads to apply it to
        return _smooth(base, self._sigma, self._allow_out_of_range)

    def __repr__(self) -> str:
        parts = [f"sigma={self._sigma:g}", f"num_classes={self._k}"]
        parts.append("rejector=None" if self.threshold is None else f"threshold={self.threshold:g}")
        parts.append(f"device={self.device}")
        return f"Smooth({', '.join(parts)})"

    # -- certify and predict --

    def certify(self, x: Images, n0: int = 100, n: int = 10_000, alpha: float = 0.001,
                batch_size: int = 1000, *, labels: Labels = None, bound: str | None = None,
                seed: int = 0, keys: Sequence[int] | None = None) -> Certificate | Certificates:
        """Certifies x: the class g_R predicts and a radius within which it cannot change.

        For each image, c_hat is the most frequent class of `n0` noisy draws (ties to the
        lowest index); `n` fresh draws then bound its probability. With probability at least
        1 - `alpha` over the noise, separately for each image, if the prediction is not
        `ABSTAIN`, g_R predicts it at every x + δ with ||δ||₂ <= radius.

        Args:
            x: One image (C, H, W) or a batch (B, C, H, W): a tensor or a numpy array, floating
                point, finite, in [0, 1]; certified in float32 on the networks' device.
            n0: Selection draws per image.
            n: Estimation draws per image (n0 <= n).
            alpha: The failure probability of each certificate, in (0, 1).
            batch_size: Noisy samples per forward pass (they mix images).
            labels: The true classes (one int for one image, a sequence for a batch); they add
                `label` and `correct`.
            bound: "paper" (Theorem 3.1: needs a rejector; the default with one), "runner_up",
                or "cohen" (the default without a rejector).
            seed: The noise seed: image i draws from the stream keyed by (seed, keys[i]), the
                same draws however the images are batched.
            keys: One integer >= 0 per image; default 0..B-1 (0 for one image).

        Returns:
            A `Certificate` for one image (C, H, W), `Certificates` for a batch (B, C, H, W).

        Raises:
            ConfigError: A setting out of range (naming it), before any draw.
            DataError: Images or labels that cannot be certified, before any draw.
        """
        n0, n = draws_setting(n0, n, names=("n0", "n"))
        bound = _bound(bound, self.rejector is not None)
        one, xs, alpha, batch_size, noise = self._checked(x, alpha, batch_size, seed, keys)
        y = _labels(labels, len(xs))
        _label_range(y, self._k)
        certs = self._certify(xs, y, n0, n, alpha, batch_size, bound, noise)
        return certs[0] if one else certs

    def _checked(self, x: Images, alpha, batch_size, seed, keys
                 ) -> tuple[bool, torch.Tensor, float, int, ImageNoise]:
        """The arguments certify and predict share, checked before any draw: (one image?, the
        images (B, C, H, W) float32, alpha, batch_size, their noise streams)."""
        alpha = alpha_setting("alpha", alpha)
        batch_size = int_setting("batch_size", batch_size, what=" (noisy samples per forward "
                                                                "pass)")
        seed = int_setting("seed", seed, low=0)
        xs = _images(x, self._allow_out_of_range)
        return _one_image(x), xs, alpha, batch_size, ImageNoise(seed, _keys(keys, len(xs)))

    def _engine(self, x: torch.Tensor) -> tuple[SmoothedClassifier, torch.Tensor]:
        """The engine over the base in eval mode, and x on its device, checked against the base."""
        base = self._base
        if isinstance(base, nn.Module):
            base.eval()
        x = x.to(self.device)
        _check_base(base, x, self._k)
        return SmoothedClassifier(base, self._k, self._sigma,
                                  allow_out_of_range=self._allow_out_of_range), x

    def _certify(self, x: torch.Tensor, y: np.ndarray | None, n0: int, n: int, alpha: float,
                 batch_size: int, bound: str, noise: ImageNoise) -> Certificates:
        """The engine on checked arguments: x (B, C, H, W) float32."""
        engine, x = self._engine(x)
        with torch.no_grad():
            cert = engine.certify(x, n0, n, alpha, batch_size, bound, noise=noise)
        cols = cert.columns()
        cols["n0"] = cert.counts0.sum(-1)
        cols["n"] = cols.pop("N")
        columns = {name: cols[name] for name in _COLUMNS if name in cols}
        if y is not None:
            columns["label"] = y
            columns["correct"] = (columns["prediction"] == y).astype(np.int64)
        return Certificates(columns, bound=cert.bound, alpha=cert.alpha, sigma=cert.sigma,
                            counts0=cert.counts0, counts=cert.counts)

    def predict(self, x: Images, n: int = 1000, alpha: float = 0.001, batch_size: int = 1000, *,
                seed: int = 0, keys: Sequence[int] | None = None) -> int | np.ndarray:
        """Predicts g_R(x), abstaining where `n` draws cannot tell it.

        The top two real classes of `n` noisy draws are compared with a two-sided binomial test
        (Cohen et al.'s PREDICT): with probability at least 1 - `alpha` over the noise, a
        returned class is g_R(x); `ABSTAIN` otherwise.

        Args:
            x: One image (C, H, W) or a batch (B, C, H, W), as `certify` takes them.
            n: Draws per image.
            alpha: The failure probability of each prediction, in (0, 1).
            batch_size: Noisy samples per forward pass.
            seed: The noise seed (see `certify`; the same seed and keys give the same draws).
            keys: One integer >= 0 per image; default 0..B-1.

        Returns:
            An int for one image, an int64 array (B,) for a batch; `ABSTAIN` (-1) where unsure.

        Raises:
            ConfigError: A setting out of range (naming it), before any draw.
            DataError: Images that cannot be classified, before any draw.
        """
        n = int_setting("n", n)
        one, xs, alpha, batch_size, noise = self._checked(x, alpha, batch_size, seed, keys)
        engine, xs = self._engine(xs)
        with torch.no_grad():
            pred = engine.predict(xs, n, alpha, batch_size, noise=noise)
        return int(pred[0]) if one else pred


def _smooth(system: SmoothingSystem, sigma: float, allow_out_of_range: bool = False) -> Smooth:
    """Smooth of a SmoothingSystem whose heads never reject at threshold +inf: certified without
    them (p_R = 0 is known, not estimated), kept for with_threshold."""
    heads = system.rejector
    if heads is not None and math.isinf(system.threshold) and system.threshold > 0:
        system = SmoothingSystem(system.classifier, system.denoiser, None,
                                 threshold=system.threshold, num_classes=system.num_classes)
    g = Smooth(system, system.num_classes, sigma, allow_out_of_range=allow_out_of_range)
    g._heads = heads if system.rejector is None else None
    return g


def _one_image(x) -> bool:
    return (torch.is_tensor(x) or isinstance(x, np.ndarray)) and x.ndim == 3




# --- building one ---------------------------------------------------------------------------------

def load(checkpoint: str | os.PathLike, *, threshold: float | None = None,
         device: str | torch.device = "cpu", baseline: bool = False) -> Smooth:
    """The smoothed classifier of a rejector checkpoint of dsr-train, rebuilt from the file alone.

    The file holds the classifier f, the denoiser D, the rejector heads, the chosen threshold
    and σ; each network must reproduce the outputs recorded when it was trained.

    Args:
        checkpoint: A rejector run's checkpoint (`<run>/checkpoints/best.ckpt` or `last.ckpt`).
        threshold: Replaces the chosen threshold (a logit: reject iff the head's logit > it); any
            number but NaN; +inf never rejects (the heads are left out), -inf rejects every draw.
        device: Where the networks run ("cpu", "cuda", ...).
        baseline: The denoised baseline f∘D of the same file instead (no heads, bound "cohen").

    Returns:
        The smoothed classifier, with `sigma` the rejector was trained for.

    Raises:
        CheckpointError: The file cannot be read or is not a rejector checkpoint.
        ConfigError: A setting out of range.
    """
    if threshold is not None:
        threshold = threshold_setting("threshold", threshold)
        if baseline:
            raise ConfigError("threshold: the baseline (baseline=True) has no rejector to apply "
                              "it to: drop one of them")
    ckpt = RunCheckpoint.read(checkpoint)
    system = ckpt.system("denoised" if baseline else "rejection", threshold=threshold)[0]
    return _smooth(system.to(device), float(ckpt.config["sigma"]))


def _normalisation(classifier: nn.Module, mean, std, channels: int | None) -> tuple[list, list]:
    """mean and std checked: both or neither, one finite value per channel each, std > 0, not
    for a models.Classifier (which has its own). Neither: [0.0], [1.0] per channel."""
    if (mean is None) != (std is None):
        raise ConfigError("mean and std go together: give both (f's input normalisation) or "
                          "neither (f normalises its own inputs)")
    if mean is None:
        c = channels or 3
        return [0.0] * c, [1.0] * c
    if isinstance(classifier, Classifier):
        raise ConfigError("mean and std: the classifier is already a models.Classifier, "
                          "which normalises with its own: drop mean and std, or pass its net")
    mean = [real_setting(f"mean[{i}]", v) for i, v in enumerate(mean)]
    std = [real_setting(f"std[{i}]", v) for i, v in enumerate(std)]
    if len(mean) != len(std) or (channels is not None and len(mean) != channels):
        each = "" if channels is None else f" (the images have {channels})"
        raise ConfigError(f"mean has {len(mean)} values, std {len(std)}: one per image channel "
                          f"each{each}")
    if min(std) <= 0:
        raise ConfigError(f"std={std}: every value must be > 0")
    return mean, std


def wrap(f: nn.Module, D: nn.Module | None = None, *, sigma: float,
         rejector: nn.Module | None = None, threshold: float = 0.0,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
         feature_layers: Sequence[str] | None = None,
         input_shape: tuple[int, int, int] | None = None,
         allow_out_of_range: bool = False) -> Smooth:
    """The smoothed classifier of your own networks, in memory.

    Without `rejector` it is the denoised baseline f∘D (without `D` too: Cohen et al.'s
    randomized smoothing of f); with one, f_R, which rejects a draw iff its head's logit >
    `threshold`. f, D and the rejector are put in eval mode and frozen (no gradients), in place.

    Args:
        f: The classifier: [0, 1] images (or normalised ones, with `mean`/`std`) to logits
            (B, K). A `models.Classifier` (e.g. `g.classifier` of another smoothed classifier)
            is used as it is.
        D: The denoiser for σ ([0, 1] noisy images to [0, 1] images), or None.
        sigma: The noise level σ, in pixel units of [0, 1] images.
        rejector: Heads (z, feats) -> (B, K) logits, as `train_rejector` trains them
            (`g.rejector`); feats are the outputs of f's `feature_layers`.
        threshold: The decision threshold (a logit); any number but NaN.
        mean: f's input normalisation, one value per channel (with `std`); None: f takes [0, 1]
            images.
        std: The normalisation's std, one value > 0 per channel.
        feature_layers: Names of f's modules whose outputs the rejector fuses (None: the
            defaults of known ResNets, else none).
        input_shape: (C, H, W) of one image; tells K by one forward of f where f shows no
            `num_classes` or `fc` (default (C, 32, 32)).
        allow_out_of_range: Certify images outside [0, 1] too.

    Returns:
        The smoothed classifier, ready to certify.

    Raises:
        ConfigError: A setting out of range, or an f whose class count cannot be told.
    """
    sigma = sigma_setting("sigma", sigma)
    threshold = threshold_setting("threshold", threshold)
    if input_shape is not None:
        input_shape = Classifier._shape(input_shape)
    channels = input_shape[0] if input_shape is not None else None
    mean, std = _normalisation(f, mean, std, channels)
    for name, m in (("f", f), ("D", D), ("rejector", rejector)):
        if m is not None and not isinstance(m, nn.Module):
            raise ConfigError(f"{name}: a {type(m).__name__} is not a torch.nn.Module")
    if not isinstance(f, Classifier):
        f = Classifier(f, mean, std, feature_layers=feature_layers, input_shape=input_shape)
    freeze(f)
    for m in (D, rejector):
        if m is not None:
            freeze(m)
    system = SmoothingSystem(f, D, rejector, threshold=threshold, num_classes=f.num_classes)
    return _smooth(system, sigma, allow_out_of_range)


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


def train_rejector(f: nn.Module, D: nn.Module | None, images: Images, labels: Labels, *,
                   sigma: float, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, feature_layers: Sequence[str] | None = None,
                   rejector: nn.Module | None = None, T: int = 4, epochs: int = 1,
                   batch_size: int = 32, lr: float = 1e-3, threshold: float = 0.0,
                   accelerator: str = "auto", seed: int = 0, progress: bool = False) -> Smooth:
    """Trains rejector heads for your own frozen classifier f and denoiser D, in memory.

    The heads learn, on noisy copies of `images` (σ, `T` per image per step), which draws f∘D
    gets wrong; f and D are frozen (eval mode, no gradients) in place. A tenth of the images
    (seeded) is held out for validation.

    Args:
        f: The classifier ([0, 1] images, or normalised ones with `mean`/`std`, to logits), or a
            `models.Classifier`.
        D: The denoiser for σ, or None.
        images: Training images (B, C, H, W) (or one (C, H, W)), floating point in [0, 1].
        labels: Integer classes in 0..K-1, one per image.
        sigma: The noise level σ, in pixel units of [0, 1] images.
        mean: f's input normalisation, one value per channel (with `std`).
        std: The normalisation's std, one value > 0 per channel.
        feature_layers: f's module names whose outputs the rejector fuses (None: the defaults of
            known ResNets, else unfused).
        rejector: Your own heads (z, feats) -> (B, K); default a small ResNet-like rejector
            (`models.Rejector`, width 16, one block per stage).
        T: Noisy copies per image per step.
        epochs: Passes over the images.
        batch_size: Images per step.
        lr: Adam's learning rate.
        threshold: The decision threshold of the result (a logit; any number but NaN).
        accelerator: Lightning's accelerator ("auto", "cpu", "gpu").
        seed: Seeds the training and the validation split.
        progress: Show Lightning's progress bar.

    Returns:
        The smoothed classifier f_R, ready to certify (its networks where Lightning trained
        them).

    Raises:
        ConfigError: A setting out of range (naming it), before training.
        DataError: Images or labels that cannot be trained on, or images f or D cannot take,
            before training.
    """
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
    if (mean is None) != (std is None) or mean is not None:
        mean, std = _normalisation(f, mean, std, channels)
    quiet_third_party()
    pl.seed_everything(seed, verbose=False)
    classifier = f
    if not isinstance(classifier, Classifier):
        if mean is None:
            mean, std = [0.0] * channels, [1.0] * channels  # f normalises its own inputs
        classifier = Classifier(classifier, mean, std, feature_layers=feature_layers,
                                input_shape=tuple(x.shape[1:]))
    freeze(classifier)
    z = x[:1].to(_device(classifier))
    if D is not None:
        freeze(D)
        z = _fits(z.to(_device(D)), D, "denoiser")
    _fits(z, classifier.forward_features, "classifier", classifier)
    k = classifier.num_classes
    _label_range(y, k)
    if rejector is None:
        rejector = Rejector(k, classifier.feature_channels, in_channels=channels, width=16,
                            blocks=(1, 1, 1, 1), fc_hidden=(64, 32), stem="auto",
                            image_size=x.shape[-1])
    optim = {"epochs": epochs, "phases": [{"epochs": epochs, "optimizer": {
        "_target_": "torch.optim.Adam", "_partial_": True, "lr": lr}}]}
    task = RejectorTask(classifier, D, rejector, optim, threshold=threshold)
    data = _Arrays(x, torch.from_numpy(y), k, batch_size=batch_size, sigma=sigma, T=T,
                   val_fraction=0.1, seed=seed)
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=progress,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    system = SmoothingSystem(classifier, D, freeze(rejector), threshold=threshold, num_classes=k)
    return _smooth(system, sigma)


# --- the first version's names --------------------------------------------------------------------

load_system = load
"""The first version's name of `load` (it returns the smoothed classifier, whose `sigma` is the
σ the rejector was trained for)."""


def certify(system: nn.Module | Smooth, images: Images, labels: Labels = None, *,
            sigma: float | None = None, N0: int = 100, N: int = 10_000, alpha: float = 0.001,
            batch: int = 1000, bound: str | None = None, seed: int = 0,
            keys: Sequence[int] | None = None, threshold: float | None = None,
            allow_out_of_range: bool = False) -> Certificates:
    """The first version's certify: `Smooth.certify` with the numbers named as dsr-certify's keys
    (N0, N, batch), always a batch.

    Args:
        system: A `Smooth`, a `models.SmoothingSystem`, or any module mapping noisy images to
            labels in {0..K} (K: reject) with `.num_classes` K.
        images: (B, C, H, W), or one image (C, H, W) as a batch of one.
        labels: Integer classes, one per image (they add the `correct` column).
        sigma: σ; default the system's own `.sigma` (another one is refused); required for a
            module without one.
        N0: Selection draws (<= N).
        N: Estimation draws.
        alpha: The failure probability of each certificate, in (0, 1).
        batch: Noisy samples per forward pass.
        bound: "paper", "runner_up" or "cohen"; default paper with a rejector, else cohen.
        seed: The noise seed (see `Smooth.certify`).
        keys: One noise key per image; default 0..B-1.
        threshold: Replaces the system's threshold for this call (see `Smooth.with_threshold`).
        allow_out_of_range: Certify images outside [0, 1] too.

    Returns:
        The batch's certificates.

    Raises:
        ConfigError: A setting out of range (naming it), before any draw.
        DataError: Images or labels that cannot be certified, before any draw.
    """
    n0, n = draws_setting(N0, N)
    alpha = alpha_setting("alpha", alpha)
    batch = int_setting("batch", batch, what=" (noisy samples per forward pass)")
    seed = int_setting("seed", seed, low=0)
    if bound is not None:
        choice_setting("bound", bound, BOUNDS)
    sigma = _sigma(system, sigma)
    if isinstance(system, Smooth):
        allow_out_of_range = allow_out_of_range or system.allow_out_of_range
        if threshold is not None:  # its heads, even where left out at +inf
            system, threshold = system.with_threshold(threshold), None
        system = system.system
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
    g = Smooth(system, k, sigma, allow_out_of_range=allow_out_of_range)
    bound = _bound(bound, g.rejector is not None)
    return g._certify(x, y, n0, n, alpha, batch, bound, ImageNoise(seed, keys))
