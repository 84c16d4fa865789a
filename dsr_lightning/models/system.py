"""The base classifier with rejection f_R(x) = R if h_{f(D(x))}(D(x)) rejects else f(D(x))."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

# The systems certified: rejection (f, D and the heads), denoised (f and D: Salman et al.), plain
# (f alone: Cohen et al.)
SYSTEMS = ("rejection", "denoised", "plain")
INVALID = -1  # the label of a draw whose logits are not finite: no class, counted apart and refused


def consulted(head_logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(B,) float32: the logit of the head f_R consults, that of each draw's prediction."""
    return head_logits.gather(1, pred[:, None]).squeeze(1).float()


def finite_draws(logits: torch.Tensor, head_logits: torch.Tensor | None,
                 pred: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the draws whose logits (and consulted head's logit) are finite. The argmax of
    NaN logits is some class: the others get no label (INVALID), which the engine refuses."""
    finite = torch.isfinite(logits).all(1)
    if head_logits is not None:
        finite &= torch.isfinite(consulted(head_logits.detach(), pred))
    return finite


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and requires_grad False on every parameter; returns the module. (Parameter by
    parameter: a TorchScript module has no requires_grad_.)"""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class SmoothingSystem(nn.Module):
    """Noisy [0,1] batch -> denoiser D (identity if None) -> classifier f -> rejector heads.

    `forward` gives labels in {0..K}, K = reject: reject iff head_logit[f(z)] > threshold (logit
    0 = probability 1/2). Without a rejector it is f(D(x)) (denoised smoothing; plain randomized
    smoothing without a denoiser too) and never outputs K. D and f run without autograd and stay
    in eval mode whatever `.train()` says (they are frozen by design); only the rejector can
    receive gradient, through `outputs(...)["head_logits"]`.
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module | None = None,
                 rejector: nn.Module | None = None, threshold: float = 0.0,
                 num_classes: int | None = None):
        super().__init__()
        self.classifier, self.denoiser, self.rejector = classifier, denoiser, rejector
        self.threshold = float(threshold)
        for m in (classifier, rejector):
            if num_classes is None:
                num_classes = getattr(m, "num_classes", None)
        if num_classes is None:
            raise ValueError("cannot tell K: pass num_classes or a classifier with .num_classes")
        if rejector is not None and getattr(rejector, "num_classes", num_classes) != num_classes:
            raise ValueError(f"rejector has {rejector.num_classes} heads, classifier {num_classes}")
        self.num_classes = int(num_classes)
        self.classifier.eval()
        if denoiser is not None:
            denoiser.eval()

    def train(self, mode: bool = True) -> SmoothingSystem:
        self.training = mode
        if self.rejector is not None:
            self.rejector.train(mode)
        self.classifier.eval()
        if self.denoiser is not None:
            self.denoiser.eval()
        return self

    def outputs(self, noisy: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """noisy: (B, C, H, W) -> dict of denoised (B,C,H,W), logits (B,K), pred (B,),
        head_logits (B,K) or None, reject (B,) bool, label (B,) in {0..K}, or INVALID where f's
        logits (or the consulted head's logit) are not finite."""
        with torch.no_grad():
            z = noisy if self.denoiser is None else self.denoiser(noisy)  # (B, C, H, W)
            if self.rejector is None:
                logits, feats = self.classifier(z), []
            else:
                logits, feats = self.classifier.forward_features(z)  # (B, K), [(B, c_i, h_i, w_i)]
            pred = logits.argmax(1)  # (B,)
        if self.rejector is None:
            head_logits, reject = None, torch.zeros_like(pred, dtype=torch.bool)
        else:
            head_logits = self.rejector(z, feats)  # (B, K)
            # in float32 whatever the autocast: a bf16 comparison would round the threshold
            reject = consulted(head_logits.detach(), pred) > self.threshold
        label = torch.where(reject, torch.full_like(pred, self.num_classes), pred)
        label = torch.where(finite_draws(logits, head_logits, pred), label,
                            torch.full_like(label, INVALID))
        return dict(denoised=z, logits=logits, pred=pred, head_logits=head_logits, reject=reject,
                    label=label)

    def soft_scores(self, noisy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The differentiable counterpart of `forward`, for attacks on g_R: noisy (B, C, H, W) ->
        (softmax of f(D(noisy)) (B, K) float32, keep weight (B,) float32). The keep weight is
        1 − sigmoid(head_logit[f(z)] − threshold) (1 without a rejector): a soft "this draw is
        not rejected". Gradient flows to `noisy` through D, f and the rejector (the rejector sees
        f's stage features detached, as in training, so its gradient reaches noisy through D).
        The networks stay as they are: call it with torch.autograd.grad with respect to the input
        (the frozen parameters get no .grad)."""
        z = noisy if self.denoiser is None else self.denoiser(noisy)  # (B, C, H, W)
        if self.rejector is None:
            logits = self.classifier(z)  # (B, K)
            keep = torch.ones(len(z), device=z.device, dtype=torch.float32)
        else:
            logits, feats = self.classifier.forward_features(z)
            head = self.rejector(z, feats).float()  # (B, K)
            pred = logits.detach().argmax(1)  # (B,) the draw's prediction (not differentiable)
            keep = torch.sigmoid(self.threshold - head.gather(1, pred[:, None]).squeeze(1))
        return logits.float().softmax(1), keep

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """noisy: (B, C, H, W) -> labels (B,) long in {0..K}, K meaning reject."""
        return self.outputs(noisy)["label"]


class SharedDraws(nn.Module):
    """One pass, several systems (DESIGN §8.2): the rejection system at several thresholds and its
    denoised baseline (the same f and D, no heads) from the same noisy draws.

    forward: noisy (B, C, H, W) -> one label per draw, c·(M+1) + b, with c = f's class of the
    draw and b the number of `thresholds` (sorted, M of them) that the consulted head's logit
    exceeds (INVALID where a logit is not finite); `num_classes` = K·(M+1), so the engine's
    counts of these labels are the joint counts of (c, b). `split(counts, threshold)` turns them
    into one system's counts (..., K+1): at threshold τ_j the draws with b > j are rejected (the
    head's logit > τ_j, exactly as SmoothingSystem decides, in float32), the others vote for c;
    `threshold=None` is the denoised baseline (no draw rejected). Each system's counts are those
    a run of that system alone would count from the same draws."""

    def __init__(self, system: SmoothingSystem, thresholds) -> None:
        super().__init__()
        if system.rejector is None:
            raise ValueError("SharedDraws needs a system with a rejector")
        self.system = system
        self.thresholds = sorted({float(t) for t in thresholds})
        self.register_buffer("edges", torch.tensor(self.thresholds, dtype=torch.float32),
                             persistent=False)
        self.k, self.m = system.num_classes, len(self.thresholds)
        self.num_classes = self.k * (self.m + 1)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        out = self.system.outputs(noisy)
        pred, heads = out["pred"], out["head_logits"].detach()
        edges = self.edges.to(heads.device)  # (M,) a no-op where the module was moved with them
        b = (consulted(heads, pred)[:, None] > edges[None, :]).sum(1)  # (B,) thresholds passed
        cell = pred * (self.m + 1) + b
        return torch.where(finite_draws(out["logits"], heads, pred), cell,
                           torch.full_like(cell, INVALID))

    def split(self, counts: np.ndarray, threshold: float | None) -> np.ndarray:
        """counts (..., K·(M+1) + 1) of this module's labels (the last, reject, column empty) ->
        the counts (..., K+1) of the system at `threshold` (one of `thresholds`), or of the
        denoised baseline (None)."""
        joint = counts[..., :-1].reshape(*counts.shape[:-1], self.k, self.m + 1)  # (..., K, M+1)
        j = self.m + 1 if threshold is None else self.thresholds.index(float(threshold)) + 1
        kept = joint[..., :j].sum(-1)  # buckets 0..j-1: the head's logit <= the threshold
        rejected = joint[..., j:].sum((-1, -2))
        return np.concatenate([kept, rejected[..., None]], -1)
