"""Argument checks shared by the smoothing statistics, the engine and the certify entry point.

Each raises ValueError naming the argument and saying why, and returns the cleaned value.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

BOUNDS = ("paper", "runner_up", "cohen")


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
