"""`rejector.threshold=auto`: the decision threshold of f_R chosen for certification.

f_R rejects a draw when the head logit of f's prediction exceeds the threshold t. Training asks the
heads for b = 1[f(D(x+ε)) ≠ f(x)]; certification rewards something else (Theorem 3.1): a high p_A
and a high p_A + p_R, where rejecting a draw that f gets right costs p_A. So t is chosen, after
the weights, to maximise a certification objective estimated on validation draws:

- for `images` validation images, `draws` noise draws each (per-image noise streams), the noisy
  prediction f(D(x+ε)) and its head logit are recorded once;
- for every candidate t (quantiles of the observed logits, and +inf: never reject), the counts
  per image follow; c_A is the top real class; the certificate is the one certify.py would give
  at the configured N and α if the probabilities were the observed frequencies;
- objective `acr`: the mean certified radius of correct predictions (the ACR); `accuracy`: the
  certified accuracy at `radius`. Ties go to the largest t (reject least).

Only the validation split (held out of the training split) is used, never the test split; the
chosen t is a fixed part of f_R before any test image is drawn, so the certificates stay sound.
Every checkpoint of a run with threshold=auto carries the t chosen for its own weights
(`dsr_threshold`), and certify.py uses it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dsr_lightning.smoothing import ImageNoise, certify_details, check_images

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


def threshold_scores(pred: np.ndarray, logit: np.ndarray, label: np.ndarray,
                     thresholds: np.ndarray, num_classes: int, sigma: float, N: int, alpha: float,
                     bound: str = "paper", objective: str = "acr",
                     radius: float = 0.0) -> np.ndarray:
    """The objective (module docstring) of each threshold: (len(thresholds),)."""
    I, n = pred.shape
    onehot = np.eye(num_classes, dtype=np.int64)[pred]               # (I, n, K)
    scores = np.empty(len(thresholds))
    for j, t in enumerate(thresholds):
        keep = logit <= t                                            # (I, n)
        real = (onehot * keep[..., None]).sum(1)                     # (I, K)
        counts = np.concatenate([real, (~keep).sum(1, keepdims=True)], 1)  # (I, K+1)
        c_hat = real.argmax(1)                                       # (I,)
        scaled = np.rint(counts * (N / n)).astype(np.int64)          # the frequencies at N
        d = certify_details(scaled, c_hat, sigma, alpha, bound)
        ok = d.prediction == label
        scores[j] = (np.mean(ok * d.radius) if objective == "acr"
                     else np.mean(ok & (d.radius >= radius)))
    return scores


def choose_threshold(draws: dict, num_classes: int, sigma: float, N: int, alpha: float,
                     bound: str = "paper", objective: str = "acr", radius: float = 0.0) -> dict:
    """The best threshold for collected draws, and what it is worth: {"value", "score",
    "score_never_reject", "reject_rate", "reject_rate_f_right", "reject_rate_f_wrong"}."""
    ts = candidates(draws["logit"])
    scores = threshold_scores(draws["pred"], draws["logit"], draws["label"], ts, num_classes,
                              sigma, N, alpha, bound, objective, radius)
    best = int(np.flatnonzero(scores >= scores.max() - 1e-12)[-1])  # ties: the largest t
    t = float(ts[best])
    reject = draws["logit"] > t
    right = draws["pred"] == draws["label"][:, None]
    return {"value": t, "score": float(scores[best]), "score_never_reject": float(scores[-1]),
            "objective": objective, "reject_rate": float(reject.mean()),
            "reject_rate_f_right": float(reject[right].mean()) if right.any() else float("nan"),
            "reject_rate_f_wrong": float(reject[~right].mean()) if (~right).any() else float("nan")}


def select_for(task, settings: dict) -> dict:
    """Choose the threshold for the task's current weights on its datamodule's validation split.
    settings: images, draws, batch, N, alpha, bound, objective, radius, sigma, seed."""
    from dsr_lightning.models import SmoothingSystem

    rej_mode = task.rejector.training
    task.rejector.eval()
    try:
        system = SmoothingSystem(task.classifier, task.denoiser, task.rejector)
        val = task.trainer.datamodule.dataset("val")
        draws = collect_draws(system, val, settings["images"], settings["draws"],
                              settings["sigma"], settings["batch"], settings["seed"], task.device)
    finally:
        task.rejector.train(rej_mode)
    choice = choose_threshold(draws, system.num_classes, settings["sigma"], settings["N"],
                              settings["alpha"], settings["bound"], settings["objective"],
                              settings["radius"])
    return {**choice, "split": "val", "images": int(draws["pred"].shape[0]),
            "draws": int(draws["pred"].shape[1]), "N": settings["N"], "alpha": settings["alpha"],
            "bound": settings["bound"], "epoch": int(task.current_epoch),
            "global_step": int(task.global_step)}


def selection_settings(cfg) -> dict | None:
    """What select_for needs, from a train config; None unless rejector.threshold=auto."""
    rej = cfg.rejector
    if rej.threshold != "auto":
        return None
    sel = rej.selection
    return {"images": int(sel.images), "draws": int(sel.draws), "batch": int(sel.batch),
            "N": int(sel.N if sel.N is not None else cfg.certify.N),
            "alpha": float(sel.alpha if sel.alpha is not None else cfg.certify.alpha),
            "bound": cfg.certify.bound or "paper", "objective": sel.objective,
            "radius": float(sel.radius), "sigma": float(cfg.sigma), "seed": int(cfg.seed)}


def finish_rejector(cfg, task, trainer, result: dict, datamodule) -> dict:
    """After fit: the threshold f_R uses (read back from the best checkpoint when chosen)."""
    if cfg.rejector.threshold != "auto":
        return {"threshold": float(cfg.rejector.threshold), "threshold_note": "configured"}
    path = result.get("best") or result.get("last")
    if not path:
        return {}
    choice = torch.load(path, map_location="cpu", weights_only=False).get("dsr_threshold") or {}
    if "value" not in choice:
        return {}
    note = (f"auto: {choice['objective']} {choice['score']:.4f} on {choice['images']} validation "
            f"images x {choice['draws']} draws at N={choice['N']} (never rejecting: "
            f"{choice['score_never_reject']:.4f}); rejects {100 * choice['reject_rate']:.1f} % of "
            f"draws, {100 * choice['reject_rate_f_right']:.1f} % of those f gets right, "
            f"{100 * choice['reject_rate_f_wrong']:.1f} % of those it gets wrong")
    return {"threshold": choice["value"], "threshold_note": note, "threshold_choice": choice}
