"""Samples per forward pass: `certify.batch=auto` (the largest batch that fits, probed before the
first image) and the back-off on out-of-memory during a run (halve the batch, redo the chunk).

Neither changes a number: each image's noise comes from its own stream whatever the chunk it is
drawn in (smoothing.ImageNoise, DESIGN §3), and a label depends on its own sample alone, so a chunk
cut into pieces gives the same labels, the same counts and the same certificates.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from dsr_lightning.errors import ConfigError
from dsr_lightning.logs import get_logger

log = get_logger(__name__)
AUTO = "auto"       # certify.batch=auto
PROBE_START = 64    # the first batch batch=auto tries
CPU_CAP = 1024      # a CPU allocation that fails is not reliably catchable: never probe above this


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error (CUDA's is the same class), or a RuntimeError whose message says
    'out of memory' (what some kernels and other backends raise instead)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err))


def release_memory(device: torch.device | str) -> None:
    """After an out-of-memory error on CUDA: drop what the failed pass left (collect cycles) and
    hand the allocator's cached blocks back, so the next, smaller try starts from a clean slate.
    (Elsewhere nothing: a collection costs a few tenths of a second, and the pass's tensors are
    freed with its traceback.)"""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _fits(run: Callable[[int], object], n: int, device: torch.device | str) -> bool:
    try:
        run(n)
        return True
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
    # outside the except clause: the traceback (and the tensors its frames hold) is gone
    release_memory(device)
    return False


def probe_batch(run: Callable[[int], object], cap: int, device: torch.device | str,
                start: int = PROBE_START) -> tuple[int, int | None]:
    """The largest batch n that `run(n)` completes with: tries start, 2·start, 4·start, ... up to
    `cap` (the last try is the cap itself) and stops at the first out-of-memory error; when `start`
    itself runs out of memory, tries start/2, start/4, ... down to 1. Returns (n, the batch that ran
    out of memory, or None when the cap was reached). Doubling, not bisection: n is within a factor
    2 of the true limit, and the run's back-off covers what the probe did not see. Raises
    ConfigError when even one sample runs out of memory; any other error propagates untouched."""
    if cap < 1 or start < 1:
        raise ValueError(f"probe_batch: cap and start must be >= 1, got {cap}, {start}")
    n, best, failed = min(start, cap), 0, None
    while True:
        if _fits(run, n, device):
            best = n
            if failed is not None or n >= cap:  # going down: the first that fits is the answer
                return best, failed
            n = min(2 * n, cap)
        else:
            failed = n
            if best:
                return best, failed
            if n == 1:
                raise ConfigError(f"certify.batch=auto: out of memory with 1 sample per forward "
                                  f"pass on {device}: the system does not fit there (free the "
                                  "device's memory, set certify.bf16=true, or use a device with "
                                  "more memory)")
            n //= 2


class BackoffForward:
    """`forward` (e.g. AcceleratedSystem: noisy (b, *shape) -> labels (b,)) on inputs of at most
    `limit` rows: a larger input is cut into pieces of `limit` rows and their outputs are
    concatenated (outputs must be tensors with one row per input row). When a piece runs out of
    memory, the limit becomes half that piece (for the rest of the run: the next chunks would run
    out too), one line is printed, and the piece is redone in halves; a piece of one sample that
    runs out of memory raises ConfigError. Any other error propagates untouched. `limit` None:
    no cutting until the first out-of-memory error."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], limit: int | None = None,
                 num_classes: int | None = None, name: str = "certify"):
        self.forward, self.limit, self.name = forward, limit, name
        self.num_classes = getattr(forward, "num_classes", None) if num_classes is None \
            else num_classes
        self.backoffs: list[tuple[int, int]] = []  # (the size that ran out of memory, new limit)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs, lo = [], 0
        while lo < len(x) or not outs:
            hi = len(x) if self.limit is None else min(len(x), lo + self.limit)
            out = self._attempt(x[lo:hi])
            if out is None:
                self._back_off(hi - lo, x.device)
                continue
            outs.append(out)
            lo = hi
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attempt(self, piece: torch.Tensor) -> torch.Tensor | None:
        """forward(piece), or None when it ran out of memory."""
        try:
            return self.forward(piece)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            if len(piece) <= 1:
                raise ConfigError(f"{self.name}: out of memory with 1 sample per forward pass on "
                                  f"{piece.device}: the system does not fit there (free the "
                                  "device's memory, set certify.bf16=true, or use a device with "
                                  "more memory)") from err
        return None

    def _back_off(self, size: int, device: torch.device) -> None:
        new = size // 2
        self.limit = new if self.limit is None else min(self.limit, new)
        self.backoffs.append((size, self.limit))
        log.warning(f"{self.name}: out of memory at {size} samples per forward pass -> "
                    f"{self.limit}; redoing that chunk")
        release_memory(device)
