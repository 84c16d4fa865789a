"""Auxiliary stage: train the base classifier f (optionally with Gaussian noise augmentation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dsr_lightning.tasks.base import FrozenAwareModule


class ClassifierTask(FrozenAwareModule):
    """Cross-entropy on [0,1] images; noise_sd > 0 trains on x + N(0, noise_sd²) (Cohen et al.'s
    randomized-smoothing classifier), evaluated on the same noise level."""

    def __init__(self, net: nn.Module, optim, noise_sd: float = 0.0, run_config: dict | None = None):
        super().__init__(optim, run_config)
        self.net = net
        self.noise_sd = float(noise_sd)
        k = net.num_classes
        self.train_acc, self.val_acc = MulticlassAccuracy(k), MulticlassAccuracy(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: dict, acc) -> tuple[torch.Tensor, dict]:
        x, y = batch["x"], batch["y"]
        if self.noise_sd > 0:
            x = x + self.noise_sd * torch.randn_like(x)
        logits = self.net(x)                                          # (B, K)
        acc.update(logits, y)
        parts = {"the input images": (x, "the data: check the data set files"),
                 "the classifier's logits": (logits, self.TRAINED_HINT)}
        return F.cross_entropy(logits, y), parts

    def training_step(self, batch, batch_idx):
        loss, parts = self._step(batch, self.train_acc)
        self.optimize(loss, batch_idx, parts)
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, prog_bar=True,
                      on_step=True, on_epoch=True, batch_size=len(batch["y"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _ = self._step(batch, self.val_acc)
        self.log_dict({"val/loss": loss, "val/acc": self.val_acc}, prog_bar=True,
                      on_epoch=True, batch_size=len(batch["y"]), sync_dist=True)
