"""Training: targets and heads on a hand-made batch, frozen networks that never move, phased
optimisation and resume, the three stages chained, sweeps, DDP, W&B, and the errors a user sees."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from dsr_lightning.errors import ConfigError
from dsr_lightning.jobs.training import build_task, train
from dsr_lightning.models import Rejector, build_arch, load_checkpoint
from dsr_lightning.tasks import RejectorTask

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # see conftest.py
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}
# Paper-like phases, shrunk: Adam 1 epoch, then SGD 2 epochs with lr x0.1 after every epoch.
PHASED = ("optim.phases=[{epochs: 1, optimizer: {_target_: torch.optim.Adam, _partial_: true, "
          "lr: 1.0e-3}}, {epochs: 2, optimizer: {_target_: torch.optim.SGD, _partial_: true, "
          "lr: 0.1, momentum: 0.9}, scheduler: {_target_: torch.optim.lr_scheduler.StepLR, "
          "_partial_: true, step_size: 1, gamma: 0.1}}]")


def optim_cfg(**opt):
    return OmegaConf.create({"phases": [{"epochs": 1, "optimizer": {**ADAM, **opt}}]})


def fit(task, loader, epochs, callbacks=()):
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(task, train_dataloaders=loader)
    return trainer


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def metrics_csv(run_dir) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "csv" / "metrics.csv")


def train_cli(*args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **SUBPROCESS_ENV, **(env or {})})


# --- targets and heads on a hand-made batch ----------------------------------------------------

class PixelClassifier(nn.Module):
    """K = 3: predicts the class whose index is written in pixel (0, 0, 0). No stage features."""

    num_classes, feature_channels = 3, []

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # a parameter that must never train

    def forward_features(self, z):
        k = z[:, 0, 0, 0].round().long().clamp(0, 2)                  # (N,)
        return self.gain * F.one_hot(k, 3).float(), []                 # (N, K), no features

    def forward(self, z):
        return self.forward_features(z)[0]


class PixelRejector(nn.Module):
    """Head logits written in the image: logit_k = scale * z[:, 1, 0, k]."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, feats):
        return self.scale * z[:, 1, 0, :3]                            # (N, K)


def hand_batch():
    """B = 2 images, T = 3 copies. Image 0: clean class 1, label 1; image 1: clean class 2, label 0.
    Noisy predictions [1, 0, 2 | 2, 2, 1]; head logits H[i] chosen per copy."""
    x = torch.zeros(2, 2, 1, 3)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1, 2
    pred = [1, 0, 2, 2, 2, 1]
    H = [[0.3, -1.2, 2.0], [1.5, 0.4, -0.7], [-2.0, 0.9, 0.1],
         [0.6, -0.3, -1.1], [2.2, 1.7, 0.8], [-0.5, 1.3, -2.4]]
    noisy = torch.zeros(6, 2, 1, 3)
    noisy[:, 0, 0, 0] = torch.tensor(pred, dtype=torch.float)
    noisy[:, 1, 0, :] = torch.tensor(H)
    return {"x": x, "y": torch.tensor([1, 0]), "noisy": noisy}, pred, H


