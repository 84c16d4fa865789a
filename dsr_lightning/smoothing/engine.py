"""The Monte Carlo engine: noise on the input's device, large chunks that mix images, counting on
the device, one host sync per call. `base(noisy) -> labels` is any callable returning a LongTensor
of labels in {0..K}, K = reject (e.g. models.SmoothingSystem); it is called as is, so put it in
eval mode. sigma is the noise std in pixel units of [0,1] images.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .certify import CertifyDetails, certify_details, predict_counts
from .checks import check_alpha, check_bound, check_positive, check_positive_int

Base = Callable[[torch.Tensor], torch.Tensor]


def _num_classes(base: Base, num_classes: int | None) -> int:
    if num_classes is None:
        num_classes = getattr(base, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes: not given and base has no .num_classes")
    return check_positive_int("num_classes", num_classes)


def sample_counts(base: Base, x: torch.Tensor, n: int | Sequence[int], sigma: float,
                  batch_size: int, num_classes: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Counts of base(x_i + σε) over n independent draws ε ~ N(0, I) per image.

    x: (B, *shape) clean images on any device; noise is drawn there with `generator` (which must
    live on that device). The B·n samples form one stream cut into chunks of <= batch_size that
    mix images; no chunk of noise larger than batch_size is ever held. n may be a sequence of
    stage sizes (n0, n1, ...): each image then gets sum(n) fresh draws, the first n0 counted in
    stage 0, the next n1 in stage 1, ... (independent draws, so stages are separate samples).
    Returns int64 counts on the CPU, (B, K+1) for an int n, (B, S, K+1) for S stages; the last
    column counts the reject label K. The same generator state gives identical counts.
    """
    single = not isinstance(n, Sequence)
    stages = (n,) if single else tuple(n)
    if not stages:
        raise ValueError("n: need at least one stage")
    stages = tuple(check_positive_int("n", s) for s in stages)
    sigma = check_positive("sigma", sigma)
    batch_size = check_positive_int("batch_size", batch_size)
    L = _num_classes(base, num_classes) + 1
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("x must be a floating point tensor (B, *shape)")
    B, S, per, dev = x.shape[0], len(stages), sum(stages), x.device
    ends = torch.tensor(np.cumsum(stages)[:-1], device=dev)  # stage boundaries in an image's draws
    counts = torch.zeros(B * S * L, dtype=torch.long, device=dev)
    with torch.inference_mode():
        for start in range(0, B * per, batch_size):
            stop = min(start + batch_size, B * per)
            j = torch.arange(start, stop, device=dev)  # (b,) position in the stream
            img = j // per  # (b,) which image
            stage = torch.bucketize(j % per, ends, right=True)  # (b,) which stage
            noisy = torch.randn((stop - start, *x.shape[1:]), generator=generator, device=dev,
                                dtype=x.dtype).mul_(sigma).add_(x[img])  # (b, *shape)
            labels = base(noisy).long()  # (b,) in {0..K}
            # scatter_add_ (not bincount, which syncs on CUDA to size its output)
            counts.scatter_add_(0, (img * S + stage) * L + labels, torch.ones_like(labels))
    counts = counts.view(B, S, L).cpu()  # the one host sync
    if (counts.sum(-1) != torch.tensor(stages)).any():
        raise RuntimeError(f"base returned labels outside 0..{L - 1} (reject = {L - 1})")
    return counts[:, 0] if single else counts


@dataclass
class Certificate(CertifyDetails):
    """certify_details for each image (prediction, radius, n_A, ...), plus the raw counts."""
    counts0: np.ndarray  # (B, K+1) the N0 selection draws
    counts: np.ndarray  # (B, K+1) the N estimation draws


class SmoothedClassifier:
    """g_R(x) = argmax over the K real classes c of P(base(x + σε) = c), ε ~ N(0, I).

    base returns labels in {0..K}, K = reject; R is never an answer of g_R. σ in pixel units.
    """

    def __init__(self, base: Base, num_classes: int | None = None, sigma: float = 0.25):
        self.base = base
        self.num_classes = _num_classes(base, num_classes)
        self.sigma = check_positive("sigma", sigma)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                bound: str = "paper", generator: torch.Generator | None = None) -> Certificate:
        """Certify each image of x (B, *shape): c_hat = argmax over real classes of n0 draws
        (ties to the lowest index), then bound its probability with n fresh draws.

        With probability >= 1 - alpha over the noise, separately for each image, if
        prediction != ABSTAIN then g_R(x + δ) = prediction for all ||δ||_2 <= radius
        (see certify_details for the bounds). One pass over the device, one host sync.
        """
        n0, n = check_positive_int("n0", n0), check_positive_int("n", n)
        alpha, bound = check_alpha(alpha), check_bound(bound)
        counts = sample_counts(self.base, x, (n0, n), self.sigma, batch_size, self.num_classes,
                               generator).numpy()  # (B, 2, K+1)
        counts0, counts = counts[:, 0], counts[:, 1]
        c_hat = counts0[:, :-1].argmax(-1)  # (B,) first maximum = lowest index
        d = certify_details(counts, c_hat, self.sigma, alpha, bound)
        return Certificate(**vars(d), counts0=counts0, counts=counts)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> np.ndarray:
        """Predictions (B,) int64, ABSTAIN where unsure. With probability >= 1 - alpha over the
        noise, separately for each image, a returned class equals g_R(x)."""
        alpha = check_alpha(alpha)
        counts = sample_counts(self.base, x, n, self.sigma, batch_size, self.num_classes,
                               generator)
        return predict_counts(counts.numpy(), alpha)
