"""Every config in conf/ composes, resolves and instantiates; the published paths and the paper's
schedule are what the configs say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dsr_lightning.config import CONFIG_DIR, to_dict
from dsr_lightning.data import SmoothingDataModule
from dsr_lightning.jobs.networks import build, build_fresh
from dsr_lightning.models import DnCNN, ResNet, build_arch
from dsr_lightning.tasks import phase_bounds
from dsr_lightning.tasks.rejector import HEADS, TARGETS


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


TOP = ["train", "certify"]
TESTED_GROUPS = {"data", "classifier", "denoiser", "rejector", "optim", "trainer", "logger",
                 "stage", "experiment", "system", "callbacks", "certify",
                 "hydra"}  # hydra/launcher=slurm: test_experiments.py


def test_every_group_and_top_config_is_tested():
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups == TESTED_GROUPS, f"add a test for the config group(s) {groups ^ TESTED_GROUPS}"
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(TOP)


@pytest.mark.parametrize("name", TOP)
def test_top_config_composes_and_resolves(tiny_cfg, name):
    cfg = tiny_cfg(name=name, experiment=None)
    resolved = to_dict(cfg)  # every interpolation resolves; the hydra node is dropped
    assert "hydra" not in resolved and resolved["sigma"] == cfg.sigma
    dm = instantiate(cfg.data)
    assert isinstance(dm, SmoothingDataModule) and (dm.sigma, dm.T) == (cfg.sigma, cfg.T)
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs >= 1


def test_train_defaults_are_the_paper_setup(tiny_cfg):
    cfg = tiny_cfg(experiment=None)
    ch = cfg.hydra.runtime.choices
    assert (ch.stage, ch.classifier, ch.denoiser, ch.rejector, ch.optim) == (
        "rejector", "resnet110", "dncnn", "resnet34", "paper")
    assert (cfg.sigma, cfg.T) == (0.25, 20)
    assert (cfg.rejector.target, cfg.rejector.head) == ("clean_pred", "noisy")  # DESIGN §1


def test_method_scalars_reach_every_node(tiny_cfg):
    """`-m sigma=... T=...` must change the data noise, the denoiser file and the run name."""
    cfg = tiny_cfg("sigma=0.5", "T=4", experiment=None)
    assert (cfg.data.sigma, cfg.data.T) == (0.5, 4)
    assert "noise_0.50" in cfg.denoiser.path and cfg.run_name.endswith("s0.50_T4")


def test_paths_follow_the_published_layout(tiny_cfg):
    cfg = tiny_cfg("pretrained_root=P", "sigma=1.0", experiment=None)
    assert cfg.classifier.path == (
        "P/cifar10_classifiers/ResNet110_90epochs/noise_0.00/checkpoint.pth.tar")
    assert cfg.denoiser.path == (
        "P/trained_denoisers/cifar10/mse_obj/dncnn/epochs_90/noise_1.00/checkpoint.pth.tar")
    cfg = tiny_cfg("denoiser=memnet", "classifier.noise_sd=0.12", "sigma=0.12", experiment=None)
    assert "memnet/epochs_90/noise_0.12/" in cfg.denoiser.path
    assert "ResNet110_90epochs/noise_0.12/" in cfg.classifier.path


def _required(group: str, opt: str, tmp: Path) -> list[str]:
    """The settings an option has no default for (a user's folder, file or class), made here."""
    if (group, opt) == ("data", "imagefolder"):
        return [f"data.root={make_image_folder(tmp / 'folder', train=2, test=1)}"]
    if (group, opt) == ("data", "npz"):
        x = np.zeros((4, 20, 20, 1), np.uint8)
        np.savez(tmp / "own.npz", x_train=x, y_train=np.arange(4) % 2, x_test=x[:2],
                 y_test=np.arange(2))
        return [f"data.path={tmp / 'own.npz'}"]
    if (group, opt) == ("denoiser", "diffusion"):  # a tiny DDPM in diffusers' layout (offline)
        from test_diffusion import save_model

        return [f"denoiser.model={save_model(tmp / 'ddpm')}"]
    if opt == "file":
        net = ResNet(8) if group == "classifier" else DnCNN(depth=3)
        torch.jit.save(torch.jit.script(net), tmp / f"{group}.pt")
        extra = ["classifier.mean=[0.5,0.5,0.5]", "classifier.std=[0.2,0.2,0.2]"] \
            if group == "classifier" else []
        return [f"{group}.path={tmp / f'{group}.pt'}", *extra]
    if (group, opt) == ("classifier", "module"):
        return ["classifier.net._target_=torchvision.models.resnet18",
                "+classifier.net.num_classes=10", "classifier.mean=[0.5,0.5,0.5]",
                "classifier.std=[0.2,0.2,0.2]"]
    if (group, opt) == ("classifier", "torchvision"):
        return ["classifier.num_classes=10"]
    if (group, opt) == ("denoiser", "module"):
        return ["denoiser.net._target_=dsr_lightning.models.DnCNN", "+denoiser.net.depth=3"]
    return []


@pytest.mark.parametrize("opt", options("data"))
def test_data_options_instantiate(tiny_cfg, tmp_path, opt):
    cfg = tiny_cfg(f"data={opt}", "sigma=0.5", "T=3", *_required("data", opt, tmp_path),
                   experiment=None)
    dm = instantiate(cfg.data)
    assert isinstance(dm, SmoothingDataModule)
    assert (dm.sigma, dm.T, dm.seed) == (0.5, 3, cfg.seed)
    assert cfg.data.name and cfg.data.name != "None"  # it names the exports
    if opt in ("synthetic", "imagefolder", "npz"):  # those whose files are here
        x, y = next(iter(dm.train_dataloader()))
        out = dm.add_noise((x, y))
        assert out["noisy"].shape == (3 * len(x), *x.shape[1:])
        assert 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("opt", options("classifier"))
def test_classifier_options_build(tiny_cfg, tmp_path, opt):
    cfg = tiny_cfg(f"classifier={opt}", *_required("classifier", opt, tmp_path), experiment=None)
    net = build_fresh("classifier", cfg.classifier).eval()
    k = 1000 if opt == "imagenet_resnet50" else 10
    assert net.num_classes == k
    with torch.no_grad():
        logits, feats = net.forward_features(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, k) and [f.shape[1] for f in feats] == net.feature_channels
    if cfg.classifier.source == "arch" and opt != "imagenet_resnet50":
        assert net.feature_channels == [16, 32, 64]  # Cohen's ResNets: layer1..3
    assert cfg.classifier.noise_sd == 0.0 and cfg.classifier.name


@pytest.mark.parametrize("opt", options("denoiser"))
def test_denoiser_options_build(tiny_cfg, tmp_path, opt):
    cfg = tiny_cfg(f"denoiser={opt}", *_required("denoiser", opt, tmp_path), experiment=None)
    if cfg.denoiser.source == "diffusion":  # pretrained, never trained fresh: built as given
        net = build("denoiser", cfg.denoiser, sigma=0.25).module.eval()
    else:
        net = build_fresh("denoiser", cfg.denoiser).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == x.shape
    if cfg.denoiser.source == "arch":
        assert cfg.denoiser.name in cfg.denoiser.path and "noise_0.25" in cfg.denoiser.path


@pytest.mark.parametrize("opt", options("rejector"))
def test_rejector_options_build(tiny_cfg, opt):
    cfg = tiny_cfg(f"rejector={opt}", experiment=None)
    assert cfg.rejector.target in TARGETS and cfg.rejector.head in HEADS
    f = build_arch("cifar_resnet8").eval()
    net = instantiate(cfg.rejector.net)(num_classes=f.num_classes,
                                        feature_channels=f.feature_channels)
    z = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = f.forward_features(z)
    assert net(z, feats).shape == (2, 10)
    if opt == "resnet34":  # the paper's backbone: BasicBlocks 3-4-6-3, width 64, 3 FC layers
        assert [len(s) for s in net.stages] == [3, 4, 6, 3] and net.stem[0].out_channels == 64
        assert sum(isinstance(m, nn.Linear) for m in net.fc) == 3


@pytest.mark.parametrize("opt", options("optim"))
def test_optim_options_instantiate(tiny_cfg, opt):
    cfg = tiny_cfg(f"optim={opt}", experiment=None)
    assert phase_bounds(cfg.optim.phases)[-1] == cfg.optim.epochs == cfg.trainer.max_epochs
    for phase in cfg.optim.phases:
        opt_ = instantiate(phase.optimizer)([nn.Parameter(torch.zeros(3))])
        assert isinstance(opt_, torch.optim.Optimizer)
        if phase.get("scheduler"):
            assert isinstance(instantiate(phase.scheduler)(opt_),
                              torch.optim.lr_scheduler.LRScheduler)


def test_paper_schedule(tiny_cfg):
    """§6.3: 20 epochs; Adam lr 1e-4 for 5 epochs, then SGD lr 1e-3, x0.1 every 5 epochs."""
    cfg = tiny_cfg("optim=paper", experiment=None)
    p = nn.Parameter(torch.zeros(1))
    adam = instantiate(cfg.optim.phases[0].optimizer)([p])
    sgd = instantiate(cfg.optim.phases[1].optimizer)([p])
    sched = instantiate(cfg.optim.phases[1].scheduler)(sgd)
    assert phase_bounds(cfg.optim.phases) == [5, 20]
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-4
    assert isinstance(sgd, torch.optim.SGD)
    lrs = []
    for _ in range(15):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 5 + [1e-4] * 5 + [1e-5] * 5)