def bce(logit: float, b: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(b * math.log(p) + (1 - b) * math.log(1 - p))


@pytest.mark.parametrize("target", ["clean_pred", "label"])
@pytest.mark.parametrize("head", ["noisy", "clean"])
def test_targets_and_heads_on_a_hand_batch(target, head):
    batch, pred, H = hand_batch()
    clean = [1, 1, 1, 2, 2, 2]
    ref = clean if target == "clean_pred" else [1, 1, 1, 0, 0, 0]
    b = [float(p != r) for p, r in zip(pred, ref)]
    assert b == ([0, 1, 1, 0, 0, 1] if target == "clean_pred" else [0, 1, 1, 1, 1, 1])
    k = pred if head == "noisy" else clean
    expected = sum(bce(H[i][k[i]], b[i]) for i in range(6)) / 6

    task = RejectorTask(PixelClassifier(), nn.Identity(), PixelRejector(), optim_cfg(),
                        target=target, head=head, threshold=0.5)
    out = task(batch)
    assert out["b"].tolist() == b
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    # inference always consults the head of the noisy prediction, whatever head was trained
    infer = [H[i][pred[i]] for i in range(6)]
    assert out["logit"].tolist() == pytest.approx(infer)
    assert out["reject"].tolist() == [v > 0.5 for v in infer]
    assert out["pred"].tolist() == pred and out["y"].tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("bad", [{"target": "foo"}, {"head": "both"}])
def test_unknown_target_or_head_is_refused_by_the_task_too(bad):
    # the schema refuses it first with a ConfigError (test_unknown_stage_target_head); the task,
    # given plain settings, guards itself with a plain ValueError
    with pytest.raises(ValueError, match="choose a target of"):
        RejectorTask(PixelClassifier(), None, PixelRejector(), optim_cfg(), **bad)


# --- only the rejector learns ---------------------------------------------------------------------

def tiny_nets():
    torch.manual_seed(0)
    f = build_arch("cifar_resnet8")
    d = build_arch("cifar_dncnn", depth=3, n_channels=8)
    r = Rejector(10, f.feature_channels, width=4, blocks=(1, 1, 1, 1), fc_hidden=(8,))
    return f, d, r


def test_only_the_rejector_gets_gradients_and_an_optimizer():
    f, d, r = tiny_nets()  # deliberately NOT frozen: the task must keep them out anyway
    task = RejectorTask(f, d, r, OmegaConf.create(
        {"phases": [{"epochs": 1, "optimizer": ADAM},
                    {"epochs": 1, "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True,
                                                "lr": 0.1}}]}))
    task.train()
    assert not any(m.training for m in [*f.modules(), *d.modules()])
    assert all(m.training for m in r.modules())
    x = torch.rand(2, 3, 32, 32)
    batch = {"x": x, "y": torch.tensor([3, 7]),
             "noisy": x.repeat_interleave(3, 0) + 0.25 * torch.randn(6, 3, 32, 32)}
    task(batch)["loss"].backward()
    assert all(p.grad is None for p in [*f.parameters(), *d.parameters()])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in r.parameters())
    assert any(p.grad.abs().sum() > 0 for p in r.parameters())
    opts, _ = task.configure_optimizers()
    assert len(opts) == 2
    for opt in opts:
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in r.parameters())


class ModeProbe(pl.Callback):
    """Records the train/eval mode of every frozen and trainable module at each batch."""

    def __init__(self):
        self.seen = []

    def _record(self, task, phase):
        self.seen.append((phase, [m.training for m in task.classifier.modules()],
                          [m.training for m in task.denoiser.modules()],
                          task.rejector.training))

    def on_train_batch_start(self, trainer, task, *args):
        self._record(task, "train")

    def on_validation_batch_start(self, trainer, task, *args):
        self._record(task, "val")


def test_frozen_networks_are_bit_identical_after_fit(tiny_pretrained, tiny_cfg):
    cfg = tiny_cfg(tiny_pretrained.override, "optim.epochs=2", "optim.phases.0.epochs=2")
    task, _ = build_task(cfg, {})
    before = {"classifier": state(task.classifier), "denoiser": state(task.denoiser)}
    rej_before = state(task.rejector)
    task.train()  # as Lightning < 2.2 did at fit start: the frozen nets must stay in eval anyway
    probe = ModeProbe()
    trainer = instantiate(cfg.trainer, callbacks=[probe], logger=False,
                          enable_checkpointing=False)
    trainer.fit(task, datamodule=instantiate(cfg.data))
    assert trainer.current_epoch == 2
    # weights AND BatchNorm running statistics (DnCNN's momentum 0.95 would move them at once)
    assert_same(before["classifier"], state(task.classifier))
    assert_same(before["denoiser"], state(task.denoiser))
    assert any(not torch.equal(v, task.rejector.state_dict()[k]) for k, v in rej_before.items())
    phases = {p for p, *_ in probe.seen}
    assert phases == {"train", "val"} and len(probe.seen) > 4
    for phase, f_modes, d_modes, r_mode in probe.seen:
        assert not any(f_modes) and not any(d_modes), f"a frozen net in train mode during {phase}"
        assert r_mode == (phase == "train")
    rej_ids = sorted(id(p) for p in task.rejector.parameters())
    for opt in trainer.optimizers:
        assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == rej_ids


