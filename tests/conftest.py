"""Shared fixtures: the real config composed as the CLI would and shrunk for CPU, and tiny
pretrained networks (classifier f, denoisers D for σ = 0.25 and 0.5) trained once per session."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dsr_lightning.config import compose

REPO = Path(__file__).resolve().parent.parent
# Test tensors are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine
# OpenMP threads spin against each other (measured: a tiny resume test 65 s -> 2.7 s with one).
torch.set_num_threads(1)
TINY_SIGMAS = (0.25, 0.5)  # the session's tiny denoisers


def compose_tiny(out_dir: str | Path, overrides=(), name: str = "train",
                 experiment: str | None = "tiny") -> DictConfig:
    """conf/<name>.yaml + experiment + overrides, writing only under out_dir: the run folder is
    out_dir (registered with HydraConfig, so `${hydra:runtime.output_dir}` resolves to it), on
    CPU, no progress bar. pretrained_root defaults to out_dir/pretrained unless overridden."""
    out_dir = Path(out_dir)
    overrides = [*([f"experiment={experiment}"] if experiment else []), *overrides]
    if not any(o.startswith("pretrained_root=") for o in overrides):
        overrides.append(f"pretrained_root={out_dir / 'pretrained'}")
    cfg = compose(name, overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        if "data" in cfg and "num_workers" in cfg.data:
            cfg.data.num_workers = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


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


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> SimpleNamespace:
    """Tiny classifier and denoisers trained once (experiment=tiny, 1 epoch) and exported in the
    published layout under `root` = <cwd>/outputs/tiny/pretrained_models, i.e. where
    experiment=tiny looks when run from `cwd`. Fields: cwd, root, override ('pretrained_root=...'),
    classifier (path), denoisers ({σ: path})."""
    from dsr_lightning.jobs.training import train

    base = tmp_path_factory.mktemp("tiny")
    root = base / "outputs" / "tiny" / "pretrained_models"
    override = f"pretrained_root={root}"
    clf = train(compose_tiny(base / "stage_classifier", ["stage=classifier", override]))["export"]
    dens = {s: train(compose_tiny(base / f"stage_denoiser_{s}",
                                  ["stage=denoiser", f"sigma={s}", override]))["export"]
            for s in TINY_SIGMAS}
    HydraConfig.instance().cfg = None
    return SimpleNamespace(cwd=base, root=root, override=override, classifier=Path(clf),
                           denoisers={s: Path(p) for s, p in dens.items()})
