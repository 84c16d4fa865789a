"""Console entry points: `dsr-train`, `dsr-certify`, `dsr-report`, `dsr-threshold` (also
`python -m dsr_lightning {train,certify,report,threshold} ...`). The top-level train.py and
certify.py call the same functions. Configs come from the package (`pkg://dsr_lightning.conf`),
so an installed wheel works from any folder.

Every job ends by saying how it went. A user error (bad config value, missing or broken file) is
one `error:` line on stderr and exit status 2, with nothing written; inside a sweep it fails that
job alone (dsr_lightning.jobs.sweeps) and the sweep goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from dsr_lightning.config import CONFIG_PATH, is_multirun
from dsr_lightning.logs import get_logger
from dsr_lightning.logs import main_process as _main_process

log = get_logger(__name__)


def run_job(fn: Callable[[DictConfig], dict], cfg: DictConfig,
            report: Callable[[dict], None]) -> float | None:
    """fn(cfg), then report(result) on the main process; returns the job's objective (what a
    Hydra sweeper optimises). Errors: see the module docstring."""
    from hydra.errors import InstantiationException

    from dsr_lightning.errors import USER_ERRORS, Interrupted
    from dsr_lightning.jobs import sweeps
    from dsr_lightning.jobs.console import quiet_third_party

    quiet_third_party()

    multirun = is_multirun()
    if multirun:
        sweeps.start_job()
    try:
        try:
            result = fn(cfg)
        except InstantiationException as e:  # a data module's own error, raised as Hydra built it
            if isinstance(e.__cause__, USER_ERRORS):
                raise e.__cause__ from None
            raise
    except Interrupted as e:  # the whole sweep stops too: the cluster wants the machine back
        log.error(f"stopped: {e}")
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        if multirun:
            sweeps.record_failure(e, user_error=True)
            return None
        log.error(f"error: {e}")
        sys.exit(2)
    except Exception as e:
        if multirun:
            sweeps.record_failure(e, user_error=False)
            return None
        raise
    if _main_process():
        report(result)
    return result.get("objective")


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def report_train(result: dict) -> None:
    log.info(f"\ntrained {result['epochs']} epoch(s); outputs in {result['output_dir']}")
    if result.get("best"):
        log.info(f"best {result['monitor']} = {_fmt(result.get('best_score'))}: {result['best']}")
    if result.get("last"):
        log.info(f"last checkpoint: {result['last']}")
    if result.get("export"):
        log.info(f"exported the best network to {result['export']}")
    if result.get("threshold") is not None:
        log.info(f"rejector threshold: {result['threshold']:.4g} "
                 f"({result.get('threshold_note', '')})")
    for system, cert in (result.get("certification") or {}).items():
        log.info(f"certified ({system}): {cert['file']}\n{cert['table']}")


def report_certify(result: dict) -> None:
    for res in (result, *result.get("also", [])):  # the systems of one pass, each its own file
        log.info(f"\n{res['system']}: {res['outfile']}  ({res['done_before']} rows resumed, "
                 f"{res['todo']} certified now)\nsettings: {res['settings']}")
        if res.get("table"):
            log.info(res["table"])


def _train(cfg: DictConfig) -> float | None:
    from dsr_lightning.jobs.training import train

    return run_job(train, cfg, report_train)


def _certify(cfg: DictConfig) -> float | None:
    from dsr_lightning.jobs.certification import certify

    return run_job(certify, cfg, report_certify)


train_main = hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")(_train)
certify_main = hydra.main(config_path=CONFIG_PATH, config_name="certify",
                          version_base="1.3")(_certify)


def report_main(argv: list[str] | None = None) -> int:
    from dsr_lightning.reports import main

    return main(argv)


def threshold_main(argv: list[str] | None = None) -> int:
    from dsr_lightning.jobs.threshold import main

    return main(argv)


COMMANDS = {"train": train_main, "certify": certify_main, "report": report_main,
            "threshold": threshold_main}
USAGE = """usage: python -m dsr_lightning {train,certify,report,threshold} [overrides or arguments]
  train      train a stage (Hydra overrides: denoiser=dncnn sigma=0.5 ...)
  certify    certify a data split (system=rejection rejector_ckpt=... ...)
  report     tables and figures from results files or folders
  threshold  how certification moves with the rejector's threshold (a rejector checkpoint)
Each command takes --help."""


def main(argv: list[str] | None = None) -> int:
    """`python -m dsr_lightning {train,certify,report,threshold} ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("report", "threshold"):
        return COMMANDS[cmd](rest)
    sys.argv = [f"dsr-{cmd}", *rest]  # Hydra reads its overrides from sys.argv
    COMMANDS[cmd]()
    return 0
