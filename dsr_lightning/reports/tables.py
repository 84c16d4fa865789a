"""Result files of certify.py and the numbers the paper reports from them.

A result file is a TSV with one header line and one row per image; its first columns are those of
Cohen et al.'s scripts (`idx label predict radius correct time`), so `pandas.read_csv(f, sep="\\t")`
reads it. `predict` is -1 on abstain (radius 0 then). Counts follow: `n_A` (selected class), `n_R`
(rejected draws), `n_B` (strongest other real class), `N` (estimation draws). The run's settings
are a JSON file beside it: `<file>.json`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dsr_lightning.errors import ResultsError
from dsr_lightning.results import REQUIRED_COLUMNS, read_settings, read_table

RADIUS_STEP = 0.25  # default table grid, in units of the l2 radius (pixel scale of [0,1] images)


def load_results(path, required=REQUIRED_COLUMNS) -> pd.DataFrame:
    """One row per image (dsr_lightning.results.read_table: a duplicated image or an unparsable
    row is refused, naming the line; a binary or empty file too). Raises FileNotFoundError, or
    ValueError (ResultsError) naming the file, also when it lacks one of `required`. A header-only
    file gives zero rows."""
    df = read_table(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = " (mode=predict output? reports need certify)" if missing == ["radius"] else ""
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}{hint}; "
                           f"found {', '.join(df.columns) or 'none'}")
    return df


def load_settings(path) -> dict:
    """The run's settings from `<path>.json`; {} when there is none (ResultsError if corrupt)."""
    return read_settings(path)


def certified_accuracy(df: pd.DataFrame, radii) -> np.ndarray:
    """Fraction of ALL rows that are correct with radius >= r, for each r (Cohen et al.'s
    definition); at r = 0 this is the clean accuracy of the smoothed classifier. NaN if no rows."""
    radii = np.atleast_1d(np.asarray(radii, dtype=float))  # (R,)
    if len(df) == 0:
        return np.full(radii.shape, np.nan)
    ok = df["correct"].to_numpy() == 1  # (n,)
    rad = df["radius"].to_numpy(dtype=float)  # (n,)
    return (ok[None, :] & (rad[None, :] >= radii[:, None])).mean(axis=1)  # (R,)


def average_certified_radius(df: pd.DataFrame) -> float:
    """Mean of radius * correct over all rows (ACR); NaN if no rows."""
    if len(df) == 0:
        return math.nan
    return float((df["radius"].to_numpy(dtype=float) * (df["correct"].to_numpy() == 1)).mean())


def clean_accuracy(df: pd.DataFrame) -> float:
    """Accuracy of the smoothed classifier: certified accuracy at r = 0."""
    return float(certified_accuracy(df, [0.0])[0])


def abstain_rate(df: pd.DataFrame) -> float:
    """Fraction of rows where the smoothed classifier abstained (predict == -1)."""
    return float((df["predict"].to_numpy() == -1).mean()) if len(df) else math.nan


def reject_fraction(df: pd.DataFrame, N=None) -> float | None:
    """Mean over images of n_R / N (rejected share of the estimation draws); None when the file
    has no n_R column or no N is known (column N, else the argument)."""
    if "n_R" not in df.columns or len(df) == 0:
        return None
    n = df["N"].to_numpy(dtype=float) if "N" in df.columns else N
    if n is None:
        return None
    return float((df["n_R"].to_numpy(dtype=float) / n).mean())


def default_radii(max_radius: float, step: float = RADIUS_STEP, at_least: float = 1.0):
    """0, step, ... up to max_radius rounded up to the step, and at least up to `at_least`."""
    top = max(at_least, math.ceil(round(max_radius / step, 9)) * step)
    return np.round(np.arange(round(top / step) + 1) * step, 6)


def file_label(path) -> str:
    """A results file's name without `.tsv` (never its stem: the reference scripts' files are
    named `sigma_0.25`, `sigma_0.50`, whose stems would collapse into `sigma_0`)."""
    name = Path(path).name
    return name[:-4] if name.endswith(".tsv") else name


