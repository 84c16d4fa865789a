"""Which process of a multi-device job speaks and writes: the one place the package asks.

Lightning's `rank_zero_only.rank` is the global rank: set from the launcher's environment when
Lightning is imported (RANK, LOCAL_RANK, SLURM_PROCID, ...) and by the strategy once the Trainer
has set it up. Before that, under Lightning's own multi-node launcher a node's first process sees
only its LOCAL_RANK, so NODE_RANK is asked too."""

from __future__ import annotations

import os

from pytorch_lightning.utilities import rank_zero_only


def is_main_process() -> bool:
    """Whether this is the job's main process (global rank 0): the one that takes the locks,
    writes the shared files and reports."""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0 \
        and int(os.environ.get("NODE_RANK", 0)) == 0
