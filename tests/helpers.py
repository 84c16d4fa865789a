"""Helpers shared by several test files (test files never import each other):

* closed-form base classifiers on the u = w·z axis (test_smoothing_soundness, _staged);
* the certification job in process on experiment=tiny, and the results-file utilities
  (test_certify, _certify_staged, test_misuse, test_threshold, test_experiments);
* callbacks a test adds through the config (`+callbacks.<name>._target_=tests.helpers.<Class>`):
  Hydra imports them by name, so the instance it built is found again through the class.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from scipy.optimize import brentq
from scipy.special import gammaln
from scipy.stats import norm

from dsr_lightning.config import compose
from dsr_lightning.smoothing import ABSTAIN

REPO = Path(__file__).resolve().parent.parent


# --- closed-form base classifiers (DESIGN.md §6) -------------------------------------------------

class Intervals:
    """u-axis cut at `edges` into intervals labelled `labels` (K = reject); noise σ."""

    def __init__(self, edges, labels, K, sigma):
        self.edges, self.labels, self.K, self.sigma = np.asarray(edges), np.asarray(labels), K, sigma

    def probs(self, t):
        """(..., K+1) probabilities of each label for u ~ N(t, σ²), t of any shape."""
        t = np.asarray(t, dtype=np.float64)[..., None]
        cdf = norm.cdf((self.edges - t) / self.sigma)  # (..., E)
        cdf = np.concatenate([np.zeros_like(t), cdf, np.ones_like(t)], -1)
        return np.diff(cdf, axis=-1) @ np.eye(self.K + 1)[self.labels]

    def truth(self, t):
        """(g_R at t, true robust radius): nearest sign change of the margin p_g − max other."""
        g = int(np.argmax(self.probs(t)[:-1]))

        def margin(s):
            p = self.probs(s)[..., :-1]
            return p[..., g] - np.delete(p, g, axis=-1).max(-1)

        radius = np.inf
        for step in (1e-3, -1e-3):  # scan each way to the first sign change, then refine
            s = t + step * np.arange(6001)
            hit = np.flatnonzero(margin(s) <= 0)
            if len(hit) and hit[0] == 0:  # t on the boundary
                return g, 0.0
            if len(hit):
                edge = brentq(margin, s[hit[0] - 1], s[hit[0]], xtol=1e-12)
                radius = min(radius, abs(edge - t))
        return g, radius


BAND = Intervals([0.0, 0.5], [0, 2, 1], K=2, sigma=0.25)  # A | R | B, boundary at 0.25
# A | R | C | R | B: B is the runner-up for t in [-0.2, 0.3], where 'runner_up' is tight and 'paper'
# (which bounds B's mass and C's together by 1 − p_AR) loses 0.07 of radius at t = 0
ISLAND = Intervals([0.0, 0.25, 0.35, 0.6], [0, 3, 2, 3, 1], K=3, sigma=0.5)
PLAIN = Intervals([0.25], [0, 1], K=2, sigma=0.25)  # A | B, no rejection: Cohen's setting
SELECTION_N0 = 100  # the N0 draws that pick ĉ in the soundness tests


def wrong(pred, radius, g, r_true):
    """A certificate is wrong when it is issued and its class is not g_R(x) or its radius exceeds
    the true radius."""
    return (pred != ABSTAIN) & ((pred != g) | (radius > r_true))


def selection_probs(model, t, N0=SELECTION_N0):
    """(K,) exact P(ĉ = c) for ĉ = argmax over real classes of N0 draws, ties to the lowest."""
    p, K = model.probs(t), model.K
    grids = np.meshgrid(*[np.arange(N0 + 1)] * K, indexing="ij")
    real = np.stack([g.ravel() for g in grids], 1)  # (cells, K)
    real = real[real.sum(1) <= N0]
    cells = np.column_stack([real, N0 - real.sum(1)])
    with np.errstate(divide="ignore"):
        logp = np.where(cells == 0, 0.0, cells * np.log(np.maximum(p, 1e-300)))
    pmf = np.exp(gammaln(N0 + 1) - gammaln(cells + 1).sum(1) + logp.sum(1))
    return np.bincount(real.argmax(1), weights=pmf, minlength=K)


class Projection(torch.nn.Module):
    """f_R(z) = labels[interval of u = w·flatten(z)], z of shape (B, *PIXELS)."""

    def __init__(self, model, w):
        super().__init__()
        self.num_classes = model.K
        self.register_buffer("w", w)
        self.register_buffer("edges", torch.tensor(model.edges, dtype=torch.float32))
        self.register_buffer("labels", torch.tensor(model.labels))

    def forward(self, z):
        u = z.flatten(1) @ self.w  # (B,)
        return self.labels[torch.bucketize(u, self.edges, right=True)]


PIXELS = (1, 4, 4)  # the closed-form models' images: 16 pixels (u = w·z is exact in any dimension)


def projected_copies(model, t: float, M: int, seed: int):
    """(f_R as a torch module, M copies of one PIXELS image x with w·x = t plus a part orthogonal
    to w, the generator after drawing them: the noise continues from it)."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(PIXELS))
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w /= w.norm()
    v = torch.randn(d, generator=g, dtype=torch.float64)
    x = (t * w + (v - (v @ w) * w)).float().view(1, *PIXELS).expand(M, *PIXELS)
    return Projection(model, w.float()), x, g


