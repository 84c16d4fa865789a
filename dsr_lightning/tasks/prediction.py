"""Certification as a Lightning predict loop: each step certifies a few images (their noise mixed in
the engine's chunks), and a writer streams one TSV row per image as soon as it is known."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dsr_lightning.results import COLUMNS, ResultsFile
from dsr_lightning.smoothing import (
    ABSTAIN,
    ImageNoise,
    SmoothedClassifier,
    attack_noise,
    certify_details,
    certify_staged,
    pgd_attack,
    predict_counts,
)

MODES = ("certify", "predict", "staged", "attack")


@dataclass(frozen=True)
class CertificationSpec:
    """Everything a certification run is asked for, built once from the config (jobs.certification
    .spec_of): it feeds the predict module, the results file's settings record and its columns."""

    mode: str                  # certify | predict | staged | attack (MODES)
    sigma: float
    N0: int
    N: int
    alpha: float
    bound: str
    seed: int
    split: str = "test"
    skip: int = 1
    max: int = -1
    batch: int = 1000          # samples per forward pass
    images_per_step: int = 4
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    allow_out_of_range: bool = False
    radius: float | None = None        # mode=staged: the target radius; mode=attack: ε
    stages: tuple[int, ...] = ()       # mode=staged: cumulative draws per look
    stage_weights: tuple[float, ...] = ()  # mode=staged: the share of α of each look (resolved)
    attack_steps: int | None = None    # mode=attack: PGD steps
    attack_draws: int | None = None    # mode=attack: noise draws per step
    attack_step_size: float | None = None  # mode=attack: the step's L2 length (resolved)

    @property
    def columns(self) -> list[str]:
        return COLUMNS[self.mode]

    def indices(self, size: int) -> list[int]:
        """The data set indices this run certifies (skip and max as the reference scripts)."""
        stop = size if self.max < 0 else min(self.max, size)
        return list(range(0, stop, self.skip))


class AcceleratedSystem(nn.Module):
    """f_R with the speed options: channels_last input, bf16 autocast (CUDA, or a CPU with bf16),
    and torch.compile (benchmarks/README.md: 1.5x on an H100 for the paper's system, after about a
    minute of compiling)."""

    def __init__(self, system: nn.Module, bf16: bool = False, channels_last: bool = False,
                 compile: bool = False):
        super().__init__()
        self.bf16, self.channels_last = bf16, channels_last
        self.num_classes = system.num_classes
        if channels_last:
            system.to(memory_format=torch.channels_last)
        self.system = torch.compile(system, dynamic=False) if compile else system

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        ctx = (torch.autocast(noisy.device.type, dtype=torch.bfloat16) if self.bf16
               else nullcontext())
        with ctx:
            return self.system(noisy)


