"""Auxiliary stage: train (or fine-tune) the denoiser D for one noise level σ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio

from dsr_lightning.tasks.base import FrozenAwareModule

OBJECTIVES = ("mse", "stab", "clf")


class DenoiserTask(FrozenAwareModule):
    """Objectives (Salman et al.): `mse` ‖D(x+ε) − x‖²; `stab` CE(f(D(x+ε)), f(x)); `clf`
    CE(f(D(x+ε)), y). f is frozen and only needed by stab/clf (and for the val/acc metric)."""

    frozen = ("classifier",)

    def __init__(self, denoiser: nn.Module, optim, objective: str = "mse",
                 classifier: nn.Module | None = None, run_config: dict | None = None):
        super().__init__(optim, run_config)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if objective != "mse" and classifier is None:
            raise ValueError(f"objective={objective} needs the frozen classifier")
        self.denoiser, self.classifier, self.objective = denoiser, classifier, objective
        # PSNR of the epoch's mean squared error (pixels in [0, 1], so the peak is 1)
        self.val_psnr, self.val_acc = PeakSignalNoiseRatio(data_range=1.0), MeanMetric()

    def _step(self, batch: dict) -> dict:
        x, y, noisy = batch["x"], batch["y"], batch["noisy"]          # (B,..), (B,), (B*T,..)
        t = noisy.shape[0] // x.shape[0]
        clean = x.repeat_interleave(t, 0)                             # (B*T, C, H, W)
        z = self.denoiser(noisy)
        out = {"mse": F.mse_loss(z, clean), "denoised": z, "clean": clean}
        if self.classifier is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.objective != "mse"):
                logits = self.classifier(z)                           # gradient flows into D only
            with torch.no_grad():
                ref = self.classifier(x).argmax(1).repeat_interleave(t)
            labels = y.repeat_interleave(t)
            out["logits"] = logits
            out["acc"] = (logits.argmax(1) == labels).float().mean()
            out["stab"] = F.cross_entropy(logits, ref)
            out["clf"] = F.cross_entropy(logits, labels)
        out["loss"] = out[self.objective]
        out["parts"] = {"the noisy inputs": (noisy, "the data or sigma: check the data set files"),
                        "the denoiser's output": (z, self.TRAINED_HINT),
                        "the classifier's logits on D(x+ε)": (out.get("logits"),
                                                                self.frozen_hint("classifier"))}
        return out

    def training_step(self, batch, batch_idx):
        out = self._step(batch)
        self.optimize(out["loss"], batch_idx, out["parts"])
        self.log("train/loss", out["loss"], prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=len(batch["y"]))
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._step(batch)
        n = len(batch["y"])
        self.log("val/loss", out["loss"], prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.val_psnr.update(out["denoised"].detach(), out["clean"])
        self.log("val/psnr", self.val_psnr, on_epoch=True)
        if "acc" in out:
            self.val_acc.update(out["acc"], n)
            self.log("val/acc", self.val_acc, on_epoch=True, batch_size=n)

