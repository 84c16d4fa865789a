"""Certification results into a W&B run: the certified accuracy at the report radii and the ACR
(history and summary, so W&B's run comparison and parallel-coordinates panels work across a
sweep), the certified-accuracy curve as a W&B line plot, and the results file (with its settings
record) as an artifact."""

from __future__ import annotations

from pathlib import Path

from dsr_lightning.results import read_table

from .plots import certified_accuracy_curve
from .tables import abstain_rate, average_certified_radius, certified_accuracy


def certification_metrics(system: str, df, radii) -> dict[str, float]:
    """{'certify/<system>/acc@r': ..., 'certify/<system>/acr': ..., '.../abstain': ...}"""
    acc = certified_accuracy(df, radii)
    out = {f"certify/{system}/acc@{float(r):g}": float(a) for r, a in zip(radii, acc)}
    out[f"certify/{system}/acr"] = average_certified_radius(df)
    out[f"certify/{system}/abstain"] = abstain_rate(df)
    out[f"certify/{system}/images"] = float(len(df))
    return out


def log_certification(run, system: str, path: str | Path, radii) -> dict[str, float]:
    """Log one results file of `system` into `run` (see the module docstring); returns the
    scalars logged."""
    import wandb

    path = Path(path)
    df = read_table(path)
    metrics = certification_metrics(system, df, radii)
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
