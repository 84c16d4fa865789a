"""certify.batch=auto (the largest batch that fits) and the back-off on out-of-memory, with a
network that runs out of memory above a batch size (MemoryBoundNet): auto stays within the limit,
a fixed batch that is too large backs off, and the rows (counts, radii, predictions) are those of
a run with a small batch that never ran out of memory, in every mode; other errors pass through."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from dsr_lightning.errors import ConfigError
from dsr_lightning.models import SmoothingSystem
from dsr_lightning.smoothing import ImageNoise, SmoothedClassifier
from dsr_lightning.tasks import CertificationModule, CertificationSpec
from dsr_lightning.tasks.batching import BackoffForward, is_out_of_memory, probe_batch


@pytest.fixture
def said(caplog):
    """What the package logged (INFO and up) since the last call, as one text."""
    caplog.set_level(logging.INFO, logger="dsr_lightning")

    def read() -> str:
        text = caplog.text
        caplog.clear()
        return text
    return read


LIMIT = 48  # samples a forward pass may hold (no gradient)
GRAD_LIMIT = 12  # with gradient (mode=attack's passes)


class MemoryBoundNet(nn.Module):
    """A tiny classifier, conv + a corner + linear on (B, in_channels, H >= 9, W >= 9) -> logits
    (B, num_classes), that raises torch.OutOfMemoryError as CUDA does when a forward pass holds
    more than `max_batch` samples (`max_grad_batch` with gradient enabled; default max_batch): a
    stand-in for a device whose memory holds that many. Its weights are a function of `seed`, and
    the noise moves its answers. Usable from a config (module source):
    `net: {_target_: tests.test_batch_auto.MemoryBoundNet, max_batch: 48, num_classes: 3}`."""

    def __init__(self, max_batch: int = 48, num_classes: int = 3, in_channels: int = 3,
                 max_grad_batch: int | None = None, width: int = 4, seed: int = 0):
        super().__init__()
        self.max_batch, self.num_classes = int(max_batch), int(num_classes)
        self.max_grad_batch = self.max_batch if max_grad_batch is None else int(max_grad_batch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(in_channels, width, 5, stride=4)
            self.fc = nn.Linear(width * 4, self.num_classes)
            nn.init.normal_(self.fc.weight, std=5.0)
        self.sizes: list[int] = []  # the batch size of every call, those refused included

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        limit = self.max_grad_batch if torch.is_grad_enabled() else self.max_batch
        if len(x) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated): {len(x)} samples in "
                                         f"one pass, room for {limit}")
        # a corner of the feature map: a few pixels, so the noise moves the answer (an average
        # over the whole image would not see it)
        return self.fc(torch.relu(self.conv(x))[:, :, :2, :2].flatten(1))


class FailingNet(MemoryBoundNet):
    """Raises a RuntimeError that is not about memory above `max_batch` samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.max_batch:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED (simulated)")
        return super().forward(x)


def images(n: int, shape: tuple[int, ...], seed: int = 1) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape, generator=g), i % 3) for i in range(n)]


SETTINGS = {  # per mode: a few draws, enough to mix images in a chunk and to stage
    "certify": dict(N0=16, N=96),
    "predict": dict(N0=16, N=96),
    "staged": dict(N0=16, N=96, stages=(32, 64, 96), stage_weights=(0.1, 0.2, 0.7), radius=0.05),
    "attack": dict(N0=16, N=64, radius=0.25, attack_steps=2, attack_draws=8),
}


def spec_of(mode: str, batch, images_per_step: int = 2, **kw) -> CertificationSpec:
    return CertificationSpec(**{**dict(mode=mode, sigma=0.25, alpha=0.01, bound="cohen", seed=3,
                                       batch=batch, images_per_step=images_per_step),
                                **SETTINGS[mode], **kw})


def run(net: nn.Module, spec: CertificationSpec, data) -> tuple[CertificationModule, list[dict]]:
    """Certify `data` through Lightning's predict loop; the module and its rows (time left out)."""
    module = CertificationModule(SmoothingSystem(net), spec, data, list(range(len(data))))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    steps = trainer.predict(module)
    return module, [{k: v for k, v in r.items() if k != "time"} for step in steps for r in step]


# -- at 224 x 224 px: the engine's counts with a small batch against auto and a fixed large batch

@pytest.fixture(scope="module")
def big():
    """Two 1 x 224 x 224 images and their certificates from the engine itself with 16 samples
    per pass (never above the limit)."""
    data = images(2, (1, 224, 224))
    spec = spec_of("certify", 16)
    net = MemoryBoundNet(LIMIT, in_channels=1)
    x = torch.stack([d[0] for d in data])
    cert = SmoothedClassifier(SmoothingSystem(net), sigma=spec.sigma).certify(
        x, spec.N0, spec.N, spec.alpha, 16, spec.bound, noise=ImageNoise(spec.seed, [0, 1]))
    assert max(net.sizes) == 16
    # the noise moves the answers: the counts would tell other draws apart
    assert (cert.counts.max(1) < spec.N).any() and (cert.counts.sum(0) > 0).sum() >= 2
    return data, spec, cert


def check_rows(rows: list[dict], cert) -> None:
    assert [r["idx"] for r in rows] == [0, 1]
    np.testing.assert_array_equal([r["n_A"] for r in rows], cert.n_A)
    np.testing.assert_array_equal([r["n_B"] for r in rows], cert.n_B)
    np.testing.assert_array_equal([r["predict"] for r in rows], cert.prediction)
    np.testing.assert_array_equal([r["radius"] for r in rows], cert.radius)  # exactly


