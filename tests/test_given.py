"""The demo's given networks ship inside the package (dsr_lightning/pretrained_models/, `make
given` makes them again): each loads, hashes as its provenance record says, and scores on the
first 200 test images what the record says; experiment=demo reads them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsr_lightning.config import compose
from dsr_lightning.errors import CheckpointError
from dsr_lightning.jobs.given import GIVEN, check, given_files, provenance_path

EXPECTED = {  # the published layout, under the data's name (the embedded subset is `cifar10`)
    "cifar10_classifiers/ResNet8/noise_0.00/checkpoint.pth.tar",
    "cifar10_classifiers/ResNet8/noise_0.25/checkpoint.pth.tar",
    "cifar10_classifiers/ResNet8/noise_0.50/checkpoint.pth.tar",
    "trained_denoisers/cifar10/mse_obj/dncnn_tiny/noise_0.25/checkpoint.pth.tar",
    "trained_denoisers/cifar10/mse_obj/dncnn_tiny/noise_0.50/checkpoint.pth.tar",
}


def test_the_given_networks_are_shipped_with_their_records():
    files = {f.relative_to(GIVEN).as_posix() for f in given_files()}
    assert files == EXPECTED
    assert sum(f.stat().st_size for f in given_files()) < 1.5e6  # about 1 MB in all
    for f in given_files():
        rec = json.loads(provenance_path(f).read_text())
        assert rec["command"].startswith("python train.py stage=")
        assert rec["data"]["fingerprint"] and len(rec["sha256"]) == 64 and rec["images"] == 200


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_given_network_scores_what_its_record_says(name):
    rec = json.loads(provenance_path(GIVEN / name).read_text())
    now = check(GIVEN / name)
    assert now["metric"] == rec["metric"]
    # the figures mean something: f well above chance (10 %), a denoiser well above the PSNR of
    # its noisy input (20 log10(1/σ): 12 dB at σ = 0.25, 6 dB at σ = 0.5)
    if rec["metric"] == "accuracy":
        assert now["value"] > 0.3
    else:
        assert now["value"] > 20 * math.log10(1 / now["sigma"]) + 3


def test_a_changed_given_network_is_caught(tmp_path):
    src = GIVEN / sorted(EXPECTED)[0]
    copy = tmp_path / "checkpoint.pth.tar"
    copy.write_bytes(src.read_bytes() + b"\0")
    provenance_path(copy).write_text(provenance_path(src).read_text())
    with pytest.raises(CheckpointError, match="its sha256 is not the recorded one"):
        check(copy)


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_experiment_demo_reads_the_given_networks(sigma):
    cfg = compose("train", ["experiment=demo", f"sigma={sigma}", f"classifier.noise_sd={sigma}"],
                  return_hydra_config=False)
    assert Path(cfg.pretrained_root) == GIVEN
    assert Path(cfg.classifier.path).is_file() and Path(cfg.denoiser.path).is_file()
