"""Shared fixtures: the real config composed as the CLI would and shrunk for CPU; tiny networks in
the published layout (made in memory, or trained through the real job where a test needs training
to have happened); tiny rejectors and certification runs trained or certified once per session."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CERTIFY_RUNS, TINY_SIGMAS, certify_tiny, compose_tiny
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# Test tensors are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine
# OpenMP threads spin against each other (measured: a tiny resume test 65 s -> 2.7 s with one).
torch.set_num_threads(1)

# the session's rejectors: as small as a run of the rejector stage gets (experiment=tiny, 1 epoch)
REJECTOR_RUN = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                "rejector.threshold=auto"]


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: `tiny_cfg("stage=denoiser", "T=1", name="train", out=None, experiment="tiny")
    -> DictConfig` (see compose_tiny), a fresh run folder under tmp_path per call (or `out`).
    The HydraConfig singleton is cleared after the test."""
    counter = itertools.count()

    def make(*overrides: str, name: str = "train", out: str | Path | None = None,
             experiment: str | None = "tiny") -> DictConfig:
        return compose_tiny(out or tmp_path / f"run{next(counter)}", overrides, name, experiment)

    yield make
    HydraConfig.instance().cfg = None


def _layout(base: Path) -> SimpleNamespace:
    root = base / "outputs" / "tiny" / "pretrained_models"
    return SimpleNamespace(cwd=base, root=root, override=f"pretrained_root={root}")


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> SimpleNamespace:
    """A tiny classifier and denoisers (σ = 0.25, 0.5) in the published layout, as the classifier
    and denoiser stages of experiment=tiny export them (same arch, same file entries), but with
    their initial weights: made in memory in milliseconds. Most tests only need files that load;
    `tiny_trained` has networks that went through the real training job. Under `root` =
    <cwd>/outputs/tiny/pretrained_models, where experiment=tiny looks when run from `cwd`. Fields:
    cwd, root, override ('pretrained_root=...'), classifier (path), denoisers ({σ: path})."""
    from dsr_lightning.config import to_dict
    from dsr_lightning.jobs.networks import build_fresh
    from dsr_lightning.models import save_checkpoint

    tiny = _layout(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    paths = {}
    try:
        for role, sigma in (("classifier", None), *(("denoiser", s) for s in TINY_SIGMAS)):
            cfg = compose_tiny(tiny.cwd / "made", [f"stage={role}", tiny.override,
                                                   *([f"sigma={sigma}"] if sigma else [])])
            spec = cfg[role]
            extra = {"sigma": float(sigma)} if sigma else {"noise_sd": float(spec.noise_sd)}
            paths[sigma] = save_checkpoint(spec.path, build_fresh(role, spec), arch=spec.arch,
                                           arch_kwargs=dict(spec.get("arch_kwargs") or {}),
                                           config=to_dict(cfg), **extra)
    finally:
        HydraConfig.instance().cfg = None
    tiny.classifier = Path(paths.pop(None))
    tiny.denoisers = {s: Path(p) for s, p in paths.items()}
    return tiny


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> SimpleNamespace:
    """A tiny classifier and a denoiser for σ = 0.25 trained (experiment=tiny, 1 epoch) through the
    real train() job and exported in the published layout (fields as tiny_pretrained's)."""
    from dsr_lightning.jobs.training import train

    tiny = _layout(tmp_path_factory.mktemp("tiny_trained"))
    try:
        tiny.classifier = Path(train(compose_tiny(tiny.cwd / "stage_classifier",
                                                  ["stage=classifier", tiny.override]))["export"])
        tiny.denoisers = {0.25: Path(train(compose_tiny(
            tiny.cwd / "stage_denoiser", ["stage=denoiser", "sigma=0.25", tiny.override]))["export"])}
    finally:
        HydraConfig.instance().cfg = None
    return tiny


def _train_rejector(tiny, out: Path, *overrides: str) -> dict:
    from dsr_lightning.jobs.training import train

    try:
        return train(compose_tiny(out, [tiny.override, "sigma=0.25", *REJECTOR_RUN, *overrides]))
    finally:
        HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def rejector_runs(tiny_pretrained, tmp_path_factory) -> dict:
    """train() results of tiny rejectors for σ = 0.25 on the session's f and D (experiment=tiny,
    1 epoch, rejector.threshold=auto): seeds 0 and 1, and 'other_test' (seed 0,
    another test split: data.num_test=48), each trained once per session."""
    runs = {seed: _train_rejector(tiny_pretrained, tmp_path_factory.mktemp(f"rej{seed}"),
                                  f"seed={seed}") for seed in (0, 1)}
    runs["other_test"] = _train_rejector(tiny_pretrained, tmp_path_factory.mktemp("rej_test48"),
                                         "seed=0", "data.num_test=48")
    return runs


@pytest.fixture(scope="session")
def rejector(rejector_runs) -> Path:
    """The best checkpoint of the seed-0 tiny rejector (σ = 0.25)."""
    return Path(rejector_runs[0]["best"])


@pytest.fixture(scope="session")
def rejectors(rejector_runs) -> dict[int, Path]:
    """{seed: last checkpoint} of two tiny rejectors with different weights (seeds 0 and 1)."""
    return {seed: Path(rejector_runs[seed]["last"]) for seed in (0, 1)}


@pytest.fixture(scope="session")
def runs(tiny_pretrained, rejector, tmp_path_factory):
    """Factory: runs(name) -> results path of the shared certification run `name` of
    CERTIFY_RUNS (helpers.SMALL settings), certified once per session."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"certify_{name}")
            done[name] = Path(certify_tiny(tiny_pretrained, rejector, out,
                                           *CERTIFY_RUNS[name])["outfile"])
        return done[name]

    return get
