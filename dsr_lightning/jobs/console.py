"""What a job prints: our progress and results. Third-party lines that say nothing to our users are
silenced where they come from (a logging filter on Lightning's info logger, warning filters by
message); every other warning is kept."""

from __future__ import annotations

import logging
import warnings

from dsr_lightning.logs import route_lightning

# Lightning's info lines that say nothing to our users: advertisements for its cloud products,
# the accelerators it did not find (once per Trainer), the seed and the end of fit (the job prints
# its seed in its config and says itself how training went)
_ADVERTS = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:",
            "`Trainer.fit` stopped:", "Seed set to")
_WARNINGS = (
    # Lightning's own pytree helper calling a deprecated torch API: nothing a user can change
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # f and D are frozen, in eval mode by design (DESIGN §3); Lightning warns about any such module
    r"Found \d+ module\(s\) in eval mode at the start of training",
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_ADVERTS)


def quiet_third_party() -> None:
    """Install the filters, and send Lightning's lines through the job's logging (its console
    and log file: logs.route_lightning). Idempotent."""
    route_lightning()
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.seed", "lightning.fabric.utilities.seed"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in log.filters):
            log.addFilter(_DropAdverts())
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