def test_auto_picks_a_batch_that_fits(big, said):
    data, spec, cert = big
    net = MemoryBoundNet(LIMIT, in_channels=1)
    module, rows = run(net, spec_of("certify", "auto"), data)
    # 64 ran out of memory, 32 fits: the largest of 64 / 2^k within the limit
    assert module.batch == module.resolved_batch == 32 <= LIMIT
    assert module.batch_reason == "out of memory at 64"
    out = said()
    assert "certify: batch=auto -> 32 samples per forward pass (out of memory at 64)" in out
    assert "redoing" not in out  # the run itself never ran out of memory
    assert net.sizes[:2] == [64, 32] and max(net.sizes[2:]) == 32
    check_rows(rows, cert)


def test_fixed_batch_backs_off(big, said):
    data, spec, cert = big
    net = MemoryBoundNet(LIMIT, in_channels=1)
    module, rows = run(net, spec_of("certify", 200), data)
    assert module.resolved_batch == 200 and module.batch == 25  # 200 -> 100 -> 50 -> 25
    assert module.passes.backoffs == [(200, 100), (100, 50), (50, 25)]
    out = said()
    assert "certify: out of memory at 200 samples per forward pass -> 100" in out
    assert "batch=auto" not in out
    assert max(s for s in net.sizes if s <= LIMIT) == 25
    check_rows(rows, cert)


# -- every mode: rows identical whatever the batch, and whatever ran out of memory

@pytest.mark.parametrize("mode", ["certify", "predict", "staged", "attack"])
def test_rows_do_not_depend_on_batch(mode, said):
    data = images(3, (3, 16, 16))
    ref_net = MemoryBoundNet(LIMIT, max_grad_batch=GRAD_LIMIT)
    _, ref = run(ref_net, spec_of(mode, 8), data)  # 8 samples per pass: never out of memory
    assert max(ref_net.sizes) <= 8
    assert "out of memory" not in said()
    if mode != "attack":  # the noise moves the answers: other draws would change the counts
        assert any(0 < r["n_A"] < r["N"] for r in ref), ref
    for batch in ("auto", 300):
        net = MemoryBoundNet(LIMIT, max_grad_batch=GRAD_LIMIT)
        module, rows = run(net, spec_of(mode, batch), data)
        out = said()
        np.testing.assert_equal(rows, ref)
        assert module.batch <= LIMIT and max(net.sizes) > LIMIT  # it did run out of memory
        if batch == 300:
            assert module.batch < 300 and "samples per forward pass -> " in out
        if mode == "attack":
            assert "certify: out of memory in the attack at 2 images x 8 draws per pass -> 1" in out
            assert module._attack_limit == 1
            assert any(r["perturbation_norm"] > 0 for r in rows)


# -- the pieces

def test_auto_cap(said):
    data = images(1, (3, 16, 16))
    module = CertificationModule(SmoothingSystem(MemoryBoundNet(10**9)),
                                 spec_of("certify", "auto", N0=10, N=90), data, [0])
    assert module.batch is None and module.resolve_batch() == 100  # N0 + N
    assert "batch=auto -> 100 samples per forward pass (the cap: N0 + N = 100)" in (
        said())
    module = CertificationModule(SmoothingSystem(MemoryBoundNet(10**9)),
                                 spec_of("predict", "auto", N=5000), data, [0])
    assert module.resolve_batch() == 1024  # the CPU's cap, below N
    assert "(the CPU cap, 1024)" in said()


def test_probe_batch():
    def bounded(limit, log):
        def run(n):
            log.append(n)
            if n > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run

    log = []
    assert probe_batch(bounded(300, log), 1000, "cpu") == (256, 512) and log == [64, 128, 256, 512]
    log = []
    assert probe_batch(bounded(5, log), 1000, "cpu") == (4, 8) and log == [64, 32, 16, 8, 4]
    log = []
    assert probe_batch(bounded(10**6, log), 100, "cpu") == (100, None) and log == [64, 100]
    with pytest.raises(ConfigError, match="out of memory with 1 sample"):
        probe_batch(bounded(0, []), 1000, "cpu")
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_backoff_forward_splits_and_keeps_order():
    net = MemoryBoundNet(LIMIT, num_classes=5)
    x = torch.rand(100, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expect = torch.cat([net(x[i:i + 10]) for i in range(0, 100, 10)])
        passes = BackoffForward(net)
        got = passes(x)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    assert passes.limit == 25 and passes.backoffs == [(100, 50), (50, 25)]
    assert net.sizes[-6:] == [100, 50, 25, 25, 25, 25]


def test_other_errors_are_not_swallowed(said):
    data = images(2, (3, 16, 16))
    for batch in ("auto", 100):
        net = FailingNet(LIMIT)
        with pytest.raises(RuntimeError, match="CUDNN_STATUS_EXECUTION_FAILED") as err:
            run(net, spec_of("certify", batch), data)
        assert not isinstance(err.value, ConfigError)
        assert "out of memory" not in said()


def test_out_of_memory_at_one_sample_is_a_clear_error():
    data = images(1, (3, 16, 16))
    with pytest.raises(ConfigError, match="certify.batch=auto: out of memory with 1 sample"):
        run(MemoryBoundNet(0), spec_of("certify", "auto"), data)
    with pytest.raises(ConfigError, match="out of memory with 1 sample per forward pass"):
        run(MemoryBoundNet(0), spec_of("certify", 8), data)
    with pytest.raises(ConfigError, match="lower certify.attack_draws"):
        run(MemoryBoundNet(LIMIT, max_grad_batch=4), spec_of("attack", 8), data)


def test_batch_must_be_a_count_or_auto():
    for bad in (0, -5, "big", 2.5, True):
        with pytest.raises(ConfigError, match="certify.batch must be"):
            CertificationModule(SmoothingSystem(MemoryBoundNet()), spec_of("certify", bad),
                                images(1, (3, 16, 16)), [0])
