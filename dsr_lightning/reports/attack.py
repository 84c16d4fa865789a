"""The report of a mode=attack results file (DESIGN §13): at the attack's ε, the empirical robust
accuracy, the certified accuracy, and the soundness alarm: the images certified at ε whose attacked
prediction is another class.

    python -m dsr_lightning.reports.attack results/<file>_attack_eps0.25_k10_m32.tsv

A certificate at ε says that g_R is constant on the ball; an attacked point inside it where
Algorithm 1 answers another class contradicts it. Each certificate and each prediction may fail
with probability α, so an alarm is a reason to look (and rerun with a smaller α), not a proof.
"""

from __future__ import annotations

import sys

import pandas as pd

from dsr_lightning.errors import ResultsError
from dsr_lightning.logs import console, get_logger
from dsr_lightning.results import ATTACK_COLUMNS, read_settings, read_table
from dsr_lightning.smoothing import ABSTAIN

log = get_logger(__name__)


def attack_summary(frame: pd.DataFrame, settings: dict) -> dict:
    """{epsilon, images, clean_accuracy (Algorithm 1 at x), empirical_robust_accuracy (mean of
    attacked_correct), certified_accuracy (correct and radius >= ε), certified (count certified
    at ε), alarms (the idx certified at ε whose attacked prediction is a class other than the
    certified one; an abstain is no alarm)}. ResultsError for a frame that is not mode=attack."""
    missing = [c for c in ATTACK_COLUMNS if c not in frame.columns]
    if settings.get("mode") not in (None, "attack") or missing:
        what = f"mode={settings['mode']}" if settings.get("mode") else f"missing {', '.join(missing)}"
        raise ResultsError(f"not a mode=attack results file ({what}): run dsr-certify mode=attack "
                           "radius=<ε>")
    eps = settings.get("radius")
    if eps is None:
        eps = float(frame["epsilon"].iloc[0]) if len(frame) else float("nan")
    eps = float(eps)
    n = len(frame)
    certified = (frame["predict"] != ABSTAIN) & (frame["radius"] >= eps)
    alarm = (certified & (frame["attacked_predict"] != ABSTAIN)
             & (frame["attacked_predict"] != frame["predict"]))

    def mean(s: pd.Series) -> float:
        return float(s.mean()) if n else float("nan")

    return {"epsilon": eps, "images": n,
            "clean_accuracy": mean(frame["clean_predict"] == frame["label"]),
            "empirical_robust_accuracy": mean(frame["attacked_correct"].astype(bool)),
            "certified_accuracy": mean(certified & frame["correct"].astype(bool)),
            "certified": int(certified.sum()),
            "attacked_abstains": int((frame["attacked_predict"] == ABSTAIN).sum()),
            "max_perturbation_norm": float(frame["perturbation_norm"].max()) if n else 0.0,
            "alarms": [int(i) for i in frame.loc[alarm, "idx"]]}


def format_summary(summary: dict) -> str:
    s = summary
    lines = [f"attack at epsilon={s['epsilon']:g} on {s['images']} images:",
             f"  clean accuracy (Algorithm 1)     {s['clean_accuracy']:.4f}",
             f"  empirical robust accuracy        {s['empirical_robust_accuracy']:.4f}",
             f"  certified accuracy at epsilon    {s['certified_accuracy']:.4f}",
             f"  certified at epsilon             {s['certified']}",
             f"  attacked points abstained        {s['attacked_abstains']}",
             f"  largest perturbation norm        {s['max_perturbation_norm']:.6g}"]
    if s["alarms"]:
        lines.append(f"  ALARM: certified at epsilon but attacked to another class: idx "
                     f"{' '.join(map(str, s['alarms']))} (each certificate and prediction may "
                     "fail with probability alpha)")
    else:
        lines.append("  no certificate contradicted by the attack")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m dsr_lightning.reports.attack RESULTS_FILE`: the summary, on the plain console."""
    with console():
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m dsr_lightning.reports.attack RESULTS_FILE", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    path = argv[0]
    try:
        settings = read_settings(path)
        if settings.get("mode") not in (None, "attack"):
            raise ResultsError(f"{path}: not a mode=attack results file (mode={settings['mode']})")
        summary = attack_summary(read_table(path), settings)
    except (ValueError, FileNotFoundError) as e:  # ResultsError is a ValueError
        log.error(f"error: {e}")
        return 2
    log.info(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
