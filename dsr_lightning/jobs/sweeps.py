"""Sweeps whose jobs fail alone. In a Hydra multirun a failing job (a user error or a crash) is
reported with its overrides and recorded in its folder (`FAILED.json`); the other jobs run; at the
end `SweepSummary` (a Hydra callback, in train.yaml's hydra.callbacks) lists what failed and exits
non-zero. Works with any launcher whose jobs share the sweep folder (basic, submitit)."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dsr_lightning.logs import get_logger

log = get_logger(__name__)
FAILED = "FAILED.json"


def _job() -> tuple[Path, int, list[str]]:
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), int(hc.job.num), list(hc.overrides.task)


def start_job() -> None:
    """Forget a failure recorded by an earlier sweep in the same job folder."""
    out, _, _ = _job()
    (out / FAILED).unlink(missing_ok=True)


def record_failure(err: BaseException, user_error: bool) -> dict:
    """Write the job's failure record and print it (one line for a user error, the traceback too
    for a crash). Returns the record."""
    out, num, overrides = _job()
    rec = {"job": num, "overrides": overrides, "error": str(err), "type": type(err).__name__,
           "user_error": user_error, "folder": str(out), "time": time.time()}
    if not user_error:
        rec["traceback"] = traceback.format_exc()
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED).write_text(json.dumps(rec, indent=2) + "\n")
    where = f"job {num} ({' '.join(overrides) or 'no overrides'})"
    if not user_error:
        log.error(rec["traceback"].rstrip("\n"))
    log.error(f"error: {where} failed: {err}\n  the other jobs go on; details in {out / FAILED}")
    return rec


def failures(sweep_dir: Path, since: float = 0.0) -> list[dict]:
    """The failure records under a sweep folder written at or after `since` (epoch seconds)."""
    recs = []
    for p in sorted(Path(sweep_dir).glob(f"**/{FAILED}")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            rec = {"job": "?", "overrides": [], "error": f"unreadable failure record {p}",
                   "time": p.stat().st_mtime}
        if rec.get("time", 0) >= since:
            recs.append(rec)
    return sorted(recs, key=lambda r: (str(r.get("job")).zfill(6)))


class SweepSummary(Callback):
    """At the end of a multirun: how many jobs ran, which failed (overrides and error); exits
    with status 1 when any did, so scripts and CI see it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.utils import configure_log

        # the launcher's logging again (a job's own, with its log file, may still be set up)
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        sweep = Path(config.hydra.sweep.dir)
        failed = failures(sweep, getattr(self, "start", 0.0))
        jobs = [p.parent.parent for p in sweep.rglob(".hydra/config.yaml")
                if p.stat().st_mtime >= getattr(self, "start", 0.0)]
        log.info(f"\nsweep {sweep}: {len(jobs)} jobs, {len(jobs) - len(failed)} succeeded, "
                 f"{len(failed)} failed")
        for rec in failed:
            # the error's first line and, for a longer one (a launcher's wrapped trace), its last
            lines = [ln.strip() for ln in str(rec.get("error", "")).splitlines() if ln.strip()]
            cause = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else "(no message)"
            record = Path(str(rec.get("folder", sweep))) / FAILED
            log.info(f"  FAILED job {rec.get('job')}: {' '.join(rec.get('overrides', []))}\n"
                     f"    {rec.get('type', 'Error')}: {cause}\n    details: {record}")
        if failed:
            sys.exit(1)
