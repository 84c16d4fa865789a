"""A report over result files: report.md (tables with 95 % intervals, figures, paired comparisons,
per-class views), the PNGs, optionally W&B; and the CLI

    dsr-report FILES_OR_FOLDERS [--out DIR] [--labels ...] [--radii ...] [--wandb]
    dsr-report compare A.tsv B.tsv [--radii ...]

Every results file (and its settings record) is read exactly once, into a `Result`, and the frames
are passed down to the tables and figures. A folder argument stands for every results file below
it; a mode=predict file (no radius) and a file without rows are skipped there, with a note, and
the sweep jobs that failed (FAILED.json) are listed."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsr_lightning.errors import ResultsError
from dsr_lightning.logs import console, get_logger
from dsr_lightning.results import identity_of, read_settings, read_table

from .compare import compare, comparison_markdown, pair_rejection_with_baseline
from .per_class import per_class_markdown
from .plots import plot_certified_accuracy, plot_count_histogram, plot_panels, plot_T_ablation
from .sweep import (
    epoch_times,
    failure_line,
    failures_summary,
    find_failures,
    find_results,
    find_runs,
    times_table,
)
from .tables import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Result,
    check_columns,
    file_label,
    markdown_table,
    network_name,
    read_result,
    summary_frame,
    table_radii,
)

log = get_logger(__name__)
_SETTING_KEYS = (("system", "system"), ("sigma", "σ"), ("N0", "N0"), ("N", "N"),
                 ("alpha", "α"), ("bound", "bound"), ("seed", "seed"))


def _settings_line(settings: dict) -> str:
    """The settings of a file in one line, each network by name and id, with the file it came
    from (records of earlier releases: the files they name)."""
    parts = [f"{name}={settings[k]}" for k, name in _SETTING_KEYS if settings.get(k) is not None]
    files = settings.get("files") or {}
    for role in settings.get("networks") or {}:
        where = files.get(role)
        parts.append(f"{role}={network_name(settings, role)}" + (f" ({where})" if where else ""))
    if not settings.get("networks"):
        parts += [f"{k}={settings[k]}" for k in ("classifier", "denoiser", "rejector")
                  if settings.get(k) is not None]
    return ", ".join(parts) or "no settings file"


def _uncertainty_note(settings: list[dict]) -> str:
    alphas = sorted({float(s["alpha"]) for s in settings if s.get("alpha") is not None})
    alpha = f"α = {', '.join(f'{a:g}' for a in alphas)}" if alphas else "α of its run"
    return ("Each certificate holds with probability ≥ 1 − α over the Monte Carlo noise "
            f"({alpha}). The bracketed intervals are 95 % intervals over the choice of test "
            "images: Clopper–Pearson for certified accuracy, a percentile bootstrap "
            f"({BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}) for the ACR.")


def _sweep_sections(results, frame, out_dir: Path, folders) -> tuple[list[str], dict]:
    """The sweep parts of a report (Markdown lines and the files written): the table by setting,
    one panel per σ, accuracy against T when T varies, the training time per epoch."""
    files = {"table": markdown_table(frame, grouped=True),
             "panels": plot_panels(frame, {str(r.path): r.frame for r in results},
                                   out_dir / "certified_accuracy_by_sigma.png")}
    md = ["## By setting", "", files["table"], "",
          f"![certified accuracy, one panel per σ]({files['panels'].name})", ""]
    t_png = plot_T_ablation(frame, out_dir / "accuracy_vs_T.png")
    if t_png is not None:
        files["T"] = t_png
        md += ["## Certified accuracy against T", "", f"![accuracy vs T]({t_png.name})", ""]
    times = epoch_times([r for f in folders for r in find_runs(f)])
    if len(times):
        files["times"] = times
        md += ["## Training time per epoch", "",
               "From each run's CSV log (`train/epoch_time_s`), as the paper's Table 1.", "",
               times_table(times), ""]
    return md, files


def write_report(paths, out_dir, labels=None, radii=None, folders=(), *, results=None,
                 skipped=(), failures=(), attacks=()) -> dict:
    """Writes into out_dir: report.md, certified_accuracy.png, and counts_<name>.png for each file
    with rejected draws (n_R > 0 somewhere); for a sweep (files found in `folders`, or spanning
    several σ) also the table by setting, certified_accuracy_by_sigma.png, accuracy_vs_T.png when
    T varies and the training times per epoch of the runs in `folders`. report.md also holds the
    paired comparison of each rejection file with its denoised baseline, the per-class views,
    the files skipped (`skipped`: one line each) and the failed jobs (`failures`: FAILED.json
    records). `results`: the files as already read (one Result per path); otherwise each is read
    here, once, before anything is written. Returns {'markdown', 'table', 'frame', 'report',
    'certified_accuracy', 'counts', 'sweep', 'comparisons', 'skipped', 'failures'} (counts: file
    -> PNG path; sweep: its files and its table)."""
    out_dir = Path(out_dir)
    results = list(results) if results is not None else [read_result(p) for p in paths]
    paths = [r.path for r in results]
    frames, settings = [r.frame for r in results], [r.settings for r in results]
    frame = summary_frame(paths, radii, labels, frames=frames, settings=settings)
    radii = frame.attrs["radii"]
    names = list(frame["label"])
    table = markdown_table(frame)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = plot_certified_accuracy(paths, out_dir / "certified_accuracy.png", labels=names,
                                    frames=frames)
    counts, used = {}, set()
    for res, lab in zip(results, names):
        df = res.frame
        if "n_R" in df.columns and "n_A" in df.columns and (df["n_R"] > 0).any():
            name, k = f"counts_{file_label(res.path)}", 2
            while name in used:  # same name from two folders
                name, k = f"counts_{file_label(res.path)}_{k}", k + 1
            used.add(name)
            counts[str(res.path)] = plot_count_histogram(res.path, out_dir / f"{name}.png",
                                                         title=lab, frame=df,
                                                         settings=res.settings)
    staged = any(s.get("mode") == "staged" for s in settings) or frame["target"].notna().any()
    md = ["# Certification report", "",
          "Certified accuracy (%) of the smoothed classifier at ℓ2 radius r (σ in pixel units "
          "of [0,1] images); ACR = mean of radius·correct over all images; abstain % = share of "
          "images without a prediction" + ("; reject % = mean n_R/N." if "reject %" in table
                                           else "."),
          "", _uncertainty_note(settings)
          + (" A staged file (mode=staged) answers only at its target radius (from its "
             "certified_at_target column): n/a elsewhere." if staged else ""),
          "", table, "## Files", ""]
    md += [f"- **{lab}**: `{p}` ({_settings_line(st)})"
           for p, st, lab in zip(paths, settings, names)]
    md += attack_lines(attacks)
    if skipped:
        md += ["", "## Skipped files", "", *(f"- {line}" for line in skipped)]
    if failures:
        n = len(failures)
        md += ["", "## Failed jobs", "", f"{n} failed job{'s' * (n != 1)}:", "",
               *(f"- {failure_line(rec)}" for rec in failures)]
    md += ["", "## Certified accuracy", "", f"![certified accuracy]({curve.name})", ""]
    sweep = {}
    if folders or len({st.get("sigma") for st in settings}) > 1:
        lines, sweep = _sweep_sections(results, frame, out_dir, folders)
        md += lines
    comparisons = []
    pairs = pair_rejection_with_baseline(results)
    if pairs:
        md += ["## Paired comparison", "",
               "Each rejection-system file against its denoised baseline: the same classifier and "
               "denoiser (by what they compute: their network ids), σ, and the same images with "
               "the same noise (seed, split, data and noise scheme), on the images both hold.", ""]
        for i, j in pairs:
            if j is None:
                md += [f"**{names[i]}**: no baseline among these files (none certifies the same "
                       "classifier and denoiser at its σ on the same images and noise; `dsr-certify "
                       "system=denoised rejector_ckpt=<its checkpoint>` certifies it).", ""]
                continue
            cmp = compare(results[i], results[j], radii)
            comparisons.append(cmp)
            md += [comparison_markdown(cmp, names[i], names[j])]
    if counts:
        md += ["## Rejected vs top-class draws", ""]
        for p, lab in zip(paths, names):
            if str(p) in counts:
                md += [f"### {lab}", "", f"![counts {lab}]({counts[str(p)].name})", ""]
    with_rows = [(r, lab) for r, lab in zip(results, names) if len(r.frame)]
    if with_rows:
        md += ["## Per class", ""]
        md += [per_class_markdown(r, lab, radii) for r, lab in with_rows]
    markdown = "\n".join(md)
    report = out_dir / "report.md"
    report.write_text(markdown)
    return {"markdown": markdown, "table": table, "frame": frame, "report": report,
            "certified_accuracy": curve, "counts": counts, "sweep": sweep,
            "comparisons": comparisons, "skipped": list(skipped), "failures": list(failures)}


def log_to_wandb(run, paths, out_dir, labels=None, radii=None, folders=(), **kwargs) -> dict:
    """write_report (kwargs passed on), then one `run.log` with the summary as a wandb.Table
    ('report/summary'), the figures as wandb.Image ('report/certified_accuracy',
    'report/counts/<stem>'), and for a single file its numbers as scalars under the keys the
    certification job logs ('certify/<system>/acc@r', 'certify/<system>/acr', ...:
    reports.wandb.certification_metrics)."""
    import wandb

    from .wandb import certification_metrics

    res = write_report(paths, out_dir, labels, radii, folders, **kwargs)
    frame = res["frame"]
    payload = {"report/summary": wandb.Table(dataframe=frame.reset_index(drop=True)),
               "report/certified_accuracy": wandb.Image(str(res["certified_accuracy"]),
                                                        caption="certified accuracy vs ℓ2 radius")}
    for file, png in res["counts"].items():
        payload[f"report/counts/{png.stem.removeprefix('counts_')}"] = wandb.Image(
            str(png), caption=f"rejected vs top-class draws: {Path(file).name}")
    if len(frame) == 1:
        row = frame.iloc[0]
        payload.update(certification_metrics(row.get("system") or file_label(row["file"]), row))
    run.log(payload)
    return res


def dedupe(results: list[Result]) -> list[Result]:
    """Copies of the same experiment (a baseline certified by several jobs, a copied file) shown
    once: two files merge only when their identities (results.identity_of) and their rows (but
    the time column) are the same."""
    seen, out = set(), []
    for r in results:
        if r.settings.get("format", 1) < 2:
            out.append(r)
            continue
        rows = r.frame.drop(columns=["time"], errors="ignore").sort_values("idx")
        key = json.dumps(identity_of(r.settings), sort_keys=True, default=str) \
            + rows.to_csv(index=False)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@dataclass
class Inputs:
    """What the command line names, read once: the results, the folders given, one line per file
    skipped in a folder, and the failed sweep jobs found there."""

    results: list[Result] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    attacks: list[Result] = field(default_factory=list)  # mode=attack files: their own section


def _read_found(path: Path) -> Result | str:
    """A results file found in a folder, read once; or why it is skipped (one line)."""
    settings = read_settings(path)
    if settings.get("mode") == "predict":
        return f"skipped {path}: mode=predict output (no radius column), nothing to certify"
    try:
        df = read_table(path)
    except ResultsError as e:
        if not settings and "missing column(s) radius" in str(e):
            return f"skipped {path}: predict output (no radius column), nothing to certify"
        raise
    if "radius" not in df.columns:
        return f"skipped {path}: mode=predict output (no radius column), nothing to certify"
    check_columns(path, df)
    if len(df) == 0:
        return f"skipped {path}: no rows yet (header only)"
    return Result(path, df, settings)


def read_inputs(args: list[Path]) -> Inputs:
    """Each file argument read (refused when it is not a certification results file); each
    folder argument becomes every results file below it (copies shown once, predict-mode and
    header-only files skipped with a note) and its failed jobs."""
    inputs = Inputs()
    for a in map(Path, args):
        if a.is_dir():
            found = [_read_found(p) for p in find_results(a)]
            inputs.attacks += [f for f in found if isinstance(f, Result) and _is_attack(f)]
            found = [f for f in found if not (isinstance(f, Result) and _is_attack(f))]
            kept = dedupe([f for f in found if isinstance(f, Result)])
            inputs.skipped += [f for f in found if isinstance(f, str)]
            inputs.failures += find_failures(a)
            if not kept and not inputs.attacks:
                why = f" ({len(found)} skipped)" if found else ""
                raise FileNotFoundError(f"{a}: no results files below this folder{why} (dsr-certify "
                                        "writes <outdir>/*.tsv; dsr-train certify=... writes "
                                        "<run>/results/*.tsv)")
            inputs.results += kept
            inputs.folders.append(a)
        else:
            r = read_result(a)
            (inputs.attacks if _is_attack(r) else inputs.results).append(r)
    return inputs


def _is_attack(r: Result) -> bool:
    return r.settings.get("mode") == "attack"


def attack_lines(attacks) -> list[str]:
    """The attack section: empirical robust accuracy at ε beside certified accuracy at ε, and the
    soundness alarm (images certified at ε whose attacked prediction is another class)."""
    from .attack import attack_summary

    if not attacks:
        return []
    md = ["", "## An attack that checks the certificates", "",
          "PGD on the smoothed classifier within the ℓ2 ball of radius ε (dsr-certify mode=attack). "
          "Empirical robust accuracy must not fall below certified accuracy at ε, up to the α of "
          "each certificate; an alarm is an image certified at ε whose attacked prediction is "
          "another class.", "",
          "| file | ε | images | certified acc. at ε (%) | empirical robust acc. (%) | alarms |",
          "|---|---:|---:|---:|---:|---|"]
    for r in attacks:
        a = attack_summary(r.frame, r.settings)
        alarms = ", ".join(map(str, a["alarms"])) or "none"
        md.append(f"| `{r.path.name}` | {a['epsilon']:g} | {a['images']} | "
                  f"{100 * a['certified_accuracy']:.1f} | "
                  f"{100 * a['empirical_robust_accuracy']:.1f} | {alarms} |")
    return md


def radii_error(radii) -> str | None:
    """Why report radii are refused (a NaN, an infinite or a negative radius), else None."""
    bad = [r for r in radii or () if not math.isfinite(r) or r < 0]
    if bad:
        return (f"--radii must be finite and >= 0 (got {', '.join(map(str, bad))})")
    return None


def compare_main(argv) -> int:
    """`compare A B [--radii ...]`: the paired comparison of two results files; 0, or 2 (one
    `error:` line) when a file is unreadable or the two do not pair."""
    p = argparse.ArgumentParser(prog="dsr-report compare",
                                description="Paired comparison of two results files certified "
                                            "on the same images with the same noise: images "
                                            "certified by A only, B only, both, neither at each "
                                            "radius, the exact McNemar test, the ACR difference "
                                            "with a paired bootstrap interval.")
    p.add_argument("a", type=Path, help="results file A")
    p.add_argument("b", type=Path, help="results file B")
    p.add_argument("--radii", nargs="+", type=float, help="radii (default 0, 0.25, ...)")
    p.add_argument("--labels", nargs=2, help="display names of A and B")
    args = p.parse_args(argv)
    if err := radii_error(args.radii):
        log.error(f"error: {err}")
        return 2
    try:
        a, b = read_result(args.a), read_result(args.b)
        radii = table_radii([a.frame, b.frame], args.radii)
        cmp = compare(a, b, radii)
    except (OSError, ValueError) as e:
        log.error(f"error: {e}")
        return 2
    labels = args.labels or [file_label(args.a), file_label(args.b)]
    log.info(f"{cmp.shared} shared images")
    log.info(comparison_markdown(cmp, *labels))
    return 0


def main(argv=None) -> int:
    """CLI; returns the exit code: 0, or 2 when a file is missing or unreadable, or an argument
    is refused (one `error:` line on stderr, nothing written before the error is removed). Its
    lines go through logging, on the plain console (logs.console)."""
    with console():
        return _main(argv)


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    p = argparse.ArgumentParser(prog="dsr-report",
                                description="Certified-accuracy tables and figures from "
                                            "dsr-certify results files (TSV), or from every results "
                                            "file below a folder (a sweep, an outputs folder). "
                                            "`compare A B` compares two files pairwise.")
    p.add_argument("files", nargs="+", type=Path, help="results files or folders")
    p.add_argument("--out", type=Path, help="output folder (default: <first folder>/report, or "
                                            "<first file's folder>/report)")
    p.add_argument("--labels", nargs="+", help="display names, one per file")
    p.add_argument("--radii", nargs="+", type=float, help="table radii (default 0, 0.25, ...)")
    p.add_argument("--wandb", action="store_true",
                   help="also log to a W&B run (offline unless WANDB_MODE says otherwise)")
    args = p.parse_args(argv)
    if err := radii_error(args.radii):
        log.error(f"error: {err}")
        return 2
    try:
        inputs = read_inputs(args.files)  # every file read and checked before anything is written
        for line in inputs.skipped:
            log.warning(line)
        files = [r.path for r in inputs.results]
        if not files:  # attack files only: their summary (python -m dsr_lightning.reports.attack)
            log.info("\n".join(attack_lines(inputs.attacks)).strip())
            return 0
        out = args.out or (inputs.folders[0] if inputs.folders else files[0].parent) / "report"
        kwargs = {"results": inputs.results, "skipped": inputs.skipped,
                  "failures": inputs.failures, "attacks": inputs.attacks}
        if args.wandb:
            import wandb

            out.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project="dsr_lightning", job_type="report", dir=str(out),
                             mode=None if os.environ.get("WANDB_MODE") else "offline",
                             config={"files": [str(f) for f in files]})
            try:
                res = log_to_wandb(run, files, out, args.labels, args.radii, inputs.folders,
                                   **kwargs)
            finally:
                run.finish()
        else:
            res = write_report(files, out, args.labels, args.radii, inputs.folders, **kwargs)
    except (OSError, ValueError) as e:
        log.error(f"error: {e}")
        return 2
    log.info(res["table"])
    if inputs.attacks:
        log.info("\n".join(attack_lines(inputs.attacks)))
    sweep = res.get("sweep") or {}
    if "table" in sweep:
        log.info(sweep["table"])
        if "times" in sweep:
            log.info(times_table(sweep["times"]))
    if inputs.failures:
        log.info(failures_summary(inputs.failures))
    written = [res["report"], res["certified_accuracy"], *res["counts"].values(),
               *(v for k, v in sweep.items() if k in ("panels", "T"))]
    for f in written:
        log.info(f"wrote {f}")
    return 0


__all__ = ["Inputs", "compare_main", "dedupe", "log_to_wandb", "main", "radii_error",
           "read_inputs", "write_report"]
