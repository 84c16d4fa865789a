"""Main job: train the rejector heads h_k for a frozen classifier f and a frozen denoiser D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryPrecision,
    BinaryRecall,
    BinaryROC,
)

from dsr_lightning.tasks.base import FrozenAwareModule

TARGETS = ("clean_pred", "label")  # b = 1[f(D(x+ε)) ≠ f(x)] (the paper), or ≠ y
HEADS = ("noisy", "clean")         # the head trained: that of f(D(x+ε)) (what f_R consults), or f(x)


class RejectorTask(FrozenAwareModule):
    """BCE of one head logit per noisy copy against b = 1[f(D(x+ε)) ≠ f(x)] (target=clean_pred)
    or 1[f(D(x+ε)) ≠ y] (target=label). The trained head is that of the noisy prediction
    f(D(x+ε)) (head=noisy, what f_R consults at inference) or of the clean prediction f(x)
    (head=clean, the paper's Eq. 9). f and D run in eval mode under no_grad; only the rejector
    is optimised. Validation always scores the head f_R consults (the noisy prediction's).

    Loss options (all 1 / 0: the paper's plain BCE): `pos_weight` weighs the b = 1 terms (reject),
    `correct_weight` the b = 0 terms whose noisy prediction is right (f(D(x+ε)) = y: rejecting
    those costs the smoothed classifier p_A), `focal_gamma` > 0 multiplies each term by
    (1 − p_t)^γ (focal loss). The mean over the B·T terms is minimised."""

    frozen = ("classifier", "denoiser")

    def __init__(self, classifier: nn.Module, denoiser: nn.Module | None, rejector: nn.Module,
                 optim, target: str = "clean_pred", head: str = "noisy", threshold: float = 0.0,
                 pos_weight: float = 1.0, correct_weight: float = 1.0, focal_gamma: float = 0.0,
                 run_config: dict | None = None):
        super().__init__(optim, run_config)
        if target not in TARGETS or head not in HEADS:
            raise ValueError(f"target={target!r} / head={head!r}: choose a target of {TARGETS} "
                             f"and a head of {HEADS}")
        self.classifier, self.denoiser, self.rejector = classifier, denoiser, rejector
        self.target, self.head, self.threshold = target, head, float(threshold)
        self.pos_weight, self.correct_weight = float(pos_weight), float(correct_weight)
        self.focal_gamma = float(focal_gamma)
        self.val_metrics = MetricCollection({
            "precision": BinaryPrecision(), "recall": BinaryRecall(), "auroc": BinaryAUROC(),
        }, prefix="val/")
        self.val_roc = BinaryROC(thresholds=200)
        self.val_reject, self.val_acc_f = MeanMetric(), MeanMetric()
        self.val_acc_fr = MeanMetric()  # accuracy of f_R on the inputs it does not reject
        self.val_target = MeanMetric()  # how often b = 1
        # reject rate among the draws f(D(x+ε)) gets right (costs p_A) and gets wrong (helps p_AR)
        self.val_reject_right, self.val_reject_wrong = MeanMetric(), MeanMetric()

    @torch.no_grad()
    def frozen_forward(self, x: torch.Tensor, noisy: torch.Tensor) -> dict:
        """What f and D say; no graph is kept. x (B,C,H,W) clean, noisy (B*T,C,H,W) image-major."""
        t = noisy.shape[0] // x.shape[0]
        clean_pred = self.classifier(x).argmax(1)                    # (B,)
        z = self.denoiser(noisy) if self.denoiser is not None else noisy
        logits, feats = self.classifier.forward_features(z)          # (B*T, K), [(B*T, C_i, H_i, W_i)]
        return {"z": z, "feats": feats, "logits": logits, "pred": logits.argmax(1),
                "clean_pred": clean_pred.repeat_interleave(t)}       # (B*T,)

    def loss(self, logit: torch.Tensor, b: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Weighted (focal) BCE, see the class docstring. logit, b (0/1), right (f's noisy
        prediction = y): (B*T,)."""
        terms = F.binary_cross_entropy_with_logits(logit, b, reduction="none")
        if self.focal_gamma > 0:
            p = torch.sigmoid(logit)
            p_t = torch.where(b > 0, p, 1 - p)
            terms = (1 - p_t).pow(self.focal_gamma) * terms
        if self.pos_weight != 1 or self.correct_weight != 1:
            w = torch.where(b > 0, self.pos_weight, torch.where(right, self.correct_weight, 1.0))
            terms = w * terms
        return terms.mean()

    def forward(self, batch: dict) -> dict:
        x, y, noisy = batch["x"], batch["y"], batch["noisy"]
        fr = self.frozen_forward(x, noisy)
        t = noisy.shape[0] // x.shape[0]
        labels = y.repeat_interleave(t)                              # (B*T,)
        ref = fr["clean_pred"] if self.target == "clean_pred" else labels
        b = (fr["pred"] != ref).float()                              # (B*T,) 1 = should reject
        heads = self.rejector(fr["z"], fr["feats"])                  # (B*T, K)
        k = fr["pred"] if self.head == "noisy" else fr["clean_pred"]
        logit = heads.gather(1, k[:, None]).squeeze(1)               # (B*T,)
        right = fr["pred"] == labels
        loss = self.loss(logit, b, right)
        infer = heads.gather(1, fr["pred"][:, None]).squeeze(1)      # the head f_R consults
        parts = {"the noisy inputs": (noisy, "the data or sigma: check the data set files"),
                 "the denoiser's output D(x+ε)": (fr["z"], self.frozen_hint("denoiser")),
                 "the classifier's logits on D(x+ε)": (fr["logits"], self.frozen_hint("classifier")),
                 "the rejector's head logits": (heads, self.TRAINED_HINT)}
        return {"loss": loss, "b": b, "logit": infer, "pred": fr["pred"], "y": labels,
                "right": right, "reject": infer > self.threshold, "parts": parts}

    def training_step(self, batch, batch_idx):
        out = self(batch)
        self.optimize(out["loss"], batch_idx, out["parts"])
        n = out["b"].numel()
        self.log("train/loss", out["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/target_rate", out["b"].mean(), on_step=False, on_epoch=True, batch_size=n)
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        n = out["b"].numel()
        b, p = out["b"].long(), torch.sigmoid(out["logit"])
        self.val_metrics.update(p, b)
        self.val_roc.update(p, b)
        keep, reject, right = ~out["reject"], out["reject"].float(), out["right"]
        self.val_reject.update(reject)
        self.val_acc_f.update(right.float())
        self.val_acc_fr.update(right.float(), keep.float())
        self.val_target.update(out["b"])
        self.val_reject_right.update(reject, right.float())
        self.val_reject_wrong.update(reject, (~right).float())
        self.log("val/loss", out["loss"], prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict(self.val_metrics, on_epoch=True, batch_size=n)
        self.log("val/reject_rate", self.val_reject, on_epoch=True, batch_size=n)
        self.log("val/acc_f", self.val_acc_f, on_epoch=True, batch_size=n)
        self.log("val/acc_fr_accepted", self.val_acc_fr, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("val/target_rate", self.val_target, on_epoch=True, batch_size=n)
        self.log("val/reject_rate_f_right", self.val_reject_right, on_epoch=True, batch_size=n)
        self.log("val/reject_rate_f_wrong", self.val_reject_wrong, on_epoch=True, batch_size=n)

    def on_validation_epoch_start(self) -> None:
        self.val_roc.reset()  # keep only the latest epoch's curve

    def roc_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fpr, tpr) of the last validation epoch, for the W&B run and the report."""
        fpr, tpr, _ = self.val_roc.compute()
        return fpr, tpr
