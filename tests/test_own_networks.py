"""Bring your own networks and data: a torchvision classifier (state dict, TorchScript, `_target_`),
a user's image folder, the rejector trained and certified on them, certification from the
checkpoint alone, and the errors a new user meets."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from helpers import compose_tiny, make_image_folder
from hydra.core.hydra_config import HydraConfig

from dsr_lightning.data.base import path_tag
from dsr_lightning.errors import CheckpointError, ConfigError
from dsr_lightning.jobs import networks
from dsr_lightning.jobs.networks import DataFacts

FACTS = DataFacts(name="folder", num_classes=3, image_shape=(3, 32, 32))


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> SimpleNamespace:
    """A user's image folder (3 classes) and a torchvision ResNet-18 for it in three files: a
    state dict, TorchScript, and a pickled whole module."""
    base = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    f = torchvision.models.resnet18(num_classes=3).eval()
    files = SimpleNamespace(base=base, folder=make_image_folder(base / "folder"), net=f,
                            state=base / "resnet18.pt", script=base / "resnet18_script.pt",
                            pickled=base / "resnet18_module.pt")
    torch.save(f.state_dict(), files.state)
    torch.jit.save(torch.jit.script(copy.deepcopy(f)), files.script)
    torch.save(copy.deepcopy(f), files.pickled)
    return files


def _node(out: Path, *overrides: str):
    cfg = compose_tiny(out, list(overrides))
    try:
        return cfg.classifier
    finally:
        HydraConfig.instance().cfg = None


def test_a_torchvision_classifier_from_a_state_dict_torchscript_or_its_class_is_one_network(
        own, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = own.net(torchvision.transforms.functional.normalize(
            x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    nodes = {
        "torchvision": ["classifier=torchvision", "classifier.model=resnet18",
                        "classifier.num_classes=3", f"classifier.path={own.state}"],
        "file": ["classifier=file", f"classifier.path={own.script}",
                 "classifier.mean=[0.485,0.456,0.406]", "classifier.std=[0.229,0.224,0.225]"],
        "module": ["classifier=module", "classifier.net._target_=torchvision.models.resnet18",
                   "+classifier.net.num_classes=3", f"classifier.path={own.state}",
                   "classifier.mean=[0.485,0.456,0.406]", "classifier.std=[0.229,0.224,0.225]"],
    }
    for source, overrides in nodes.items():
        built = networks.build("classifier", _node(tmp_path / source, *overrides), data=FACTS)
        with torch.no_grad():
            got = built.module(x)
        torch.testing.assert_close(got, want, msg=f"source={source}")
        r = built.recipe
        assert r["source"] == source and r["num_classes"] == 3
        assert r["input_shape"] == [3, 32, 32]
        assert not any(p.requires_grad for p in built.module.parameters())
    # torchvision's ResNets fuse layer1..layer4 by default; the class count is read from f
    assert r["feature_layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert "torchvision's convention" in networks.build(
        "classifier", _node(tmp_path / "n", *nodes["torchvision"]), data=FACTS).recipe[
        "normalisation"]


def test_a_lightning_state_dict_loads_with_its_prefix_stripped(own, tmp_path):
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in
                                           own.net.state_dict().items()}}, ckpt)
    base = ["classifier=torchvision", "classifier.model=resnet18", "classifier.num_classes=3",
            f"classifier.path={ckpt}"]
    for extra in ([], ["classifier.strip_prefix=model"]):
        net = networks.build("classifier", _node(tmp_path / "a", *base, *extra), data=FACTS)
        torch.testing.assert_close(net.module.net.fc.weight, own.net.fc.weight)
    with pytest.raises(CheckpointError, match="strip_prefix='net'"):
        networks.build("classifier", _node(tmp_path / "b", *base, "classifier.strip_prefix=net"),
                       data=FACTS)


def test_a_class_count_mismatch_and_an_untrusted_pickle_are_refused_clearly(own, tmp_path):
    five = tmp_path / "five.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), five)
    node = _node(tmp_path / "a", "classifier=torchvision", "classifier.model=resnet18",
                 "classifier.num_classes=5", f"classifier.path={five}")
    with pytest.raises(ConfigError, match=r"has 5 outputs, but the data \(folder\) has 3 classes"):
        networks.build("classifier", node, data=FACTS)
    # weights for 3 classes into a 5-class network: the keys and shapes are listed
    node = _node(tmp_path / "b", "classifier=torchvision", "classifier.model=resnet18",
                 "classifier.num_classes=5", f"classifier.path={own.state}")
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(3, 512\) vs model \(5, 512\)"):
        networks.build("classifier", node, data=FACTS)
    pickled = ["classifier=file", f"classifier.path={own.pickled}",
               "classifier.mean=[0,0,0]", "classifier.std=[1,1,1]"]
    with pytest.raises(CheckpointError, match="runs code from the file.*trust_pickle=true"):
        networks.build("classifier", _node(tmp_path / "c", *pickled), data=FACTS)
    trusted = networks.build("classifier", _node(tmp_path / "d", *pickled,
                                                 "classifier.trust_pickle=true"), data=FACTS)
    assert trusted.module.num_classes == 3
    # a state dict given as a whole-network file: told what to do instead
    with pytest.raises(CheckpointError, match="weights only.*source torchvision or module"):
        networks.build("classifier", _node(tmp_path / "e", "classifier=file",
                                           f"classifier.path={own.state}"), data=FACTS)
    with pytest.raises(ConfigError, match="not a torchvision model"):
        networks.build("classifier", _node(tmp_path / "f", "classifier=torchvision",
                                           "classifier.model=resnet_nineteen",
                                           f"classifier.path={own.state}"), data=FACTS)


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_a_users_folder_and_torchvision_f_train_certify_and_certify_again_from_the_checkpoint(
        own, tmp_path):
    """The issue's chain: a denoiser trained on the folder, the rejector trained (fused with
    resnet18's layers) and certified in the job, then certify.py with the checkpoint alone."""
    from dsr_lightning.jobs.certification import certify
    from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
    from dsr_lightning.jobs.training import train

    data = ["data=imagefolder", f"data.root={own.folder}", "data.image_size=16",
            f"pretrained_root={tmp_path / 'pretrained'}"]
    try:
        den = train(compose_tiny(tmp_path / "den", ["stage=denoiser", *data]))
        # the data set's name (the folder's, with its path's hash), not cifar10
        assert f"/trained_denoisers/{path_tag(own.folder)}_16px/" in den["export"]
        cfg = compose_tiny(tmp_path / "rej", [
            *data, "classifier=torchvision", "classifier.model=resnet18",
            "classifier.num_classes=3", f"classifier.path={own.state}", "certify=quick",
            "certify.N0=10", "certify.N=100", "certify.systems=[rejection]",
            "rejector.threshold=0.0"])
        assert cfg.run_name.startswith("rejector_resnet18_")  # names carry the classifier
        run = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    job = run["certification"]["rejection"]
    assert "rejection_resnet18_" in Path(job["file"]).name
    ckpt = RunCheckpoint.read(run["best"] or run["last"], weights=False)
    recipe = ckpt.recipe("classifier")
    assert recipe["source"] == "torchvision" and recipe["num_classes"] == 3
    assert recipe["feature_layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert len(recipe["state_sha256"]) == 64 and ckpt.recipe("denoiser")["source"] == "arch"

    # certify.py rejector_ckpt=... N0=10 N=100 max=6: no data, network or sigma setting
    cfg = compose_tiny(tmp_path / "cert", [f"rejector_ckpt={run['best'] or run['last']}",
                                           "N0=10", "N=100", "max=6", f"outdir={tmp_path}/c"],
                       name="certify", experiment=None)
    try:
        out = certify(cfg)
    finally:
        HydraConfig.instance().cfg = None
    rows = _rows(out["outfile"])
    assert [int(r["idx"]) for r in rows] == list(range(6))
    assert {int(r["label"]) for r in rows} <= {0, 1, 2}
    import json

    settings = json.loads(Path(out["settings"]).read_text())
    job_settings = json.loads(Path(job["file"] + ".json").read_text())
    assert settings["data"] == job_settings["data"]  # the folder's test split, by content
    assert settings["data"]["name"] == "ImageFolderDataModule"
    assert settings["sigma"] == 0.25

    # a setting that disagrees with the checkpoint is refused, naming the key
    cfg = compose_tiny(tmp_path / "bad", [f"rejector_ckpt={run['best'] or run['last']}",
                                          "classifier.num_classes=10", f"outdir={tmp_path}/d"],
                       name="certify", experiment=None)
    try:
        with pytest.raises(ConfigError, match="classifier.num_classes=10 disagrees"):
            certify(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_224px_with_batch_auto_under_out_of_memory(own, tmp_path):
    """At 224 px: a user's module as f (it runs out of memory above 48 images), an identity
    denoiser, the strided rejector stem; certify.batch=auto stays under the limit and gives the
    rows a small fixed batch gives."""
    from dsr_lightning.jobs.certification import certify
    from dsr_lightning.jobs.training import train

    data = ["data=imagefolder", f"data.root={own.folder}", "data.image_size=224",
            "data.batch_size=8"]
    nets = ["classifier=module", "classifier.net._target_=helpers.MemoryBoundNet",
            "+classifier.net.max_batch=48", "classifier.mean=[0.5,0.5,0.5]",
            "classifier.std=[0.25,0.25,0.25]", "classifier.feature_layers=[layer1]",
            "denoiser=module", "denoiser.net._target_=torch.nn.Identity",
            "rejector.threshold=0.0", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1"]
    try:
        run = train(compose_tiny(tmp_path / "rej", [*data, *nets]))
    finally:
        HydraConfig.instance().cfg = None
    ckpt = run["best"] or run["last"]
    outs = {}
    for batch in ("auto", "16"):
        cfg = compose_tiny(tmp_path / f"c{batch}", [
            f"rejector_ckpt={ckpt}", "N0=10", "N=100", "max=2", f"batch={batch}",
            f"outdir={tmp_path}/{batch}"], name="certify", experiment=None)
        try:
            outs[batch] = certify(cfg)
        finally:
            HydraConfig.instance().cfg = None
    cols = ("idx", "predict", "radius", "n_A", "n_R", "n_B")
    auto, fixed = ([{k: r[k] for k in cols} for r in _rows(outs[b]["outfile"])]
                   for b in ("auto", "16"))
    assert auto == fixed and len(auto) == 2


@pytest.mark.parametrize("overrides, match", [
    (["classifier.source=hub"], r"classifier\.source"),
    (["denoiser.source=torchvision"], "torchvision has no denoisers"),
    (["classifier.mean=[0.5,0.5,0.5]"], "classifier.mean and classifier.std go together"),
    (["classifier.mean=[0.5,0.5]", "classifier.std=[0.2,0.2,0.2]"], "one per image channel"),
    (["classifier.mean=[0.5,0.5,0.5]", "classifier.std=[0.2,0,0.2]"], "must be > 0"),
    (["stage=classifier", "classifier.path=null"], "classifier.path is not set"),
], ids=["source", "torchvision_denoiser", "mean_alone", "lengths", "std_zero", "no_export_path"])
def test_a_wrong_network_node_is_one_error_naming_the_key_with_nothing_written(
        tiny_cfg, tmp_path, overrides, match):
    from dsr_lightning.jobs.training import train

    cfg = tiny_cfg(*overrides, out=tmp_path / "run")
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not list((tmp_path / "run").rglob("*.pth.tar")) and not list(tmp_path.rglob("*.ckpt"))


def test_the_api_wants_mean_and_std_together():
    from dsr_lightning import api

    f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for kw in ({"mean": [0.5] * 3}, {"std": [0.2] * 3}):
        with pytest.raises(ValueError, match="mean and std go together"):
            api.train_rejector(f, None, x, y, sigma=0.25, **kw)
