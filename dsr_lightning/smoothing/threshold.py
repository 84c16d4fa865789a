"""The statistics of `rejector.threshold=auto`: the decision threshold of f_R chosen for
certification (DESIGN §5). No Lightning, no config: jobs.threshold wires it to a run.

f_R rejects a draw when the head logit of f's prediction exceeds the threshold t. Training asks the
heads for b = 1[f(D(x+ε)) ≠ f(x)]; certification rewards something else (Theorem 3.1): a high p_A
and a high p_A + p_R, where rejecting a draw that f gets right costs p_A. So t is chosen, after
the weights, to maximise a certification objective estimated on validation draws:

- for `images` validation images, `draws` noise draws each (per-image noise streams), the noisy
  prediction f(D(x+ε)) and its head logit are recorded once;
- for every candidate t (quantiles of the observed logits, and +inf: never reject), the counts
  per image follow; c_A is the top real class; the certificate is the one dsr-certify would give
  at the configured N and α if the probabilities were the observed frequencies;
- objective `acr`: the mean certified radius of correct predictions (the ACR); `accuracy`: the
  certified accuracy at `radius`. Ties go to the larger ACR, then to the larger t (reject least).

Only the validation split (held out of the training split) is used, never the test split; the
chosen t is a fixed part of f_R before any test image is drawn, so the certificates stay sound.
Every checkpoint of a run with threshold=auto carries the t chosen for its own weights
(`dsr_threshold`), and dsr-certify uses it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .certificates import certify_details
from .engine import ImageNoise, check_images

OBJECTIVES = ("acr", "accuracy")  # selection.objective: mean certified radius, or accuracy at a radius
CANDIDATES = 64  # quantiles of the observed logits tried as thresholds (plus +inf)
SELECTION_KEY_OFFSET = 1 << 40  # noise keys of the selection draws, apart from certification's


@torch.inference_mode()
def collect_draws(system, dataset: Dataset, images: int, draws: int, sigma: float, batch: int,
                  seed: int, device: torch.device | str) -> dict[str, np.ndarray]:
    """For the first `images` items of `dataset`: `draws` noisy copies each through D and f and the
    rejector heads. Returns pred (I, n) f's noisy prediction, logit (I, n) the head logit of that
    prediction, label (I,) the true label."""
    n_img = min(images, len(dataset))
    xs, ys = zip(*(dataset[i] for i in range(n_img)))
    x = torch.stack(xs).to(device)                                    # (I, C, H, W)
    check_images(x)
    noise = ImageNoise(seed, [SELECTION_KEY_OFFSET + i for i in range(n_img)])
    per_chunk = max(1, batch // draws)
    preds, logits = [], []
    for lo in range(0, n_img, per_chunk):
        hi = min(n_img, lo + per_chunk)
        eps = torch.cat([noise.draw(b, 0, draws, x.shape[1:], x.device, x.dtype)
                         for b in range(lo, hi)])                    # ((hi-lo)*n, C, H, W)
        noisy = eps.mul(sigma).add_(x[lo:hi].repeat_interleave(draws, 0))
        out = system.outputs(noisy)
        head = out["head_logits"].gather(1, out["pred"][:, None]).squeeze(1)
        preds.append(out["pred"].view(hi - lo, draws).cpu())
        logits.append(head.float().view(hi - lo, draws).cpu())
    return {"pred": torch.cat(preds).numpy(), "logit": torch.cat(logits).numpy(),
            "label": np.asarray([int(y) for y in ys], dtype=np.int64)}


def candidates(logit: np.ndarray, k: int = CANDIDATES) -> np.ndarray:
    """Thresholds to try: the midpoints between k + 1 quantiles of the observed logits (so each
    separates observed values), and +inf (never reject)."""
    q = np.unique(np.quantile(logit.ravel(), np.linspace(0, 1, k + 1)))
    mids = (q[:-1] + q[1:]) / 2 if len(q) > 1 else q
    return np.concatenate([mids, [np.inf]])


def counts_at(pred: np.ndarray, logit: np.ndarray, t: float, num_classes: int) -> np.ndarray:
    """The counts (I, K+1) of f_R with threshold t over collected draws (last column: reject)."""
    keep = logit <= t                                                 # (I, n)
    real = (np.eye(num_classes, dtype=np.int64)[pred] * keep[..., None]).sum(1)  # (I, K)
    return np.concatenate([real, (~keep).sum(1, keepdims=True)], 1)


def estimate(draws: dict, t: float, num_classes: int, sigma: float, N: int, alpha: float,
             bound: str = "paper", radius: float = 0.0) -> dict:
    """What threshold t is worth on collected draws: the certificate dsr-certify would give each
    image at N and α if the probabilities were the observed frequencies (c_A the top real class),
    and the mean frequencies p_A, p_A + p_R behind it."""
    pred, logit, label = draws["pred"], draws["logit"], draws["label"]
    n = pred.shape[1]
    counts = counts_at(pred, logit, t, num_classes)
    c_hat = counts[:, :-1].argmax(1)                                  # (I,)
    scaled = np.rint(counts * (N / n)).astype(np.int64)              # the frequencies at N
    d = certify_details(scaled, c_hat, sigma, alpha, bound)
    ok = d.prediction == label
    n_a = np.take_along_axis(counts, c_hat[:, None], 1)[:, 0]
    return {"acr": float(np.mean(ok * d.radius)),
            "accuracy": float(np.mean(ok & (d.radius >= radius))),
            "pA": float(np.mean(n_a / n)), "pAR": float(np.mean((n_a + counts[:, -1]) / n))}


def choose_threshold(draws: dict, num_classes: int, sigma: float, N: int, alpha: float,
                     bound: str = "paper", objective: str = "acr", radius: float = 0.0) -> dict:
    """The best threshold for collected draws, and what it is worth: {"value", "score",
    "score_never_reject", "reject_rate", "reject_rate_f_right", "reject_rate_f_wrong", ...}.
    Ties go to the larger ACR, then to the larger threshold (reject least)."""
    ts = candidates(draws["logit"])
    ests = [estimate(draws, t, num_classes, sigma, N, alpha, bound, radius) for t in ts]
    best = max(range(len(ts)), key=lambda j: (round(ests[j][objective], 12),
                                              round(ests[j]["acr"], 12), ts[j]))
    t = float(ts[best])
    reject = draws["logit"] > t
    right = draws["pred"] == draws["label"][:, None]
    return {"value": t, "score": ests[best][objective], "score_never_reject": ests[-1][objective],
            "objective": objective, "pA": ests[best]["pA"], "pAR": ests[best]["pAR"],
            "reject_rate": float(reject.mean()),
            "reject_rate_f_right": float(reject[right].mean()) if right.any() else float("nan"),
            "reject_rate_f_wrong": float(reject[~right].mean()) if (~right).any() else float("nan")}
