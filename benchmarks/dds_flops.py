"""FLOPs per noisy sample of diffusion denoised smoothing systems, and the time per certified image
they imply at the rate the paper's system was measured at on an H200 (docs/diffusion.md).

Counts with the package's counter (models/flops.py: PyTorch's FlopCounterMode, two FLOPs per
multiply-accumulate) on randomly initialised networks of the published architectures: the
diffusers CIFAR-10 DDPM (google/ddpm-cifar10-32's UNet2DModel configuration), a 256-px diffusers
UNet2DModel (google/ddpm-ema-bedroom-256's configuration, standing in for an ImageNet-sized
model), torchvision ViT-B/16 at 224 px and ViT-L/16 at 512 px, the CIFAR ResNet-110, the paper's
DnCNN and the paper's rejector. Nothing is downloaded; weights do not change FLOPs.

    python benchmarks/dds_flops.py                      # needs the diffusion extra (diffusers)
    python benchmarks/dds_flops.py --rate 5.2 --n 10000 --n0 100
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dsr_lightning.config import CONFIG_DIR
from dsr_lightning.models import Classifier
from dsr_lightning.models.dncnn import DnCNN
from dsr_lightning.models.flops import count_flops
from dsr_lightning.models.resnet import ResNet

GIGA = 1e9


def unet(size: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    if size == 32:  # google/ddpm-cifar10-32
        return UNet2DModel(
            sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
    return UNet2DModel(  # google/ddpm-ema-bedroom-256
        sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)


def unet_flops(size: int) -> float:
    x = torch.zeros(1, 3, size, size)
    return count_flops(unet(size), x, torch.tensor([100])) / GIGA


def rejector_flops(f: Classifier | None, size: int, classes: int) -> float:
    """The default rejector (rejector=resnet34: the paper's ResNet-34-like net, its stem strided
    above 64 px), fused with f's features where it has them, else unfused on the denoised image."""
    x = torch.zeros(1, 3, size, size)
    channels = f.feature_channels if f is not None else []
    feats = f.forward_features(x)[1] if f is not None else []
    node = OmegaConf.load(CONFIG_DIR / "rejector" / "resnet34.yaml").net
    net = instantiate(node)(num_classes=classes, feature_channels=channels, image_size=size)
    return count_flops(net, x, feats) / GIGA


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=5.2,
                   help="images/s of the paper's f_R and baseline from one pass (H200 measurement)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n0", type=int, default=100)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    samples = args.n + args.n0
    x32 = torch.zeros(1, 3, 32, 32)

    r110 = Classifier(ResNet(110, 10))
    paper = {"classifier": count_flops(r110, x32) / GIGA,
             "denoiser": count_flops(DnCNN(), x32) / GIGA,
             "rejector": rejector_flops(r110, 32, 10)}
    per_second = sum(paper.values()) * GIGA * samples * args.rate
    vit_b = torchvision.models.vit_b_16()
    vit_l = torchvision.models.vit_l_16(image_size=512)
    systems = {
        "paper: ResNet-110 + DnCNN (measured rate)": paper,
        "CIFAR-10 DDPM + ResNet-110": {
            "classifier": paper["classifier"], "denoiser": unet_flops(32),
            "rejector": paper["rejector"]},
        "CIFAR-10 DDPM + ViT-B/16 at 224 px": {
            "classifier": count_flops(vit_b, torch.zeros(1, 3, 224, 224)) / GIGA,
            "denoiser": unet_flops(32), "rejector": rejector_flops(None, 32, 10)},
        "256-px UNet + ViT-L/16 at 512 px": {
            "classifier": count_flops(vit_l, torch.zeros(1, 3, 512, 512)) / GIGA,
            "denoiser": unet_flops(256), "rejector": rejector_flops(None, 256, 1000)},
    }
    print(f"effective rate of the paper's system: {per_second / 1e12:.0f} TFLOP/s "
          f"({args.rate} images/s x {samples} samples x {sum(paper.values()):.2f} GFLOP)")
    print(f"{'system':44s} {'f':>8s} {'D':>8s} {'h':>8s} {'GFLOP':>8s} {'s/image':>8s}")
    for name, g in systems.items():
        total = sum(g.values())
        print(f"{name:44s} {g['classifier']:8.2f} {g['denoiser']:8.2f} {g['rejector']:8.2f} "
              f"{total:8.2f} {total * GIGA * samples / per_second:8.2f}")


if __name__ == "__main__":
    main()
