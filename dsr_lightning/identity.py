"""What a network and a system are, as results records and checkpoints name them (DESIGN §8): the
id of a network (its recipe and weights), the id of a system (its networks and threshold), and
the comparison of two probe sketches (models.fingerprint takes them). Imports nothing of the
package: results, reports, models and jobs all use it.

Two sketches agree when their largest difference is within a tolerance of the recorded one's scale
(its largest absolute value): float rounding (threads, another CPU) stays far below
SAME_DEVICE_TOL, another device type (TF32 convolutions) below OTHER_DEVICE_TOL, while another
network (other weights, an argument its weights imply, a random buffer) differs by orders of
magnitude more.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

SAME_DEVICE_TOL = 1e-4
OTHER_DEVICE_TOL = 2e-2
# recipe entries that say where a network came from or how it is described, not what it computes
NOT_IDENTITY = ("name", "path", "normalisation", "strip_prefix", "weights", "trust_pickle",
                "probe", "state_sha256", "role")


def network_id(role: str, recipe: dict) -> str:
    """16 hex digits of sha256 over what a network computes: its recipe without the entries that
    only say where it came from (NOT_IDENTITY: a file's path, names), and its weights' hash
    (`state_sha256`). The same network read from another file or folder has the same id."""
    core = {k: v for k, v in recipe.items() if k not in NOT_IDENTITY}
    text = json.dumps({"role": role, "recipe": core, "weights": recipe.get("state_sha256")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def system_id(system: str, ids: dict, threshold: float | None) -> str:
    """8 hex digits naming a system: its kind, the ids of its networks and its threshold (results
    files carry it in their names, so two systems never share a file)."""
    text = json.dumps({"system": system, "networks": ids,
                       "threshold": None if threshold is None else repr(float(threshold))},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def sketch_difference(recorded: Sequence[Sequence[float]], now: Sequence[Sequence[float]]) -> float:
    """The largest difference of two probe sketches relative to the recorded one's scale (inf when
    their shapes differ or `now` is not finite)."""
    a, b = np.asarray(recorded, dtype=np.float64), np.asarray(now, dtype=np.float64)
    if a.shape != b.shape or not np.isfinite(b).all():
        return math.inf
    if not a.size:
        return 0.0
    return float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-12)


def tolerance(recorded_device: str | None, device: str | None) -> float:
    """The sketch tolerance between probes taken on these device types."""
    return SAME_DEVICE_TOL if recorded_device == device or None in (recorded_device, device) \
        else OTHER_DEVICE_TOL
