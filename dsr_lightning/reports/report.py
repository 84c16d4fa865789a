"""A report over result files: report.md (table + figures), the PNGs, optionally W&B; and the CLI
`python -m dsr_lightning.reports FILE... [--out DIR] [--labels ...] [--radii ...] [--wandb]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .plots import plot_certified_accuracy, plot_count_histogram
from .tables import file_label, load_results, load_settings, markdown_table, summary_frame

_SETTING_KEYS = (("system", "system"), ("sigma", "σ"), ("N0", "N0"), ("N", "N"),
                 ("alpha", "α"), ("bound", "bound"), ("classifier", "classifier"),
                 ("denoiser", "denoiser"), ("rejector", "rejector"))


def _settings_line(settings: dict) -> str:
    parts = [f"{name}={settings[k]}" for k, name in _SETTING_KEYS if settings.get(k) is not None]
    return ", ".join(parts) or "no settings file"


def write_report(paths, out_dir, labels=None, radii=None, folders=()) -> dict:
    """Writes into out_dir: report.md, certified_accuracy.png, and counts_<name>.png for each file
    with rejected draws (n_R > 0 somewhere); for a sweep (files found in `folders`, or spanning
    several σ) also the table by setting, certified_accuracy_by_sigma.png, accuracy_vs_T.png when
    T varies and the training times per epoch of the runs in `folders`. All files are read and
    checked before anything is written. Returns {'markdown', 'table', 'frame', 'report',
    'certified_accuracy', 'counts', 'sweep'} (counts: file -> PNG path; sweep: its files)."""
    paths, out_dir = [Path(p) for p in paths], Path(out_dir)
    frames = [load_results(p) for p in paths]
    settings = [load_settings(p) for p in paths]
    frame = summary_frame(paths, radii, labels, frames=frames)
    table = markdown_table(frame)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = plot_certified_accuracy(paths, out_dir / "certified_accuracy.png",
                                    labels=list(frame["label"]))
    counts, used = {}, set()
    for path, df, lab in zip(paths, frames, frame["label"]):
        if "n_R" in df.columns and "n_A" in df.columns and (df["n_R"] > 0).any():
            name, k = f"counts_{file_label(path)}", 2
            while name in used:  # same name from two folders
                name, k = f"counts_{file_label(path)}_{k}", k + 1
            used.add(name)
            counts[str(path)] = plot_count_histogram(path, out_dir / f"{name}.png", title=lab)
    md = ["# Certification report", "",
          "Certified accuracy (%) of the smoothed classifier at ℓ2 radius r (σ in pixel units "
          "of [0,1] images); ACR = mean of radius·correct over all images; abstain % = share of "
          "images without a prediction" + ("; reject % = mean n_R/N." if "reject %" in table
                                           else "."), "", table,
          "## Files", ""]
    md += [f"- **{lab}**: `{p}` ({_settings_line(st)})"
           for p, st, lab in zip(paths, settings, frame["label"])]
    md += ["", "## Certified accuracy", "", f"![certified accuracy]({curve.name})", ""]
    sweep = {}
    if folders or len({st.get("sigma") for st in settings}) > 1:
        from .sweep import write_sweep_sections

        lines, sweep = write_sweep_sections(paths, frames, out_dir, frame.attrs["radii"], folders)
        md += lines
    if counts:
        md += ["## Rejected vs top-class draws", ""]
        for p, lab in zip(paths, frame["label"]):
            if str(p) in counts:
                md += [f"### {lab}", "", f"![counts {lab}]({counts[str(p)].name})", ""]
    markdown = "\n".join(md)
    report = out_dir / "report.md"
    report.write_text(markdown)
    return {"markdown": markdown, "table": table, "frame": frame, "report": report,
            "certified_accuracy": curve, "counts": counts, "sweep": sweep}


def log_to_wandb(run, paths, out_dir, labels=None, radii=None, folders=()) -> dict:
    """write_report, then one `run.log` with the summary as a wandb.Table ('report/summary'), the
    figures as wandb.Image ('report/certified_accuracy', 'report/counts/<stem>'), and for a
    single file its numbers as scalars ('certify/acc@r', 'certify/acr', ...)."""
    import wandb

    res = write_report(paths, out_dir, labels, radii, folders)
    frame = res["frame"]
    payload = {"report/summary": wandb.Table(dataframe=frame.reset_index(drop=True)),
               "report/certified_accuracy": wandb.Image(str(res["certified_accuracy"]),
                                                        caption="certified accuracy vs ℓ2 radius")}
    for file, png in res["counts"].items():
        payload[f"report/counts/{png.stem.removeprefix('counts_')}"] = wandb.Image(
            str(png), caption=f"rejected vs top-class draws: {Path(file).name}")
    if len(frame) == 1:
        row = frame.iloc[0]
        payload.update({f"certify/{k}": float(row[k]) for k in frame.columns
                        if k.startswith("acc@") or k in ("acr", "abstain", "reject")})
    run.log(payload)
    return res


def dedupe(paths: list[Path]) -> list[Path]:
    """One file per identity (results.IDENTITY_KEYS of the settings record) and set of images:
    copies of the same experiment (e.g. a baseline certified by several jobs) are shown once."""
    from dsr_lightning.results import IDENTITY_KEYS, read_rows

    seen, out = set(), []
    for p in paths:
        st = load_settings(p)
        if st.get("format", 1) < 2:
            out.append(p)
            continue
        key = json.dumps({k: st.get(k) for k in IDENTITY_KEYS}, sort_keys=True, default=str)
        key += str(sorted(r[0] for r in read_rows(p)[1]))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def expand(args: list[Path]) -> tuple[list[Path], list[Path]]:
    """(results files, folders): each folder argument becomes every results file below it."""
    from .sweep import find_results

    files, folders = [], []
    for a in args:
        if a.is_dir():
            found = dedupe(find_results(a))
            if not found:
                raise FileNotFoundError(f"{a}: no results files below this folder (certify.py "
                                        "writes <outdir>/*.tsv; train.py certify=... writes "
                                        "<run>/results/*.tsv)")
            files += found
            folders.append(a)
        else:
            files.append(a)
    return files, folders


def main(argv=None) -> int:
    """CLI; returns the exit code: 0, or 2 when a file is missing or unreadable (message on
    stderr, nothing written before the error is removed)."""
    p = argparse.ArgumentParser(prog="python -m dsr_lightning.reports",
                                description="Certified-accuracy tables and figures from "
                                            "certify.py results files (TSV), or from every results "
                                            "file below a folder (a sweep, an outputs folder).")
    p.add_argument("files", nargs="+", type=Path, help="results files or folders")
    p.add_argument("--out", type=Path, help="output folder (default: <first folder>/report, or "
                                            "<first file's folder>/report)")
    p.add_argument("--labels", nargs="+", help="display names, one per file")
    p.add_argument("--radii", nargs="+", type=float, help="table radii (default 0, 0.25, ...)")
    p.add_argument("--wandb", action="store_true",
                   help="also log to a W&B run (offline unless WANDB_MODE says otherwise)")
    args = p.parse_args(argv)
    try:
        files, folders = expand(args.files)
        out = args.out or (folders[0] if folders else files[0].parent) / "report"
        for f in files:  # check every file before writing or starting anything
            load_results(f)
            load_settings(f)
        if args.wandb:
            import wandb

            out.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project="dsr_lightning", job_type="report", dir=str(out),
                             mode=None if os.environ.get("WANDB_MODE") else "offline",
                             config={"files": [str(f) for f in files]})
            try:
                res = log_to_wandb(run, files, out, args.labels, args.radii, folders)
            finally:
                run.finish()
        else:
            res = write_report(files, out, args.labels, args.radii, folders)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    sweep = res.get("sweep") or {}
    if "frame" in sweep:
        from .sweep import sweep_table, times_table

        print(sweep_table(sweep["frame"]))
        if "times" in sweep:
            print(times_table(sweep["times"]))
    written = [res["report"], res["certified_accuracy"], *res["counts"].values(),
               *(v for k, v in sweep.items() if k in ("panels", "T"))]
    for f in written:
        print(f"wrote {f}")
    return 0
