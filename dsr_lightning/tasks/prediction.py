"""Certification as a Lightning predict loop: each step certifies a few images (their noise mixed in
the engine's chunks), and a writer streams one TSV row per image as soon as it is known. The
samples per forward pass are `spec.batch`, or with batch="auto" the largest that fits (probed
before the first image); a forward pass that runs out of memory halves them and is redone
(tasks.batching), which changes no number."""

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

from dsr_lightning.errors import ConfigError
from dsr_lightning.logs import get_logger, row_level
from dsr_lightning.models.system import SharedDraws
from dsr_lightning.results import COLUMNS, SPEC_KEYS, ResultsFile
from dsr_lightning.smoothing import (
    ABSTAIN,
    ImageNoise,
    SmoothedClassifier,
    attack_noise,
    certify_details,
    certify_selected,
    certify_staged,
    pgd_attack,
    predict_counts,
)
from dsr_lightning.tasks.batching import (
    AUTO,
    CPU_CAP,
    PROBE_START,
    BackoffForward,
    is_out_of_memory,
    probe_batch,
    release_memory,
)

log = get_logger(__name__)
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
    batch: int | str = 1000    # samples per forward pass, or "auto": the largest that fits
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

    def record(self) -> dict:
        """The settings record's part of this spec: results.SPEC_KEYS that the mode has (identity:
        they change the numbers; a record lacks those of other modes, read as None), then skip,
        max and batch (which images, and how fast)."""
        values = {k: list(v) if isinstance(v, tuple) else v
                  for k in SPEC_KEYS if (v := getattr(self, k)) is not None and v != ()}
        return {**values, "skip": self.skip, "max": self.max, "batch": self.batch}

    @property
    def draws_per_image(self) -> tuple[int, str]:
        """The most draws one image takes in one pass of the engine, and their name: batch=auto's
        cap (a larger batch only mixes more images in a chunk)."""
        if self.mode == "predict":
            return self.N, "N"
        if self.mode == "staged":
            return self.N0 + max(self.stages, default=self.N), "N0 + the last stage"
        return self.N0 + self.N, "N0 + N"

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
        self._eager = (system,)  # the uncompiled system (in a tuple: not registered twice)
        self.system = torch.compile(system, dynamic=False) if compile else system

    def forward(self, noisy: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """noisy (b, *shape) -> labels (b,); `eager`: the uncompiled system with the same options
        (batch=auto probes with it: compiling once per probed size would take minutes, and a
        compiled pass needs no more memory than the eager one)."""
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        ctx = (torch.autocast(noisy.device.type, dtype=torch.bfloat16) if self.bf16
               else nullcontext())
        with ctx:
            return (self._eager[0] if eager else self.system)(noisy)


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
    seed.

    Samples per forward pass (`batch`): spec.batch, or with spec.batch="auto" the largest that
    fits (resolve_batch, before the first image). A forward pass that runs out of memory halves
    them for the rest of the run and is redone (tasks.batching.BackoffForward; mode=attack's
    gradient passes halve their images per pass and redo the step's attack). The rows are those
    of a run that never ran out of memory: the noise does not depend on the chunks.
    """

    def __init__(self, system: nn.Module, spec: CertificationSpec, dataset: Dataset,
                 todo: list[int], shared: list[tuple[float | None, str]] | None = None):
        super().__init__()
        batch = spec.batch
        if batch != AUTO and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ConfigError(f"certify.batch must be a number of samples per forward pass >= 1 "
                              f"or 'auto' (the largest that fits), got {batch!r}")
        self.spec, self.dataset, self.todo = spec, dataset, todo
        self.system = system  # mode=attack: its soft_scores (with gradient), uncompiled
        # one pass, several systems (mode=certify): [(threshold or None: the baseline, bound)]
        self.shared = shared
        self.draws = SharedDraws(system, [t for t, _ in shared if t is not None]) if shared \
            else None
        self.base = AcceleratedSystem(self.draws or system, spec.bf16, spec.channels_last,
                                      spec.compile)
        # every counting pass goes through `passes`: cut to its limit, halved on out of memory
        self.passes = BackoffForward(self.base, None if batch == AUTO else batch,
                                     self.base.num_classes)
        self.smoothed = SmoothedClassifier(self.passes, self.base.num_classes, spec.sigma,
                                           spec.allow_out_of_range)
        self.resolved_batch: int | None = None if batch == AUTO else batch
        self.batch_reason: str | None = None if batch == AUTO else "fixed"
        self._resolved_on: torch.device | None = None  # batch=auto: the device probed
        self._attack_limit: int | None = None  # mode=attack: images per pass after a back-off

    @property
    def batch(self) -> int | None:
        """The samples per forward pass now: spec.batch, or what batch=auto resolved to (None
        before resolve_batch); lowered by each back-off on out of memory."""
        return self.passes.limit

    def resolve_batch(self, shape: tuple[int, ...] | None = None,
                      dtype: torch.dtype | None = None) -> int:
        """The samples per forward pass on this module's device (call it after moving the module
        there; Lightning's on_predict_start does). A fixed spec.batch as it is; batch="auto": the
        largest that fits (tasks.batching.probe_batch), probed once per device on noisy images of
        `shape` and `dtype` (default: those of the first image to certify) through the system as
        configured (bf16, channels_last; uncompiled), doubling from 64 up to the cap (the draws
        of one image in one pass of the engine, spec.draws_per_image; 1024 on a CPU). Each probe
        holds what a chunk of the engine holds: the noise and the noisy images, then the pass. No
        further headroom is taken: doubling stops up to a factor 2 below the limit, and the run's
        back-off covers the rest. Sets `resolved_batch` and `batch_reason`, prints one line."""
        dev = self.device
        if self.spec.batch != AUTO or self._resolved_on == dev:
            return self.passes.limit
        if shape is None or dtype is None:
            x0 = torch.as_tensor(self.dataset[(self.todo or [0])[0]][0])
            shape, dtype = tuple(x0.shape), x0.dtype
        cap, why = self.spec.draws_per_image
        why = f"the cap: {why} = {cap}"
        if dev.type == "cpu" and cap > CPU_CAP:
            cap, why = CPU_CAP, f"the CPU cap, {CPU_CAP}"

        def run(n: int) -> None:
            with torch.inference_mode():
                held = torch.empty((n, *shape), device=dev, dtype=dtype)  # the chunk's noise
                noisy = torch.full((n, *shape), 0.5, device=dev, dtype=dtype)
                self.base(noisy, eager=True)
                del held, noisy

        modes = [(m, m.training) for m in self.base.modules()]
        self.base.eval()  # no batch norm statistics may move during a probe
        try:
            best, failed = probe_batch(run, cap, dev, PROBE_START)
        finally:
            for m, training in modes:  # each module's mode exactly as it was
                m.training = training
        if failed is not None:
            why = f"out of memory at {failed}"
        log.info(f"certify: batch=auto -> {best} samples per forward pass ({why})")
        self.passes.limit, self.resolved_batch, self.batch_reason = best, best, why
        self._resolved_on = dev
        return best

    def on_predict_start(self) -> None:
        self.resolve_batch()

    def predict_dataloader(self) -> DataLoader:
        # Each rank takes its own shard of the remaining indices. Lightning refuses an empty loader
        # on any rank: one left without work recomputes the last image (its noise is keyed by its
        # index, so the same row), which the merge keeps once.
        shard = self.todo[self.global_rank::self.trainer.world_size] or self.todo[-1:]
        return DataLoader(Indexed(self.dataset, shard), batch_size=self.spec.images_per_step,
                          shuffle=False)

    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        idx, x, y = batch
        self.resolve_batch(tuple(x.shape[1:]), x.dtype)  # done already, unless called directly
        t0 = time.perf_counter()
        noise = ImageNoise(self.spec.seed, idx.tolist())
        spec = self.spec
        if self.shared:
            # (B, 2, K·(M+1)+1): the N0 selection and the N estimation draws, counted once
            counts = self.smoothed.counts(x, (spec.N0, spec.N), self.batch, noise=noise)
            dt = (time.perf_counter() - t0) / len(idx)
            return [self._rows(idx, y, certify_selected(self.draws.split(counts, t), spec.sigma,
                                                        spec.alpha, bound).columns(), dt)
                    for t, bound in self.shared]
        if spec.mode == "certify":
            cert = self.smoothed.certify(x, spec.N0, spec.N, spec.alpha, self.batch, spec.bound,
                                         noise=noise)
            cols = cert.columns()
            pred = cols["prediction"]
        elif spec.mode == "staged":
            cert = certify_staged(self.passes, x, spec.N0, spec.stages, spec.stage_weights,
                                  spec.alpha, spec.sigma, spec.radius, self.batch, spec.bound,
                                  noise=noise, allow_out_of_range=spec.allow_out_of_range)
            cols = {**cert.columns(), "target_radius": np.full(len(idx), cert.target),
                    "certified_at_target": cert.certified.astype(np.int64)}
            pred = cols["prediction"]
        elif spec.mode == "attack":
            cols = self._attack(x, y, idx, noise)
            pred = cols["prediction"]
        else:
            counts = self.smoothed.counts(x, spec.N, self.batch, noise=noise)  # (B, K+1)
            pred = predict_counts(counts, spec.alpha)
            top = np.where(pred == ABSTAIN, counts[:, :-1].argmax(1), pred)
            # the counts of the answer (or the top class on abstain) and of the runner-up
            d = certify_details(counts, top, spec.sigma, spec.alpha, "cohen").columns()
            cols = {k: d[k] for k in ("n_A", "n_R", "n_B", "N")}
        dt = (time.perf_counter() - t0) / len(idx)  # the step's time, shared by its images
        return self._rows(idx, y, {**cols, "prediction": pred}, dt)

    def _rows(self, idx: torch.Tensor, y: torch.Tensor, cols: dict, dt: float) -> list[dict]:
        """One row per image: the reference columns, then what `cols` has of the mode's."""
        pred = cols["prediction"]
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
        spec = self.spec
        cert = self.smoothed.certify(x, spec.N0, spec.N, spec.alpha, self.batch, spec.bound,
                                     noise=noise)
        x_adv = self._pgd(x, y, idx.tolist())
        pos = noise.pos.copy()  # after the certificate's draws
        clean = predict_counts(self.smoothed.counts(x, spec.N, self.batch, noise=noise),
                               spec.alpha)
        noise.pos = pos  # the same draws at x'
        attacked = predict_counts(self.smoothed.counts(x_adv, spec.N, self.batch, noise=noise),
                                  spec.alpha)
        labels = y.cpu().numpy()
        norm = (x_adv - x).reshape(len(x), -1).norm(dim=1).cpu().numpy().astype(np.float64)
        return {"prediction": cert.prediction, "radius": cert.radius, "clean_predict": clean,
                "attacked_predict": attacked,
                # never an attacked prediction for an abstaining image: -1 is not a label
                "attacked_correct": ((attacked != ABSTAIN) & (attacked == labels)).astype(np.int64),
                "perturbation_norm": norm, "epsilon": np.full(len(x), spec.radius)}

    def _pgd(self, x: torch.Tensor, y: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """pgd_attack with `batch // attack_draws` images per gradient pass (at least 1, at most
        the step's images). A pass that runs out of memory (forward or backward) halves the
        images per pass for the rest of the run and redoes this step's attack from the start
        with the same streams (a fresh attack_noise: the same draws, so the same x'); one image's
        draws that do not fit raise ConfigError."""
        spec = self.spec
        while True:
            per = max(1, min(self.batch // spec.attack_draws, len(x)))
            if self._attack_limit is not None:
                per = min(per, self._attack_limit)
            try:
                return pgd_attack(self._soft_scores, x, y, spec.sigma, spec.radius,
                                  spec.attack_steps, spec.attack_draws, spec.attack_step_size,
                                  noise=attack_noise(spec.seed, keys), images_per_pass=per)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                if per == 1:
                    raise ConfigError(
                        f"certify: out of memory in the attack with one image's "
                        f"{spec.attack_draws} draws per gradient pass on {x.device}: lower "
                        "certify.attack_draws, set certify.bf16=true, or use a device with more "
                        "memory") from err
            self._attack_limit = per // 2
            log.warning(f"certify: out of memory in the attack at {per} images x "
                        f"{spec.attack_draws} draws per pass -> {per // 2}; redoing this step's "
                        "attack")
            release_memory(x.device)


class RowWriter(BasePredictionWriter):
    """Streams each step's rows to the results file (rank 0 alone) or to a shard per rank, and
    logs one line per image (logs.row_level: DEBUG under a progress bar, so the job's log file
    keeps it and the bar is left alone; INFO without one). With several systems from shared
    draws (CertificationModule's `shared`), a step gives one list of rows per system, written to
    `results[i]` except the images `done[i]` holds already (each file resumes on its own)."""

    def __init__(self, results: ResultsFile | list[ResultsFile], verbose: bool = True,
                 done: list[set[int]] | None = None, names: list[str] | None = None,
                 total: int | None = None):
        super().__init__(write_interval="batch")
        self.files = results if isinstance(results, list) else [results]
        self.shared = isinstance(results, list)
        self.done = done or [set() for _ in self.files]
        self.names = names or [f.settings.get("system", "") for f in self.files]
        self.verbose, self.total = verbose, total
        self._parts: list | None = None  # this rank's shards (multi-device runs), with records
        self._seen, self._t0 = 0, None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        per_system = prediction if self.shared else [prediction]
        if self._parts is None:
            self._parts = [f.open_part(trainer.global_rank) if trainer.world_size > 1 else None
                           for f in self.files]
        for f, part, rows, done in zip(self.files, self._parts, per_system, self.done):
            if todo := [r for r in rows if r["idx"] not in done]:
                f.append(todo, part)
        level = row_level(trainer.progress_bar_callback is not None)
        for i, r in enumerate(per_system[0]):
            self._seen += 1
            if self.verbose and log.isEnabledFor(level):
                parts = [self._line(rows[i], name if self.shared else "")
                         for rows, name in zip(per_system, self.names)]
                log.log(level, f"[certify]{self._progress(trainer)} idx {r['idx']:>5}  label "
                        f"{r['label']}  " + " | ".join(parts) + f"  {r['time']:.2f}s/img")

    def _progress(self, trainer) -> str:
        """' 12/100 (~3.1 min left)': this process's images so far, of its share of the run."""
        if not self.total or self._t0 is None:
            return ""
        total = -(-self.total // max(1, trainer.world_size))
        left = (time.perf_counter() - self._t0) / self._seen * max(0, total - self._seen)
        when = f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s"
        return f" {self._seen}/{total} (~{when} left)"

    @staticmethod
    def _line(r: dict, name: str) -> str:
        rad = f" radius {r['radius']:.3f}" if "radius" in r else ""
        nr = f" n_R {r['n_R']}" if "n_R" in r else ""
        counts = f"  n_A {r.get('n_A', '')}{nr}" if "n_A" in r else ""
        adv = (f"  attacked {r['attacked_predict']:>2} (|δ| {r['perturbation_norm']:.3f})"
               if "attacked_predict" in r else "")
        return (f"{name + ': ' if name else ''}predict {r['predict']:>2}{rad}  "
                f"correct {r['correct']}{counts}{adv}")

    def on_predict_end(self, trainer, pl_module):
        if trainer.world_size > 1:
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                for f in self.files:
                    f.merge_parts()
