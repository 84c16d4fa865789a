"""Staged certification for one target radius: the certified-accuracy-at-r question with fewer draws.

c_hat comes from N0 selection draws, as in fixed-N certification. Then looks s = 0..S-1 at
cumulative draw counts stages[0] < stages[1] < ... (each stage adds fresh draws to the previous
ones); look s bounds at level α_s = α·w_s (Σ w_s = 1; inside a look the bound splits α_s as the
fixed-N one does: 'paper'/'runner_up' α_s/2 per bound, 'cohen' α_s). An image stops at the first
look whose radius reaches the target (certified), or when the target is out of reach of every
later look even if all remaining draws were c_hat (futility: no α of its own), or at the last look;
it returns the certificate of that look (abstain, or a radius, below the target unless
certified). Only undecided images draw the next stage, so an image certified at 100 draws costs
100 draws. Radii are L2 in pixel units of [0,1] images (the units of σ).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from .certificates import CertifyDetails, certify_details
from .checks import check_alpha, check_bound, check_counts, check_positive, check_positive_int
from .engine import Base, ImageNoise, _num_classes, sample_counts


def default_weights(n_stages: int) -> tuple[float, ...]:
    """The default split of α over the looks: 0.7 for the last look, 0.3 shared 1 : 2 : 4 : ... by
    the earlier ones (three looks: 0.1, 0.2, 0.7; one look: 1)."""
    if n_stages == 1:
        return (1.0,)
    early = [2.0**i for i in range(n_stages - 1)]
    return (*(0.3 * w / sum(early) for w in early), 0.7)


def check_stages(stages, weights) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """stages: strictly increasing cumulative draw counts (>= 1); weights: one positive share of α
    per look, summing to 1 (within 1e-6; they are renormalised so Σ α_s never exceeds α), or None
    for `default_weights`."""
    if isinstance(stages, str | bytes) or not isinstance(stages, Sequence) or not stages:
        raise ValueError(f"stages must be a non-empty list of cumulative draw counts, got {stages!r}")
    if weights is None:
        weights = default_weights(len(stages))
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise ValueError(f"stage_weights must be a list of numbers, got {weights!r}")
    stages = tuple(check_positive_int("stages", s) for s in stages)
    if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise ValueError(f"stages must be strictly increasing cumulative draw counts, got {stages}")
    if len(weights) != len(stages):
        raise ValueError(f"stage_weights must have one weight per stage ({len(stages)}), got "
                         f"{len(weights)}")
    for w in weights:
        if (isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)
                or w <= 0):
            raise ValueError(f"stage_weights must be numbers > 0, got {list(weights)}")
    total = math.fsum(weights)
    if abs(total - 1) > 1e-6:
        raise ValueError(f"stage_weights must sum to 1 (shares of alpha), got sum {total:.6g}")
    return stages, tuple(float(w) / total for w in weights)


def staged_look(counts, c_hat, look: int, stages, weights, alpha: float, sigma: float,
                radius: float, bound: str = "paper", futility: bool = True
                ) -> tuple[CertifyDetails, np.ndarray, np.ndarray]:
    """The decision at look `look` from the cumulative counts (..., K+1) of its stages[look] draws.

    Returns (the certificate of this look at α·weights[look], certified, stop): certified where its
    radius >= the target radius; stop where certified, at the last look, or (futility) where no
    later look s' reaches the target even with all stages[s'] − stages[look] remaining draws on
    c_hat at α·weights[s'] — the best case of every bound, as each CP bound is monotone in its
    count — so futility never stops an image that could still be certified.
    """
    counts, c_hat = check_counts(counts, c_hat)
    stages, weights = check_stages(stages, weights)
    radius = check_positive("radius", radius)
    if (counts.sum(-1) != stages[look]).any():
        raise ValueError(f"counts of look {look} must sum to stages[{look}] = {stages[look]}")
    d = certify_details(counts, c_hat, sigma, alpha * weights[look], bound)
    certified = d.radius >= radius
    stop = certified | (look == len(stages) - 1)
    if futility:
        reachable = np.zeros_like(stop)
        for later in range(look + 1, len(stages)):
            best = counts.copy()
            np.put_along_axis(best, c_hat[..., None],
                              np.take_along_axis(best, c_hat[..., None], -1)
                              + stages[later] - stages[look], -1)
            rho = certify_details(best, c_hat, sigma, alpha * weights[later], bound).radius
            reachable |= rho >= radius
        stop |= ~reachable
    return d, certified, stop


@dataclass
class StagedCertificate(CertifyDetails):
    """The certificate of each image's stopping look (prediction, radius, n_A, ..., N, pA_lower, ...
    as certify_details at α·weights[stage]; `alpha` is the overall α), plus:"""
    certified: np.ndarray  # bool: radius >= target (prediction != ABSTAIN then)
    stage: np.ndarray  # int64: index of the stopping look
    draws: np.ndarray  # int64: all base evaluations of the image, N0 + N
    counts0: np.ndarray  # (B, K+1) the N0 selection draws
    counts: np.ndarray  # (B, K+1) the N cumulative draws of the stopping look
    target: float
    stages: tuple[int, ...]
    weights: tuple[float, ...]

    def columns(self) -> dict[str, np.ndarray]:
        """The per-image arrays by name, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}


