"""Diffusion denoisers (models/diffusion.py, denoiser=diffusion): t* against the scheduler's ᾱ, the
one-step estimate against its closed form, the [0, 1] range, σ beyond the schedule, the folder
layouts of save_pretrained, and the chain train -> certify -> dsr-certify from the checkpoint alone
on a tiny random UNet2DModel saved into a temporary folder (offline). Also classifier.input_size
(a classifier at its own resolution, with the rejector's fusion)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_tiny, env, error_lines
from hydra.core.hydra_config import HydraConfig

from dsr_lightning.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")

from dsr_lightning.models.diffusion import (  # noqa: E402 - after the importorskip
    DiffusionDenoiser,
    load_diffusion,
    max_sigma,
    timestep_for,
)

SIGMAS = (0.12, 0.25, 0.5, 1.0)


def _unet(size: int = 16, out_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def save_model(folder: Path, layout: str = "pipeline", seed: int = 0, **scheduler) -> Path:
    """A tiny random DDPM (UNet2DModel + DDPMScheduler) written by save_pretrained: the pipeline
    layout (unet/, scheduler/) or a model's own (config.json, scheduler_config.json beside it)."""
    learned = str(scheduler.get("variance_type", "")).startswith("learned")
    unet = _unet(out_channels=6 if learned else 3, seed=seed)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, **scheduler)
    if layout == "pipeline":
        unet.save_pretrained(folder / "unet")
        sched.save_pretrained(folder / "scheduler")
    else:
        unet.save_pretrained(folder)
        sched.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("ddpm") / "tiny_ddpm")


def _alphas() -> torch.Tensor:
    return diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod


# --- the timestep and the one-step estimate -----------------------------------------------------

@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_timestep_is_the_one_whose_noise_level_matches_sigma(sigma):
    ab = _alphas().double()
    t = timestep_for(sigma, ab)
    level = lambda s: math.sqrt((1 - float(ab[s])) / float(ab[s]))  # noqa: E731
    # the model's noise level at t* is 2σ (σ in [0, 1] pixels = 2σ in the model's [-1, 1] units)
    assert abs(level(t) - 2 * sigma) <= abs(level(t - 1) - 2 * sigma)
    assert abs(level(t) - 2 * sigma) <= abs(level(t + 1) - 2 * sigma)
    assert abs(level(t) / (2 * sigma) - 1) < 0.01  # the linear schedule's steps are that fine here
    # larger σ, later timestep
    assert timestep_for(2 * sigma, ab) > t


def test_sigma_beyond_the_schedule_is_refused_naming_the_largest():
    ab = _alphas()
    top = max_sigma(ab)
    assert top == pytest.approx(math.sqrt((1 - float(ab[-1])) / float(ab[-1])) / 2)
    assert timestep_for(top, ab) == len(ab) - 1
    with pytest.raises(ConfigError, match=rf"sigma <= {top:.4g}"):
        timestep_for(top * 1.01, ab)
    with pytest.raises(ConfigError, match="sigma > 0"):
        timestep_for(0.0, ab)


