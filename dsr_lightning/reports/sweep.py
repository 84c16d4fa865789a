"""The report of a whole sweep (or any folder of runs): every results file below a folder, a table
by setting (σ, T, denoiser, objective, system), one panel per σ with the systems as curves (the
paper's Fig. 4/5/7/8), certified accuracy against T when T varies (Fig. 9), and the training time
per epoch of the rejectors beside the denoisers' (Table 1), from the runs' own logs. Labels come
from the settings records (and, without one, from the whole file name, never its stem)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsr_lightning.results import REQUIRED_COLUMNS

from .plots import certified_accuracy_curve
from .tables import certified_accuracy, load_settings

SKIP_SUFFIXES = (".json", ".lock", ".ckpt", ".png", ".md", ".yaml", ".log", ".csv", ".pth", ".tar",
                 ".npz", ".txt", ".pt")


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


def describe(path: Path, settings: dict) -> dict:
    """σ, T, denoiser, objective and system of a results file, from its settings record."""
    run = settings.get("run") or {}
    system = settings.get("system")
    return {"sigma": settings.get("sigma"), "T": run.get("T"), "denoiser": run.get("denoiser"),
            "objective": run.get("objective"), "system": system,
            "bound": settings.get("bound"), "threshold": settings.get("threshold"),
            "N": settings.get("N"), "mode": settings.get("mode"), "file": str(path)}


def sweep_frame(paths: list[Path], frames: list[pd.DataFrame], radii) -> pd.DataFrame:
    """One row per results file: its description and its certified accuracy at `radii`, ACR."""
    rows = []
    for p, df in zip(paths, frames):
        d = describe(p, load_settings(p))
        acc = certified_accuracy(df, radii)
        d.update({f"acc@{r:g}": float(a) for r, a in zip(radii, acc)})
        ok = df["correct"].to_numpy() == 1
        d["acr"] = float((df["radius"].to_numpy(float) * ok).mean()) if len(df) else math.nan
        d["images"] = len(df)
        rows.append(d)
    frame = pd.DataFrame(rows)
    order = [c for c in ("sigma", "denoiser", "objective", "system", "T") if c in frame]
    frame = frame.sort_values(order, na_position="first", kind="stable").reset_index(drop=True)
    frame.attrs["radii"] = [float(r) for r in radii]
    return frame


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def sweep_table(frame: pd.DataFrame) -> str:
    """Markdown: σ, T, denoiser, objective, system, certified accuracy (%) at the radii, ACR."""
    radii = frame.attrs["radii"]
    head = ["σ", "T", "denoiser", "objective", "system", *(f"r={r:g}" for r in radii), "ACR",
            "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * (len(head) - 5)]
    for _, row in frame.iterrows():
        cells = [_cell(row["sigma"]), _cell(row["T"]), _cell(row["denoiser"]),
                 _cell(row["objective"]), _cell(row["system"]),
                 *(f"{100 * row[f'acc@{r:g}']:.1f}" for r in radii),
                 "–" if math.isnan(row["acr"]) else f"{row['acr']:.3f}", str(row["images"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_label(row) -> str:
    parts = [str(row["system"] or Path(row["file"]).name)]
    if row.get("denoiser"):
        parts.append(f"{row['denoiser']}" + (f" ({row['objective']})" if row.get("objective")
                                             else ""))
    if row.get("T") is not None and not (isinstance(row["T"], float) and math.isnan(row["T"])):
        parts.append(f"T={int(row['T'])}")
    return " ".join(parts)


def _save(fig: Figure, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=130)
    return out_png


def plot_panels(frame: pd.DataFrame, frames: dict[str, pd.DataFrame], out_png: Path) -> Path:
    """One panel per σ, the systems of that σ as certified-accuracy curves (Fig. 4/5 layout)."""
    sigmas = sorted({s for s in frame["sigma"] if s is not None and not pd.isna(s)})
    groups = [(s, frame[frame["sigma"] == s]) for s in sigmas]
    if frame["sigma"].isna().any():
        groups.append((None, frame[frame["sigma"].isna()]))
    n = max(1, len(groups))
    fig = Figure(figsize=(4.2 * n, 3.8), layout="constrained")
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    styles = {"rejection": "-", "denoised": "--", "plain": ":"}
    for ax, (s, sub) in zip(axes, groups):
        top = max((float(frames[f]["radius"].max()) for f in sub["file"] if len(frames[f])),
                  default=0.0)
        xmax = max(1.05 * top, 0.5)
        for _, row in sub.iterrows():
            df = frames[row["file"]]
            if not len(df):
                continue
            x, y = certified_accuracy_curve(df, xmax)
            ax.step(x, y, where="pre", lw=1.6, ls=styles.get(row["system"], "-."),
                    label=curve_label(row), clip_on=False)
        ax.set(xlabel="ℓ2 radius", ylabel="certified accuracy", xlim=(0, xmax), ylim=(0, 1),
               title=f"σ = {s:g}" if s is not None else "σ unknown")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper right")
    return _save(fig, out_png)


def plot_T_ablation(frame: pd.DataFrame, out_png: Path) -> Path | None:
    """Certified accuracy against T at each radius, one panel per (σ, denoiser, objective) of the
    rejection system (Fig. 9); None unless some group has two or more values of T."""
    rej = frame[(frame["system"] == "rejection") & frame["T"].notna()]
    groups = [(k, g) for k, g in rej.groupby(["sigma", "denoiser", "objective"], dropna=False)
              if g["T"].nunique() > 1]
    if not groups:
        return None
    radii = frame.attrs["radii"]
    fig = Figure(figsize=(4.2 * len(groups), 3.6), layout="constrained")
    for i, ((s, den, obj), g) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        g = g.groupby("T").mean(numeric_only=True).sort_index()
        for r in radii:
            ax.plot(g.index, g[f"acc@{r:g}"], marker="o", label=f"r = {r:g}")
        ax.set(xlabel="T (noise draws per image in training)", ylabel="certified accuracy",
               ylim=(0, 1), title=f"σ = {s:g}, {den} ({obj})", xticks=list(g.index))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, out_png)


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


def write_sweep_sections(paths, frames, out_dir: Path, radii, folders=()) -> tuple[list[str], dict]:
    """The sweep parts of a report (Markdown lines and the files written)."""
    frame = sweep_frame(list(paths), list(frames), radii)
    by_file = {str(p): df for p, df in zip(paths, frames)}
    files = {"panels": plot_panels(frame, by_file, out_dir / "certified_accuracy_by_sigma.png")}
    md = ["## By setting", "", sweep_table(frame), "",
          f"![certified accuracy, one panel per σ]({files['panels'].name})", ""]
    t_png = plot_T_ablation(frame, out_dir / "accuracy_vs_T.png")
    if t_png is not None:
        files["T"] = t_png
        md += ["## Certified accuracy against T", "", f"![accuracy vs T]({t_png.name})", ""]
    runs = [r for f in folders for r in find_runs(f)]
    times = epoch_times(runs)
    if len(times):
        files["times"] = times
        md += ["## Training time per epoch", "",
               "From each run's CSV log (`train/epoch_time_s`), as the paper's Table 1.", "",
               times_table(times), ""]
    files["frame"] = frame
    return md, files


__all__ = ["describe", "epoch_times", "find_results", "find_runs", "plot_T_ablation",
           "plot_panels", "sweep_frame", "sweep_table", "times_table", "write_sweep_sections"]
