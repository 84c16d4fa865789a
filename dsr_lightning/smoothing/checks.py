"""Argument checks shared by the smoothing statistics, the engine and the entry points.

`check_*` raise ValueError naming the argument and saying why (the engine's own arguments).
`*_setting` are the range rules of the settings a user gives, written once for dsr-certify and
dsr-train (config/schema.py) and the Python API (api.py): each raises one ConfigError
`key=value: must be ...` naming the key (a config key or an API argument). All return the cleaned
value.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from dsr_lightning.errors import ConfigError

BOUNDS = ("paper", "runner_up", "cohen")
SIGMA_UNITS = " (the Gaussian noise std, in pixel units of [0,1] images)"


def check_alpha(alpha, name: str = "alpha") -> float:
    """alpha must be a real number in the open interval (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def check_positive_int(name: str, value) -> int:
    """value must be an integer >= 1 (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """value must be a finite real number > 0 (e.g. sigma, in pixel units of [0,1] images)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_bound(bound) -> str:
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}; got {bound!r}")
    return bound


def check_counts(counts, c_hat=None) -> tuple[np.ndarray, np.ndarray | None]:
    """counts: non-negative integers (..., K+1), last column = reject, K >= 1.
    c_hat (optional): integers of shape counts.shape[:-1], each a real class in 0..K-1."""
    counts = np.asarray(counts)
    if counts.ndim < 1 or counts.shape[-1] < 2:
        raise ValueError(f"counts must have shape (..., K+1) with K+1 >= 2 columns (last = reject),"
                         f" got shape {counts.shape}")
    if counts.dtype.kind not in "iu":
        raise ValueError(f"counts must be integers, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    if c_hat is None:
        return counts, None
    c_hat = np.asarray(c_hat)
    if c_hat.shape != counts.shape[:-1]:
        raise ValueError(f"c_hat must have shape counts.shape[:-1] = {counts.shape[:-1]},"
                         f" got {c_hat.shape}")
    if c_hat.dtype.kind not in "iu":
        raise ValueError(f"c_hat must be integers, got dtype {c_hat.dtype}")
    K = counts.shape[-1] - 1
    if ((c_hat < 0) | (c_hat >= K)).any():
        raise ValueError(f"c_hat must be a real class in 0..{K - 1} (never the reject column {K})")
    return counts, c_hat.astype(np.int64)


# --- settings (config keys and API arguments): one ConfigError naming the key --------------------

def real_setting(key: str, value, *, low: float | None = None, strict: bool = True,
                 what: str = "") -> float:
    """A finite real number (bool refused), > low (>= low unless strict) when low is given."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (low is None or (value > low if strict else value >= low)))
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{key}={value}: must be a finite number{bound}{what}")
    return float(value)


def int_setting(key: str, value, low: int = 1, what: str = "") -> int:
    """An integer >= low (bool and whole floats refused: 100.0 is a typo, not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{key}={value}: must be an integer >= {low}{what}")
    return int(value)


def choice_setting(key: str, value, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    return value


def sigma_setting(key: str, value, strict: bool = True) -> float:
    """σ: finite and > 0 (>= 0 unless strict), in pixel units of [0,1] images."""
    return real_setting(key, value, low=0, strict=strict, what=SIGMA_UNITS)


def alpha_setting(key: str, value) -> float:
    try:
        return check_alpha(value, key)
    except ValueError:
        raise ConfigError(f"{key}={value}: must be a number in (0, 1) (the failure probability "
                          "of each certificate, e.g. 0.01)") from None


def threshold_setting(key: str, value) -> float:
    """The decision threshold f_R certifies with (a logit: reject iff the head's logit > it): any
    real number but NaN (f_R would silently become another system); +inf never rejects, −inf
    rejects every draw (every certificate then abstains)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{key}={value}: must be a number (a logit: reject iff the head's "
                          "logit > it; inf: never reject)")
    return float(value)


def draws_setting(n0, n, prefix: str = "", names: tuple[str, str] = ("N0", "N")
                  ) -> tuple[int, int]:
    """N0 selection and N estimation draws: integers >= 1, N0 <= N. `names`: what the two are
    called where they are given (("N0", "N") in the configs, ("n0", "n") in the Python API)."""
    a, b = (f"{prefix}{name}" for name in names)
    n0, n = int_setting(a, n0), int_setting(b, n)
    if n0 > n:
        raise ConfigError(f"{a}={n0} > {b}={n}: the selection draws {names[0]} should be a "
                          f"small fraction of the estimation draws {names[1]} (e.g. "
                          f"{names[0]}=100, {names[1]}=10000)")
    return n0, n
