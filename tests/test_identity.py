"""A result belongs to the networks that made it (docs/DESIGN.md §8): results files are identified by
each network as built (recipe, weights, probe outputs), not by the file it was read from; a rebuild
that is not the trained network is refused; the training job's baseline is the checkpoint's own f
and D; a run resumed after its weights file changed is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from conftest import REJECTOR_RUN
from helpers import ScaledNet, certify_tiny, compose_tiny
from hydra.core.hydra_config import HydraConfig

from dsr_lightning.errors import CheckpointError, ConfigError
from dsr_lightning.identity import network_id
from dsr_lightning.jobs import networks
from dsr_lightning.jobs.networks import DataFacts
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.training import train
from dsr_lightning.models import load_state_dict_strict

PLAIN = ["system=plain", "rejector_ckpt=null"]


def record(res: dict) -> dict:
    return json.loads(Path(res["outfile"] + ".json").read_text())


# --- identity by network ---------------------------------------------------------------------

def test_normalisation_and_constructor_arguments_are_part_of_a_network(tiny_pretrained, tmp_path):
    """Two classifiers from one weights file that differ in their normalisation, or in a
    constructor argument, are two networks: two results files, each certified in full (never "0
    images to go" with the other's certificates)."""
    first = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN)
    other = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, "classifier.mean=[0.5,0.5,0.5]",
                         "classifier.std=[0.25,0.25,0.25]")
    assert first["outfile"] != other["outfile"] and other["todo"] == first["todo"] == 4
    ids = [record(r)["networks"]["classifier"]["id"] for r in (first, other)]
    assert ids[0] != ids[1]

    weights = tmp_path / "scaled.pt"
    torch.save(ScaledNet().state_dict(), weights)
    module = ["classifier=module", "classifier.net._target_=helpers.ScaledNet",
              f"classifier.path={weights}", "classifier.mean=[0,0,0]", "classifier.std=[1,1,1]"]
    up = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, *module, "+classifier.net.scale=1")
    down = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, *module, "+classifier.net.scale=-1")
    assert up["outfile"] != down["outfile"] and down["todo"] == 4
    assert record(down)["networks"]["classifier"]["recipe"]["net"]["scale"] == -1
    # the same command again resumes its own file
    again = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, *module, "+classifier.net.scale=-1")
    assert again["outfile"] == down["outfile"] and again["todo"] == 0


def test_the_same_network_from_another_file_is_the_same_network(tiny_pretrained, tmp_path):
    """A network is what it computes: its weights re-saved in another file (other metadata, other
    folder) give the same id, so its results file resumes."""
    first = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN)
    ck = torch.load(tiny_pretrained.classifier, weights_only=False)
    ck["config"] = {"re-saved": True}
    copy = tmp_path / "elsewhere" / "c.pth.tar"
    copy.parent.mkdir()
    torch.save(ck, copy)
    again = certify_tiny(tiny_pretrained, None, tmp_path, *PLAIN, f"classifier.path={copy}")
    assert again["outfile"] == first["outfile"] and again["todo"] == 0


# --- rebuilt = trained, or refused ------------------------------------------------------------------

def _fake_run_checkpoint(path: Path, role: str, net: networks.Network) -> Path:
    """A checkpoint holding one network and its recipe, as train.py writes them."""
    state = {f"{role}.{k}": v for k, v in net.module.state_dict().items()}
    torch.save({"dsr_config": {"networks": {role: net.recipe}, "stage": {"name": "rejector"},
                               "sigma": 0.25, role: {}}, "state_dict": state}, path)
    return path


def test_a_network_with_state_outside_its_weights_is_refused_on_rebuild(tmp_path):
    """A module whose constructor draws a random buffer (not in its state dict) is another network
    on every build: its rebuild from a checkpoint is refused, naming it."""
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(ScaledNet(random_buffer=True).state_dict(), weights)
    node = {"source": "module", "name": "scaled", "path": str(weights), "mean": [0, 0, 0],
            "std": [1, 1, 1], "net": {"_target_": "helpers.ScaledNet", "random_buffer": True}}
    facts = DataFacts(name="x", num_classes=10, image_shape=(3, 16, 16))
    built = networks.build("classifier", node, data=facts)
    ckpt = RunCheckpoint.read(_fake_run_checkpoint(tmp_path / "r.ckpt", "classifier", built))
    with pytest.raises(CheckpointError, match=r"the classifier \(classifier.source=module: "
                                              r"helpers.ScaledNet\) rebuilt from .*r.ckpt is not "
                                              r"the network that was trained"):
        ckpt.network("classifier")
    # the same module without the random buffer rebuilds, and is verified
    node["net"]["random_buffer"] = False
    built = networks.build("classifier", node, data=facts)
    ckpt = RunCheckpoint.read(_fake_run_checkpoint(tmp_path / "s.ckpt", "classifier", built))
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(ckpt.network("classifier")(x), built.module(x))


