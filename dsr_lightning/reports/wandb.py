"""Certification results into a W&B run: the certified accuracy at the report radii and the ACR
(history and summary, so W&B's run comparison and parallel-coordinates panels work across a
sweep), the certified-accuracy curve as a W&B line plot, and the results file (with its settings
record) as an artifact."""

from __future__ import annotations

import math
from pathlib import Path

from dsr_lightning.results import read_settings, read_table

from .plots import certified_accuracy_curve
from .tables import summary_frame

PREFIX = "certify"


def metric_key(system: str, name: str) -> str:
    """The W&B key of one certification number: 'certify/<system>/<name>' (name: 'acc@0.5',
    'acr', ...). The certification job and the report both log under it."""
    return f"{PREFIX}/{system}/{name}"


def certification_metrics(system: str, row) -> dict[str, float]:
    """The scalars of one results file from its row of reports.summary_frame: certified accuracy
    at each of the frame's radii (acc@r), acr, abstain, reject (mean n_R/N; left out for a file
    without n_R or without rows), images; each under metric_key(system, ...)."""
    names = [k for k in row.index if str(k).startswith("acc@")]
    names += ["acr", "abstain", "reject", "images"]
    values = {k: float(row[k]) for k in names}
    return {metric_key(system, k): v for k, v in values.items()
            if not (k == "reject" and math.isnan(v))}


def file_metrics(system: str, path: str | Path, radii, df=None) -> dict[str, float]:
    """certification_metrics of the results file at `path` (its rows `df` when read already) at
    `radii`."""
    df = read_table(path) if df is None else df
    row = summary_frame([path], radii, frames=[df], settings=[read_settings(path)]).iloc[0]
    return certification_metrics(system, row)


def log_certification(run, system: str, path: str | Path, radii) -> dict[str, float]:
    """Log one results file of `system` into `run` (see the module docstring); returns the
    scalars logged."""
    import wandb

    path = Path(path)
    df = read_table(path)
    metrics = file_metrics(system, path, radii, df)
    top = float(df["radius"].max()) if len(df) else 0.0
    x, y = certified_accuracy_curve(df, max(1.05 * top, max(radii, default=0.0), 0.01))
    table = wandb.Table(data=[[float(a), float(b)] for a, b in zip(x, y)],
                        columns=["radius", "certified_accuracy"])
    run.log({**metrics, f"certify/{system}/curve": wandb.plot.line(
        table, "radius", "certified_accuracy", title=f"certified accuracy: {system}")})
    run.summary.update(metrics)
    art = wandb.Artifact(f"results-{run.id}-{system}", type="certification",
                         metadata={"system": system, "file": path.name, **metrics})
    art.add_file(str(path), name=path.name)
    settings = Path(f"{path}.json")
    if settings.is_file():
        art.add_file(str(settings), name=settings.name)
    run.log_artifact(art)
    return metrics
