"""The one reader of a checkpoint of dsr-train (a Lightning checkpoint with our entries): resume,
certification, the threshold tool and the export all go through `RunCheckpoint`.

Entries beside Lightning's own (DESIGN §4): `dsr_config` (the run's resolved config: how each
network was built), `dsr_threshold` (the threshold chosen for these weights, rejector.threshold=auto)
and `dsr_wandb` (the W&B run, so a resume or a certification joins it).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dsr_lightning.errors import USER_ERRORS, CheckpointError, ConfigError
from dsr_lightning.jobs.networks import fingerprint, probe, rebuild, verify
from dsr_lightning.models import (
    SmoothingSystem,
    freeze,
    load_state_dict_strict,
    non_finite_keys,
    read_checkpoint,
    state_sha256,
)

RESUME_HINT = "resume from <run>/checkpoints/last.ckpt"


@dataclass
class RunCheckpoint:
    """A checkpoint of dsr-train, read once. `state_dict` is empty when read with weights=False
    (mapped: only the small entries are wanted)."""

    path: Path
    config: dict
    state_dict: dict = field(repr=False)
    epoch: int                 # epochs done (the file is saved at the end of epoch `epoch - 1`)
    global_step: int
    threshold_choice: dict | None
    wandb: dict | None

    @classmethod
    def read(cls, path: str | os.PathLike, *, weights: bool = True) -> RunCheckpoint:
        """Read `path`; a missing, unreadable or foreign file (not written by dsr-train) is one
        CheckpointError naming it."""
        path = Path(path)
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; pass a checkpoint file in it, e.g. "
                                  f"{path / 'checkpoints' / 'best.ckpt'}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path} ({RESUME_HINT}, or certify "
                                  "<run>/checkpoints/best.ckpt)")
        raw = read_checkpoint(path, weights_only=False, mmap=not weights)  # our own Lightning file
        if not isinstance(raw, dict) or not isinstance(raw.get("dsr_config"), dict) \
                or not isinstance(raw.get("state_dict"), dict):
            raise CheckpointError(f"{path}: not a checkpoint of dsr-train (no state_dict or no "
                                  "dsr_config); pass <run>/checkpoints/best.ckpt or last.ckpt of a "
                                  "dsr-train run")
        choice = raw.get("dsr_threshold")
        return cls(path=path, config=raw["dsr_config"],
                   state_dict=raw["state_dict"] if weights else {},
                   epoch=int(raw.get("epoch", -1)) + 1, global_step=int(raw.get("global_step", 0)),
                   threshold_choice=choice if isinstance(choice, dict) else None,
                   wandb=raw.get("dsr_wandb"))

    # -- what it holds ----------------------------------------------------------------------
    @property
    def stage(self) -> str | None:
        return (self.config.get("stage") or {}).get("name")

    def require_stage(self, stage: str, hint: str) -> RunCheckpoint:
        if self.stage != stage:
            raise CheckpointError(f"{self.path} is a checkpoint of the {self.stage!r} stage, not "
                                  f"of the {stage} stage; {hint}")
        return self

    def check_finite(self) -> None:
        if bad := non_finite_keys(self.state_dict):
            raise CheckpointError(f"{self.path} holds non-finite weights ({len(bad)} tensors, "
                                  f"e.g. {', '.join(bad[:3])}): use an earlier checkpoint")

    def part(self, prefix: str) -> dict[str, Any]:
        """The state dict of one sub-network of the task (`classifier`, `denoiser`, `rejector`,
        `net`), its prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.state_dict.items() if k.startswith(prefix + ".")}

    def threshold(self) -> float:
        """The rejector threshold these weights certify with: the one chosen for them
        (threshold=auto), else the configured one. Anything but a number (NaN, text) is refused:
        f_R would silently become another system."""
        configured = (self.config.get("rejector") or {}).get("threshold", 0.0)
        value = (self.threshold_choice or {}).get("value", configured)
        if value == "auto":
            raise CheckpointError(
                f"{self.path}: rejector.threshold=auto was never chosen for these weights (the run "
                "stopped before the choice after fit?). Certify the best.ckpt of a finished run, "
                "or pass threshold=<a logit> to dsr-certify")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise CheckpointError(f"{self.path}: the rejector threshold {value!r} is not a number "
                                  "(an edited or damaged checkpoint?); pass threshold=<a logit> to "
                                  "dsr-certify, or use an intact checkpoint")
        return float(value)

    # -- networks -----------------------------------------------------------------------------
    def rejection_system(self, sigma: float | None = None,
                         threshold: float | None = None) -> SmoothingSystem:
        """f_R rebuilt from this file alone (f, D, the heads and the threshold); `threshold`
        replaces the checkpoint's. A σ other than the rejector's is refused."""
        system = self.system("rejection", sigma, threshold)[0]
        if math.isinf(system.threshold) and system.threshold > 0:  # never rejects: no heads to run
            return SmoothingSystem(system.classifier, system.denoiser, None,
                                   threshold=system.threshold, num_classes=system.num_classes)
        return system

    def system(self, name: str = "rejection", sigma: float | None = None,
               threshold: float | None = None) -> tuple[SmoothingSystem, dict]:
        """(a system rebuilt from this file alone, the fingerprints of its networks: {role:
        jobs.networks.fingerprint}). `rejection`: f_R (f, D, the heads and the threshold;
        `threshold` replaces the checkpoint's); `denoised`: the same f and D without the heads
        (the rejector's baseline: the networks it was trained on, not the files as they are now).
        Each rebuilt network must reproduce the outputs recorded when it was trained. A σ other
        than the rejector's is refused. (f_R keeps its heads at threshold +inf too: the caller
        may leave them out, as rejection_system does, since they never reject.)"""
        self.require_stage("rejector", "pass rejector_ckpt=<run>/checkpoints/best.ckpt of a "
                                       "rejector run")
        run = self.config
        if sigma is not None and abs(float(run["sigma"]) - float(sigma)) > 1e-9:
            raise ConfigError(f"the rejector {self.path} was trained for sigma={run['sigma']:g}, "
                              f"but sigma={float(sigma):g} was asked: certify with "
                              f"sigma={run['sigma']:g} or train a rejector for this sigma")
        nets, prints = {}, {}
        for role in ("classifier", "denoiser"):
            nets[role], recipe = self._network(role)
            prints[role] = fingerprint(role, recipe)
        clf, den = nets["classifier"], nets["denoiser"]
        if name == "denoised":
            return SmoothingSystem(clf, den, num_classes=clf.num_classes), prints
        t = self.threshold() if threshold is None else float(threshold)
        shape = tuple(clf.input_shape)
        spec = dict(num_classes=clf.num_classes, feature_channels=clf.feature_channels,
                    image_size=shape[-1])
        rej = instantiate(OmegaConf.create(run["rejector"]["net"]))(**spec)
        load_state_dict_strict(rej, self.part("rejector"), source=f"{self.path} (rejector)")
        freeze(rej)
        recipe = {"source": "rejector", "net": run["rejector"]["net"], **spec,
                  "state_sha256": state_sha256(rej)}
        full = SmoothingSystem(clf, den, rej, threshold=t, num_classes=clf.num_classes)
        recipe["probe"] = probe("rejector", lambda x: full.outputs(x)["head_logits"], recipe,
                                shape, float(run["sigma"]), what=f"the rejector of {self.path}")
        prints["rejector"] = fingerprint("rejector", recipe)
        return full, prints

    def recipe(self, role: str) -> dict:
        """How the run built its `role` network (jobs.networks), recorded at training; a
        checkpoint from before recipes were recorded gives its config node (a published arch)."""
        recorded = (self.config.get("networks") or {}).get(role)
        if recorded:
            return recorded
        node = dict(self.config[role])
        if role == "classifier":  # the published classifiers: their own (CIFAR-10) normalisation
            from dsr_lightning.models import CIFAR10_MEAN, CIFAR10_STD

            node["mean"] = node.get("mean") or list(CIFAR10_MEAN)
            node["std"] = node.get("std") or list(CIFAR10_STD)
        return {"source": "arch", **node}

    def network(self, role: str) -> nn.Module:
        """The run's frozen `role` network rebuilt from its recipe, with the weights of this file;
        refused (CheckpointError) unless it reproduces the outputs recorded at training."""
        return self._network(role)[0]

    def _network(self, role: str) -> tuple[nn.Module, dict]:
        """(the rebuilt, verified network, its recipe with the weights' hash and the probe)."""
        recipe = dict(self.recipe(role))
        try:
            net = rebuild(role, recipe)
        except USER_ERRORS:  # already one clear error (e.g. a changed diffusion model)
            raise
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: cannot rebuild the {role} from its record "
                                  f"({e})") from None
        if not getattr(net, "weights_outside_checkpoint", False):  # a diffusion model: its own
            load_state_dict_strict(net, self.part(role), source=f"{self.path} ({role})")
        freeze(net)
        weights = state_sha256(net)
        if recipe.get("state_sha256") not in (None, weights):
            if getattr(net, "weights_outside_checkpoint", False):  # read from the model's folder
                raise CheckpointError(
                    f"the diffusion model {recipe['path']} changed since the rejector was trained "
                    "on it: its weights' hash differs from the recorded one. Restore the model it "
                    "was trained with (the folder, or the hub revision), or train a rejector on "
                    "this one")
            raise CheckpointError(f"{self.path}: the {role}'s weights in the checkpoint are not "
                                  "those its record names (an edited or damaged checkpoint); "
                                  "use an intact one")
        recipe["state_sha256"] = weights
        verify(role, net, recipe, str(self.path))
        if not recipe.get("probe"):  # an earlier release's record: probed now, for the results
            shape = recipe.get("input_shape") or self.recipe("classifier").get("input_shape")
            sigma = float(self.config["sigma"]) if role == "denoiser" else None
            recipe["probe"] = probe(role, net, recipe, shape, sigma)
        return net, recipe

    def load_into(self, module: nn.Module) -> nn.Module:
        """The file's weights into the task that wrote it (strict, but for the weights a
        checkpoint leaves out: tasks.base.outside_prefixes, which the task already holds)."""
        state = dict(self.state_dict)
        if hasattr(module, "fill_outside"):
            module.fill_outside(state)
        module.load_state_dict(state)
        return module

    # -- writing ------------------------------------------------------------------------------
    def write_threshold(self, choice: dict) -> None:
        """Add the threshold chosen for these weights to the file, atomically (files.atomic_write:
        a kill or a failing disk leaves the old file whole; the latter is one WriteError)."""
        from dsr_lightning.files import atomic_write

        raw = torch.load(self.path, map_location="cpu", weights_only=False)
        raw["dsr_threshold"] = choice
        atomic_write(self.path, lambda f: torch.save(raw, f), what="the checkpoint",
                     hint="Its weights are unchanged; resuming the run with ckpt_path=<it> "
                     "certify=... chooses the threshold again")
        self.threshold_choice = choice
