"""Certification as a Lightning predict loop: each step certifies a few images (their noise mixed in
the engine's chunks), and a writer streams one TSV row per image as soon as it is known."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dsr_lightning.smoothing import (
    ABSTAIN,
    SmoothedClassifier,
    certify_details,
    certify_staged,
    predict_counts,
    sample_counts,
)
from dsr_lightning.tasks.networks import ConfigError

# The reference columns first, in their order, so existing analysis scripts read the file.
REFERENCE_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
CERTIFY_COLUMNS = REFERENCE_COLUMNS + [
    "n_A", "n_R", "n_B", "N", "pA_lower", "pAR_lower", "pB_upper", "c_hat"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time", "n_A", "n_R", "n_B", "N"]
# mode=staged: the certificate of the stopping look (N its cumulative draws), that look's index,
# the draws spent (N0 + N), the target radius and whether the certificate reaches it
STAGED_COLUMNS = CERTIFY_COLUMNS + ["stage", "draws", "target_radius", "certified_at_target"]
# Settings that change the numbers: a results file is only ever extended under the same ones.
# The last three are recorded in mode=staged only (absent, i.e. None, in other modes' records).
IDENTITY_KEYS = ("mode", "system", "sigma", "N0", "N", "alpha", "bound", "split", "seed", "bf16",
                 "classifier", "denoiser", "rejector", "radius", "stages", "stage_weights")


class FastBase(nn.Module):
    """f_R with the speed options: channels_last input and bf16 autocast (CUDA, or a CPU with bf16)."""

    def __init__(self, system: nn.Module, bf16: bool = False, channels_last: bool = False):
        super().__init__()
        self.system, self.bf16, self.channels_last = system, bf16, channels_last
        self.num_classes = system.num_classes
        if channels_last:
            system.to(memory_format=torch.channels_last)

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


class CertifyModule(pl.LightningModule):
    """predict_step: certify (or predict, Algorithm 1; or 'staged': certify at the target `radius`
    with cumulative `stages` of draws and α split by `stage_weights`, see
    smoothing.certify_staged) a batch of images; returns one row per image. Each step's noise
    comes from a generator seeded by (seed, first index), so a resumed or sharded run draws the
    same noise for the same step composition."""

    def __init__(self, base: nn.Module, sigma: float, N0: int, N: int, alpha: float, batch: int,
                 bound: str, mode: str, seed: int, dataset: Dataset, todo: list[int],
                 images_per_step: int = 4, radius: float | None = None,
                 stages: list[int] | None = None, stage_weights: list[float] | None = None):
        super().__init__()
        self.base = base
        self.smoothed = SmoothedClassifier(base, base.num_classes, sigma)
        self.N0, self.N, self.alpha, self.batch, self.bound = N0, N, alpha, batch, bound
        self.mode, self.seed, self.dataset, self.todo = mode, seed, dataset, todo
        self.images_per_step = images_per_step
        self.radius, self.stages, self.stage_weights = radius, stages, stage_weights

    def predict_dataloader(self) -> DataLoader:
        # Each rank takes its own shard of the remaining indices. Lightning refuses an empty loader
        # on any rank: one left without work recomputes the last image, a one-image step seeded by
        # its index like the other copy, so the same row, which the merge keeps once.
        shard = self.todo[self.global_rank::self.trainer.world_size] or self.todo[-1:]
        return DataLoader(Indexed(self.dataset, shard), batch_size=self.images_per_step,
                          shuffle=False)

    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        idx, x, y = batch
        t0 = time.perf_counter()
        gen = torch.Generator(device=x.device).manual_seed(int(self.seed) * 1_000_003 + int(idx[0]))
        if self.mode == "certify":
            cert = self.smoothed.certify(x, self.N0, self.N, self.alpha, self.batch, self.bound, gen)
            cols = cert.columns()
            pred = cols["prediction"]
        elif self.mode == "staged":
            cert = certify_staged(self.base, x, self.N0, self.stages, self.stage_weights,
                                  self.alpha, self.smoothed.sigma, self.radius, self.batch,
                                  self.bound, generator=gen)
            cols = {**cert.columns(), "target_radius": np.full(len(idx), cert.target),
                    "certified_at_target": cert.certified.astype(np.int64)}
            pred = cols["prediction"]
        else:
            counts = sample_counts(self.base, x, self.N, self.smoothed.sigma, self.batch,
                                   generator=gen).numpy()          # (B, K+1)
            pred = predict_counts(counts, self.alpha)
            top = np.where(pred == ABSTAIN, counts[:, :-1].argmax(1), pred)
            # the counts of the answer (or the top class on abstain) and of the runner-up
            d = certify_details(counts, top, self.smoothed.sigma, self.alpha, "cohen").columns()
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
                      "stage", "draws", "target_radius", "certified_at_target"):
                if k in cols:
                    row[k] = cols[k][i]
            rows.append(row)
        return rows


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return "nan" if np.isnan(v) else f"{v:.6g}"
    return str(int(v)) if isinstance(v, np.integer | bool) else str(v)


class ResultsFile:
    """One header line plus one row per image; a settings record beside it (`<file>.json`).

    Opening an existing file under the same settings resumes it (rows kept, their indices
    skipped); other settings are refused. Rows are flushed as they are written, so a killed run
    loses at most the image in flight; a torn last line is dropped on resume."""

    def __init__(self, path: str | Path, settings: dict, columns: list[str]):
        self.path, self.settings, self.columns = Path(path), settings, columns
        self.meta = Path(str(self.path) + ".json")

    def check(self) -> set[int]:
        """Validate an existing file against the settings (writing nothing); the indices done."""
        if not self.path.exists():
            return set()
        if not self.meta.exists():
            raise ConfigError(f"{self.path} exists without its settings record {self.meta}: "
                              "move it away or choose another outfile=...")
        old = json.loads(self.meta.read_text())
        diff = {k: (old.get(k), self.settings.get(k)) for k in IDENTITY_KEYS
                if old.get(k) != self.settings.get(k)}
        if diff:
            lines = "; ".join(f"{k}: file {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{self.path} was written with other settings ({lines}). "
                              "Choose another outfile=... or restore the settings to resume it.")
        text = self.path.read_text()
        lines = text.split("\n")
        if lines[0].split("\t") != self.columns:
            raise ConfigError(f"{self.path}: header {lines[0]!r} is not this version's columns")
        rows = [ln for ln in lines[1:-1]]  # the part after the last newline is torn or empty
        return {int(r.split("\t", 1)[0]) for r in rows if r}

    def open(self) -> None:
        """Create the file (header + settings) or repair a torn last line; then append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # the record first: a file is never without its settings
            self.meta.write_text(json.dumps(self.settings, indent=2, default=str) + "\n")
            self.path.write_text("\t".join(self.columns) + "\n")
        else:
            self._drop_torn_line()

    def _drop_torn_line(self) -> None:
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # truncate in place: a kill now cannot lose the whole rows
            os.truncate(self.path, data.rfind(b"\n") + 1)

    def append(self, rows: list[dict], path: Path | None = None) -> None:
        with open(path or self.path, "a") as f:
            for r in rows:
                f.write("\t".join(_fmt(r.get(c, "")) for c in self.columns) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def part(self, rank: int) -> Path:
        return Path(f"{self.path}.rank{rank}")

    def merge_parts(self) -> set[int]:
        """Fold shard files of a multi-device run into the results file, in index order (the
        settings are checked first); returns the indices the file then holds."""
        parts = sorted(self.path.parent.glob(self.path.name + ".rank*"))
        rows, done = [], self.check()
        for p in parts:
            for ln in p.read_text().split("\n")[:-1]:
                if ln and int(ln.split("\t", 1)[0]) not in done:
                    rows.append(ln)
                    done.add(int(ln.split("\t", 1)[0]))
        rows.sort(key=lambda ln: int(ln.split("\t", 1)[0]))
        if rows:
            self._drop_torn_line()  # a merge killed mid-write: never glue a row onto its tail
            with open(self.path, "a") as f:
                f.write("\n".join(rows) + "\n")
        for p in parts:
            p.unlink()
        return done


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
                print(f"[certify] idx {r['idx']:>5}  label {r['label']}  predict {r['predict']:>2}"
                      f"{rad}  correct {r['correct']}  n_A {r.get('n_A', '')}{nr}  "
                      f"{r['time']:.2f}s/img", flush=True)

    def on_predict_end(self, trainer, pl_module):
        if trainer.world_size > 1:
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                self.results.merge_parts()
