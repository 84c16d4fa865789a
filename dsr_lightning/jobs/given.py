"""The networks the method is given, shipped for the demo (DESIGN §4): the ResNet-8 classifier f,
its Gaussian-augmented copies for σ = 0.25 and 0.5 (the randomized-smoothing baseline), and the
small DnCNN denoisers for σ = 0.25 and 0.5, trained once by the project's own stages on the embedded
CIFAR-10 subset (`make given`) and kept inside the package (`dsr_lightning/pretrained_models/`,
`${given:}` in the configs) in the published archives' layout. Beside each file,
`<file>.provenance.json` says how it was made (the command, the package version, the training
data's fingerprint), what it scores on the first 200 test images (a classifier's accuracy, under
its own noise for a noise-trained one; a denoiser's PSNR) and its sha256.

    python -m dsr_lightning.jobs.given record <root> --command "..."   # write the records
    python -m dsr_lightning.jobs.given check [<root>]                  # compare with them
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

import dsr_lightning
from dsr_lightning.errors import CheckpointError
from dsr_lightning.files import atomic_write
from dsr_lightning.jobs.networks import file_sha256
from dsr_lightning.logs import console, get_logger
from dsr_lightning.models import load_checkpoint, read_checkpoint

GIVEN = Path(__file__).resolve().parent.parent / "pretrained_models"
EVAL_IMAGES = 200  # the first test images every record's figure is computed on
EVAL_SEED = 0      # the noise of a noise-trained classifier's accuracy and of a denoiser's PSNR
ACCURACY_TOL = 1 / EVAL_IMAGES  # one image: another CPU's rounding may flip a borderline one
PSNR_TOL = 0.02    # dB

log = get_logger(__name__)


def provenance_path(path: str | Path) -> Path:
    return Path(f"{path}.provenance.json")


def given_files(root: str | Path = GIVEN) -> list[Path]:
    """Every network file below `root` (checkpoint.pth.tar), sorted."""
    return sorted(Path(root).rglob("checkpoint.pth.tar"))


def _test_images(n: int = EVAL_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images of the embedded CIFAR-10 subset (B, 3, 32, 32) in [0, 1] and labels."""
    from dsr_lightning.data import CIFAR10SubsetDataModule

    test = CIFAR10SubsetDataModule().dataset("test")
    xs, ys = zip(*(test[i] for i in range(min(n, len(test)))))
    return torch.stack(xs), torch.tensor(ys)


def evaluate(path: str | Path, images: int = EVAL_IMAGES) -> dict:
    """A given network's figure on the first `images` test images: a classifier's accuracy (with
    N(0, noise_sd²) noise of a fixed seed added when it was trained with noise), a denoiser's PSNR
    (dB) on x + N(0, σ²) noise of a fixed seed, clipped to [0, 1]."""
    entries = read_checkpoint(path)
    net = load_checkpoint(path).eval()
    x, y = _test_images(images)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    noise = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        if "sigma" in entries:  # a denoiser: exported with the σ it was trained for
            sigma = float(entries["sigma"])
            psnr = peak_signal_noise_ratio(net(x + sigma * noise).clamp(0, 1), x, data_range=1.0)
            return {"metric": "psnr_db", "value": float(psnr), "sigma": sigma, "images": len(x)}
        sd = float(entries.get("noise_sd") or 0.0)
        acc = (net(x + sd * noise).argmax(1) == y).float().mean()
        return {"metric": "accuracy", "value": float(acc), "noise_sd": sd, "images": len(x)}


def record(path: str | Path, command: str) -> dict:
    """Write `path`'s provenance record beside it and return it."""
    from dsr_lightning.data import CIFAR10SubsetDataModule

    path = Path(path)
    rec = {"file": path.name, "command": command, "dsr_lightning": dsr_lightning.__version__,
           "torch": torch.__version__,
           "data": {"name": "cifar10_subset", "split": "train",
                    "fingerprint": CIFAR10SubsetDataModule().fingerprint("train")},
           **evaluate(path), "sha256": file_sha256(path)}
    text = json.dumps(rec, indent=2) + "\n"
    atomic_write(provenance_path(path), lambda f: f.write(text.encode()), "the provenance record")
    return rec


def check(path: str | Path) -> dict:
    """`path` against its record: the same sha256 and, on the first test images, the recorded
    figure within ACCURACY_TOL or PSNR_TOL; CheckpointError otherwise. Returns the figure now."""
    path = Path(path)
    rec_path = provenance_path(path)
    if not rec_path.is_file():
        raise CheckpointError(f"{path}: no provenance record {rec_path.name} beside it")
    rec = json.loads(rec_path.read_text())
    if file_sha256(path) != rec["sha256"]:
        raise CheckpointError(f"{path}: its sha256 is not the recorded one ({rec['sha256'][:12]}"
                              "...): the file changed since it was made; make it again (make given)")
    now = evaluate(path, rec["images"])
    tol = ACCURACY_TOL if rec["metric"] == "accuracy" else PSNR_TOL
    if not math.isclose(now["value"], rec["value"], rel_tol=0, abs_tol=tol + 1e-9):
        raise CheckpointError(f"{path}: {rec['metric']} {now['value']:.4g} on the first "
                              f"{rec['images']} test images, recorded {rec['value']:.4g}")
    return now


def main(argv: list[str] | None = None) -> int:
    with console():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsr_lightning.jobs.given",
                                     description="Provenance records of the given networks.")
    sub = parser.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("record", help="write a record beside every network below ROOT (or "
                                        "beside the one file ROOT)")
    rec.add_argument("root")
    rec.add_argument("--command", required=True, help="the command that made them")
    chk = sub.add_parser("check", help="check every network below ROOT against its record")
    chk.add_argument("root", nargs="?", default=str(GIVEN))
    args = parser.parse_args(argv)
    files = [Path(args.root)] if Path(args.root).is_file() else given_files(args.root)
    if not files:
        log.error(f"error: no checkpoint.pth.tar below {args.root}")
        return 2
    for f in files:
        try:
            r = record(f, args.command) if args.what == "record" else check(f)
        except CheckpointError as e:
            log.error(f"error: {e}")
            return 2
        log.info(f"{f}: {r['metric']} {r['value']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