class Oracle(torch.nn.Module):
    """A perfect model of the true noise: at any input it predicts the ε (or x0, or v) that made
    the noisy images, x_t = √ᾱ x0 + √(1-ᾱ) ε at t*. D gives back x0 only if it fed the model the
    input t* expects: the signal scaled by √ᾱ and the noise at √(1-ᾱ) (√ᾱ · 2σ ≈ √(1-ᾱ))."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, ab: float, kind: str):
        super().__init__()
        self.x0, self.eps, self.ab, self.kind = x0, eps, ab, kind

    def forward(self, x_t, t):
        a, s = math.sqrt(self.ab), math.sqrt(1 - self.ab)
        return {"epsilon": self.eps, "sample": self.x0,
                "v_prediction": a * self.eps - s * self.x0}[self.kind]


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_the_one_step_estimate_is_the_closed_form(kind, sigma):
    ab = _alphas()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 0.5 + 0.25       # clean images inside [0, 1]
    eps = torch.randn(x.shape, generator=g)
    noisy = x + sigma * eps                                    # 2σε in the model's units
    t = timestep_for(sigma, ab)
    den = DiffusionDenoiser(Oracle(2 * x - 1, eps, float(ab[t]), kind), ab, sigma, kind)
    assert den.timestep == t and den.noise_mismatch < 2e-3
    # exact up to the schedule's step: the noise left is ε · (2σ − √((1-ᾱ)/ᾱ)), a fraction
    # noise_mismatch of 2σε
    torch.testing.assert_close(den(noisy), x, atol=2e-2 * sigma, rtol=0)
    if kind != "sample":  # an input without the √ᾱ scaling (or at another t) misses x0 by far
        wrong = DiffusionDenoiser(Oracle(2 * x - 1, eps, float(ab[t + 40]), kind), ab, sigma, kind)
        wrong.alpha_bar = float(ab[t + 40])
        assert (wrong(noisy) - x).abs().max() > 0.05


def test_a_real_unet_one_step_equals_its_formula_and_maps_into_unit_range():
    ab = _alphas()
    unet = _unet().eval()
    den = DiffusionDenoiser(unet, ab, 0.25).eval()
    g = torch.Generator().manual_seed(1)
    noisy = torch.rand(4, 3, 16, 16, generator=g) + 0.25 * torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        out = den(noisy)
        a = float(ab[den.timestep])
        x_t = math.sqrt(a) * (2 * noisy - 1)
        eps = unet(x_t, torch.full((4,), den.timestep)).sample
        want = (((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1) + 1) / 2
    assert out.shape == noisy.shape
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(den(noisy), out, rtol=0, atol=0)  # deterministic
    # a UNet predicting no noise leaves the noisy image, clipped to [0, 1]
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    torch.testing.assert_close(den(noisy), noisy.clamp(0, 1), atol=1e-6, rtol=0)


# --- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["pipeline", "model"])
def test_both_save_pretrained_layouts_load(tmp_path, layout):
    folder = save_model(tmp_path / layout, layout)
    den, info = load_diffusion(str(folder), 0.5)
    assert info["timestep"] == timestep_for(0.5, _alphas())
    assert info["prediction_type"] == "epsilon" and info["unet"]["sample_size"] == 16
    assert isinstance(den.unet, diffusers.UNet2DModel)


def test_other_prediction_types_and_learned_variance(tmp_path):
    den, info = load_diffusion(str(save_model(tmp_path / "v", prediction_type="v_prediction")), 0.25)
    assert den.prediction_type == "v_prediction" and info["prediction_type"] == "v_prediction"
    den, _ = load_diffusion(str(save_model(tmp_path / "learned", variance_type="learned_range")), 0.25)
    assert den.learned_variance
    assert den(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)  # the variance channels dropped
    folder = save_model(tmp_path / "odd")
    cfg = (folder / "scheduler" / "scheduler_config.json")
    cfg.write_text(cfg.read_text().replace('"epsilon"', '"score"'))
    with pytest.raises(ConfigError, match="predicts 'score'"):
        load_diffusion(str(folder), 0.25)


def test_bad_model_references_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no diffusers model"):
        load_diffusion(str(tmp_path / "empty"), 0.25)
    with pytest.raises(ConfigError, match="not a hub id"):
        load_diffusion(str(tmp_path / "missing" / "folder"), 0.25)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        load_diffusion(str(tmp_path / "file.bin"), 0.25)


def test_a_variance_exploding_model_is_refused(tmp_path):
    """A score-SDE scheduler (sigma_min/sigma_max, no β schedule) is another process: refused,
    never read as a DDPM with invented betas."""
    folder = tmp_path / "ve"
    _unet().save_pretrained(folder / "unet")
    diffusers.ScoreSdeVeScheduler().save_pretrained(folder / "scheduler")
    with pytest.raises(ConfigError, match="ScoreSdeVeScheduler has no β schedule"):
        load_diffusion(str(folder), 0.25)


def test_the_recipe_holds_the_model_files_configuration(model):
    """What the recipe (and the network id) records of the UNet is its config.json as written, not
    the installed diffusers' defaults on top of it; the scheduler's β schedule likewise."""
    _, info = load_diffusion(str(model), 0.25)
    written = json.loads((model / "unet" / "config.json").read_text())
    assert info["unet"] == {k: v for k, v in written.items() if not k.startswith("_")}
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert info["scheduler"]["beta_schedule"] == sched["beta_schedule"]
    assert info["scheduler"]["num_train_timesteps"] == 1000


def test_a_relative_model_folder_is_recorded_as_an_absolute_path(model, tmp_path, monkeypatch):
    """A rebuild from another working directory finds the folder (never a hub id of that name)."""
    from omegaconf import OmegaConf

    from dsr_lightning.jobs.networks import build, rebuild

    shutil.copytree(model, tmp_path / "models" / "ddpm")
    monkeypatch.chdir(tmp_path)
    node = OmegaConf.create({"source": "diffusion", "model": "models/ddpm", "name": "ddpm"})
    built = build("denoiser", node, sigma=0.25)
    assert built.recipe["path"] == str(tmp_path / "models" / "ddpm")
    monkeypatch.chdir(model.parent)
    assert rebuild("denoiser", dict(built.recipe)).timestep == built.module.timestep


def test_without_diffusers_the_error_names_the_extra(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ConfigError, match=r'pip install "dsr_lightning\[diffusion\]"'):
        load_diffusion(str(model), 0.25)


# --- the chain: train, certify in the job, dsr-certify from the checkpoint alone ----------------

def _train(tiny, out: Path, *overrides: str) -> dict:
    from dsr_lightning.jobs.training import train

    try:
        return train(compose_tiny(out, [tiny.override, "sigma=0.25", "trainer.limit_train_batches=2",
                                        "trainer.limit_val_batches=1", *overrides]))
    finally:
        HydraConfig.instance().cfg = None


def _rows(path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def chain(tiny_pretrained, model, tmp_path_factory):
    """The rejector trained on the tiny DDPM, its f_R and baseline certified in the job."""
    out = tmp_path_factory.mktemp("dds")
    result = _train(tiny_pretrained, out / "run", "denoiser=diffusion", f"denoiser.model={model}",
                    "certify=quick", "certify.N0=10", "certify.N=50", "certify.max=3",
                    "certify.batch=64")
    return out, result


def test_the_rejector_trains_on_a_diffusion_denoiser_and_certifies(chain, model):
    _, result = chain
    files = {s: c["file"] for s, c in result["certification"].items()}
    assert set(files) == {"rejection", "denoised"}
    for path in files.values():
        assert len(_rows(path)) == 3
    ckpt = torch.load(result["best"], map_location="cpu", weights_only=False)
    # the DDPM's weights stay in its folder: the checkpoint names the model and the weights' hash
    assert not [k for k in ckpt["state_dict"] if k.startswith("denoiser.")]
    recipe = ckpt["dsr_config"]["networks"]["denoiser"]
    assert recipe["source"] == "diffusion" and recipe["path"] == str(model)
    assert recipe["timestep"] == timestep_for(0.25, _alphas()) and len(recipe["state_sha256"]) == 64


def test_certify_from_the_checkpoint_alone_repeats_the_jobs_rows(chain, tiny_pretrained):
    from helpers import certify_tiny

    out, result = chain
    again = certify_tiny(tiny_pretrained, Path(result["best"]), out / "again", "system=denoised",
                         "N0=10", "N=50", "max=3", "batch=64")
    assert _rows(again["outfile"]) == _rows(result["certification"]["denoised"]["file"])


def test_a_changed_model_folder_is_refused(chain, model, tmp_path):
    from dsr_lightning.jobs.run_checkpoint import RunCheckpoint

    _, result = chain
    moved = tmp_path / "model"
    shutil.copytree(model, moved)
    ckpt = RunCheckpoint.read(result["best"])
    ckpt.config["networks"]["denoiser"]["path"] = str(moved)
    ckpt.system("denoised")  # the same model in another folder: the same network
    save_model(moved, seed=1)  # other weights in that folder
    with pytest.raises(CheckpointError, match="changed since the rejector was trained"):
        ckpt.system("denoised")


def test_sigma_beyond_the_schedule_and_a_diffusion_stage_are_refused(tiny_pretrained, model, tmp_path):
    with pytest.raises(ConfigError, match=r"beyond the diffusion model's noise schedule.*sigma <="):
        _train(tiny_pretrained, tmp_path / "a", "denoiser=diffusion", f"denoiser.model={model}",
               "sigma=200")
    with pytest.raises(ConfigError, match="pretrained model, used as it is"):
        _train(tiny_pretrained, tmp_path / "b", "stage=denoiser", "denoiser=diffusion",
               f"denoiser.model={model}")


@pytest.mark.process
def test_dsr_certify_from_the_checkpoint_alone(chain, tmp_path):
    """The command a user types, in a new process: dsr-certify (the installed console script)
    with nothing but the checkpoint."""
    _, result = chain
    script = Path(sys.executable).parent / "dsr-certify"
    assert script.is_file(), "the package is not installed with its console scripts (make install)"
    proc = subprocess.run([str(script), f"rejector_ckpt={result['best']}",
                           "N0=10", "N=50", "max=2", "batch=64", f"outdir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu"],
                          capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not error_lines(proc.stderr)
    files = list(tmp_path.glob("rejection_*_certify.tsv"))
    assert len(files) == 1 and len(_rows(files[0])) == 2


# --- a classifier at its own resolution -----------------------------------------------------------

def test_classifier_input_size_resizes_inside_and_keeps_fusion():
    from dsr_lightning.models import Classifier
    from dsr_lightning.models.resnet import ResNet

    seen = []
    net = ResNet(8, 10)
    net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    f = Classifier(net, input_shape=(3, 16, 16), input_size=32).eval()
    x = torch.rand(2, 3, 16, 16)
    logits, feats = f.forward_features(x)
    assert seen[-1] == (2, 3, 32, 32) and logits.shape == (2, 10)
    assert [t.shape[-1] for t in feats] == [32, 16, 8]  # the net's maps, at its own size
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True,
                                          align_corners=False)
    plain = Classifier(net, input_shape=(3, 32, 32)).eval()
    torch.testing.assert_close(f(x), plain(big))
    with pytest.raises(ConfigError, match="classifier.input_size"):
        Classifier(net, input_size=[1, 2, 3])


def test_classifier_input_size_in_the_job_is_part_of_the_network(tiny_pretrained, tmp_path):
    from dsr_lightning.identity import network_id
    from dsr_lightning.jobs.run_checkpoint import RunCheckpoint

    result = _train(tiny_pretrained, tmp_path / "run", "classifier.input_size=24")
    ckpt = RunCheckpoint.read(result["best"])
    recipe = ckpt.config["networks"]["classifier"]
    assert recipe["input_size"] == [24, 24]
    system, prints = ckpt.system("rejection")  # rebuilt at 24 px, its probe reproduced
    assert system.classifier.input_size == (24, 24) and system.rejector is not None
    plain = {k: v for k, v in recipe.items() if k != "input_size"}
    assert prints["classifier"]["id"] == network_id("classifier", recipe) != \
        network_id("classifier", plain)


def test_the_dds_experiment_is_the_diffusion_grid():
    """experiment=dds_cifar10: the diffusers CIFAR-10 DDPM, sigma in {0.25, 0.5, 1.0}, f_R and its
    baseline certified in the job as the paper's protocol; every job of the grid passes the checks."""
    from dsr_lightning.config import compose
    from dsr_lightning.config.schema import check_train

    cfg = compose("train", ["experiment=dds_cifar10"])
    ch = cfg.hydra.runtime.choices
    assert (ch.denoiser, ch.certify, ch.data) == ("diffusion", "paper", "cifar10")
    assert cfg.denoiser.source == "diffusion" and cfg.denoiser.model == "google/ddpm-cifar10-32"
    assert cfg.denoiser.name == "ddpm-cifar10-32"
    assert cfg.certify.systems == ["rejection", "denoised"] and cfg.certify.batch == "auto"
    assert (cfg.certify.N0, cfg.certify.N) == (100, 10_000)
    sigmas = cfg.hydra.sweeper.params.sigma.split(",")
    assert sigmas == ["0.25", "0.5", "1.0"]
    for s in sigmas:
        check_train(compose("train", ["experiment=dds_cifar10", f"sigma={s}"]))
    # a classifier at its own resolution in front of the DDPM composes and passes the checks
    check_train(compose("train", ["experiment=dds_cifar10", "classifier=torchvision",
                                  "classifier.model=vit_b_16", "classifier.path=vit.pth",
                                  "classifier.input_size=224"]))


