"""Result files of dsr-certify and the numbers the paper reports from them, with their uncertainty.

A result file is a TSV with one header line and one row per image; its first columns are those of
Cohen et al.'s scripts (`idx label predict radius correct time`), so `pandas.read_csv(f, sep="\\t")`
reads it. `predict` is -1 on abstain (radius 0 then). Counts follow: `n_A` (selected class), `n_R`
(rejected draws), `n_B` (strongest other real class), `N` (estimation draws). The run's settings
are a JSON file beside it: `<file>.json` (dsr_lightning.results is the only reader of the format).

Every number here is computed from the radii exactly as written (never rounded). A file written
with mode=staged answers one question only, certified accuracy at its target radius, and that
from its `certified_at_target` column; at other radii (and for its ACR) it has no answer (NaN,
shown as n/a).

Uncertainty: each certificate holds with probability >= 1 - alpha over the Monte Carlo noise; the
intervals here are about the choice of test images: a 95 % Clopper-Pearson interval for a
certified accuracy (a count of images out of n), and a seeded percentile bootstrap for the ACR.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from statsmodels.stats.proportion import proportion_confint

from dsr_lightning.errors import ResultsError
from dsr_lightning.results import REQUIRED_COLUMNS, identity_of, read_settings, read_table

RADIUS_STEP = 0.25  # default table grid, in units of the l2 radius (pixel scale of [0,1] images)
CONFIDENCE = 0.95  # of every interval in the reports (over the choice of test images)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
SETTING_COLUMNS = ("sigma", "T", "denoiser", "objective", "system")  # the table by setting
_SETTING_HEAD = {"sigma": "σ", "T": "T", "denoiser": "denoiser", "objective": "objective",
                 "system": "system"}


# -- reading ------------------------------------------------------------------------------------
def load_results(path, required=REQUIRED_COLUMNS) -> pd.DataFrame:
    """One row per image (dsr_lightning.results.read_table: a duplicated image or an unparsable
    row is refused, naming the line; a binary or empty file too). Raises FileNotFoundError, or
    ValueError (ResultsError) naming the file, also when it lacks one of `required`. A header-only
    file gives zero rows."""
    return check_columns(path, read_table(path), required)


def check_columns(path, df: pd.DataFrame, required=REQUIRED_COLUMNS) -> pd.DataFrame:
    """`df`, unless it lacks one of `required` (ResultsError naming the file and the columns)."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = " (mode=predict output? reports need certify)" if missing == ["radius"] else ""
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}{hint}; "
                           f"found {', '.join(df.columns) or 'none'}")
    return df


@dataclass
class Result:
    """A results file read once: its path, its rows (one per image) and its settings record."""

    path: Path
    frame: pd.DataFrame
    settings: dict


def read_result(path, required=REQUIRED_COLUMNS) -> Result:
    """The file and its settings record, each read once (see load_results)."""
    path = Path(path)
    return Result(path, load_results(path, required), read_settings(path))


# -- the numbers --------------------------------------------------------------------------------
def is_staged(df: pd.DataFrame) -> bool:
    """Written with mode=staged: it only knows whether each image is certified at its target."""
    return "certified_at_target" in df.columns


def staged_target(df: pd.DataFrame) -> float:
    """The target radius of a staged file (NaN for other files, or without rows)."""
    if not is_staged(df) or len(df) == 0:
        return math.nan
    return float(df["target_radius"].iloc[0])


def certified_mask(df: pd.DataFrame, radii) -> np.ndarray:
    """(R, n) floats: 1 where image j is correct with a certificate of radius >= radii[i], else 0
    (radius >= r is inclusive, on the radii as written). A staged file knows this only at its
    target radius (from `certified_at_target`): its other rows are NaN."""
    radii = np.atleast_1d(np.asarray(radii, dtype=float))  # (R,)
    ok = df["correct"].to_numpy() == 1  # (n,)
    if is_staged(df):
        hit = (ok & (df["certified_at_target"].to_numpy() == 1)).astype(float)  # (n,)
        known = np.isclose(radii, staged_target(df), rtol=0, atol=1e-12)  # (R,)
        return np.where(known[:, None], hit[None, :], np.nan)
    rad = df["radius"].to_numpy(dtype=float)  # (n,)
    return (ok[None, :] & (rad[None, :] >= radii[:, None])).astype(float)  # (R, n)


def certified_counts(df: pd.DataFrame, radii) -> np.ndarray:
    """(R,) number of images certified correct at each radius (NaN where the file cannot say)."""
    mask = certified_mask(df, radii)
    return mask.sum(axis=1)  # NaN rows stay NaN


