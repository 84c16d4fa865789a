"""The paper's figures from result files: certified accuracy vs radius (Fig. 4/5) and the 2D
histogram of rejected vs top-class draws (Fig. 6). Figures are built with matplotlib's object API
on the Agg canvas: no pyplot, no global state, no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .tables import certified_accuracy, load_results, load_settings, resolve_labels


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=150)
    return out_png


def certified_accuracy_curve(df, max_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact step curve of certified accuracy on [0, max_radius]: the breakpoints are the radii
    themselves, so `ax.step(x, y, where="pre")` draws the function with no grid error
    (acc is left-continuous: acc(r) = acc(u_j) for r in (u_{j-1}, u_j])."""
    rad = df["radius"].to_numpy(dtype=float)[df["correct"].to_numpy() == 1]
    x = np.unique(np.concatenate([[0.0], rad[(rad > 0) & (rad <= max_radius)], [max_radius]]))
    return x, certified_accuracy(df, x)


def plot_certified_accuracy(paths, out_png, labels=None, title=None) -> Path:
    """Certified accuracy vs l2 radius, one step curve per result file; writes a PNG."""
    paths = [Path(p) for p in paths]
    frames = [load_results(p) for p in paths]
    labels = resolve_labels(paths, [load_settings(p) for p in paths], labels)
    top = max((float(df["radius"].max()) for df in frames if len(df)), default=0.0)
    xmax = 1.05 * top if top > 0 else 1.0
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, (df, lab) in enumerate(zip(frames, labels)):
        if len(df) == 0:
            continue
        x, y = certified_accuracy_curve(df, xmax)
        ax.step(x, y, where="pre", label=lab, lw=1.8, ls=styles[(i // 10) % len(styles)],
                clip_on=False)  # a curve at 0 stays visible on the axis
    ax.set(xlabel="ℓ2 radius", ylabel="certified accuracy", xlim=(0, xmax), ylim=(0, 1))
    ax.grid(alpha=0.3)
    if len(frames) <= 4:
        ax.legend(loc="upper right", fontsize="small")
    else:  # many curves: the legend below the axes, where it cannot squeeze them
        fig.set_size_inches(6.4, 4.4 + 0.22 * len(frames))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="x-small")
    if title:
        ax.set_title(title)
    return _save(fig, out_png)


def count_histogram(df, N: int, bins: int = 50):
    """Counts of images per (n_R, n_A) bin on [0, N]^2: h (bins, bins) indexed [x=n_R, y=n_A],
    and the bin edges of x and y."""
    return np.histogram2d(df["n_R"].to_numpy(float), df["n_A"].to_numpy(float), bins=bins,
                          range=[[0, N], [0, N]])


def plot_count_histogram(path, out_png, title=None, bins: int = 50) -> Path:
    """2D histogram over images of n_R (rejected draws, x) vs n_A (top-class draws not rejected,
    y), log colour scale, with the diagonal n_A + n_R = N dashed; writes a PNG."""
    path = Path(path)
    df = load_results(path, required=("n_A", "n_R"))
    if "N" in df.columns and len(df):
        N = int(df["N"].max())
    elif load_settings(path).get("N"):
        N = int(load_settings(path)["N"])
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
    return _save(fig, out_png)
