"""Certificates and predictions of the smoothed classifier g_R from Monte Carlo counts.

counts have shape (..., K+1): how often the base classifier with rejection f_R returned each of
the K real classes and, in the last column, the reject class R. Radii are L2, in the pixel units
of [0,1] images (the units of sigma).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.stats import binomtest

from .bounds import cp_lower, cp_lower_probit, cp_upper, cp_upper_probit
from .checks import check_alpha, check_bound, check_counts, check_positive

ABSTAIN = -1


@dataclass
class CertifyDetails:
    """One certificate per image; every array has the leading shape (...) of the counts.
    pAR_lower is NaN for 'runner_up' and 'cohen', pB_upper is NaN for 'paper' and 'cohen'."""
    prediction: np.ndarray  # int64, ABSTAIN (-1) on abstain
    radius: np.ndarray  # float64, 0.0 on abstain
    c_hat: np.ndarray  # the selected class the bounds refer to (from the separate N0 draws)
    n_A: np.ndarray  # count of c_hat among the N draws
    n_R: np.ndarray  # count of the reject class
    n_B: np.ndarray  # largest count of a real class other than c_hat (0 when K = 1)
    N: np.ndarray  # number of draws
    pA_lower: np.ndarray
    pAR_lower: np.ndarray
    pB_upper: np.ndarray
    bound: str
    alpha: float
    sigma: float

    def columns(self) -> dict[str, np.ndarray]:
        """The per-image arrays by name (what a results file records), in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("bound", "alpha", "sigma")}


def certify_details(counts, c_hat, sigma: float, alpha: float, bound: str = "paper"
                    ) -> CertifyDetails:
    """Certify from the counts of N fresh draws, for the class c_hat chosen on separate draws.

    With probability >= 1 - alpha over the N draws (for any fixed c_hat), if the prediction is
    not ABSTAIN then g_R(x + δ) = prediction for every ||δ||_2 <= radius. bound:
      'paper'     Theorem 3.1: ρ = σ/2·(Φ⁻¹(p_A) + Φ⁻¹(p_AR)), p_A, p_AR one-sided CP at α/2 each;
      'runner_up' ρ = σ/2·(Φ⁻¹(p_A) − Φ⁻¹(p_B)), p_B = CP upper at α/2 of the largest count of a
                  real class ≠ c_hat; never smaller than 'paper' on the same counts;
      'cohen'     ρ = σ·Φ⁻¹(p_A), p_A one-sided CP at α (R counts against c_hat; the baseline
                  for systems without rejector, Cohen et al. 2019).
    Abstains unless ρ > 0 ('cohen': unless p_A > 1/2, the same thing).
    """
    counts, c_hat = check_counts(counts, c_hat)
    sigma, alpha, bound = check_positive("sigma", sigma), check_alpha(alpha), check_bound(bound)
    K = counts.shape[-1] - 1
    N = counts.sum(-1)
    n_A = np.take_along_axis(counts, c_hat[..., None], -1)[..., 0]
    n_R = counts[..., K]
    others = counts[..., :K].copy()
    np.put_along_axis(others, c_hat[..., None], -1, -1)
    n_B = np.maximum(others.max(-1), 0)  # K = 1: no other real class
    nan = np.full(N.shape, np.nan)
    pAR = pB = nan
    # The probits come from the complements (bounds.cp_lower_probit), so ρ stays finite even where
    # a bound rounds to 1 (huge N): -inf where n_A = 0 or n_B = N (then n_A = 0 too), never +inf,
    # never NaN; N = 0 gives -inf as well, hence abstain.
    with np.errstate(divide="ignore", invalid="ignore"):
        if bound == "cohen":
            pA = cp_lower(n_A, N, alpha)
            rho = sigma * cp_lower_probit(n_A, N, alpha)
        elif bound == "paper":
            pA, pAR = cp_lower(n_A, N, alpha / 2), cp_lower(n_A + n_R, N, alpha / 2)
            rho = sigma / 2 * (cp_lower_probit(n_A, N, alpha / 2)
                               + cp_lower_probit(n_A + n_R, N, alpha / 2))
        else:
            pA, pB = cp_lower(n_A, N, alpha / 2), cp_upper(n_B, N, alpha / 2)
            rho = sigma / 2 * (cp_lower_probit(n_A, N, alpha / 2)
                               - cp_upper_probit(n_B, N, alpha / 2))
    ok = rho > 0
    return CertifyDetails(
        prediction=np.where(ok, c_hat, ABSTAIN).astype(np.int64),
        radius=np.where(ok, rho, 0.0).astype(np.float64),
        c_hat=c_hat, n_A=n_A, n_R=n_R, n_B=n_B, N=N,
        pA_lower=np.asarray(pA, dtype=np.float64), pAR_lower=np.asarray(pAR, dtype=np.float64),
        pB_upper=np.asarray(pB, dtype=np.float64), bound=bound, alpha=alpha, sigma=sigma)


def certify_counts(counts, c_hat, sigma: float, alpha: float, bound: str = "paper"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) of certify_details: ABSTAIN / 0.0 where not certified."""
    d = certify_details(counts, c_hat, sigma, alpha, bound)
    return d.prediction, d.radius


def predict_counts(counts, alpha: float) -> np.ndarray:
    """Algorithm 1 (Cohen et al.) on the real classes (the reject column is dropped).

    Returns the top real class, or ABSTAIN where the two-sided binomial test of the top two counts
    against 1/2 has p-value > alpha or both are 0. With probability >= 1 - alpha over the draws, a
    returned class is g_R(x) (Hung & Fithian; given the reject draws the real-class counts are
    multinomial with the same argmax). Ties go to the lowest index, then the test abstains.
    """
    counts, _ = check_counts(counts)
    alpha = check_alpha(alpha)
    real = counts[..., :-1]  # (..., K)
    order = np.argsort(-real, axis=-1, kind="stable")
    c_A = order[..., 0]
    n_A = np.take_along_axis(real, order[..., :1], -1)[..., 0]
    n_B = (np.take_along_axis(real, order[..., 1:2], -1)[..., 0] if real.shape[-1] > 1
           else np.zeros_like(n_A))
    # binomtest is scalar: test each distinct (n_A, n_B) pair once
    pairs, inverse = np.unique(np.stack([n_A.ravel(), n_B.ravel()], 1), axis=0, return_inverse=True)
    pval = np.array([binomtest(int(a), int(a + b), 0.5).pvalue if a + b > 0 else 1.0
                     for a, b in pairs])
    keep = (pval[inverse.ravel()] <= alpha).reshape(n_A.shape)
    return np.where(keep, c_A, ABSTAIN).astype(np.int64)
