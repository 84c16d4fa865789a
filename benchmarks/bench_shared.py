"""Benchmark: one pass for several systems against a pass per system (DESIGN §8.2).

The rejection system f_R and its denoised baseline (the same f and D, no heads) certified on the
same images, with the same N0, N and noise streams, two ways, in one run:
  (a) separate: SmoothedClassifier.certify of f_R, then of the baseline: two passes of D and f;
  (b) one pass: SmoothedClassifier.counts of models.SharedDraws (f's class and the head logit's
      bucket per draw), then each system's certificates from its counts.
Each path is timed in fp32 and, with --bf16, in bf16 autocast too; paths take turns. It checks
that (a) and (b) give the same counts, and prints seconds per image, system-images per second (a
pass certifying two systems counts twice) and the ratios against the first path (separate,
fp32 unless --no-fp32).

    python benchmarks/bench_shared.py --system demo --images 8 --n 1000 --batch 100 --bf16
    python benchmarks/bench_shared.py --system paper --device cuda --images 40 --n 10000 \\
        --batch 4000 --bf16 --channels-last [--compile]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dsr_lightning.data import CIFAR10SubsetDataModule
from dsr_lightning.models import Classifier, DnCNN, Rejector, ResNet, SmoothingSystem, freeze
from dsr_lightning.models.system import SharedDraws
from dsr_lightning.smoothing import ImageNoise, SmoothedClassifier
from dsr_lightning.tasks.prediction import AcceleratedSystem


def build(kind: str) -> SmoothingSystem:
    """demo: the given ResNet-8 f and 5x16 DnCNN (σ = 0.25) with the demo's rejector (random
    weights: the time does not depend on them); paper: ResNet-110, DnCNN 17x64, the ResNet-34-like
    rejector (random weights; built directly, no config needed)."""
    if kind == "paper":
        f, d = Classifier(ResNet(110)), DnCNN(depth=17, n_channels=64)
        r = Rejector(10, f.feature_channels)
        return SmoothingSystem(freeze(f), freeze(d), freeze(r), threshold=0.0).eval()
    from hydra.utils import instantiate

    from dsr_lightning.config import compose
    from dsr_lightning.jobs.networks import load_frozen

    cfg = compose("train", ["experiment=demo"], return_hydra_config=False)
    f, d = load_frozen("classifier", cfg.classifier), load_frozen("denoiser", cfg.denoiser)
    r = instantiate(cfg.rejector.net)(num_classes=f.num_classes, feature_channels=f.feature_channels)
    return SmoothingSystem(f, d, freeze(r), threshold=0.0).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", choices=["demo", "paper"], default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--bf16", action="store_true", help="also time both paths in bf16 autocast")
    ap.add_argument("--no-fp32", action="store_true", help="time bf16 only")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path (best reported)")
    ap.add_argument("--paths", default="separate,one", help="which paths: separate, one, or both")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    full = build(a.system).to(device)
    base = SmoothingSystem(full.classifier, full.denoiser, None).eval()
    test = CIFAR10SubsetDataModule().dataset("test")
    x = torch.stack([test[i][0] for i in range(a.images)]).to(device)
    precisions = ([] if a.no_fp32 else [False]) + ([True] if a.bf16 or a.no_fp32 else [])

    def engine(module):
        acc = AcceleratedSystem(module, False, a.channels_last, a.compile)
        return acc, SmoothedClassifier(acc, acc.num_classes, a.sigma)

    draws = SharedDraws(full, [0.0]).to(device)
    want = set(a.paths.split(","))
    rej, den = (engine(full), engine(base)) if "separate" in want else (None, None)
    one = engine(draws) if "one" in want else None

    def separate(bf16: bool):
        counts = []
        for acc, sm in (rej, den):
            acc.bf16 = bf16
            counts.append(sm.counts(x, (a.n0, a.n), a.batch, noise=ImageNoise(0, range(len(x)))))
        return counts

    def shared(bf16: bool):
        acc, sm = one
        acc.bf16 = bf16
        joint = sm.counts(x, (a.n0, a.n), a.batch, noise=ImageNoise(0, range(len(x))))
        return [draws.split(joint, 0.0), draws.split(joint, None)]

    paths = {}
    for bf16 in precisions:
        p = "bf16" if bf16 else "fp32"
        if rej is not None:
            paths[f"separate passes, {p}"] = (lambda bf16=bf16: separate(bf16))
        if one is not None:
            paths[f"one pass, {p}"] = (lambda bf16=bf16: shared(bf16))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"system {a.system} on {dev} ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}: {a.images} images, N0={a.n0}, N={a.n}, batch {a.batch}"
          f"{', channels_last' if a.channels_last else ''}{', compiled' if a.compile else ''}")
    for name, run in paths.items():  # warm-up (and compilation), and the same counts both ways
        out = run()
        if name.startswith("one pass") and rej is not None:
            same = all(np.array_equal(u, v) for u, v in zip(out, paths[name.replace(
                "one pass", "separate passes")]()))
            print(f"{name}: counts identical to the separate passes: {same}")
    best = {name: float("inf") for name in paths}
    for _ in range(a.repeats):
        for name, run in paths.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = next(iter(best.values()))
    print(f"\n{'path':<26} {'s/image':>9} {'system-images/s':>16} {'speed-up':>9}")
    for name, sec in best.items():
        print(f"{name:<26} {sec / a.images:9.3f} {2 * a.images / sec:16.2f} {ref / sec:8.2f}x")


if __name__ == "__main__":
    main()