def test_certification_refuses_a_rebuild_whose_probe_outputs_changed(tiny_pretrained, rejector,
                                                                     tmp_path):
    """The rejector checkpoint records f's outputs on the probe batch at training; a rebuild that
    gives others (here: the record edited) is refused before anything is written."""
    raw = torch.load(rejector, weights_only=False)
    probe = raw["dsr_config"]["networks"]["classifier"]["probe"]
    probe["sketch"] = [[1.5 * v + 0.1 for v in row] for row in probe["sketch"]]
    edited = tmp_path / "edited.ckpt"
    torch.save(raw, edited)
    with pytest.raises(CheckpointError, match="is not the network that was trained: on the probe "
                                              "batch its outputs differ"):
        certify_tiny(tiny_pretrained, edited, tmp_path / "out", "system=rejection")
    assert not list((tmp_path / "out").glob("*.tsv*"))


def test_torchvision_arguments_implied_by_weights_are_recorded(monkeypatch, tmp_path):
    """torchvision's builders set arguments when weights are given (GoogLeNet: transform_input=True,
    no auxiliary heads): the recipe records them, so the network rebuilt without the weights (as
    certification does from a checkpoint) is the same network. (The download is replaced by the
    weights of a network built with those arguments: nothing is fetched.)"""
    torch.manual_seed(0)
    published = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True,
                                             init_weights=False).state_dict()
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict",
                        lambda self, *a, **k: published)
    node = {"source": "torchvision", "name": "googlenet", "model": "googlenet",
            "weights": "DEFAULT", "feature_layers": []}
    built = networks.build("classifier", node, data=DataFacts(image_shape=(3, 32, 32)))
    assert built.recipe["kwargs"] == {"transform_input": True, "aux_logits": False}
    rebuilt = networks.rebuild("classifier", built.recipe)
    load_state_dict_strict(rebuilt, built.module.state_dict())
    rebuilt.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), built.module(x))
    networks.verify("classifier", rebuilt, built.recipe, "the test")


# --- the baseline is the checkpoint's, and a changed file is refused -----------------------------