# --- the loss falls on a learnable problem ---------------------------------------------------------

class MeanClassifier(nn.Module):
    """K = 2: class 1 iff the mean of channel 0 exceeds 1/2."""

    num_classes, feature_channels = 2, []

    def forward_features(self, z):
        return F.one_hot((z[:, 0].mean((1, 2)) > 0.5).long(), 2).float(), []

    def forward(self, z):
        return self.forward_features(z)[0]


def learnable_batches(n_batches, seed, B=16, T=4, sigma=0.25):
    """Channel 0 decides f (0.2 or 0.8), channel 1 holds the label y (0 or 1), independent: with
    target=label the right answer of head k is 1[y != k], which needs the image, not a bias."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        c = torch.randint(2, (B,), generator=g).float() * 0.6 + 0.2
        y = torch.randint(2, (B,), generator=g)
        x = torch.full((B, 3, 8, 8), 0.5)
        x[:, 0], x[:, 1] = c[:, None, None], y[:, None, None].float()
        noisy = x.repeat_interleave(T, 0)
        noisy = noisy + sigma * torch.randn(noisy.shape, generator=g)
        out.append({"x": x, "y": y, "noisy": noisy})
    return out


def test_rejector_loss_falls_on_a_learnable_problem():
    torch.manual_seed(0)
    rej = Rejector(2, [], width=8, blocks=(1,), fc_hidden=(16,))
    task = RejectorTask(MeanClassifier(), None, rej, optim_cfg(), target="label", head="noisy")
    held_out = learnable_batches(4, seed=1)

    def loss():
        task.eval()
        with torch.no_grad():
            return sum(task(b)["loss"].item() for b in held_out) / len(held_out)

    before = loss()
    fit(task, DataLoader(learnable_batches(16, seed=0), batch_size=None), epochs=6)
    after = loss()
    assert before > 0.6 and after < 0.5 * before, (before, after)


# --- the three stages, chained ---------------------------------------------------------------------

def test_tiny_stages_chain(tiny_trained, tiny_cfg):
    """experiment=tiny: classifier and denoiser trained and exported by their stages (session
    fixture) where the rejector stage reads them; the rejector checkpoint holds the same frozen
    networks and the config."""
    tiny_pretrained = tiny_trained
    assert load_checkpoint(tiny_pretrained.classifier).num_classes == 10
    for s, path in tiny_pretrained.denoisers.items():
        assert torch.load(path, weights_only=True)["sigma"] == s and f"noise_{s:.2f}" in str(path)
    cfg = tiny_cfg(tiny_pretrained.override)
    assert cfg.classifier.path == str(tiny_pretrained.classifier)
    res = train(cfg)
    assert res["epochs"] == 1 and Path(res["last"]).is_file() and Path(res["best"]).is_file()
    assert Path(res["roc"]).is_file() and "export" not in res
    assert {"train/loss_epoch", "val/loss", "val/auroc", "val/reject_rate"} <= res["metrics"].keys()
    ckpt = torch.load(res["last"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"].keys() == {"config"}  # never the networks
    assert ckpt["dsr_config"]["stage"]["name"] == "rejector"
    assert ckpt["dsr_config"]["classifier"]["path"] == str(tiny_pretrained.classifier)
    sd = ckpt["state_dict"]
    for prefix, file in (("classifier.", tiny_pretrained.classifier),
                         ("denoiser.", tiny_pretrained.denoisers[0.25])):
        ref = load_checkpoint(file).state_dict()
        assert_same(ref, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


def test_denoiser_stab_objective_keeps_the_classifier_frozen(tiny_pretrained, tiny_cfg, tmp_path):
    cfg = tiny_cfg("stage=denoiser", "stage.objective=stab", f"pretrained_root={tmp_path / 'p'}",
                   f"classifier.path={tiny_pretrained.classifier}")
    res = train(cfg)
    assert Path(res["export"]).is_file() and "val/acc" in res["metrics"]
    sd = torch.load(res["last"], map_location="cpu", weights_only=False)["state_dict"]
    ref = load_checkpoint(tiny_pretrained.classifier).state_dict()
    assert_same(ref, {k[len("classifier."):]: v for k, v in sd.items()
                      if k.startswith("classifier.")})


def test_export_refuses_to_overwrite(tiny_pretrained, tiny_cfg):
    with pytest.raises(ConfigError, match="overwrite=true"):
        train(tiny_cfg("stage=classifier", tiny_pretrained.override))


# --- resume --------------------------------------------------------------------------------------

def test_resume_continues_epoch_and_phase(tiny_pretrained, tiny_cfg):
    common = (tiny_pretrained.override, "optim.epochs=3", PHASED, "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "rejector.threshold=0")  # no threshold choice
    full = train(tiny_cfg(*common))
    part = train(tiny_cfg(*common, "trainer.max_epochs=2"))
    assert (full["epochs"], part["epochs"]) == (3, 2)
    for other in ("stage.task.pos_weight=7", "rejector.pos_weight=7"):  # the task's options
        with pytest.raises(ConfigError, match=r"other settings(.|\n)*pos_weight"):
            train(tiny_cfg(*common, f"ckpt_path={part['last']}", other))
    resumed = train(tiny_cfg(*common, f"ckpt_path={part['last']}"))
    assert resumed["epochs"] == full["epochs"] == 3

    # the resumed run trained epoch 2 only, in the SGD phase, at the decayed lr 0.1 * 0.1
    m = metrics_csv(resumed["output_dir"]).dropna(subset=["train/lr"])
    assert m["epoch"].tolist() == [2] and m["train/phase"].tolist() == [1.0]
    assert m["train/lr"].tolist() == pytest.approx([0.01])
    m_full = metrics_csv(full["output_dir"]).dropna(subset=["train/lr"])
    assert m_full["train/lr"].tolist() == pytest.approx([1e-3, 0.1, 0.01])
    assert m_full["train/phase"].tolist() == [0.0, 1.0, 1.0]

    ck = {k: torch.load(r["last"], map_location="cpu", weights_only=False)
          for k, r in (("full", full), ("part", part), ("resumed", resumed))}
    assert ck["resumed"]["epoch"] == ck["full"]["epoch"]
    assert ck["resumed"]["global_step"] == ck["full"]["global_step"] > ck["part"]["global_step"]
    # Adam (phase 0) was not stepped after the resume; SGD was, and its schedule went on
    adam = [c["optimizer_states"][0]["state"][0]["step"] for c in (ck["part"], ck["resumed"])]
    assert adam[0] == adam[1]
    for c in (ck["full"], ck["resumed"]):
        assert c["optimizer_states"][1]["param_groups"][0]["lr"] == pytest.approx(1e-3)
        assert c["lr_schedulers"][0]["last_epoch"] == 2


@pytest.mark.slow
def test_resume_after_kill(tiny_pretrained, tmp_path):
    """A CLI run killed mid-way resumes from last.ckpt and ends at the uninterrupted epoch count."""
    epochs = 10
    args = ["experiment=tiny", f"optim.epochs={epochs}", f"optim.phases.0.epochs={epochs}"]
    env = {**os.environ, **SUBPROCESS_ENV}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args,
                             f"hydra.run.dir={tmp_path / 'a'}"], cwd=tiny_pretrained.cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert killed_at < epochs - 1, "the run ended before it could be killed"
    r = train_cli(*args, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}",
                cwd=tiny_pretrained.cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    final = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["epoch"] == epochs - 1
    m = metrics_csv(tmp_path / "b").dropna(subset=["train/lr"])
    assert m["epoch"].tolist() == list(range(killed_at + 1, epochs))


# --- sweeps, DDP, W&B --------------------------------------------------------------------------------

def test_multirun_sweep_gives_separate_runs(tiny_pretrained, tmp_path, monkeypatch, capsys):
    """`train.py -m` (the entry point in process; Hydra's basic launcher runs the jobs in turn)."""
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tiny_pretrained.cwd)
    rc = run_cli(["train", "-m", "experiment=tiny", "sigma=0.25,0.5", "T=1,2",
                  "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                  "rejector.threshold=0.0",
                  f"hydra.sweep.dir={sweep}"], monkeypatch)
    assert rc == 0, capsys.readouterr().err[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)
        assert (ckpt["dsr_config"]["sigma"], ckpt["dsr_config"]["T"]) == (cfg.sigma, cfg.T)
        assert ckpt["dsr_config"]["denoiser"]["path"].endswith(
            f"noise_{cfg.sigma:.2f}/checkpoint.pth.tar")
        assert (job / "csv" / "metrics.csv").is_file() and (job / "roc.png").is_file()
        seen.add((cfg.sigma, cfg.T))
    assert seen == {(0.25, 1), (0.25, 2), (0.5, 1), (0.5, 2)}


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_pretrained, tmp_path):
    out = tmp_path / "ddp"
    r = train_cli("experiment=tiny", "trainer=ddp", "trainer.accelerator=cpu",
                f"hydra.run.dir={out}", cwd=tiny_pretrained.cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "train_ddp_process_1.log").is_file()  # a second rank really ran
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["dsr_config"]["trainer"]["strategy"] == "ddp"
    assert (out / "roc.png").is_file()