def certified_accuracy(df: pd.DataFrame, radii) -> np.ndarray:
    """Fraction of ALL rows that are correct with radius >= r, for each r (Cohen et al.'s
    definition); at r = 0 this is the clean accuracy of the smoothed classifier. NaN if no rows,
    and for a staged file at any radius but its target."""
    radii = np.atleast_1d(np.asarray(radii, dtype=float))
    if len(df) == 0:
        return np.full(radii.shape, np.nan)
    return certified_counts(df, radii) / len(df)


def clopper_pearson(k, n: int, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) interval for k successes of n, elementwise; NaN for NaN k or n=0."""
    k = np.atleast_1d(np.asarray(k, dtype=float))
    lo, hi = np.full(k.shape, np.nan), np.full(k.shape, np.nan)
    ok = ~np.isnan(k)
    if n > 0 and ok.any():
        lo[ok], hi[ok] = proportion_confint(k[ok], n, alpha=1 - confidence, method="beta")
    return lo, hi


def certified_radii(df: pd.DataFrame) -> np.ndarray:
    """Per image radius * correct: what the ACR averages."""
    return df["radius"].to_numpy(dtype=float) * (df["correct"].to_numpy() == 1)


def average_certified_radius(df: pd.DataFrame) -> float:
    """Mean of radius * correct over all rows (ACR); NaN if no rows, or for a staged file (its
    radii stop once the target is reached)."""
    if len(df) == 0 or is_staged(df):
        return math.nan
    return float(certified_radii(df).mean())


def bootstrap_interval(samples, statistic, confidence: float = CONFIDENCE,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap (BOOTSTRAP_RESAMPLES resamples of the images, seeded) of
    `statistic(*samples, axis)`; paired when there are several samples. NaN for < 2 images."""
    if len(samples[0]) < 2:
        return math.nan, math.nan
    res = bootstrap(tuple(samples), statistic, n_resamples=BOOTSTRAP_RESAMPLES, batch=250,
                    vectorized=True, paired=len(samples) > 1, confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def acr_interval(df: pd.DataFrame, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Bootstrap interval of the ACR over the test images (NaN where the ACR is)."""
    if math.isnan(average_certified_radius(df)):
        return math.nan, math.nan
    return bootstrap_interval((certified_radii(df),), _mean, confidence)


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


# -- labels -------------------------------------------------------------------------------------
def file_label(path) -> str:
    """A results file's name without `.tsv` (never its stem: the reference scripts' files are
    named `sigma_0.25`, `sigma_0.50`, whose stems would collapse into `sigma_0`)."""
    name = Path(path).name
    return name[:-4] if name.endswith(".tsv") else name


def describe(settings: dict) -> dict:
    """σ, T, denoiser, objective, system, bound, mode, N and the classifier (name#id) of a results
    file, from its record."""
    run = settings.get("run") or {}
    return {"sigma": settings.get("sigma"), "T": run.get("T"), "denoiser": run.get("denoiser"),
            "objective": run.get("objective"), "system": settings.get("system"),
            "bound": settings.get("bound"), "mode": settings.get("mode"), "N": settings.get("N"),
            "classifier": network_name(settings, "classifier") or run.get("classifier")}


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


def network_name(settings: dict, role: str) -> str | None:
    """A network of a record as reports name it: 'dncnn_tiny#1a2b3c' (its recipe's name and the
    first digits of its id); for a record of an earlier release the first digits of its weights
    file's hash; None if the record names no such network."""
    fp = (settings.get("networks") or {}).get(role)
    if fp:
        name = (fp.get("recipe") or {}).get("name") or role
        return f"{name}#{str(fp.get('id'))[:6]}"
    sha = settings.get(f"{role}_sha256")
    return f"#{sha[:6]}" if sha else None


def _data_name(settings: dict) -> str | None:
    data = settings.get("data")
    if not isinstance(data, dict):
        return None
    return f"{data.get('name')}#{str(data.get('fingerprint'))[:6]}"


# What tells two files apart when their labels coincide, in this order (DISTINCT: name, value)
DISTINCT = (
    ("classifier", lambda s: network_name(s, "classifier")),
    ("denoiser", lambda s: network_name(s, "denoiser")),
    ("rejector", lambda s: network_name(s, "rejector")),
    ("threshold", lambda s: s.get("threshold")), ("N0", lambda s: s.get("N0")),
    ("N", lambda s: s.get("N")), ("α", lambda s: s.get("alpha")),
    ("bound", lambda s: s.get("bound")), ("seed", lambda s: s.get("seed")),
    ("split", lambda s: s.get("split")), ("data", _data_name),
    ("mode", lambda s: s.get("mode")), ("noise", lambda s: s.get("noise")),
    ("device", lambda s: s.get("device")),
)


def distinctions(paths, settings) -> list[str]:
    """For each file, what sets it apart from the files whose display_label is the same: the
    settings (DISTINCT) that differ within that group, else the shortest tail of its path that
    does, else its position; '' for a file whose label is unique."""
    paths = [Path(p) for p in paths]
    base = [display_label(p, s) for p, s in zip(paths, settings)]
    out = [""] * len(paths)
    for lab in set(base):
        group = [i for i, b in enumerate(base) if b == lab]
        if len(group) < 2:
            continue
        # settings every file of the group records, and on which they differ
        keys = [(n, get) for n, get in DISTINCT
                if all(get(settings[i]) is not None for i in group)
                and len({str(get(settings[i])) for i in group}) > 1]
        for i in group:
            out[i] = ", ".join(f"{n}={get(settings[i])}" for n, get in keys)
        for sub in _same(out, group):  # still alike: the path, from its end
            tails = [(*paths[i].parent.parts, file_label(paths[i])) for i in sub]
            depth = next((d for d in range(1, max(map(len, tails)) + 1)
                          if len({t[-d:] for t in tails}) == len(sub)), None)
            for k, (i, tail) in enumerate(zip(sub, tails)):
                where = "/".join(tail[-depth:]) if depth else f"#{k + 1}"
                out[i] = f"{out[i]}, {where}" if out[i] else where
    return out


def _same(values: list[str], group: list[int]) -> list[list[int]]:
    """The subgroups of `group` whose values coincide (size >= 2)."""
    by: dict[str, list[int]] = {}
    for i in group:
        by.setdefault(values[i], []).append(i)
    return [g for g in by.values() if len(g) > 1]


def resolve_labels(paths, settings, labels=None) -> list[str]:
    """The given labels (one per file), else `display_label` of each, with what sets it apart
    (`distinctions`) where two would read alike."""
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} files")
        return [str(lab) for lab in labels]
    return [f"{display_label(p, s)} [{d}]" if d else display_label(p, s)
            for p, s, d in zip(paths, settings, distinctions(paths, settings))]


def setting_key(settings: dict, vary: str = "T") -> str:
    """What a file shares with the others of its curve when `vary` (a key of the record's `run`,
    T) is swept: its identity but the rejector (retrained for each T) and its threshold (chosen
    for each), and how the rejector was trained but `vary`. Files with one key and another `vary`
    are points of one curve."""
    run = {k: v for k, v in (settings.get("run") or {}).items()
           if k not in (vary, "threshold_choice", "wandb")}
    ident = identity_of(settings, drop=("networks.rejector", "threshold"))
    return json.dumps({"identity": ident, "run": run}, sort_keys=True, default=str)


# -- the summary frame and its tables -----------------------------------------------------------
def radius_key(r: float) -> str:
    """The frame's column of the certified accuracy at radius r (its interval: lo@r, hi@r)."""
    return f"acc@{r:g}"


def table_radii(frames, radii=None) -> np.ndarray:
    """The given radii (default: `default_radii` over the largest radius of all files), and the
    target radius of every staged file, where it alone has an answer."""
    if radii is None:
        radii = default_radii(max((float(df["radius"].max()) for df in frames if len(df)),
                                  default=0.0))
    targets = {t for t in map(staged_target, frames) if not math.isnan(t)}
    radii = [float(r) for r in radii]
    radii += [t for t in sorted(targets) if not np.isclose(radii, t, rtol=0, atol=1e-12).any()]
    return np.asarray(sorted(radii), dtype=float)


def summary_frame(paths, radii=None, labels=None, frames=None, settings=None) -> pd.DataFrame:
    """One row of numbers per file: label, file, images, acc@r for each radius (fractions) with
    its 95 % Clopper-Pearson interval (lo@r, hi@r), acr with its bootstrap interval (acr_lo,
    acr_hi), abstain, reject (mean n_R/N, NaN without n_R), time_s (mean seconds per image, if
    numeric), target (a staged file's target radius), then the setting (σ, T, denoiser, objective,
    system, bound, mode, N). Default radii: see `table_radii`. `frames` and `settings` (one per
    file) are used as given; what is not given is read here, once."""
    paths = [Path(p) for p in paths]
    frames = frames if frames is not None else [load_results(p) for p in paths]
    settings = settings if settings is not None else [read_settings(p) for p in paths]
    radii = table_radii(frames, radii)
    rows = []
    names = resolve_labels(paths, settings, labels)
    details = distinctions(paths, settings)
    for path, df, st, lab, detail in zip(paths, frames, settings, names, details):
        row = {"label": lab, "file": str(path), "images": len(df), "detail": detail,
               "setting": setting_key(st)}
        k = certified_counts(df, radii) if len(df) else np.full(radii.shape, np.nan)
        lo, hi = clopper_pearson(k, len(df))
        for r, a, a_lo, a_hi in zip(radii, certified_accuracy(df, radii), lo, hi):
            row.update({radius_key(r): float(a), f"lo@{r:g}": float(a_lo),
                        f"hi@{r:g}": float(a_hi)})
        rej = reject_fraction(df, st.get("N"))
        acr_lo, acr_hi = acr_interval(df)
        row.update(acr=average_certified_radius(df), acr_lo=acr_lo, acr_hi=acr_hi,
                   abstain=abstain_rate(df), reject=math.nan if rej is None else rej)
        t = df["time"] if "time" in df.columns else None
        row["time_s"] = float(t.mean()) if t is not None and pd.api.types.is_numeric_dtype(t) \
            and len(df) else math.nan
        row["target"] = staged_target(df)
        row.update(describe(st))
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["radii"] = radii.tolist()
    return frame


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _missing(row) -> str:
    """A number a file cannot give: n/a for a staged file (it answers at its target only), – for
    a file without rows."""
    return "n/a" if row["images"] and not math.isnan(row["target"]) else "–"


def accuracy_cell(row, r: float) -> str:
    """'23.0 [15.1, 32.6]': certified accuracy (%) at r with its 95 % Clopper-Pearson interval."""
    a = row[radius_key(r)]
    if math.isnan(a):
        return _missing(row)
    return f"{100 * a:.1f} [{100 * row[f'lo@{r:g}']:.1f}, {100 * row[f'hi@{r:g}']:.1f}]"


def acr_cell(row) -> str:
    """'0.275 [0.150, 0.413]': the ACR with its bootstrap interval."""
    if math.isnan(row["acr"]):
        return _missing(row)
    if math.isnan(row["acr_lo"]):
        return f"{row['acr']:.3f}"
    return f"{row['acr']:.3f} [{row['acr_lo']:.3f}, {row['acr_hi']:.3f}]"


def _setting_cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def by_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """The summary frame's rows ordered by setting: σ, denoiser, objective, system, T."""
    order = [c for c in ("sigma", "denoiser", "objective", "system", "T") if c in frame]
    out = frame.sort_values(order, na_position="first", kind="stable").reset_index(drop=True)
    out.attrs = dict(frame.attrs)
    return out


def markdown_table(frame: pd.DataFrame, grouped: bool = False) -> str:
    """Markdown of a `summary_frame`: certified accuracy (%) at each radius with its 95 %
    interval, ACR with its interval, images, abstain %, and reject % when some file rejected
    draws. `grouped`: the table by setting (rows ordered by σ, denoiser, objective, system, T, and
    those five columns instead of the label; where two rows would read alike there, a column
    `which` says what sets each apart)."""
    radii = frame.attrs["radii"]
    with_reject = bool((frame["reject"].fillna(0) > 0).any())
    which = False
    if grouped:
        frame = by_setting(frame)
        first = [_SETTING_HEAD[c] for c in SETTING_COLUMNS]
        # rows whose setting cells coincide (another classifier, N, bound...) get a column more
        keys = [tuple(_setting_cell(row.get(c)) for c in SETTING_COLUMNS)
                for _, row in frame.iterrows()]
        alike = {k for k in keys if keys.count(k) > 1}
        which = bool(alike)
        first += ["which"] * which
    else:
        first = ["system"]
    head = [*first, *(f"r={r:g}" for r in radii), "ACR", "images", "abstain %"]
    head += ["reject %"] * with_reject
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * len(first) + "---:|" * (len(head) - len(first))]
    for _, row in frame.iterrows():
        cells = ([_setting_cell(row.get(c)) for c in SETTING_COLUMNS] if grouped
                 else [row["label"].replace("|", "\\|")])
        if which:
            key = tuple(cells[:len(SETTING_COLUMNS)])
            cells.append((row.get("detail") or row["label"]).replace("|", "\\|")
                         if key in alike else "")
        cells += [*(accuracy_cell(row, r) for r in radii), acr_cell(row), str(row["images"]),
                  _pct(row["abstain"])]
        cells += [_pct(row["reject"])] * with_reject
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(paths, radii=None, labels=None) -> str:
    """Markdown table, one row per result file; see `summary_frame` and `markdown_table`."""
    return markdown_table(summary_frame(paths, radii, labels))
