"""Forward FLOPs of a network, counted by PyTorch's FlopCounterMode, to compare the cost of
classifiers, denoisers and rejectors (e.g. the rejector's stems) without timing them.

Counted are the operations FlopCounterMode knows (convolutions, matrix products, attention), two
FLOPs per multiply-accumulate; normalisation, activations, pooling and additions are not, so a
count slightly undercounts a network's arithmetic but ranks networks reliably.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(module: nn.Module, *inputs: Any) -> int:
    """Forward FLOPs of `module(*inputs)` (for the whole batch: pass one image for per-image
    counts). Runs the forward once in eval mode under no_grad; each submodule's train/eval mode is
    restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            module(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return int(counter.get_total_flops())


def format_gflops(flops: int | float, digits: int = 2) -> str:
    """A FLOP count as GFLOP: 4_130_000_000 -> '4.13 GFLOP'."""
    return f"{flops / 1e9:.{digits}f} GFLOP"