def test_wandb_offline_run_gets_the_roc(tiny_pretrained, tiny_cfg, tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    res = train(tiny_cfg(tiny_pretrained.override, "logger=wandb", out=tmp_path / "run"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].glob("files/media/table/val/roc_table*.table.json"))
    assert len(tables) == 1 and '"fpr"' in tables[0].read_text()
    assert list(runs[0].glob("files/media/images/val/roc_png*.png"))
    assert Path(res["roc"]).is_file()


# --- bad input -------------------------------------------------------------------------------------

def test_missing_classifier_names_the_file_and_both_ways_out(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"pretrained_root={tmp_path / 'empty'}")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    msg = str(e.value)
    assert cfg.classifier.path in msg and "published" in msg
    # the hint names the config option as the command line spells it (tiny, not resnet8)
    assert "dsr-train stage=classifier classifier=tiny" in msg


def test_missing_denoiser_names_the_file_and_both_ways_out(tiny_pretrained, tiny_cfg):
    cfg = tiny_cfg(tiny_pretrained.override, "sigma=1.0")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    msg = str(e.value)
    assert cfg.denoiser.path in msg and "published" in msg
    # the option is `tiny` (the network is named dncnn_tiny, which is no option)
    assert "dsr-train stage=denoiser denoiser=tiny sigma=1" in msg


def test_denoiser_sigma_mismatch_is_refused(tiny_pretrained, tiny_cfg):
    cfg = tiny_cfg(tiny_pretrained.override, "sigma=0.5",
                   f"denoiser.path={tiny_pretrained.denoisers[0.25]}")
    with pytest.raises(ConfigError, match=r"trained for sigma=0.25, but sigma=0.5"):
        train(cfg)


def test_legacy_format_denoiser_loads_and_sigma_is_checked(tiny_pretrained, tmp_path):
    # published files of the time may use torch's legacy (pre-zip) format, which cannot be mmapped
    from dsr_lightning.jobs.networks import load_frozen

    ckpt = torch.load(tiny_pretrained.denoisers[0.25], map_location="cpu", weights_only=True)
    legacy = tmp_path / "noise_0.25" / "checkpoint.pth.tar"
    legacy.parent.mkdir()
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    spec = OmegaConf.create({"name": "dncnn_tiny", "arch": ckpt["arch"], "path": str(legacy)})
    net = load_frozen("denoiser", spec, sigma=0.25)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ConfigError, match=r"trained for sigma=0.25, but sigma=0.5"):
        load_frozen("denoiser", spec, sigma=0.5)
    legacy.write_bytes(b"not a checkpoint")  # unreadable: the loader's own error, naming the file
    with pytest.raises(ValueError, match=str(legacy)):
        load_frozen("denoiser", spec, sigma=0.25)


@pytest.mark.parametrize("override,match", [("stage.name=foo", "stage='foo'"),
                                            ("rejector.target=foo", "rejector.target='foo'"),
                                            ("rejector.head=foo", "rejector.head='foo'")])
def test_unknown_stage_target_head(tiny_pretrained, tiny_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny_cfg(tiny_pretrained.override, override))


def test_cli_user_error_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """train.py's entry point in process (the same exit path as certify.py's, whose launched
    process test_certify.test_cli_error checks)."""
    monkeypatch.chdir(tmp_path)
    rc = run_cli(["train", "experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "classifier checkpoint not found" in errors[0]
