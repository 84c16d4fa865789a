"""Shared fixtures: the real config composed as the CLI would and shrunk for CPU; tiny networks in
the published layout (made in memory, or trained through the real job where a test needs training
to have happened); tiny rejectors and certification runs trained or certified once per test run:
the pytest-xdist workers share them (`once`: the first to need one makes it, the others wait and
read it), so no network is trained twice."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from helpers import CERTIFY_RUNS, TINY_SIGMAS, certify_tiny, compose_tiny
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# Test tensors are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine
# OpenMP threads spin against each other (measured: a tiny resume test 65 s -> 2.7 s with one).
torch.set_num_threads(1)

# the session's rejectors: as small as a run of the rejector stage gets (experiment=tiny, 1 epoch)
REJECTOR_RUN = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                "rejector.threshold=auto"]


def _plain(value):
    """JSON for what json.dumps does not take: NumPy/torch scalars as numbers, paths as text."""
    return value.item() if hasattr(value, "item") else str(value)


def _once(tmp_path_factory, name: str, make) -> dict:
    """make(folder) -> a JSON-able dict, made once per test run in `folder` and shared by the
    xdist workers (their temporary folders have one parent per run). Everyone, the maker
    included, gets the JSON round trip, so a result reads the same in every worker. A fixture's
    files are shared: tests copy what they change."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / f"once_{name}", root / f"once_{name}.json"
    with FileLock(str(root / f"once_{name}.lock")):
        if not done.is_file():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(make(folder), default=_plain))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def once(tmp_path_factory):
    """Factory: once(name, make) -> make(folder)'s dict, made once per test run (see _once)."""
    return lambda name, make: _once(tmp_path_factory, name, make)


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
def tiny_pretrained(once) -> SimpleNamespace:
    """A tiny classifier and denoisers (σ = 0.25, 0.5) in the published layout, as the classifier
    and denoiser stages of experiment=tiny export them (same arch, same file entries), but with
    their initial weights: made in memory in milliseconds. Most tests only need files that load;
    `tiny_trained` has networks that went through the real training job. Under `root` =
    <cwd>/outputs/tiny/pretrained_models, where experiment=tiny looks when run from `cwd`. Fields:
    cwd, root, override ('pretrained_root=...'), classifier (path), denoisers ({σ: path})."""

    def make(base: Path) -> dict:
        from dsr_lightning.config import to_dict
        from dsr_lightning.jobs.networks import build_fresh
        from dsr_lightning.models import save_checkpoint

        tiny = _layout(base)
        torch.manual_seed(0)
        paths = {}
        try:
            for role, sigma in (("classifier", None), *(("denoiser", s) for s in TINY_SIGMAS)):
                cfg = compose_tiny(tiny.cwd / "made", [f"stage={role}", tiny.override,
                                                       *([f"sigma={sigma}"] if sigma else [])])
                spec = cfg[role]
                extra = {"sigma": float(sigma)} if sigma else {"noise_sd": float(spec.noise_sd)}
                paths[str(sigma)] = save_checkpoint(
                    spec.path, build_fresh(role, spec), arch=spec.arch,
                    arch_kwargs=dict(spec.get("arch_kwargs") or {}), config=to_dict(cfg), **extra)
        finally:
            HydraConfig.instance().cfg = None
        return {"base": base, "classifier": paths.pop("None"), "denoisers": paths}

    made = once("tiny_pretrained", make)
    tiny = _layout(Path(made["base"]))
    tiny.classifier = Path(made["classifier"])
    tiny.denoisers = {float(s): Path(p) for s, p in made["denoisers"].items()}
    return tiny


@pytest.fixture(scope="session")
def tiny_trained(once) -> SimpleNamespace:
    """A tiny classifier and a denoiser for σ = 0.25 trained (experiment=tiny, 1 epoch) through the
    real train() job and exported in the published layout (fields as tiny_pretrained's)."""

    def make(base: Path) -> dict:
        from dsr_lightning.jobs.training import train

        tiny = _layout(base)
        try:
            clf = train(compose_tiny(tiny.cwd / "stage_classifier",
                                     ["stage=classifier", tiny.override]))["export"]
            den = train(compose_tiny(tiny.cwd / "stage_denoiser",
                                     ["stage=denoiser", "sigma=0.25", tiny.override]))["export"]
        finally:
            HydraConfig.instance().cfg = None
        return {"base": base, "classifier": clf, "denoiser": den}

    made = once("tiny_trained", make)
    tiny = _layout(Path(made["base"]))
    tiny.classifier, tiny.denoisers = Path(made["classifier"]), {0.25: Path(made["denoiser"])}
    return tiny


def _train_rejector(tiny, out: Path, *overrides: str) -> dict:
    from dsr_lightning.jobs.training import train

    try:
        return train(compose_tiny(out, [tiny.override, "sigma=0.25", *REJECTOR_RUN, *overrides]))
    finally:
        HydraConfig.instance().cfg = None


class _LazyRuns(dict):
    """{key: train() result}, each run trained on first use, once per test run."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = self._make(key)
        return self[key]


@pytest.fixture(scope="session")
def rejector_runs(tiny_pretrained, once) -> dict:
    """train() results (JSON round trip) of tiny rejectors for σ = 0.25 on the session's f and D
    (experiment=tiny, 1 epoch, rejector.threshold=auto): seeds 0 and 1, and 'other_test' (seed 0,
    another test split: data.num_test=48), each trained on first use, once per test run."""
    settings = {0: ["seed=0"], 1: ["seed=1"], "other_test": ["seed=0", "data.num_test=48"]}
    return _LazyRuns(lambda key: once(f"rejector_{key}", lambda out: _train_rejector(
        tiny_pretrained, out, *settings[key])))


@pytest.fixture(scope="session")
def rejector(rejector_runs) -> Path:
    """The best checkpoint of the seed-0 tiny rejector (σ = 0.25)."""
    return Path(rejector_runs[0]["best"])


@pytest.fixture(scope="session")
def rejectors(rejector_runs) -> dict[int, Path]:
    """{seed: last checkpoint} of two tiny rejectors with different weights (seeds 0 and 1)."""
    return {seed: Path(rejector_runs[seed]["last"]) for seed in (0, 1)}


@pytest.fixture(scope="session")
def runs(tiny_pretrained, rejector, once):
    """Factory: runs(name) -> results path of the shared certification run `name` of
    CERTIFY_RUNS (helpers.SMALL settings), certified once per test run."""

    def get(name: str) -> Path:
        made = once(f"certify_{name}", lambda out: {"outfile": certify_tiny(
            tiny_pretrained, rejector, out, *CERTIFY_RUNS[name])["outfile"]})
        return Path(made["outfile"])

    return get
