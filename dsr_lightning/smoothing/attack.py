"""An ℓ2 PGD attack on the smoothed classifier (Salman et al.'s SmoothAdv), to check the
certificates empirically (DESIGN §13).

The loss of image x' with label y is the cross-entropy of the Monte Carlo expectation of the base
classifier's vote over m noise draws:

    L(x') = −log( Σ_j w_j p_j[y] / Σ_j w_j ),   p_j = softmax f(D(x' + σε_j)),

where w_j is the draw's soft "keep" weight (1 − sigmoid(h_{f(z_j)}(z_j) − t) for the rejection
system, 1 without a rejector). A rejected draw does not vote in g_R, so the attack averages the
votes of the kept draws: the w-weighted average is the differentiable version of "rejected draws do
not vote", and its argmax over the real classes is the soft counterpart of g_R's answer.

`attack_steps` steps of normalised-gradient ascent of size `step_size`, each projected onto
[0, 1] and then onto the ε ball around x (scaling δ down keeps x + δ in [0, 1], being a convex
combination of x and a point in [0, 1]), with m fresh draws per step from the image's own attack
stream (ImageNoise keyed by the image's key + ATTACK_KEY_OFFSET: never the draws that certify or
predict). Only the input gets gradient (torch.autograd.grad with respect to δ): the networks'
parameters are never given a .grad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .checks import check_positive, check_positive_int
from .engine import ImageNoise

# noisy (b, *shape) -> (probabilities (b, K) of the base classifier, keep weight (b,) in [0, 1]),
# differentiable with respect to noisy (e.g. models.SmoothingSystem.soft_scores)
SoftScores = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

ATTACK_KEY_OFFSET = 1 << 62  # attack streams: image key + this (data set indices stay far below)
DEFAULT_STEP_FACTOR = 2.5    # step_size=None: 2.5 ε / steps (Madry et al.'s rule)


def default_step_size(epsilon: float, steps: int) -> float:
    return DEFAULT_STEP_FACTOR * float(epsilon) / int(steps)


def attack_noise(seed: int, keys: Sequence[int]) -> ImageNoise:
    """The attack's noise streams of images `keys` (disjoint from their certification streams)."""
    return ImageNoise(seed, [int(k) + ATTACK_KEY_OFFSET for k in keys])


def smoothed_loss(scores: SoftScores, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                  sigma: float) -> torch.Tensor:
    """(B,) −log of the keep-weighted average probability of y over the draws.
    x (B, *shape), y (B,), eps (B, m, *shape) standard normal draws."""
    B, m = eps.shape[:2]
    noisy = (x[:, None] + sigma * eps).reshape(B * m, *x.shape[1:])
    probs, keep = scores(noisy)  # (B·m, K), (B·m,)
    probs, keep = probs.float().view(B, m, -1), keep.float().view(B, m)
    p_y = probs.gather(2, y.view(B, 1, 1).expand(B, m, 1)).squeeze(2)  # (B, m)
    tiny = torch.finfo(torch.float32).tiny
    avg = (keep * p_y).sum(1) / keep.sum(1).clamp_min(tiny)
    return -torch.log(avg.clamp_min(tiny))


def smoothed_true_prob(scores: SoftScores, x: torch.Tensor, y: torch.Tensor, sigma: float,
                       draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) the keep-weighted average probability of y over `draws` draws (no gradient)."""
    eps = torch.randn((len(x), draws, *x.shape[1:]), generator=generator, device=x.device,
                      dtype=x.dtype)
    with torch.no_grad():
        return torch.exp(-smoothed_loss(scores, x, y, eps, sigma))


def pgd_attack(scores: SoftScores, x: torch.Tensor, y: torch.Tensor, sigma: float,
               epsilon: float, steps: int, draws: int, step_size: float | None = None,
               noise: ImageNoise | None = None, generator: torch.Generator | None = None,
               images_per_pass: int | None = None) -> torch.Tensor:
    """x' (B, *shape) in [0, 1] with ‖x' − x‖₂ ≤ ε that raises the smoothed loss of y (see the
    module's docstring). The draws of step s of image b are draws s·m .. (s+1)·m − 1 of its stream
    in `noise` (see attack_noise), else come from `generator`. `images_per_pass` images (all: None)
    go through the networks together, each with its m draws: a loss depends on its own image only,
    so the passes are exact. Runs with gradient even under torch.inference_mode or no_grad."""
    sigma, epsilon = check_positive("sigma", sigma), check_positive("epsilon", epsilon)
    steps, draws = check_positive_int("steps", steps), check_positive_int("draws", draws)
    step = default_step_size(epsilon, steps) if step_size is None else check_positive(
        "step_size", step_size)
    B, shape, dev = len(x), tuple(x.shape[1:]), x.device
    if noise is not None and len(noise) != B:
        raise ValueError(f"noise has {len(noise)} streams for {B} images")
    per = B if images_per_pass is None else check_positive_int("images_per_pass", images_per_pass)
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x.detach().clone()  # a normal tensor, also when x was made under inference_mode
        y = y.detach().clone().to(dev).long()
        delta = torch.zeros_like(x0)
        for s in range(steps):
            if noise is None:
                eps = torch.randn((B, draws, *shape), generator=generator, device=dev,
                                  dtype=x0.dtype)
            else:
                eps = torch.stack([noise.draw(b, int(noise.pos[b]) + s * draws,
                                              int(noise.pos[b]) + (s + 1) * draws, shape, dev,
                                              x0.dtype) for b in range(B)])
            grad = torch.zeros_like(x0)
            for lo in range(0, B, per):
                hi = min(lo + per, B)
                d = delta[lo:hi].clone().requires_grad_(True)
                loss = smoothed_loss(scores, x0[lo:hi] + d, y[lo:hi], eps[lo:hi], sigma).sum()
                (grad[lo:hi],) = torch.autograd.grad(loss, [d])
            norm = grad.reshape(B, -1).norm(dim=1).view(B, *([1] * len(shape)))
            # a zero gradient (a flat loss) takes no step
            delta = delta + step * grad / norm.clamp_min(1e-12)
            delta = (x0 + delta).clamp(0, 1) - x0  # into [0, 1]
            delta = delta.renorm(p=2, dim=0, maxnorm=epsilon)  # into the ball (stays in [0, 1])
        if noise is not None:
            noise.pos += steps * draws
        return (x0 + delta).clamp(0, 1).detach()  # (rounding; clamping only shortens δ)