def test_baseline_from_the_checkpoint_and_a_changed_weights_file_refused(tiny_pretrained, tmp_path):
    """A rejector trained on a classifier file that is replaced afterwards: its baseline
    (certify.py system=denoised rejector_ckpt=...) is still the network it was trained on; the
    replaced file, certified as it is now, is another network with its own results file; resuming
    the training run is refused, naming the classifier."""
    clf = tmp_path / "clf.pth.tar"
    clf.write_bytes(tiny_pretrained.classifier.read_bytes())
    try:
        res = train(compose_tiny(tmp_path / "run", [tiny_pretrained.override, "sigma=0.25",
                                                    *REJECTOR_RUN, f"classifier.path={clf}"]))
    finally:
        HydraConfig.instance().cfg = None
    ckpt = RunCheckpoint.read(res["last"], weights=False)
    trained_id = network_id("classifier", ckpt.recipe("classifier"))
    ck = torch.load(clf, weights_only=True)
    ck["state_dict"] = {k: v + 0.05 if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    torch.save(ck, clf)

    base = certify_tiny(tiny_pretrained, Path(res["last"]), tmp_path / "out", "system=denoised")
    assert record(base)["networks"]["classifier"]["id"] == trained_id
    now = certify_tiny(tiny_pretrained, None, tmp_path / "out", "system=denoised",
                       f"classifier.path={clf}")
    assert record(now)["networks"]["classifier"]["id"] != trained_id
    assert now["outfile"] != base["outfile"] and now["todo"] == 4
    a, b = (pd.read_csv(r["outfile"], sep="\t") for r in (base, now))
    assert len(a) == len(b) == 4

    try:
        cfg = compose_tiny(tmp_path / "run", [tiny_pretrained.override, "sigma=0.25",
                                              *REJECTOR_RUN, f"classifier.path={clf}",
                                              f"ckpt_path={res['last']}", "optim.epochs=2",
                                              "optim.phases.0.epochs=2"])
        with pytest.raises(CheckpointError, match=r"trained with other networks than those built "
                                                  r"now: classifier \(weights differ"):
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None


# --- networks probed before any work ---------------------------------------------------------------

class TupleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(x.mean((2, 3))), x


@pytest.mark.parametrize("case, message", [
    ("tuple", r"returns a tuple on a probe batch of shape \(2, 3, 16, 16\), not a logits tensor"),
    ("grey", r"fails on a probe batch of the data's shape \(2, 3, 16, 16\): RuntimeError: .*"
             r"expected input.* to have 1 channels"),
    ("raises", r"classifier.net: cannot build 'helpers.ScaledNet'.*caused by TypeError"),
])
def test_a_users_network_is_probed_before_any_work(tmp_path, case, message):
    facts = DataFacts(name="x", num_classes=10, image_shape=(3, 16, 16))
    node = {"source": "module", "name": case, "mean": [0, 0, 0], "std": [1, 1, 1],
            "feature_layers": []}
    if case == "tuple":
        node["net"] = {"_target_": "test_identity.TupleNet"}
    elif case == "grey":  # a one-channel network (a whole pickled module) on RGB data
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=10)
        net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        path = tmp_path / "grey.pt"
        torch.save(net, path)
        node = {"source": "file", "name": "grey", "path": str(path), "trust_pickle": True,
                "mean": [0, 0, 0], "std": [1, 1, 1], "feature_layers": []}
    else:
        node["net"] = {"_target_": "helpers.ScaledNet", "no_such_argument": 1}
    with pytest.raises(ConfigError, match=message):
        networks.build("classifier", node, data=facts)


def test_a_torchscript_denoiser_works(tiny_pretrained, tmp_path):
    """denoiser=file with a TorchScript file (the documented form) builds, probes and certifies."""
    from dsr_lightning.models import DnCNN

    torch.manual_seed(0)
    path = tmp_path / "den_script.pt"
    torch.jit.save(torch.jit.script(DnCNN(image_channels=3, depth=3, n_channels=8)), path)
    res = certify_tiny(tiny_pretrained, None, tmp_path, "system=denoised", "rejector_ckpt=null",
                       "denoiser=file", f"denoiser.path={path}")
    assert res["todo"] == 4 and record(res)["networks"]["denoiser"]["recipe"]["file_sha256"]


# --- one pass, several systems ------------------------------------------------------------------

