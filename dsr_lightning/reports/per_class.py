"""Per-class views of a results file: certified accuracy per true class at the report radii, and,
for files with rejected draws (`n_R`), the reject rate (mean n_R/N) per true class and per
predicted class (`c_hat`, the class the certificate is about, for the rows that have one)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .tables import Result, certified_accuracy, radius_key

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def class_name(c: int, settings: dict) -> str:
    """The CIFAR-10 name of class `c` for a CIFAR-10 data set, else its index."""
    data = settings.get("data")
    name = data.get("name", "") if isinstance(data, dict) else ""
    if "CIFAR10" in str(name) and 0 <= c < len(CIFAR10_CLASSES):
        return f"{c} {CIFAR10_CLASSES[c]}"
    return str(c)


def _reject_share(df: pd.DataFrame, settings: dict) -> np.ndarray | None:
    """Per row n_R / N (N from its column, else the record); None without n_R or N."""
    if "n_R" not in df.columns:
        return None
    n = df["N"].to_numpy(dtype=float) if "N" in df.columns else settings.get("N")
    if n is None:
        return None
    return df["n_R"].to_numpy(dtype=float) / n


def per_class_frame(result: Result, radii) -> pd.DataFrame:
    """One row per true class: class, images, acc@r (fraction, NaN where a staged file has no
    answer) and, with n_R, reject (mean n_R/N over the class's images)."""
    df, share = result.frame, _reject_share(result.frame, result.settings)
    rows = []
    for c in sorted(df["label"].unique()):
        sel = (df["label"] == c).to_numpy()
        row = {"class": class_name(int(c), result.settings), "images": int(sel.sum())}
        row.update(zip(map(radius_key, radii), certified_accuracy(df[sel], radii).tolist()))
        if share is not None:
            row["reject"] = float(share[sel].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def reject_by_predicted_class(result: Result) -> pd.DataFrame | None:
    """One row per predicted class c_hat (rows with c_hat >= 0): class, images, reject (mean
    n_R/N); None without n_R, N or c_hat."""
    df, share = result.frame, _reject_share(result.frame, result.settings)
    if share is None or "c_hat" not in df.columns:
        return None
    c_hat = pd.to_numeric(df["c_hat"], errors="coerce").to_numpy(dtype=float)
    rows = []
    for c in sorted(set(c_hat[~np.isnan(c_hat) & (c_hat >= 0)].astype(int))):
        sel = c_hat == c
        rows.append({"class": class_name(int(c), result.settings), "images": int(sel.sum()),
                     "reject": float(share[sel].mean())})
    return pd.DataFrame(rows, columns=["class", "images", "reject"])


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def per_class_markdown(result: Result, label: str, radii) -> str:
    """The per-class tables of one file, under a heading with its label."""
    frame = per_class_frame(result, radii)
    with_reject = "reject" in frame.columns
    head = ["true class", "images", *(f"r={r:g}" for r in radii)] + ["reject %"] * with_reject
    lines = [f"### {label}", "", "Certified accuracy (%) per true class"
             + (" and reject rate (mean n_R/N)" if with_reject else "") + ":", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, row in frame.iterrows():
        cells = [row["class"], str(row["images"]), *(_pct(row[radius_key(r)]) for r in radii)]
        cells += [_pct(row["reject"])] * with_reject
        lines.append("| " + " | ".join(cells) + " |")
    pred = reject_by_predicted_class(result)
    if pred is not None and len(pred):
        lines += ["", "Reject rate (mean n_R/N) per predicted class (c_hat):", "",
                  "| predicted class | images | reject % |", "|---|---:|---:|"]
        lines += [f"| {r['class']} | {r['images']} | {_pct(r['reject'])} |"
                  for _, r in pred.iterrows()]
    return "\n".join(lines) + "\n"
