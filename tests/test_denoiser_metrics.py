"""The denoiser's PSNR (torchmetrics' PeakSignalNoiseRatio, data_range 1): the formula on known
pairs, the validation epoch's val/psnr (the PSNR of the epoch's mean squared error over every
pixel of every batch), and the given networks' figure (jobs.given.evaluate)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.image import peak_signal_noise_ratio

from dsr_lightning.tasks.denoiser import DenoiserTask

OPTIM = {"epochs": 1, "phases": [{"epochs": 1, "optimizer": {
    "_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}}]}


def test_psnr_of_a_known_pair():
    x = torch.zeros(2, 3, 4, 4)
    # every pixel off by 0.1: MSE 0.01, PSNR 10 log10(1 / 0.01) = 20 dB
    assert float(peak_signal_noise_ratio(x + 0.1, x, data_range=1.0)) == pytest.approx(20.0, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    mse = float(((a.double() - b.double()) ** 2).mean())
    assert float(peak_signal_noise_ratio(a, b, data_range=1.0)) == pytest.approx(
        -10 * math.log10(mse), abs=1e-4)


class Shift(nn.Module):
    """A "denoiser" whose output is its input plus a fixed offset."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        return x + self.offset


def test_validation_psnr_is_that_of_the_epochs_mean_squared_error(tmp_path):
    g = torch.Generator().manual_seed(1)
    T, batches = 2, []
    for b in (3, 5):  # batches of unequal size: the PSNR is of the mean over all pixels
        x = torch.rand(b, 3, 8, 8, generator=g)
        noise = 0.2 * torch.randn(b * T, 3, 8, 8, generator=g)
        batches.append({"x": x, "y": torch.zeros(b, dtype=torch.long),
                        "noisy": x.repeat_interleave(T, 0) + noise})
    task = DenoiserTask(Shift(0.05), OPTIM)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(task, DataLoader(batches, batch_size=None))
    errors = torch.cat([(bt["noisy"].double() + 0.05 - bt["x"].double().repeat_interleave(T, 0))
                        .flatten() for bt in batches])
    want = -10 * math.log10(float((errors ** 2).mean()))
    assert float(trainer.callback_metrics["val/psnr"]) == pytest.approx(want, abs=1e-3)
    # another epoch starts again: the same figure, not the two epochs pooled with a stale state
    trainer.validate(task, DataLoader(batches[:1], batch_size=None))
    first = (batches[0]["noisy"].double() + 0.05 - batches[0]["x"].double().repeat_interleave(T, 0))
    assert float(trainer.callback_metrics["val/psnr"]) == pytest.approx(
        -10 * math.log10(float((first ** 2).mean())), abs=1e-3)


def test_given_denoiser_psnr_is_the_formula(tmp_path, monkeypatch):
    """jobs.given.evaluate's PSNR on a denoiser file equals -10 log10(MSE) of its clipped output."""
    from dsr_lightning.jobs import given

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(given, "_test_images", lambda n: (x, torch.zeros(len(x), dtype=torch.long)))
    monkeypatch.setattr(given, "read_checkpoint", lambda path: {"sigma": 0.25})
    monkeypatch.setattr(given, "load_checkpoint", lambda path: Shift(0.0))
    got = given.evaluate(tmp_path / "denoiser.pth.tar", images=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(given.EVAL_SEED))
    mse = float((((x + 0.25 * noise).clamp(0, 1) - x).double() ** 2).mean())
    assert got["metric"] == "psnr_db"
    assert got["value"] == pytest.approx(-10 * math.log10(mse), abs=1e-4)
