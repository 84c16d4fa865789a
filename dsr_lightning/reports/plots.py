"""The paper's figures from result files: certified accuracy vs radius (Fig. 4/5), one panel per σ
for a sweep (Fig. 4/5/7/8), certified accuracy against T (Fig. 9), and the 2D histogram of
rejected vs top-class draws (Fig. 6). Curves carry a 95 % Clopper-Pearson band over the test
images; a staged file is one point (its target radius) with its interval. Figures are built with
matplotlib's object API on the Agg canvas: no pyplot, no global state, no display needed. They take
the frames already read: nothing here reads a results file again."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from dsr_lightning.results import read_settings

from .tables import (
    certified_accuracy,
    certified_counts,
    clopper_pearson,
    is_staged,
    load_results,
    radius_key,
    resolve_labels,
    staged_target,
)


def save_figure(fig: Figure, out_png, dpi: int = 150) -> Path:
    """Render `fig` on the Agg canvas into `out_png` (its folder created); the path."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=dpi)
    return out_png


def certified_accuracy_curve(df, max_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact step curve of certified accuracy on [0, max_radius]: the breakpoints are the radii
    themselves, so `ax.step(x, y, where="pre")` draws the function with no grid error
    (acc is left-continuous: acc(r) = acc(u_j) for r in (u_{j-1}, u_j])."""
    rad = df["radius"].to_numpy(dtype=float)[df["correct"].to_numpy() == 1]
    x = np.unique(np.concatenate([[0.0], rad[(rad > 0) & (rad <= max_radius)], [max_radius]]))
    return x, certified_accuracy(df, x)


def draw_certified_accuracy(ax, df, max_radius: float, label: str, **style) -> None:
    """One file on `ax`: its step curve with a 95 % Clopper-Pearson band (alpha 0.2), or for a
    staged file the point at its target radius with its interval."""
    if len(df) == 0:
        return
    if is_staged(df):
        t = staged_target(df)
        k = certified_counts(df, [t])
        lo, hi = clopper_pearson(k, len(df))
        y = float(k[0]) / len(df)
        ax.errorbar([t], [y], yerr=[[y - lo[0]], [hi[0] - y]], fmt="o", capsize=3,
                    label=f"{label} (at its target only)", clip_on=False)
        return
    x, y = certified_accuracy_curve(df, max_radius)
    (line,) = ax.step(x, y, where="pre", label=label, clip_on=False, **style)
    lo, hi = clopper_pearson(y * len(df), len(df))
    ax.fill_between(x, lo, hi, step="pre", alpha=0.2, color=line.get_color(), lw=0)


def _x_max(frames) -> float:
    top = max((float(df["radius"].max()) for df in frames if len(df)), default=0.0)
    return 1.05 * top if top > 0 else 1.0


def plot_certified_accuracy(paths, out_png, labels=None, title=None, frames=None,
                            settings=None) -> Path:
    """Certified accuracy vs l2 radius, one step curve (with its 95 % band) per result file;
    writes a PNG. `frames`/`settings`: the files as already read (read here otherwise)."""
    paths = [Path(p) for p in paths]
    frames = frames if frames is not None else [load_results(p) for p in paths]
    if labels is None:
        settings = settings if settings is not None else [read_settings(p) for p in paths]
        labels = resolve_labels(paths, settings)
    xmax = _x_max(frames)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, (df, lab) in enumerate(zip(frames, labels)):
        draw_certified_accuracy(ax, df, xmax, lab, lw=1.8, ls=styles[(i // 10) % len(styles)])
    ax.set(xlabel="ℓ2 radius", ylabel="certified accuracy", xlim=(0, xmax), ylim=(0, 1))
    ax.grid(alpha=0.3)
    if len(frames) <= 4:
        ax.legend(loc="upper right", fontsize="small")
    else:  # many curves: the legend below the axes, where it cannot squeeze them
        fig.set_size_inches(6.4, 4.4 + 0.22 * len(frames))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="x-small")
    if title:
        ax.set_title(title)
    return save_figure(fig, out_png)


def count_histogram(df, N: int, bins: int = 50):
    """Counts of images per (n_R, n_A) bin on [0, N]^2: h (bins, bins) indexed [x=n_R, y=n_A],
    and the bin edges of x and y."""
    return np.histogram2d(df["n_R"].to_numpy(float), df["n_A"].to_numpy(float), bins=bins,
                          range=[[0, N], [0, N]])


def plot_count_histogram(path, out_png, title=None, bins: int = 50, frame=None,
                         settings=None) -> Path:
    """2D histogram over images of n_R (rejected draws, x) vs n_A (top-class draws not rejected,
    y), log colour scale, with the diagonal n_A + n_R = N dashed; writes a PNG. `frame`/`settings`:
    the file as already read (read here otherwise)."""
    path = Path(path)
    df = frame if frame is not None else load_results(path, required=("n_A", "n_R"))
    settings = settings if settings is not None else read_settings(path)
    if "N" in df.columns and len(df):
        N = int(df["N"].max())
    elif settings.get("N"):
        N = int(settings["N"])
    else:
        raise ValueError(f"{path}: N unknown (no N column and no N in {path}.json)")
    h, xe, ye = count_histogram(df, N, bins)
    fig = Figure(figsize=(5.6, 4.6), layout="constrained")
    ax = fig.add_subplot()
    h = np.ma.masked_equal(h.T, 0)  # (y, x); empty bins stay white
    mesh = ax.pcolormesh(xe, ye, h, cmap="viridis",
                         norm=LogNorm(vmin=1, vmax=max(float(h.max() or 1), 10.0)))
    ax.plot([0, N], [N, 0], "k--", lw=1, label=f"$n_A + n_R = N$ = {N:,}")
    ax.set(xlabel="rejected samples", ylabel="top-class samples", xlim=(0, N), ylim=(0, N),
           aspect="equal")
    ax.legend(loc="upper right", fontsize="small")
    fig.colorbar(mesh, ax=ax, label="images", shrink=0.85)
    if title:
        ax.set_title(title)
    return save_figure(fig, out_png)


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def curve_label(row) -> str:
    """'rejection dncnn (mse_obj) T=2' from a summary-frame row (its file's name without a
    system)."""
    parts = [str(row["system"]) if _known(row["system"]) else Path(row["file"]).name]
    if _known(row.get("denoiser")):
        parts.append(f"{row['denoiser']}" + (f" ({row['objective']})"
                                             if _known(row.get("objective")) else ""))
    if _known(row.get("T")):
        parts.append(f"T={int(row['T'])}")
    return " ".join(parts)


def plot_panels(frame: pd.DataFrame, frames: dict[str, pd.DataFrame], out_png) -> Path:
    """One panel per σ, the systems of that σ as certified-accuracy curves with their bands
    (Fig. 4/5 layout). `frame`: a summary_frame; `frames`: its files' rows by file."""
    sigmas = sorted({s for s in frame["sigma"] if _known(s)})
    groups = [(s, frame[frame["sigma"] == s]) for s in sigmas]
    if frame["sigma"].isna().any():
        groups.append((None, frame[frame["sigma"].isna()]))
    n = max(1, len(groups))
    fig = Figure(figsize=(4.2 * n, 3.8), layout="constrained")
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    styles = {"rejection": "-", "denoised": "--", "plain": ":"}
    for ax, (s, sub) in zip(axes, groups):
        xmax = max(_x_max([frames[f] for f in sub["file"]]), 0.5)
        for _, row in sub.iterrows():
            label = curve_label(row) + (f" [{row['detail']}]" if row.get("detail") else "")
            draw_certified_accuracy(ax, frames[row["file"]], xmax, label, lw=1.6,
                                    ls=styles.get(row["system"], "-."))
        ax.set(xlabel="ℓ2 radius", ylabel="certified accuracy", xlim=(0, xmax), ylim=(0, 1),
               title=f"σ = {s:g}" if s is not None else "σ unknown")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper right")
    return save_figure(fig, out_png, dpi=130)


def t_ablation_groups(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """The rejection files of a summary frame by `setting` (all but T and the rejector trained for
    it), those with two or more values of T: the panels of plot_T_ablation."""
    rej = frame[(frame["system"] == "rejection") & frame["T"].notna()]
    return [g for _, g in rej.groupby("setting", sort=False) if g["T"].nunique() > 1]


def plot_T_ablation(frame: pd.DataFrame, out_png) -> Path | None:
    """Certified accuracy against T at each radius, one panel per setting of the rejection system
    (Fig. 9): the files of a panel share everything but T and the rejector trained for it (the
    frame's `setting`: classifier, denoiser, σ, N, bound, data, training options, ...). Files of
    one setting and one T (the same training, run again) are averaged, and the panel says so.
    None unless some setting has two or more values of T."""
    groups = t_ablation_groups(frame)
    if not groups:
        return None
    radii = frame.attrs["radii"]
    # what sets the panels apart beyond σ and D, named in each title
    differ = [c for c in ("classifier", "bound", "N", "mode")
              if len({str(h.iloc[0].get(c)) for h in groups}) > 1]
    fig = Figure(figsize=(4.2 * len(groups), 3.6), layout="constrained")
    for i, g in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        runs = int(g.groupby("T").size().max())
        first = g.iloc[0]
        g = g.groupby("T").mean(numeric_only=True).sort_index()
        for r in radii:
            ax.plot(g.index, g[radius_key(r)], marker="o", label=f"r = {r:g}")
        title = f"σ = {first['sigma']:g}, {first['denoiser']} ({first['objective']})"
        if differ:
            title += "\n" + ", ".join(f"{c}={first.get(c)}" for c in differ)
        if runs > 1:
            title += f"\n(mean of up to {runs} runs per T)"
        ax.set(xlabel="T (noise draws per image in training)", ylabel="certified accuracy",
               ylim=(0, 1), title=title, xticks=list(g.index))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return save_figure(fig, out_png, dpi=130)