def test_the_documented_python_block_runs(model, capsys):
    """docs/diffusion.md's Python block, with the tiny DDPM's folder for the hub id."""
    import re

    text = (REPO / "docs" / "diffusion.md").read_text()
    (code,) = [c for c in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
               if "load_diffusion" in c]
    assert '"google/ddpm-cifar10-32"' in code
    code = code.replace('"google/ddpm-cifar10-32"', repr(str(model)))
    code = code.replace("n0=100, n=1000", "n0=10, n=100")
    exec(compile(code, "docs/diffusion.md", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert f"{timestep_for(0.25, _alphas())} " in out and "Certificate(prediction=" in out


def test_the_python_api_loads_the_diffusion_rejector(chain):
    """dsr.load rebuilds the DDPM from its folder (the checkpoint holds none of its weights) and
    certifies as the job did: the same counts for the same images and keys."""
    from hydra.utils import instantiate

    import dsr_lightning as dsr
    from dsr_lightning.jobs.run_checkpoint import RunCheckpoint

    _, result = chain
    g = dsr.load(result["best"])
    assert type(g.denoiser).__name__ == "DiffusionDenoiser"
    assert g.denoiser.timestep == timestep_for(0.25, _alphas())
    data = instantiate(RunCheckpoint.read(result["best"]).config["data"]).dataset("test")
    rows = _rows(result["certification"]["rejection"]["file"])
    keys = [int(r["idx"]) for r in rows]
    x = torch.stack([data[i][0] for i in keys])
    certs = g.certify(x, 10, 50, 0.01, 64, labels=[int(r["label"]) for r in rows], keys=keys,
                      bound=_meta(result)["bound"])
    assert certs["n_A"].tolist() == [int(r["n_A"]) for r in rows]
    assert certs["n_R"].tolist() == [int(r["n_R"]) for r in rows]
    assert certs.prediction.tolist() == [int(r["predict"]) for r in rows]


def _meta(result) -> dict:
    return json.loads(Path(result["certification"]["rejection"]["file"] + ".json").read_text())


@pytest.mark.parametrize("overrides, match", [
    (["classifier.input_size=abc"], "classifier.input_size"),
    (["classifier.input_size=0"], "classifier.input_size"),
    (["classifier.input_size=[1,2,3]"], "classifier.input_size"),
    (["denoiser=diffusion", "denoiser.model=null"], "needs denoiser.model"),
    (["classifier.source=diffusion"], "only the denoiser can be a diffusion model"),
])
def test_bad_diffusion_and_input_size_settings_are_one_config_error(overrides, match):
    """Each new key, given wrong: one ConfigError naming it, from the checks every job runs first
    (before any data, network or file is touched)."""
    from dsr_lightning.config import compose
    from dsr_lightning.config.schema import check_certify, check_train

    with pytest.raises(ConfigError, match=match):
        check_train(compose("train", overrides))
    with pytest.raises(ConfigError, match=match):
        check_certify(compose("certify", overrides))


def test_a_model_of_other_channels_than_the_data_is_refused(model):
    from omegaconf import OmegaConf

    from dsr_lightning.jobs.networks import DataFacts, build

    node = OmegaConf.create({"source": "diffusion", "model": str(model), "name": "ddpm"})
    with pytest.raises(ConfigError, match="denoises 3-channel images and the data's have 1"):
        build("denoiser", node, sigma=0.25, data=DataFacts(image_shape=(1, 16, 16)))


def test_a_bad_model_on_the_command_line_exits_2_with_nothing_written(tiny_pretrained, tmp_path,
                                                                    monkeypatch, capsys):
    from helpers import run_cli

    monkeypatch.chdir(tiny_pretrained.cwd)
    run = tmp_path / "run"
    code = run_cli(["train", "experiment=tiny", tiny_pretrained.override, "denoiser=diffusion",
                    f"denoiser.model={tmp_path / 'no_such_folder'}", f"hydra.run.dir={run}"],
                   monkeypatch)
    assert code == 2
    err = capsys.readouterr().err
    assert "error: denoiser.model=" in err and "not a hub id" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists() and not (run / "results").exists()


def test_a_diffusion_run_resumes_with_the_models_weights_from_its_folder(tiny_pretrained, model,
                                                                         tmp_path):
    """The checkpoint leaves the DDPM out; a resume (Lightning's strict load) refills it from the
    model the job built, trains the epoch left, and its checkpoints still hold none of it."""
    args = ("denoiser=diffusion", f"denoiser.model={model}", "rejector.threshold=0",
            "optim=adam", "optim.epochs=2")
    first = _train(tiny_pretrained, tmp_path / "run", *args, "trainer.max_epochs=1")
    resumed = _train(tiny_pretrained, tmp_path / "run", *args, f"ckpt_path={first['last']}")
    assert (first["epochs"], resumed["epochs"]) == (1, 2)
    state = torch.load(resumed["last"], map_location="cpu", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("denoiser.")]