def _rows_without_time(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t").drop(columns="time")


def test_one_pass_equals_separate_runs_row_for_row(tiny_pretrained, rejector, tmp_path):
    """certify.py system=rejection baseline=true thresholds=[...]: f_R, its denoised baseline and
    f_R at other thresholds from the same draws, each into the file a separate run of that system
    writes (the same name and identity: a separate run finds it done), with the same rows."""
    one = tmp_path / "one"
    res = certify_tiny(tiny_pretrained, rejector, one, "system=rejection", "baseline=true",
                       "thresholds=[0,1e9]")
    files = [res, *res["also"]]
    assert [(r["system"], r["threshold"]) for r in files][1:] == [
        ("denoised", None), ("rejection", 0.0), ("rejection", 1e9)]
    assert len({r["outfile"] for r in files}) == 4 and all(r["todo"] == 4 for r in files)
    separate = {0: ["system=rejection"], 1: ["system=denoised"],
                2: ["system=rejection", "threshold=0"], 3: ["system=rejection", "threshold=1e9"]}
    for i, args in separate.items():
        # the same command on its own finds its file written by the pass, and done
        again = certify_tiny(tiny_pretrained, rejector, one, *args)
        assert again["outfile"] == files[i]["outfile"] and again["todo"] == 0, args
        # and on its own, elsewhere, it writes the same rows
        alone = certify_tiny(tiny_pretrained, rejector, tmp_path / f"alone{i}", *args)
        pd.testing.assert_frame_equal(_rows_without_time(alone["outfile"]),
                                      _rows_without_time(files[i]["outfile"]))
    den, at0, never = (_rows_without_time(files[i]["outfile"]) for i in (1, 2, 3))
    assert (den.n_R == 0).all() and (at0.n_R > 0).any()
    cols = ["c_hat", "n_A", "n_B", "N", "predict"]
    pd.testing.assert_frame_equal(never[cols], den[cols])  # a threshold no logit passes


def test_one_pass_resumes_each_file_on_its_own(tiny_pretrained, rejector, tmp_path):
    """A baseline already written (another job of a sweep) is left as it is; the pass writes the
    rows the other file lacks."""
    first = certify_tiny(tiny_pretrained, rejector, tmp_path / "a", "system=rejection",
                         "baseline=true")
    base = Path(first["also"][0]["outfile"])
    out = tmp_path / "b"
    out.mkdir()
    for suffix in ("", ".json"):
        (out / (base.name + suffix)).write_bytes(Path(f"{base}{suffix}").read_bytes())
    before = (out / base.name).read_bytes()
    res = certify_tiny(tiny_pretrained, rejector, out, "system=rejection", "baseline=true")
    assert res["todo"] == 4 and res["also"][0]["todo"] == 0
    assert (out / base.name).read_bytes() == before
    pd.testing.assert_frame_equal(_rows_without_time(res["outfile"]),
                                  _rows_without_time(first["outfile"]))


@pytest.mark.parametrize("args, message", [
    (["system=denoised", "baseline=true"], "use system=rejection"),
    (["system=rejection", "baseline=true", "mode=predict"], "works with mode=certify"),
    (["system=rejection", "thresholds=[nan]"], "thresholds="),
    (["system=rejection", "baseline=true", "outfile=one.tsv"], "put {id} in outfile"),
])
def test_one_pass_misuse(tiny_pretrained, rejector, tmp_path, args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        certify_tiny(tiny_pretrained, rejector, tmp_path, *args)
    assert not list(tmp_path.glob("*.tsv"))


def test_the_training_job_certifies_randomized_smoothing_too(tiny_pretrained, tmp_path):
    """certify.systems=[rejection,denoised,plain]: f_R and its baseline in one pass, and the
    job's classifier trained with noise σ (classifier.noise_sd=σ, its own file) by randomized
    smoothing, each into its own results file."""
    import shutil

    root = tmp_path / "pretrained"
    shutil.copytree(tiny_pretrained.root, root)
    noisy = Path(str(tiny_pretrained.classifier).replace(str(tiny_pretrained.root), str(root))
                 .replace("noise_0.00", "noise_0.25"))
    noisy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_pretrained.classifier, noisy)  # stands in for a noise-trained copy
    try:
        res = train(compose_tiny(tmp_path / "run", [
            f"pretrained_root={root}", "sigma=0.25", *REJECTOR_RUN, "certify=quick",
            "certify.systems=[rejection,denoised,plain]", "certify.N=50", "certify.max=3"]))
    finally:
        HydraConfig.instance().cfg = None
    cert = res["certification"]
    assert list(cert) == ["rejection", "denoised", "plain"]
    rec = json.loads(Path(cert["plain"]["file"] + ".json").read_text())
    assert rec["system"] == "plain" and rec["files"]["classifier"] == str(noisy)
    assert set(rec["networks"]) == {"classifier"}
    assert len(pd.read_csv(cert["plain"]["file"], sep="\t")) == 3


def test_randomized_smoothing_in_the_job_is_checked_before_training(tiny_pretrained, tmp_path):
    """certify.systems with plain: a missing noise-trained classifier, or a classifier whose file
    does not follow classifier.noise_sd, is one ConfigError before any epoch (no checkpoint)."""
    weights = tmp_path / "scaled.pt"
    torch.save(ScaledNet().state_dict(), weights)
    module = ["classifier=module", "classifier.net._target_=helpers.ScaledNet",
              f"classifier.path={weights}", "classifier.mean=[0,0,0]", "classifier.std=[1,1,1]"]
    cases = [([], r"classifier checkpoint not found: .*noise_0\.25"),
             (module, r"this classifier's file does not follow classifier.noise_sd")]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        try:
            cfg = compose_tiny(out, [tiny_pretrained.override, "sigma=0.25", *REJECTOR_RUN,
                                     "certify=quick", "certify.systems=[rejection,plain]", *extra])
            with pytest.raises(ConfigError, match=message):
                train(cfg)
        finally:
            HydraConfig.instance().cfg = None
        assert not list(out.rglob("*.ckpt"))
