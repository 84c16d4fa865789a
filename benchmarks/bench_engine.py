"""Benchmark: the smoothing engine against a certification loop written like the published scripts.

Both paths certify the same images with the same base f_R and the same N0, N, batch size, sigma
and statistics (certify_details), so what differs is the sampling:
  (a) engine: SmoothedClassifier.certify on all images at once: one stream of mixed-image chunks,
      noise drawn on the device (`--noise image`, the default and dsr-certify's: each image its own
      counter-based stream, smoothing.ImageNoise; `--noise stream`: one generator for the call),
      counting on the device, one host sync;
  (b) reference (as Cohen et al.'s core.py / Salman et al.): one image at a time, an N0 selection
      pass then the N pass, x.repeat((this_batch, 1, 1, 1)) per batch, randn_like noise on the same
      device, labels copied to the host per batch and counted with a Python loop (`--ref-count
      bincount`: np.bincount per batch instead).
Both call the same base callable: models.SmoothingSystem.forward, i.e. labels in {0..K} (the
rejector's reject label included), not logits + argmax, so the model work is identical and the
comparison isolates batching and counting. Weights are random (the timing does not depend on them);
images are the first test images of the embedded CIFAR-10 subset.

    python benchmarks/bench_engine.py --system tiny --images 4 --n 2000
    python benchmarks/bench_engine.py --system paper --device cuda --images 20 --n 10000 --bf16
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from dsr_lightning.models import Classifier, DnCNN, Rejector, ResNet, SmoothingSystem
from dsr_lightning.smoothing import ImageNoise, SmoothedClassifier, certify_details

SUBSET = Path(__file__).resolve().parents[1] / "dsr_lightning/data/cifar10_subset/cifar10_subset.npz"


class LinearNet(torch.nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def build_system(kind: str) -> SmoothingSystem:
    """tiny: ResNet-8, DnCNN 3×16, a small rejector (CPU-sized); paper: ResNet-110, DnCNN 17×64,
    the ResNet-34-like rejector with 3 FC layers; linear: one linear layer, no denoiser, no
    rejector (a base that costs next to nothing, so the timing is the sampling overhead)."""
    if kind == "linear":
        return SmoothingSystem(Classifier(LinearNet())).eval()
    if kind == "tiny":
        clf, den = Classifier(ResNet(8)), DnCNN(depth=3, n_channels=16)
        rej = Rejector(10, clf.feature_channels, width=8, blocks=(1, 1, 1), fc_hidden=(32,))
    else:
        clf, den = Classifier(ResNet(110)), DnCNN(depth=17, n_channels=64)
        rej = Rejector(10, clf.feature_channels)
    return SmoothingSystem(clf, den, rej).eval()


def make_base(system, device, bf16: bool, channels_last: bool):
    """noisy (b, 3, 32, 32) -> labels (b,): the one callable both paths use. On the CPU it also
    adds up the seconds spent inside it (base.seconds), so the rest is the sampling overhead."""
    def base(z):
        t0 = time.perf_counter()
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            labels = system(z)
        base.seconds += time.perf_counter() - t0  # asynchronous on CUDA: not reported there
        return labels
    base.num_classes, base.seconds = system.num_classes, 0.0
    return base


def count_loop(labels: np.ndarray, length: int) -> np.ndarray:
    counts = np.zeros(length, dtype=np.int64)
    for i in labels:  # the reference's per-prediction Python loop
        counts[i] += 1
    return counts


def reference_certify(base, x, n0, n, sigma, alpha, batch, bound, ref_count):
    """One image at a time, as the published scripts; returns (prediction, radius) arrays."""
    K1 = base.num_classes + 1
    count = count_loop if ref_count == "loop" else (lambda a, L: np.bincount(a, minlength=L))

    def sample(x1, num):  # x1: (1, C, H, W)
        counts = np.zeros(K1, dtype=np.int64)
        with torch.no_grad():
            for _ in range(math.ceil(num / batch)):
                this_batch = min(batch, num)
                num -= this_batch
                batch_x = x1.repeat((this_batch, 1, 1, 1))  # (b, C, H, W)
                noise = torch.randn_like(batch_x) * sigma
                counts += count(base(batch_x + noise).cpu().numpy(), K1)
        return counts

    preds, radii = [], []
    for i in range(len(x)):
        c_hat = sample(x[i:i + 1], n0)[:-1].argmax()
        d = certify_details(sample(x[i:i + 1], n), c_hat, sigma, alpha, bound)
        preds.append(int(d.prediction))
        radii.append(float(d.radius))
    return np.array(preds), np.array(radii)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", choices=["tiny", "paper", "linear"], default="tiny")
    p.add_argument("--rejector-ckpt", default=None,
                   help="a trained f_R instead: a rejector checkpoint of dsr-train (e.g. the demo's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=400, help="noisy samples per forward (both)")
    p.add_argument("--engine-batch", type=int, default=None, help="engine chunk (default --batch)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--bound", default="paper")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the base (both paths)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ref-count", choices=["loop", "bincount"], default="loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path, alternating; best")
    p.add_argument("--noise", choices=["image", "stream"], default="image",
                   help="engine noise: per-image streams (dsr-certify) or one generator")
    p.add_argument("--no-reference", action="store_true", help="time the engine only")
    p.add_argument("--compile", action="store_true", help="torch.compile the base (engine only)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if a.rejector_ckpt:
        from dsr_lightning.jobs.run_checkpoint import RunCheckpoint

        system = RunCheckpoint.read(a.rejector_ckpt).rejection_system()
        a.system = a.rejector_ckpt
    else:
        system = build_system(a.system)
    system = system.to(device)
    if a.channels_last:
        system = system.to(memory_format=torch.channels_last)
    base = make_base(system, device, a.bf16, a.channels_last)
    engine_base = base
    if a.compile:  # the reference keeps the eager base
        compiled = torch.compile(system, dynamic=False)
        engine_base = make_base(compiled, device, a.bf16, a.channels_last)
    imgs = np.load(SUBSET)["x_test"][:a.images]  # (B, 32, 32, 3) uint8
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).contiguous().to(device)
    smoothed = SmoothedClassifier(engine_base, sigma=a.sigma)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    eb = a.engine_batch or a.batch

    def noise():
        return ImageNoise(a.seed, range(len(x))) if a.noise == "image" else None

    def engine():
        c = smoothed.certify(x, a.n0, a.n, a.alpha, eb, a.bound, generator=gen, noise=noise())
        return c.prediction, c.radius

    def reference():
        return reference_certify(base, x, a.n0, a.n, a.sigma, a.alpha, a.batch, a.bound,
                                 a.ref_count)

    # warm-up (allocator, cudnn autotune, lazy init, compilation) on two images: full chunks
    t0 = time.perf_counter()
    smoothed.certify(x[:2], a.n0, eb, a.alpha, eb, a.bound, generator=gen,
                     noise=ImageNoise(a.seed, [0, 1]) if a.noise == "image" else None)
    if not a.no_reference:
        reference_certify(base, x[:1], a.n0, a.batch, a.sigma, a.alpha, a.batch, a.bound,
                          a.ref_count)
    print(f"warm-up {time.perf_counter() - t0:.1f} s")

    print(f"system={a.system} device={device} threads={torch.get_num_threads()} images={a.images}"
          f" N0={a.n0} N={a.n} batch={a.batch} engine_batch={eb} bf16={a.bf16}"
          f" channels_last={a.channels_last} ref_count={a.ref_count} noise={a.noise}"
          f" compile={a.compile}" + (f" gpu={torch.cuda.get_device_name(device)}"
                                     if device.type == "cuda" else ""))
    paths = (("engine", engine),) if a.no_reference else (("reference", reference),
                                                          ("engine", engine))
    times = {name: [] for name, _ in paths}
    for _ in range(a.repeats):  # alternate the two paths so drift in machine load hits both
        for name, fn in paths:
            sync()
            base.seconds, t0 = 0.0, time.perf_counter()
            pred, radius = fn()
            sync()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            split = (f" (base {base.seconds:.2f} s, rest {dt - base.seconds:.2f} s)"
                     if device.type == "cpu" else "")
            print(f"{name:>9}: {dt:8.2f} s{split}  certified {np.mean(pred >= 0):.2f}"
                  f"  mean radius {radius.mean():.3f}")
    for name, ts in times.items():
        dt = min(ts)
        print(f"{name:>9} best: {dt / a.images:8.3f} s/image  {a.images / dt:8.2f} images/s"
              f"  ({(a.n0 + a.n) * a.images / dt:,.0f} samples/s)")
    times = {k: min(v) for k, v in times.items()}
    if "reference" in times:
        print(f"speed-up engine vs reference: {times['reference'] / times['engine']:.2f}x")


if __name__ == "__main__":
    main()
