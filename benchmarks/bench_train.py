"""Benchmark: rejector training throughput, extrapolated to seconds per epoch.

One training step on B clean images and T noise draws each, as RejectorTask runs it:
  (a) ours: noise drawn on the device (the datamodule's add_noise), f(x) once per clean image for
      the targets, D and f (with stage features) on the B*T noisy copies under no_grad, the
      rejector forward/backward with BCE on the chosen heads, one optimizer step; optional bf16
      autocast and channels_last;
  (b) naive reference, same process, same networks: noise drawn on the host with a CPU generator
      and copied to the device, f run on all B*T clean copies (the target recomputed per noisy
      copy), fp32, default memory format.
Throughput is noisy samples (image x draw) per second: the median of --steps timed steps after
--warmup untimed ones, the two paths taking turns step by step. Seconds per epoch = images * T /
throughput, an extrapolation (no data loading, no validation). Each path has its own copy of the
networks (random weights: the timing does not depend on them); images are uniform in [0,1]. The
paper reports 352 s/epoch (DnCNN, T = 20) on its own hardware.

    python benchmarks/bench_train.py --config paper --batch 2 --T 20 --steps 3
    python benchmarks/bench_train.py --config paper --device cuda --batch 64 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from dsr_lightning.config import compose
from dsr_lightning.data import SmoothingDataModule
from dsr_lightning.jobs.networks import build_fresh
from dsr_lightning.models import freeze
from dsr_lightning.tasks import RejectorTask

CL = torch.channels_last


def build(config: str, T: int, denoiser: str | None = None):
    """f, D (frozen, eval) and a fresh rejector from the config tree: paper = the train.yaml
    defaults (ResNet-110, DnCNN 17x64, ResNet-34-like rejector 3-4-6-3 width 64; `denoiser`: another
    denoiser option, e.g. memnet); demo, tiny = experiment=demo, experiment=tiny (random weights:
    the time does not depend on them)."""
    over = [f"T={T}"] + ([f"experiment={config}"] if config != "paper" else [])
    cfg = compose("train", over + ([f"denoiser={denoiser}"] if denoiser else []))
    f = freeze(build_fresh("classifier", cfg.classifier))
    d = freeze(build_fresh("denoiser", cfg.denoiser))
    r = instantiate(cfg.rejector.net)(num_classes=f.num_classes, feature_channels=f.feature_channels)
    return cfg, f, d, r


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours_step(task, opt, dm, x, y, bf16: bool, channels_last: bool) -> None:
    batch = dm.add_noise((x, y))                                     # noisy (B*T, C, H, W) on device
    if channels_last:
        batch = {k: v.contiguous(memory_format=CL) if v.dim() == 4 else v for k, v in batch.items()}
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = task(batch)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def naive_step(f, d, r, opt, x, T: int, sigma: float, gen: torch.Generator) -> None:
    xr = x.repeat_interleave(T, 0)                                   # (B*T, C, H, W)
    noise = torch.randn(xr.shape, generator=gen).to(x.device)       # host noise, copied over
    with torch.no_grad():
        clean = f(xr).argmax(1)                                      # f(x) once per noisy copy
        z = d(xr + sigma * noise)
        logits, feats = f.forward_features(z)
    pred = logits.argmax(1)
    heads = r(z, feats)                                              # (B*T, K)
    loss = F.binary_cross_entropy_with_logits(heads.gather(1, pred[:, None]).squeeze(1),
                                              (pred != clean).float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(steps_by_path: dict, warmup: int, steps: int, device: torch.device) -> dict:
    """Seconds per step of each path: the median of `steps` timed steps after `warmup` untimed
    ones; the paths take turns step by step, so a change in machine load hits them alike."""
    for step in steps_by_path.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps_by_path}
    for _ in range(steps):
        for name, step in steps_by_path.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["paper", "demo", "tiny"], default="paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="clean images per step "
                    "(default: 64 on cuda, 2 on cpu)")
    ap.add_argument("--T", type=int, default=20, help="noise draws per image")
    ap.add_argument("--denoiser", default=None, help="a denoiser option (dncnn, memnet, ...)")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 cuda, 3 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 5 cuda, 1 cpu)")
    ap.add_argument("--images", type=int, default=50_000, help="images per epoch (CIFAR-10 train)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for ours")
    ap.add_argument("--both-precisions", action="store_true",
                    help="time ours in fp32 and in bf16 autocast, step by step in one run")
    ap.add_argument("--channels-last", action="store_true", help="channels_last for ours")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    B = a.batch or (64 if cuda else 2)
    steps = a.steps or (20 if cuda else 3)
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 1)

    torch.manual_seed(a.seed)
    cfg, f, d, r = build(a.config, a.T, a.denoiser)
    f, d, r = f.to(device), d.to(device), r.to(device)
    x = torch.rand(B, 3, 32, 32, device=device)
    y = torch.randint(f.num_classes, (B,), device=device)
    n_params = sum(p.numel() for p in r.parameters())
    print(f"config {a.config}: classifier {cfg.classifier.arch}, denoiser {cfg.denoiser.arch} "
          f"{dict(cfg.denoiser.arch_kwargs) or '(published size)'}, rejector width {cfg.rejector.net.width} "
          f"blocks {list(cfg.rejector.net.blocks)} ({n_params / 1e6:.2f} M params)")
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"step: {B} images x T={a.T} = {B * a.T} noisy samples; warm-up {warmup}, "
          f"timed {steps} steps; epoch = {a.images} images x T={a.T}")

    paths = {}
    if not a.no_naive:  # the reference gets the original (contiguous) networks
        fn, dn, rn = (copy.deepcopy(m) for m in (f, d, r))
        opt_n = torch.optim.Adam(rn.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(a.seed)
        paths["naive (host noise, f(x) per copy, fp32)"] = (
            lambda: naive_step(fn, dn, rn, opt_n, x, a.T, a.sigma, gen))
    if a.channels_last:
        f, d, r = (m.to(memory_format=CL) for m in (f, d, r))
    task = RejectorTask(f, d, r, {"phases": [{"epochs": 1, "optimizer": {
        "_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}}]}).to(device).train()
    opt = torch.optim.Adam(r.parameters(), lr=1e-4)  # the paper's first phase
    dm = SmoothingDataModule(sigma=a.sigma, T=a.T)
    ours = {}
    for bf16 in ((False, True) if a.both_precisions else (a.bf16,)):
        tag = "ours (noise on device, f(x) once/image" + (", bf16" if bf16 else "") + \
            (", channels_last" if a.channels_last else "") + ")"
        ours[tag] = lambda bf16=bf16: ours_step(task, opt, dm, x, y, bf16, a.channels_last)
    paths = {**ours, **paths}
    rows = list(timed(paths, warmup, steps, device).items())

    print(f"\n{'path':<62} {'s/step':>8} {'samples/s':>10} {'s/epoch':>10}")
    for name, sec in rows:
        rate = B * a.T / sec
        print(f"{name:<62} {sec:8.3f} {rate:10.1f} {a.images * a.T / rate:10.0f}")
    if len(rows) == 2 and not a.both_precisions:
        print(f"\nspeed-up ours / naive: {rows[1][1] / rows[0][1]:.2f}x")
    if a.both_precisions:
        print(f"\nspeed-up bf16 / fp32: {rows[0][1] / rows[1][1]:.2f}x")
    print(f"s/epoch is an EXTRAPOLATION from {steps} measured steps of {B * a.T} samples on "
          f"{device.type} to {a.images} images x T={a.T} (data loading and validation excluded).")


if __name__ == "__main__":
    main()