class Indexed(Dataset):
    """(idx, x, y) for chosen indices of a dataset of (x, y)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.dataset[self.indices[i]]
        return self.indices[i], x, y


class CertificationModule(pl.LightningModule):
    """predict_step: certify (or predict, Algorithm 1; or 'staged': certify at the target radius
    with cumulative stages of draws and α split over the looks, see smoothing.certify_staged) a
    batch of images; returns one row per image. The noise of each image comes from its own stream,
    keyed by (seed, its index in the data set): an image gets the same draws whatever it is
    certified with, in a resumed or sharded run, and in every system certified with the same
    seed."""

    def __init__(self, system: nn.Module, spec: CertificationSpec, dataset: Dataset,
                 todo: list[int]):
        super().__init__()
        self.spec, self.dataset, self.todo = spec, dataset, todo
        self.system = system  # mode=attack: its soft_scores (with gradient), uncompiled
        self.base = AcceleratedSystem(system, spec.bf16, spec.channels_last, spec.compile)
        self.smoothed = SmoothedClassifier(self.base, self.base.num_classes, spec.sigma,
                                           spec.allow_out_of_range)

    def predict_dataloader(self) -> DataLoader:
        # Each rank takes its own shard of the remaining indices. Lightning refuses an empty loader
        # on any rank: one left without work recomputes the last image (its noise is keyed by its
        # index, so the same row), which the merge keeps once.
        shard = self.todo[self.global_rank::self.trainer.world_size] or self.todo[-1:]
        return DataLoader(Indexed(self.dataset, shard), batch_size=self.spec.images_per_step,
                          shuffle=False)

    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        idx, x, y = batch
        t0 = time.perf_counter()
        noise = ImageNoise(self.spec.seed, idx.tolist())
        spec = self.spec
        if spec.mode == "certify":
            cert = self.smoothed.certify(x, spec.N0, spec.N, spec.alpha, spec.batch, spec.bound,
                                         noise=noise)
            cols = cert.columns()
            pred = cols["prediction"]
        elif spec.mode == "staged":
            cert = certify_staged(self.base, x, spec.N0, spec.stages, spec.stage_weights,
                                  spec.alpha, spec.sigma, spec.radius, spec.batch, spec.bound,
                                  noise=noise, allow_out_of_range=spec.allow_out_of_range)
            cols = {**cert.columns(), "target_radius": np.full(len(idx), cert.target),
                    "certified_at_target": cert.certified.astype(np.int64)}
            pred = cols["prediction"]
        elif spec.mode == "attack":
            cols = self._attack(x, y, idx, noise)
            pred = cols["prediction"]
        else:
            counts = self.smoothed.counts(x, spec.N, spec.batch, noise=noise)  # (B, K+1)
            pred = predict_counts(counts, spec.alpha)
            top = np.where(pred == ABSTAIN, counts[:, :-1].argmax(1), pred)
            # the counts of the answer (or the top class on abstain) and of the runner-up
            d = certify_details(counts, top, spec.sigma, spec.alpha, "cohen").columns()
            cols = {k: d[k] for k in ("n_A", "n_R", "n_B", "N")}
        dt = (time.perf_counter() - t0) / len(idx)  # the step's time, shared by its images
        labels = y.cpu().numpy()
        rows = []
        for i in range(len(idx)):
            row = {"idx": int(idx[i]), "label": int(labels[i]), "predict": int(pred[i]),
                   "correct": int(pred[i] == labels[i]), "time": round(dt, 4)}
            if "radius" in cols:
                row["radius"] = float(cols["radius"][i])
            for k in ("n_A", "n_R", "n_B", "N", "pA_lower", "pAR_lower", "pB_upper", "c_hat",
                      "stage", "draws", "target_radius", "certified_at_target",
                      "clean_predict", "attacked_predict", "attacked_correct",
                      "perturbation_norm", "epsilon"):
                if k in cols:
                    row[k] = cols[k][i]
            rows.append(row)
        return rows

    def _soft_scores(self, noisy: torch.Tensor):
        if self.spec.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        ctx = (torch.autocast(noisy.device.type, dtype=torch.bfloat16) if self.spec.bf16
               else nullcontext())
        with ctx:
            return self.system.soft_scores(noisy)

    def _attack(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                noise: ImageNoise) -> dict:
        """mode=attack (DESIGN §13): the clean certificate (N0 + N draws of each image's stream,
        as mode=certify), then PGD on g_R within the ε ball (its own streams), then Algorithm 1
        with the same N further draws of the image's stream at x and at x' (paired: each is
        Algorithm 1 with draws independent of the point, and the two differ only by the point)."""
        spec, keys = self.spec, idx.tolist()
        cert = self.smoothed.certify(x, spec.N0, spec.N, spec.alpha, spec.batch, spec.bound,
                                     noise=noise)
        x_adv = pgd_attack(self._soft_scores, x, y, spec.sigma, spec.radius, spec.attack_steps,
                           spec.attack_draws, spec.attack_step_size,
                           noise=attack_noise(spec.seed, keys),
                           images_per_pass=max(1, spec.batch // spec.attack_draws))
        pos = noise.pos.copy()  # after the certificate's draws
        clean = predict_counts(self.smoothed.counts(x, spec.N, spec.batch, noise=noise),
                               spec.alpha)
        noise.pos = pos  # the same draws at x'
        attacked = predict_counts(self.smoothed.counts(x_adv, spec.N, spec.batch, noise=noise),
                                  spec.alpha)
        labels = y.cpu().numpy()
        norm = (x_adv - x).reshape(len(x), -1).norm(dim=1).cpu().numpy().astype(np.float64)
        return {"prediction": cert.prediction, "radius": cert.radius, "clean_predict": clean,
                "attacked_predict": attacked,
                # never an attacked prediction for an abstaining image: -1 is not a label
                "attacked_correct": ((attacked != ABSTAIN) & (attacked == labels)).astype(np.int64),
                "perturbation_norm": norm, "epsilon": np.full(len(x), spec.radius)}


class RowWriter(BasePredictionWriter):
    """Streams each step's rows to the results file (rank 0 alone) or to a shard per rank, and
    prints one line per image."""

    def __init__(self, results: ResultsFile, verbose: bool = True):
        super().__init__(write_interval="batch")
        self.results, self.verbose = results, verbose

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        path = None if trainer.world_size == 1 else self.results.part(trainer.global_rank)
        self.results.append(prediction, path)
        if self.verbose:
            for r in prediction:
                rad = f" radius {r['radius']:.3f}" if "radius" in r else ""
                nr = f" n_R {r['n_R']}" if "n_R" in r else ""
                counts = f"  n_A {r.get('n_A', '')}{nr}" if "n_A" in r else ""
                adv = (f"  attacked {r['attacked_predict']:>2} (|δ| {r['perturbation_norm']:.3f})"
                       if "attacked_predict" in r else "")
                print(f"[certify] idx {r['idx']:>5}  label {r['label']}  predict {r['predict']:>2}"
                      f"{rad}  correct {r['correct']}{counts}{adv}  "
                      f"{r['time']:.2f}s/img", flush=True)

    def on_predict_end(self, trainer, pl_module):
        if trainer.world_size > 1:
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                self.results.merge_parts()
