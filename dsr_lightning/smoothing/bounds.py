"""One-sided Clopper–Pearson bounds on a binomial proportion, vectorised over numpy arrays."""
from __future__ import annotations

import numpy as np
from scipy.stats import beta, norm

from .checks import check_alpha


def _kn(k, n) -> tuple[np.ndarray, np.ndarray]:
    k, n = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    if k.dtype.kind not in "iu" or n.dtype.kind not in "iu":
        raise ValueError(f"k and n must be integers, got dtypes {k.dtype}, {n.dtype}")
    if (k < 0).any() or (k > n).any():
        raise ValueError("need 0 <= k <= n")
    return k.astype(np.int64), n.astype(np.int64)


def _per_pair(fn, k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """fn(k, n) evaluated once per distinct (k, n) pair and spread back: counts over many images
    or count cells repeat the same few pairs, and a Beta quantile costs microseconds each. Each
    element gets exactly the value fn gives it alone (the quantiles are elementwise)."""
    if k.size < 256:
        return fn(k, n)
    n_max = int(n.max()) + 1
    if n_max > 2**31:
        return fn(k, n)
    key, inverse = np.unique(k * n_max + n, return_inverse=True)
    return fn(key // n_max, key % n_max)[inverse.reshape(-1)].reshape(k.shape)


def cp_lower(k, n, alpha: float) -> np.ndarray:
    """p_lower with P(p_lower <= p) >= 1 - alpha for k ~ Binomial(n, p); 0 where k = 0.
    It is < 1 for every n >= 1 (alpha**(1/n) at k = n), so Φ⁻¹ of it is finite."""
    alpha = check_alpha(alpha)
    k, n = _kn(k, n)

    def fn(k, n):
        with np.errstate(invalid="ignore"):
            lo = beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
        return np.where(k == 0, 0.0, lo)
    return _per_pair(fn, k, n)


def cp_upper(k, n, alpha: float) -> np.ndarray:
    """p_upper with P(p <= p_upper) >= 1 - alpha for k ~ Binomial(n, p); 1 where k = n."""
    alpha = check_alpha(alpha)
    k, n = _kn(k, n)

    def fn(k, n):
        with np.errstate(invalid="ignore"):
            hi = beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1))
        return np.where(k == n, 1.0, hi)
    return _per_pair(fn, k, n)


_TINY = np.finfo(np.float64).tiny  # smallest positive normal float


def cp_lower_probit(k, n, alpha: float) -> np.ndarray:
    """Φ⁻¹(cp_lower(k, n, alpha)), computed from the complement 1 − p_lower (a Beta(n−k+1, k)
    quantile) so it stays accurate and finite where p_lower rounds to 1 (huge n): −inf where
    k = 0, else finite. Rounding only ever lowers it (the complement is clamped up to the smallest
    normal float), so a radius built on it is never larger than the exact one."""
    alpha = check_alpha(alpha)
    k, n = _kn(k, n)

    def fn(k, n):
        with np.errstate(invalid="ignore"):
            q = beta.isf(alpha, n - k + 1, np.maximum(k, 1))  # 1 - p_lower
        return np.where(k == 0, -np.inf, norm.isf(np.maximum(q, _TINY)))
    return _per_pair(fn, k, n)


def cp_upper_probit(k, n, alpha: float) -> np.ndarray:
    """Φ⁻¹(cp_upper(k, n, alpha)): +inf where k = n, else finite (p_upper clamped up to the
    smallest normal float, which can only raise it)."""
    return np.where(np.asarray(k) == np.asarray(n), np.inf,
                    norm.ppf(np.maximum(cp_upper(k, n, alpha), _TINY)))
