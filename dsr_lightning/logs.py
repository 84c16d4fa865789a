"""How the package speaks: through `logging`, one logger per module
(`log = get_logger(__name__)`, all below the `dsr_lightning` logger), never print.

* Hydra jobs (train, certify) are set up by conf/hydra/job_logging/dsr.yaml: the console shows the
  plain message (INFO on stdout, warnings and errors on stderr) and the job's `<name>.log` file in
  its run folder gets every line of the package, DEBUG included, with time, logger and level;
  `route_lightning()` (run by every job) sends Lightning's lines there too.
* The other entry points (dsr-report, the threshold and given-networks tools) and scripts using the
  API call `console()`: the same plain console, with no file.
* Per-image certification rows: `row_level(progress_bar)` (DEBUG while a progress bar is drawn,
  so they reach the log file and leave the bar alone; INFO without a bar).
* `main_process()`: rank zero, where a line or a file should come once from a multi-device run.

This module imports nothing heavy: the logging configs import it.
"""

from __future__ import annotations

import logging
import sys

PACKAGE = "dsr_lightning"
PLAIN = "%(message)s"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (`get_logger(__name__)`); a bare name is put below the package's."""
    return logging.getLogger(name if name.split(".")[0] == PACKAGE else f"{PACKAGE}.{name}")


class _StdStream(logging.StreamHandler):
    """A stream handler that writes to sys.stdout or sys.stderr as they are at each line (not as
    they were when it was built): a redirected or captured stream is followed."""

    stream_name = "stdout"

    def __init__(self, level: int | str = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.setStream; the stream is always the current
        pass


class StdoutHandler(_StdStream):
    """Lines to the current sys.stdout."""


class StderrHandler(_StdStream):
    """Lines to the current sys.stderr."""

    stream_name = "stderr"


class BelowLevel(logging.Filter):
    """Keeps the records below `level` (the stdout console: warnings go to stderr instead)."""

    def __init__(self, level: int | str = logging.WARNING):
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else int(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _Console:
    """Marks the handlers console() added, so that a second call replaces them."""


class Console:
    """What console() installed: `with console(): ...` takes it away again at the end (an entry
    point run inside a longer-lived process, a test), `close()` does so by hand."""

    def __init__(self, log: logging.Logger, level: int, handlers: list[logging.Handler]):
        self.log, self._level, self.handlers = log, level, handlers

    def close(self) -> None:
        for h in self.handlers:
            self.log.removeHandler(h)
        self.log.setLevel(self._level)

    def __enter__(self) -> logging.Logger:
        return self.log

    def __exit__(self, *exc) -> None:
        self.close()


class _ConsoleOut(StdoutHandler, _Console):
    pass


class _ConsoleErr(StderrHandler, _Console):
    pass


def console(level: int | str = logging.INFO) -> Console:
    """The plain console for entry points that Hydra does not set up (dsr-report, the threshold
    tool, a script using the API): the package's lines at `level` and above, the message alone,
    on stdout (warnings and errors on stderr), no file. A second call replaces the first's
    handlers. Inside a Hydra job (whose console is set up already) lines would show twice."""
    log = logging.getLogger(PACKAGE)
    before = log.level
    for h in [h for h in log.handlers if isinstance(h, _Console)]:
        log.removeHandler(h)
    out, err = _ConsoleOut(), _ConsoleErr(logging.WARNING)
    out.addFilter(BelowLevel(logging.WARNING))
    for h in (out, err):
        h.setFormatter(logging.Formatter(PLAIN))
        log.addHandler(h)
    log.setLevel(level)
    return Console(log, before, [out, err])


LIGHTNING = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")


def route_lightning() -> None:
    """Lightning's lines through the logging that is set up (a Hydra job's: its console and its
    log file). Imported before any was set up, Lightning gave its loggers a stderr handler of
    their own and stopped them propagating; with handlers on the root logger, both are undone.
    Idempotent."""
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING:
        log = logging.getLogger(name)
        own = [h for h in log.handlers if type(h) is logging.StreamHandler]
        if own and not log.propagate:
            for h in own:
                log.removeHandler(h)
            log.propagate = True


def row_level(progress_bar: bool) -> int:
    """The level of a per-image line: DEBUG under a progress bar (the log file keeps it, the
    console's bar is left alone), INFO without one (a log file or CI output is the progress)."""
    return logging.DEBUG if progress_bar else logging.INFO


def main_process() -> bool:
    """Whether this is the job's main process (global rank 0): the one that takes the locks,
    writes the shared files and reports; the one place the package asks. Lightning's
    `rank_zero_only.rank` is the strategy's once a Trainer runs, else the launcher's environment
    (RANK, LOCAL_RANK, SLURM_PROCID, ...); before that, under Lightning's own multi-node launcher a
    node's first process sees only its LOCAL_RANK, so NODE_RANK is asked too."""
    import os

    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0 \
        and int(os.environ.get("NODE_RANK", 0) or 0) == 0