def display_label(path, settings: dict) -> str:
    """settings['label'], else e.g. 'rejection dncnn (mse_obj) σ=0.25 T=20 (paper)' built from the
    settings record, else the file's name."""
    if settings.get("label"):
        return str(settings["label"])
    system = settings.get("system")
    if not system:
        return file_label(path)
    parts = [str(system)]
    run = settings.get("run") or {}
    den = run.get("denoiser") or settings.get("denoiser")
    if isinstance(den, str) and den and "/" not in den and "." not in den:
        # a short name like "dncnn"; paths say nothing useful here
        parts.append(den + (f" ({run['objective']})" if run.get("objective") else ""))
    if settings.get("sigma") is not None:
        parts.append(f"σ={float(settings['sigma']):g}")
    if run.get("T") is not None:
        parts.append(f"T={int(run['T'])}")
    if system == "rejection" and settings.get("bound"):
        parts.append(f"({settings['bound']})")
    if settings.get("mode") == "staged":
        # staged files answer one question: only the certified accuracy at this radius is
        # comparable with fixed-N files (their radii stop once the target is reached)
        parts.append(f"[staged, target r={float(settings['radius']):g}]")
    return " ".join(parts)


def resolve_labels(paths, settings, labels=None) -> list[str]:
    """The given labels (one per file), else `display_label` of each, made unique by file name
    (then by folder)."""
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} files")
        return [str(lab) for lab in labels]
    out = [display_label(p, s) for p, s in zip(paths, settings)]
    # two runs with the same settings: tell them apart by file, then by folder
    out = [f"{lab} [{file_label(p)}]" if out.count(lab) > 1 else lab for p, lab in zip(paths, out)]
    return [f"{lab} [{Path(p).parent.name}/{file_label(p)}]" if out.count(lab) > 1 else lab
            for p, lab in zip(paths, out)]


def _radius_key(r: float) -> str:
    return f"acc@{r:g}"


def summary_frame(paths, radii=None, labels=None, frames=None) -> pd.DataFrame:
    """One row of numbers per file: label, file, images, acc@r for each radius (fractions), acr,
    abstain, reject (mean n_R/N, NaN without n_R), time_s (mean seconds per image, if numeric).
    Default radii: see `default_radii` over the largest radius of all files."""
    paths = [Path(p) for p in paths]
    frames = frames if frames is not None else [load_results(p) for p in paths]
    settings = [load_settings(p) for p in paths]
    if radii is None:
        radii = default_radii(max((float(df["radius"].max()) for df in frames if len(df)),
                                  default=0.0))
    radii = np.asarray(radii, dtype=float)
    rows = []
    names = resolve_labels(paths, settings, labels)
    for path, df, st, lab in zip(paths, frames, settings, names):
        row = {"label": lab, "file": str(path), "images": len(df)}
        row.update(zip(map(_radius_key, radii), certified_accuracy(df, radii).tolist()))
        rej = reject_fraction(df, st.get("N"))
        row.update(acr=average_certified_radius(df), abstain=abstain_rate(df),
                   reject=math.nan if rej is None else rej)
        t = df["time"] if "time" in df.columns else None
        row["time_s"] = float(t.mean()) if t is not None and pd.api.types.is_numeric_dtype(t) \
            and len(df) else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["radii"] = radii.tolist()
    return frame


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """Markdown of a `summary_frame`: certified accuracy (%) at each radius, ACR, images, abstain %,
    and reject % when some file rejected draws."""
    radii = frame.attrs["radii"]
    with_reject = bool((frame["reject"].fillna(0) > 0).any())
    head = ["system", *(f"r={r:g}" for r in radii), "ACR", "images", "abstain %"]
    head += ["reject %"] * with_reject
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for _, row in frame.iterrows():
        cells = [row["label"].replace("|", "\\|"), *(_pct(row[_radius_key(r)]) for r in radii),
                 "–" if math.isnan(row["acr"]) else f"{row['acr']:.3f}", str(row["images"]),
                 _pct(row["abstain"])]
        cells += [_pct(row["reject"])] * with_reject
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(paths, radii=None, labels=None) -> str:
    """Markdown table, one row per result file; see `summary_frame` and `markdown_table`."""
    return markdown_table(summary_frame(paths, radii, labels))
