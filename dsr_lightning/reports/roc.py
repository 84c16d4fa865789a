"""The rejector's validation ROC after training (fpr, tpr of b = 1[f(D(x+ε)) ≠ ref] against the
heads' logit): a PNG beside the run and a curve in its W&B runs. Built like the other figures
(plots.py: matplotlib's object API on the Agg canvas)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .plots import save_figure


def roc_figure(fpr: np.ndarray, tpr: np.ndarray) -> Figure:
    """The ROC curve with the chance diagonal."""
    fig = Figure(figsize=(4, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label="rejector")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="Rejector ROC (validation, b = 1[f(D(x+ε)) ≠ ref])")
    ax.legend(loc="lower right")
    return fig


def log_rejector_roc(curve, wandb_runs: list, out_dir: str | Path) -> Path:
    """`curve` (fpr, tpr tensors or arrays) as `<out_dir>/roc.png`, and as a line plot with that
    image in each W&B run; returns the PNG's path."""
    fpr, tpr = (np.asarray(t.cpu() if hasattr(t, "cpu") else t) for t in curve)
    png = save_figure(roc_figure(fpr, tpr), Path(out_dir) / "roc.png", dpi=120)
    for run in wandb_runs:
        import wandb

        table = wandb.Table(data=[[float(a), float(b)] for a, b in zip(fpr, tpr)],
                            columns=["fpr", "tpr"])
        run.log({"val/roc": wandb.plot.line(table, "fpr", "tpr", title="Rejector ROC"),
                 "val/roc_png": wandb.Image(str(png))})
    return png
