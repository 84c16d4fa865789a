"""SIGTERM (what a cluster sends before it preempts or kills a job) and Ctrl-C: a job stops
promptly, keeps what is written, and raises errors.Interrupted saying how to resume."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dsr_lightning.errors import Interrupted


@contextmanager
def stop_on_signals(message: Callable[[str], str]) -> Iterator[None]:
    """Inside the block SIGTERM raises Interrupted at once (Lightning, which installs its own
    handlers when a loop starts, calls this one too), and Ctrl-C (KeyboardInterrupt, or the exit
    Lightning makes of it after its own shutdown) becomes Interrupted as well. `message(what)`
    tells what was kept and how to resume; `what` is 'SIGTERM' or 'Ctrl-C'."""

    def on_sigterm(signum, frame):
        raise Interrupted(message("SIGTERM"), signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message("Ctrl-C"), signal.SIGINT) from None
    except SystemExit as e:
        # Lightning: SIGTERMException (a SystemExit) from the fit loop; sys.exit(1) after it shut
        # down on Ctrl-C
        what = "SIGTERM" if type(e).__name__ == "SIGTERMException" else "Ctrl-C"
        raise Interrupted(message(what), signal.SIGTERM if what == "SIGTERM" else signal.SIGINT
                          ) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