@pytest.mark.parametrize("opt", options("trainer"))
def test_trainer_options_instantiate(tiny_cfg, opt, tmp_path):
    cfg = tiny_cfg(f"trainer={opt}", out=tmp_path / "run", experiment=None)
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.default_root_dir == str(tmp_path / "run")
    if opt == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2


@pytest.mark.parametrize("opt", options("logger"))
def test_logger_options_instantiate(tiny_cfg, opt, tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    cfg = tiny_cfg(f"logger={opt}", out=tmp_path / "run", experiment=None)
    loggers = {k: instantiate(v) for k, v in cfg.logger.items()}  # no run is started here
    if opt == "none":  # certify.py's default
        assert loggers == {}
        return
    assert "csv" in loggers and loggers["csv"].save_dir == str(tmp_path / "run")
    if opt == "wandb":  # offline; one group per sweep (outside a sweep: the run name)
        w = cfg.logger.wandb
        assert w.offline is True and w.name == f"{cfg.run_name}-run" and w.group == cfg.run_name
        assert w.job_type == "rejector" and "sigma=0.25" in w.tags


@pytest.mark.parametrize("opt", options("stage"))
def test_stage_options(tiny_cfg, opt):
    cfg = tiny_cfg(f"stage={opt}", experiment=None)
    assert cfg.stage.name == opt and cfg.stage.mode in ("min", "max")
    assert cfg.stage.monitor.startswith("val/")
    expected_optim = {"classifier": "sgd_cosine", "denoiser": "adam", "rejector": "paper"}
    assert cfg.hydra.runtime.choices.optim == expected_optim[opt]


@pytest.mark.parametrize("opt", options("system"))
def test_system_options(tiny_cfg, opt):
    cfg = tiny_cfg(f"system={opt}", name="certify", experiment=None)
    assert cfg.system.name == opt and cfg.bound == cfg.system.bound
    assert cfg.bound in ("paper", "runner_up", "cohen")
    assert to_dict(cfg)["outfile"].endswith(".tsv")


@pytest.mark.parametrize("top", TOP)
@pytest.mark.parametrize("exp", options("experiment"))
def test_experiments_compose(tiny_cfg, exp, top):
    stages = options("stage") if top == "train" else [None]
    for stage in stages:
        cfg = tiny_cfg(*([f"stage={stage}"] if stage else []), name=top, experiment=exp)
        resolved = to_dict(cfg)
        assert resolved["pretrained_root"] and cfg.trainer.accelerator == "cpu"
        instantiate(cfg.data)
        instantiate(cfg.trainer, logger=False)
        if top == "train":
            assert phase_bounds(cfg.optim.phases)[-1] == cfg.trainer.max_epochs


def test_unknown_group_option_names_the_choices(tiny_cfg):
    with pytest.raises(MissingConfigException, match="stage") as e:
        tiny_cfg("stage=foo")
    for choice in options("stage"):
        assert choice in str(e.value)


def test_to_dict_is_plain_and_resolved(tiny_cfg):
    cfg = tiny_cfg()
    d = to_dict(cfg)
    assert isinstance(d, dict) and OmegaConf.create(d).classifier.path == cfg.classifier.path
    assert "${" not in repr(d)
