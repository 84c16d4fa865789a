"""What a folder of runs (a sweep, an outputs folder) holds besides its table: every results file
below it, the training runs' time per epoch (the paper's Table 1, from the runs' own logs), and the
jobs that failed (`FAILED.json`, written by dsr_lightning.jobs.sweeps). The table by setting and
the figures are the report's own (tables.markdown_table(grouped=True), plots.plot_panels)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from dsr_lightning.results import REQUIRED_COLUMNS

SKIP_SUFFIXES = (".json", ".lock", ".ckpt", ".png", ".md", ".yaml", ".log", ".csv", ".pth", ".tar",
                 ".npz", ".txt", ".pt")
FAILED = "FAILED.json"  # a failed sweep job's record (dsr_lightning.jobs.sweeps.FAILED)


def find_results(folder: str | Path) -> list[Path]:
    """The results files below `folder`: files whose header starts with the reference columns
    (ours, `*.tsv` with a settings record, and the reference scripts' files without extension);
    shards (`.rank<r>`), settings, locks and W&B folders are skipped. Sorted."""
    head = "\t".join(REQUIRED_COLUMNS[:3]).encode()
    out = []
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).parts
        if (not p.is_file() or p.suffix in SKIP_SUFFIXES or ".rank" in p.name
                or any(part.startswith(".") or part == "wandb" for part in rel)):
            continue
        try:
            with open(p, "rb") as f:
                first = f.read(len(head))
        except OSError:
            continue
        if first == head:
            out.append(p)
    return out


def find_failures(folder: str | Path) -> list[dict]:
    """Every failed sweep job below `folder`: its FAILED.json record (job, overrides, error, type,
    folder), in job order; an unreadable record is one entry saying so."""
    recs = []
    for p in sorted(Path(folder).rglob(FAILED)):
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            rec = {"job": "?", "overrides": [], "error": f"unreadable failure record ({e})",
                   "type": "?"}
        rec.setdefault("folder", str(p.parent))
        recs.append(rec)
    return sorted(recs, key=lambda r: str(r.get("job")).zfill(6))


def failure_line(rec: dict) -> str:
    """'job 3 (T=2 sigma=0.5): ValueError: bad value [folder]'"""
    over = " ".join(map(str, rec.get("overrides") or [])) or "no overrides"
    error = (str(rec.get("error") or "?").splitlines() or ["?"])[0]
    kind = f"{rec['type']}: " if rec.get("type") else ""
    return f"job {rec.get('job', '?')} ({over}): {kind}{error} [{rec.get('folder')}]"


def failures_summary(failures: list[dict]) -> str:
    """'2 failed jobs: job 1 (...): ...; job 3 (...): ...' (one line)."""
    n = len(failures)
    return f"{n} failed job{'s' * (n != 1)}: " + "; ".join(map(failure_line, failures))


def find_runs(folder: str | Path) -> list[Path]:
    """Training run folders below `folder`: those with `.hydra/config.yaml` and `csv/metrics.csv`."""
    return sorted(p.parent.parent for p in Path(folder).rglob(".hydra/config.yaml")
                  if (p.parent.parent / "csv" / "metrics.csv").is_file())


def epoch_times(runs: list[Path]) -> pd.DataFrame:
    """Per training run: stage, denoiser, objective, σ, T, epochs and the mean seconds per epoch
    (`train/epoch_time_s` of its CSV log; runs without it are left out)."""
    from omegaconf import OmegaConf

    rows = []
    for run in runs:
        try:
            cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
            m = pd.read_csv(run / "csv" / "metrics.csv")
        except Exception:  # noqa: BLE001 - a run folder being written, or not ours
            continue
        if "train/epoch_time_s" not in m or m["train/epoch_time_s"].notna().sum() == 0:
            continue
        t = m["train/epoch_time_s"].dropna()
        stage = OmegaConf.select(cfg, "stage.name")
        rows.append({"stage": stage, "denoiser": OmegaConf.select(cfg, "denoiser.name"),
                     "objective": (OmegaConf.select(cfg, "stage.objective")
                                   if stage == "denoiser"
                                   else OmegaConf.select(cfg, "denoiser.objective")),
                     "sigma": OmegaConf.select(cfg, "sigma") if stage != "classifier" else None,
                     "T": OmegaConf.select(cfg, "T") if stage == "rejector" else None,
                     "epochs": len(t), "s_per_epoch": float(t.mean()), "run": str(run)})
    return pd.DataFrame(rows)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def times_table(times: pd.DataFrame) -> str:
    """Markdown of epoch_times: the rejectors beside the denoisers (the paper's Table 1)."""
    lines = ["| stage | denoiser | objective | σ | T | epochs | s / epoch |",
             "|---|---|---|---|---|---:|---:|"]
    order = {"denoiser": 0, "rejector": 1, "classifier": 2}
    times = times.assign(_o=times["stage"].map(order)).sort_values(["_o", "denoiser", "sigma", "T"],
                                                                   kind="stable")
    for _, r in times.iterrows():
        lines.append("| " + " | ".join([str(r["stage"]), _cell(r["denoiser"]), _cell(r["objective"]),
                                        _cell(r["sigma"]), _cell(r["T"]), str(r["epochs"]),
                                        f"{r['s_per_epoch']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["epoch_times", "failure_line", "failures_summary", "find_failures", "find_results",
           "find_runs", "times_table"]
