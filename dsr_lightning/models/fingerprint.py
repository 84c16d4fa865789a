"""The probe of a network (DESIGN §8): its outputs on a fixed seeded probe batch, kept as a small
sketch (dsr_lightning.identity compares two of them and names networks and systems).

A probe batch is PROBE_IMAGES images of the data's shape, uniform in [0, 1], from a generator
seeded with PROBE_SEED; a denoiser sees them with Gaussian noise of its σ added (the inputs it was
made for). The sketch of an output (B, ...) is, per image, the output itself when it has at most
SKETCH_DIM values (a classifier's logits), else its projection on SKETCH_DIM fixed random
directions (a denoiser's image): a network whose outputs differ anywhere moves the sketch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

PROBE_SEED = 20_240_607
PROBE_IMAGES = 2
SKETCH_DIM = 32


def probe_batch(shape: Sequence[int], sigma: float | None = None) -> torch.Tensor:
    """(PROBE_IMAGES, *shape) float32 on the CPU: seeded uniform images, plus N(0, σ²) noise when
    σ is given (a denoiser's inputs). The same tensor on every machine."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand((PROBE_IMAGES, *[int(s) for s in shape]), generator=gen)
    if sigma:
        x = x + float(sigma) * torch.randn(x.shape, generator=gen)
    return x


def _directions(dim: int) -> torch.Tensor:
    """(dim, SKETCH_DIM) fixed random directions, float64, seeded by the dimension."""
    gen = torch.Generator().manual_seed(PROBE_SEED + dim)
    return torch.randn((dim, SKETCH_DIM), generator=gen, dtype=torch.float64) / math.sqrt(dim)


def sketch(outputs: torch.Tensor) -> list[list[float]]:
    """Per image the output's values (at most SKETCH_DIM of them) or their random projection."""
    flat = outputs.detach().to("cpu", torch.float64).reshape(len(outputs), -1)  # (B, d)
    if flat.shape[1] > SKETCH_DIM:
        flat = flat @ _directions(flat.shape[1])  # (B, SKETCH_DIM)
    return [[float(v) for v in row] for row in flat]


def run_probe(forward: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int],
              sigma: float | None = None, device: torch.device | str = "cpu") -> dict:
    """The probe record of `forward` (a network's forward, in eval mode; run without gradient):
    {shape, sigma, seed, device, sketch}. What `forward` returns must be a tensor with one row
    per image: checking that is the caller's (jobs.networks.probe)."""
    device = torch.device(device)
    x = probe_batch(shape, sigma).to(device)
    with torch.no_grad():
        out = forward(x)
    return {"shape": [int(s) for s in shape], "sigma": float(sigma) if sigma else None,
            "seed": PROBE_SEED, "device": device.type, "sketch": sketch(out)}