# --- networks ----------------------------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics (positive variances), so no entry is at its init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif k.endswith("num_batches_tracked"):
                v.fill_(7)
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return model.eval()


# --- configs composed as the CLI would, and the jobs in process ----------------------------------

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


# certify.py's settings in the tests: small N, 4 images
N0, N, MAX, SIGMA = 10, 50, 4, 0.25
SMALL = [f"N0={N0}", f"N={N}", "batch=64", f"max={MAX}", "images_per_step=4", f"sigma={SIGMA}"]
# the session's shared certification runs (conftest's `runs`, on its seed-0 rejector)
CERTIFY_RUNS = {
    "paper": ["system=rejection", "bound=paper"],
    "runner_up": ["system=rejection", "bound=runner_up"],
    "denoised": ["system=denoised", "rejector_ckpt=null"],  # f and D from their files
    "plain": ["system=plain"],
    "predict": ["system=rejection", "mode=predict"],
}


def certify_tiny(tiny, rejector: Path | None, out_dir: Path, *overrides: str) -> dict:
    """certify(cfg) in process, config composed as the CLI would (experiment=tiny, SMALL)."""
    from dsr_lightning.jobs.certification import certify

    ckpt = [f"rejector_ckpt={rejector}"] if rejector else []
    cfg = compose_tiny(out_dir, [tiny.override, *SMALL, f"outdir={out_dir}", *ckpt, *overrides],
                       name="certify")
    try:
        return certify(cfg)
    finally:
        HydraConfig.instance().cfg = None


def run_cli(argv: list[str], monkeypatch) -> int:
    """`python -m dsr_lightning <argv>` in this process (dsr_lightning.cli.main, Hydra included):
    the exit status (0, or that of the SystemExit it raised). Hydra's global state and the
    logging handlers its job adds are put back afterwards."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from dsr_lightning.cli import main

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # errors as users see them
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main hands Hydra its overrides there
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:], root.level = handlers, level
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


def cli(tiny, run_dir: Path, *args: str) -> list[str]:
    """The command line of certify.py as a user types it (its Hydra run folder in run_dir)."""
    return [sys.executable, str(REPO / "certify.py"), "experiment=tiny", tiny.override,
            f"hydra.run.dir={run_dir}", *args]


def env() -> dict:
    """The environment of a launched process: errors as users see them, one OpenMP thread."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# --- results files ------------------------------------------------------------------------------

def snapshot(path: Path) -> tuple[bytes, bytes]:
    """The bytes of a results file and of its settings record."""
    return path.read_bytes(), Path(f"{path}.json").read_bytes()


def copy_results(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    shutil.copy(f"{src}.json", f"{dst}.json")
    return dst


def rows(path: Path) -> list[str]:
    """The data lines of a results file (asserting its last line is terminated)."""
    lines = path.read_text().split("\n")
    assert lines[-1] == "", f"{path}: the last line is not terminated"
    return lines[1:-1]


# --- callbacks added through the config: +callbacks.<name>._target_=helpers.<Class> ---------------

class StepSpy(pl.Callback):
    """Records the global gradient norm at every optimiser step, and the batch index. The last
    instance built is `StepSpy.last`."""

    last: StepSpy | None = None

    def __init__(self):
        self.norms, self.batches = [], []
        StepSpy.last = self

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))
        self.batches.append(trainer.fit_loop.epoch_loop.batch_idx)


class WorseLater(pl.Callback):
    """From epoch 1 on, the monitored metric (val/auroc) reads worse than anything before."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch >= 1:
            trainer.callback_metrics["val/auroc"] = torch.tensor(-1.0)



# --- user data and networks (bring your own) --------------------------------------------------

def make_image_folder(root: Path, classes=("cat", "dog", "owl"), train: int = 12, test: int = 4,
                      size: tuple[int, int] = (40, 36), seed: int = 0) -> Path:
    """An ImageFolder data set as a user has one: root/{train,test}/<class>/<n>.png, small RGB
    PNGs of different sizes whose mean colour depends on the class (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size[0] + i % 3, size[1] + i % 2  # the folder's images differ in size
                base = np.zeros(3)
                base[k % 3] = 160
                img = np.clip(base + rng.normal(0, 40, (h, w, 3)) + 40, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


class MemoryBoundNet(torch.nn.Module):
    """A small convolutional classifier that runs out of memory (a simulated CUDA OOM) on inputs
    of more than `max_batch` images: what certify.batch=auto must find and stay under."""

    def __init__(self, num_classes: int = 3, max_batch: int = 48, width: int = 8):
        super().__init__()
        self.max_batch = max_batch
        self.conv = torch.nn.Conv2d(3, width, 3, stride=4, padding=1)
        self.layer1 = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, stride=2, padding=1),
                                          torch.nn.ReLU())
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {len(x)} > "
                                         f"{self.max_batch} images)")
        return self.fc(self.layer1(torch.relu(self.conv(x))).mean((2, 3)))


class ScaledNet(torch.nn.Module):
    """A small classifier whose constructor arguments change what it computes: `scale` multiplies
    its logits; `random_buffer` adds a random shift held in a buffer outside its state dict (a
    network that differs on every build)."""

    def __init__(self, num_classes: int = 10, scale: float = 1.0, random_buffer: bool = False):
        super().__init__()
        self.scale = scale
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)
        shift = torch.randn(8) if random_buffer else torch.zeros(8)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc(torch.relu(self.conv(x)).mean((2, 3)) + self.shift)
