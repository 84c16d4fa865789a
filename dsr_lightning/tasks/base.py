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

from dsr_lightning.errors import TrainingError
from dsr_lightning.models import non_finite_keys

CLIP_ALGORITHMS = ("norm", "value")


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
        self.clip_val, self.clip_algorithm, self.accumulate = None, None, 1
        self.wandb_record: dict | None = None

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

    def configure_manual_optimization(self, clip_val: float | None = None,
                                      clip_algorithm: str | None = None, accumulate: int = 1) -> None:
        """Gradient clipping (Lightning's `clip_gradients`, 'norm' unless said) and accumulation
        over `accumulate` batches: what trainer.gradient_clip_val / accumulate_grad_batches ask
        for, which Lightning itself refuses under manual optimisation."""
        if clip_algorithm not in (None, *CLIP_ALGORITHMS) or int(accumulate) < 1 or \
                (clip_val is not None and clip_val <= 0):  # the schema checks these first
            raise ValueError(f"clip_val={clip_val}, clip_algorithm={clip_algorithm!r}, "
                             f"accumulate={accumulate}: out of range")
        self.clip_val, self.clip_algorithm, self.accumulate = clip_val, clip_algorithm, accumulate

    def optimize(self, loss: torch.Tensor, batch_idx: int, parts: dict | None = None) -> None:
        """Backward, then (every `accumulate` batches, and at the epoch's last batch) clip and step
        the current phase's optimiser. A non-finite loss stops the run (TrainingError) naming the
        first part of the step holding non-finite values (see non_finite_message)."""
        if not torch.isfinite(loss.detach()).item():
            raise TrainingError(self.non_finite_message(parts or {}))
        opts = self.optimizers()
        opt = opts[self.phase] if isinstance(opts, list) else opts
        k = self.accumulate
        self.manual_backward(loss / k if k > 1 else loss)
        if (batch_idx + 1) % k == 0 or self.trainer.is_last_batch:
            if self.clip_val:
                self.clip_gradients(opt, gradient_clip_val=self.clip_val,
                                    gradient_clip_algorithm=self.clip_algorithm or "norm")
            opt.step()
            opt.zero_grad(set_to_none=True)

    def non_finite_message(self, parts: dict) -> str:
        """parts: name -> (tensor, what a non-finite value there means), in the order of the
        computation; the message names the first part holding one."""
        bad = [(name, hint) for name, (t, hint) in parts.items()
               if t is not None and not torch.isfinite(t.detach().float()).all().item()]
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        if not bad:
            return (f"non-finite training loss at {where}, though every part of the step is finite "
                    f"({', '.join(parts) or 'none checked'}): the loss overflowed; lower the "
                    "learning rate or train with trainer.precision=32-true")
        name, hint = bad[0]
        more = f" (then also in {', '.join(n for n, _ in bad[1:])})" if len(bad) > 1 else ""
        return (f"non-finite training loss at {where}: non-finite values first appear in {name}"
                f"{more}: {hint}. Training stopped; the checkpoints of earlier epochs are kept.")

    def frozen_hint(self, role: str) -> str:
        path = (self.run_config.get(role) or {}).get("path", "?")
        return (f"the frozen {role} outputs them: its checkpoint {path} may hold bad weights, or "
                "the inputs are outside what it was trained on")

    TRAINED_HINT = ("the network being trained diverged: lower the learning rate "
                    "(optim.phases[i].optimizer.lr) or clip gradients (trainer.gradient_clip_val=1.0)")

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

    def outside_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen networks whose weights stay in their own files (a
        diffusion model's: models/diffusion.py), never copied into a checkpoint; a rebuild reads
        them from there and checks their recorded hash (jobs/networks.py)."""
        return tuple(f"{name}." for name, m in self.named_modules(remove_duplicate=False)
                     if name and getattr(m, "weights_outside_checkpoint", False))

    def fill_outside(self, state: dict) -> dict:
        """`state` (a checkpoint's state dict) completed, in place, with the weights a checkpoint
        leaves out (outside_prefixes), which this task already holds; returned."""
        if prefixes := self.outside_prefixes():
            for k, v in self.state_dict().items():
                if k.startswith(prefixes) and k not in state:
                    state[k] = v
        return state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.fill_outside(checkpoint["state_dict"])  # a resume: Lightning loads strictly

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if prefixes := self.outside_prefixes():
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(prefixes)}
        # parameters and buffers (e.g. BatchNorm statistics fed by overflowing features can turn
        # Inf while the loss stays finite): a non-finite checkpoint is never written
        if bad := non_finite_keys(checkpoint["state_dict"]):
            trained = [k for k in bad if k.split(".")[0] not in self.frozen]
            where = ("the network being trained" if trained else
                     f"the frozen {bad[0].split('.')[0]}")
            raise TrainingError(
                f"non-finite values in {len(bad)} tensor(s) of {where} at epoch "
                f"{self.current_epoch}, step {self.global_step} (e.g. {', '.join(bad[:3])}): the "
                "run diverged though its loss stayed finite. Training stopped before saving; the "
                "checkpoints of earlier epochs are kept. "
                + (self.TRAINED_HINT + "; or the frozen networks' outputs overflow: check their "
                   "checkpoints" if trained else "Check the frozen network's checkpoint."))
        checkpoint["dsr_config"] = self.run_config
        if self.wandb_record:
            checkpoint["dsr_wandb"] = self.wandb_record  # a resume or dsr-certify joins the run
