"""Paired comparisons of two results files certified on the same images with the same noise.

Two files pair when their settings agree on PAIR_KEYS (seed, split, data fingerprint, noise
scheme): image i then saw the same input and the same noise draws in both. They are compared on
the images both hold. At each radius every shared image is certified (correct with radius >= r)
by A only, by B only, by both or by neither; the exact McNemar test (a two-sided binomial test on
the discordant images) says whether A and B differ beyond the choice of test images. The ACR
difference gets a paired, seeded percentile bootstrap interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar

from dsr_lightning.errors import ResultsError
from dsr_lightning.results import network_ids

from .tables import (
    Result,
    average_certified_radius,
    bootstrap_interval,
    certified_mask,
    certified_radii,
)

PAIR_KEYS = ("seed", "split", "data", "noise")  # same images, same noise
SIGNIFICANCE = 0.05


def pairing_mismatch(a: dict, b: dict, keys=PAIR_KEYS) -> str | None:
    """The first of `keys` on which two settings records differ (or that one lacks), else None."""
    for k in keys:
        if a.get(k) is None or b.get(k) is None or a.get(k) != b.get(k):
            return k
    return None


def check_paired(a: Result, b: Result, keys=PAIR_KEYS) -> None:
    """Raise ResultsError naming the setting unless `a` and `b` were certified on the same images
    with the same noise."""
    for r in (a, b):
        if not r.settings:
            raise ResultsError(f"{r.path} has no settings record: cannot tell whether it was "
                               "certified on the same images and noise")
    k = pairing_mismatch(a.settings, b.settings, keys)
    if k is not None:
        raise ResultsError(f"{a.path} and {b.path} do not pair (not the same images and noise): "
                           f"{k} differs ({a.settings.get(k)!r} vs {b.settings.get(k)!r})")


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


@dataclass
class PairedComparison:
    """A against B on their shared images: `table` has one row per radius (r, a_only, b_only,
    both, neither, p: the exact McNemar p-value, NaN where a staged file has no answer)."""

    a: Result
    b: Result
    shared: int
    table: pd.DataFrame
    acr_difference: float  # ACR(A) - ACR(B) on the shared images
    acr_lo: float
    acr_hi: float

    def significant(self, level: float = SIGNIFICANCE) -> pd.DataFrame:
        return self.table[self.table["p"] < level]


def compare(a: Result, b: Result, radii, keys=PAIR_KEYS) -> PairedComparison:
    """The paired comparison of `a` and `b` at `radii` (refused unless they pair, see
    check_paired, and share at least one image)."""
    check_paired(a, b, keys)
    shared = np.intersect1d(a.frame["idx"].to_numpy(), b.frame["idx"].to_numpy())
    if len(shared) == 0:
        raise ResultsError(f"{a.path} and {b.path} share no image: nothing to compare")
    fa = a.frame.set_index("idx").loc[shared].reset_index()
    fb = b.frame.set_index("idx").loc[shared].reset_index()
    radii = np.asarray(radii, dtype=float)
    ma, mb = certified_mask(fa, radii), certified_mask(fb, radii)  # (R, n) with NaN rows
    rows = []
    for r, x, y in zip(radii, ma, mb):
        if np.isnan(x).any() or np.isnan(y).any():
            rows.append({"r": float(r), "a_only": math.nan, "b_only": math.nan, "both": math.nan,
                         "neither": math.nan, "p": math.nan})
            continue
        x, y = x == 1, y == 1
        both, a_only = int((x & y).sum()), int((x & ~y).sum())
        b_only, neither = int((~x & y).sum()), int((~x & ~y).sum())
        p = mcnemar([[both, a_only], [b_only, neither]], exact=True).pvalue
        rows.append({"r": float(r), "a_only": a_only, "b_only": b_only, "both": both,
                     "neither": neither, "p": float(p)})
    diff = average_certified_radius(fa) - average_certified_radius(fb)
    lo, hi = (math.nan, math.nan) if math.isnan(diff) else bootstrap_interval(
        (certified_radii(fa), certified_radii(fb)), _mean_difference)
    return PairedComparison(a, b, len(shared), pd.DataFrame(rows), diff, lo, hi)


def _count(v) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else str(int(v))


def comparison_table(cmp: PairedComparison) -> str:
    """Markdown: per radius the images certified by A only, B only, both, neither, and McNemar's
    exact p-value."""
    lines = ["| r | A only | B only | both | neither | McNemar p |",
             "|---:|---:|---:|---:|---:|---:|"]
    for _, row in cmp.table.iterrows():
        p = "n/a" if math.isnan(row["p"]) else f"{row['p']:.4g}"
        lines.append(f"| {row['r']:g} | " + " | ".join(
            _count(row[k]) for k in ("a_only", "b_only", "both", "neither")) + f" | {p} |")
    return "\n".join(lines) + "\n"


def acr_difference_text(cmp: PairedComparison) -> str:
    if math.isnan(cmp.acr_difference):
        return "ACR difference: n/a (a staged file has no ACR)"
    interval = "" if math.isnan(cmp.acr_lo) else f" [{cmp.acr_lo:+.3f}, {cmp.acr_hi:+.3f}]"
    return (f"ACR difference (A − B): {cmp.acr_difference:+.3f}{interval} (95 % paired bootstrap "
            "over the shared images)")


def significance_sentence(cmp: PairedComparison, label_a: str = "A", label_b: str = "B",
                          level: float = SIGNIFICANCE) -> str:
    """A plain sentence: at which radii A and B differ significantly at `level`, and which way."""
    known = cmp.table[cmp.table["p"].notna()]
    sig = known[known["p"] < level]
    pct = f"{100 * level:g} %"
    if len(known) == 0:
        return "No radius where both files have an answer."
    if len(sig) == 0:
        return (f"No difference between {label_a} and {label_b} is significant at {pct} "
                f"(exact McNemar test) at r = {', '.join(f'{r:g}' for r in known['r'])}.")
    parts = []
    for _, row in sig.iterrows():
        better = label_a if row["a_only"] > row["b_only"] else label_b
        parts.append(f"r = {row['r']:g} ({better} certifies more images, p = {row['p']:.3g})")
    rest = known[known["p"] >= level]
    tail = (f"; not significant at r = {', '.join(f'{r:g}' for r in rest['r'])}"
            if len(rest) else "")
    return (f"{label_a} and {label_b} differ significantly at {pct} (exact McNemar test) at "
            + ", ".join(parts) + tail + ".")


def comparison_markdown(cmp: PairedComparison, label_a: str, label_b: str) -> str:
    """The comparison as Markdown: who A and B are, the shared images, the table, the ACR
    difference and the sentence on significance."""
    return "\n".join([
        f"A = **{label_a}** (`{cmp.a.path}`), B = **{label_b}** (`{cmp.b.path}`): "
        f"{cmp.shared} shared images.", "", comparison_table(cmp), acr_difference_text(cmp) + ".",
        "", significance_sentence(cmp, label_a, label_b), ""])


def baseline_mismatch(rejection: dict, denoised: dict) -> str | None:
    """Why a denoised file is not the baseline of a rejection file, else None. The baseline is the
    same classifier and denoiser (their network ids, from the records: a record of an earlier
    release names none, and pairs with nothing), σ, and the same images and noise (PAIR_KEYS)."""
    if denoised.get("system") != "denoised":
        return "system"
    ids, base = network_ids(rejection), network_ids(denoised)
    for role in ("classifier", "denoiser"):
        if not ids.get(role) or ids.get(role) != base.get(role):
            return role
    if rejection.get("sigma") != denoised.get("sigma"):
        return "sigma"
    return pairing_mismatch(rejection, denoised)


def pair_rejection_with_baseline(results: list[Result]) -> list[tuple[int, int | None]]:
    """(i, j) for each rejection-system file i and the denoised file j that is its baseline
    (baseline_mismatch: the same f, D, σ, images and noise); among several, one with the same
    N0, N, α and mode; j is None where the files hold no baseline for i."""
    pairs = []
    for i, r in enumerate(results):
        if r.settings.get("system") != "rejection":
            continue
        found = [j for j, d in enumerate(results)
                 if baseline_mismatch(r.settings, d.settings) is None]
        same = [j for j in found if all(results[j].settings.get(k) == r.settings.get(k)
                                        for k in ("N0", "N", "alpha", "mode"))]
        pairs.append((i, (same or found or [None])[0]))
    return pairs
