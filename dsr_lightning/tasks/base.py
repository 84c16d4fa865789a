"""Shared Lightning plumbing: frozen sub-networks kept in eval mode, and phased optimisation.

An optimiser config is a list of phases run one after another, each with its own optimiser and an
optional scheduler stepped once per epoch (the paper: Adam for 5 epochs, then SGD with a step decay).
Every phase's optimiser exists from the start, so its state is in every checkpoint and a resumed run
continues in the same phase, at the same learning rate.
"""

from __future__ import annotations

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf


def phase_bounds(phases) -> list[int]:
    """Cumulative end epoch of each phase: [5, 20] for the paper schedule."""
    ends, total = [], 0
    for p in phases:
        total += int(p["epochs"])
        ends.append(total)
    return ends


class FrozenAwareModule(pl.LightningModule):
    """A LightningModule whose `frozen` sub-modules stay in eval mode whatever Lightning toggles,
    and which steps the optimiser of the current phase by hand."""

    frozen: tuple[str, ...] = ()

    def __init__(self, optim: DictConfig | dict, run_config: dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.optim_cfg = OmegaConf.create(optim) if isinstance(optim, dict) else optim
        self.ends = phase_bounds(self.optim_cfg.phases)
        self.run_config = run_config or {}
        # Only the run's resolved config goes to hparams (W&B config, hparams.yaml); never networks.
        self.save_hyperparameters({"config": self.run_config})

    # -- frozen networks -------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            m = getattr(self, name, None)
            if m is not None:
                m.eval()  # BatchNorm statistics of f and D never move
        return self

    # -- phased optimisation ---------------------------------------------------------------
    @property
    def phase(self) -> int:
        e = self.current_epoch
        return next((i for i, end in enumerate(self.ends) if e < end), len(self.ends) - 1)

    def configure_optimizers(self):
        # frozen networks never enter an optimiser, even if handed over with requires_grad on
        frozen = {id(p) for name in self.frozen if getattr(self, name, None) is not None
                  for p in getattr(self, name).parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]
        opts, scheds = [], []
        self._sched_index = {}
        for i, p in enumerate(self.optim_cfg.phases):
            opt = hydra.utils.instantiate(p.optimizer)(params)
            opts.append(opt)
            if p.get("scheduler"):
                self._sched_index[i] = len(scheds)
                scheds.append(hydra.utils.instantiate(p.scheduler)(opt))
        return opts, scheds

    def optimize(self, loss: torch.Tensor) -> None:
        opts = self.optimizers()
        opt = opts[self.phase] if isinstance(opts, list) else opts
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()

    def on_train_epoch_start(self) -> None:
        opts = self.optimizers()
        opt = opts[self.phase] if isinstance(opts, list) else opts
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=False, on_epoch=True)
        self.log("train/phase", float(self.phase), on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        i = self.phase
        if i in self._sched_index:
            scheds = self.lr_schedulers()
            scheds = scheds if isinstance(scheds, list) else [scheds]
            scheds[self._sched_index[i]].step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dsr_config"] = self.run_config