def certify_staged(base: Base, x: torch.Tensor, n0: int, stages: Sequence[int],
                   weights: Sequence[float] | None, alpha: float, sigma: float, radius: float,
                   batch_size: int, bound: str = "paper", num_classes: int | None = None,
                   generator: torch.Generator | None = None, futility: bool = True,
                   noise: ImageNoise | None = None, allow_out_of_range: bool = False
                   ) -> StagedCertificate:
    """Certify each image of x (B, *shape) at the target `radius` with the staged design (above).

    Guarantee, separately for each image: with probability >= 1 − α over the noise, if
    prediction != ABSTAIN then g_R(x + δ) = prediction for every ||δ||_2 <= radius (the radius
    returned, the bound of the stopping look; >= the target where `certified`). Why: given c_hat,
    the cumulative counts of look s are a Multinomial(stages[s], p) sample whatever was decided
    before (each stage's draws are fresh), so the bound of look s fails with probability
    <= α·w_s; the certificate returned is the bound of one look, so it is wrong only if some
    look's bound fails: probability <= Σ_s α·w_s = α (union bound; the stopping rule is free).

    One host sync per stage (stage 0 draws the N0 and the first stage together). Noise as in
    sample_counts: `noise` (per-image streams, continued from look to look) or `generator`.
    """
    n0, alpha, bound = check_positive_int("n0", n0), check_alpha(alpha), check_bound(bound)
    sigma, radius = check_positive("sigma", sigma), check_positive("radius", radius)
    stages, weights = check_stages(stages, weights)
    K = _num_classes(base, num_classes)
    first = sample_counts(base, x, (n0, stages[0]), sigma, batch_size, K, generator, noise,
                          allow_out_of_range).numpy()
    counts0, cum = first[:, 0], first[:, 1].copy()  # (B, K+1) each
    c_hat = counts0[:, :-1].argmax(-1)  # (B,) first maximum = lowest index
    B = len(c_hat)
    out: dict[str, np.ndarray] = {}
    stage = np.full(B, -1, dtype=np.int64)
    live = np.arange(B)  # images still undecided
    for s in range(len(stages)):
        if s > 0:
            sel = torch.as_tensor(live, device=x.device)
            sub = noise.subset(live) if noise is not None else None
            cum[live] += sample_counts(base, x[sel], stages[s] - stages[s - 1], sigma, batch_size,
                                       K, generator, sub, allow_out_of_range).numpy()
            if sub is not None:
                noise.pos[live] = sub.pos
        d, certified, stop = staged_look(cum[live], c_hat[live], s, stages, weights, alpha, sigma,
                                         radius, bound, futility)
        done = live[stop]
        for name, v in {**d.columns(), "certified": certified}.items():
            out.setdefault(name, np.zeros(B, dtype=v.dtype))[done] = v[stop]
        stage[done] = s
        live = live[~stop]
        if not len(live):
            break
    return StagedCertificate(**out, bound=bound, alpha=alpha, sigma=sigma, stage=stage,
                             draws=n0 + out["N"], counts0=counts0,
                             counts=cum, target=radius, stages=stages, weights=weights)
