"""The package as a user meets it: entry points from any folder, the schema's refusals, the
callbacks group, gradient clipping and accumulation under manual optimisation, resume in place,
what the entry points print, and the design document every citation points into."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import REPO, StepSpy, error_lines, run_cli
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from dsr_lightning.cli import main as cli_main
from dsr_lightning.config import CONFIG_DIR, compose
from dsr_lightning.config.schema import check_train
from dsr_lightning.errors import ConfigError
from dsr_lightning.jobs.trainer_parts import build_callbacks
from dsr_lightning.jobs.training import train

ENV = {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run_module(*args, cwd, timeout=300):
    """`python -m dsr_lightning ...` in `cwd` (not the checkout: the package is installed)."""
    return subprocess.run([sys.executable, "-m", "dsr_lightning", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV})


# --- packaging ---------------------------------------------------------------------------------

def test_configs_ship_inside_the_package():
    import dsr_lightning

    assert CONFIG_DIR == Path(dsr_lightning.__file__).parent / "conf"
    assert (CONFIG_DIR / "train.yaml").is_file() and (CONFIG_DIR / "__init__.py").is_file()
    assert (CONFIG_DIR.parent / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    for script in ("dsr-train", "dsr-certify", "dsr-report"):
        assert re.search(rf'^{script} = "dsr_lightning.cli:\w+"', pyproject, re.M), script
    assert '"dsr_lightning.conf" = ["*.yaml", "**/*.yaml"]' in pyproject


def test_every_import_of_the_package_is_a_declared_dependency():
    """`pip install dsr_lightning` brings every module the package imports, at the top of a module
    or inside a function: an import declared only in an extra (statsmodels was, in `dev`) fails
    for users after work is done. (scripts/check_wheel.sh runs the installed wheel without the dev
    extras.)"""
    import ast
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")
    declared = {re.split(r"[<>=!~\[; ]", d)[0].lower().replace("_", "-") for d in tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # an extra's library may be imported only inside a function of its one module, which names the
    # extra when it is missing (models/diffusion.py: diffusers, the `diffusion` extra)
    optional = {"diffusers": ("diffusion", REPO / "dsr_lightning" / "models" / "diffusion.py")}
    for top, (extra, where) in optional.items():
        assert any(d.startswith(top) for d in project["optional-dependencies"][extra])
        tree = ast.parse(where.read_text())
        assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
                    and top in ([a.name for a in n.names] + [getattr(n, "module", None)])]
        assert f'dsr_lightning[{extra}]' in where.read_text()
    dists = packages_distributions()
    used = {}
    for path in (REPO / "dsr_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names):
                if top != "dsr_lightning" and not (top in optional and path == optional[top][1]):
                    used.setdefault(top, path.relative_to(REPO))
    assert {"torch", "statsmodels", "PIL"} <= used.keys()  # the scan sees them
    missing = [f"{top} ({where}; distribution {dists.get(top, ['?'])[0]})"
               for top, where in sorted(used.items())
               if not {d.lower().replace("_", "-") for d in dists.get(top, [top])} & declared]
    assert not missing, "imported but not in [project.dependencies]: " + ", ".join(missing)


@pytest.mark.process
def test_python_m_from_another_folder(tmp_path, capsys):
    """The configs are found through the package (pkg://), not the working folder."""
    r = run_module("train", "--cfg", "job", "experiment=tiny", "sigma=0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sigma: 0.5" in r.stdout and "_target_: dsr_lightning.data.SyntheticDataModule" in r.stdout
    cfg = compose("certify", ["certify=quick"])  # certify.py's keys follow the preset
    assert (cfg.N, cfg.max, cfg.N0) == (1000, 100, 100) and compose("certify", ["N=7"]).N == 7
    assert cli_main(["nonsense"]) == 2  # what `python -m dsr_lightning nonsense` exits with
    assert "usage: python -m dsr_lightning" in capsys.readouterr().err


@pytest.mark.process
def test_console_scripts_are_installed():
    bindir = Path(sys.executable).parent
    for script in ("dsr-train", "dsr-certify", "dsr-report"):
        assert (bindir / script).is_file(), f"{script} not installed (pip install -e .)"
    r = subprocess.run([str(bindir / "dsr-report"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "results files or folders" in r.stdout


def test_report_subcommand_is_the_report_cli(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's --help exits 0
        cli_main(["report", "--help"])
    assert e.value.code == 0 and "sweep" in capsys.readouterr().out


# --- the schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("optim.epochs=two", "optim.epochs"),
                                           ("sigma=abc", "sigma"), ("T=1.5", "T"),
                                           ("certify.N=many", "certify.N"),
                                           ("rejector.pos_weight=heavy", "rejector.pos_weight")])
def test_wrong_types_are_refused_when_composing(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", ["experiment=tiny", override])
    assert f"full_key: {key}" in str(e.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("sigma=-1", "sigma=-1.0: must be a finite number > 0"),
    ("sigma=nan", "sigma=nan: must be a finite number > 0"),
    ("T=0", "T=0: must be an integer >= 1"),
    ("optim.epochs=0", "optim.epochs=0: must be an integer >= 1"),
    ("optim.epochs=-1", "optim.epochs=-1: must be an integer >= 1"),
    ("optim.phases.0.optimizer.lr=-0.1", "optim.phases[0].optimizer.lr=-0.1: must be a finite"),
    ("classifier.noise_sd=-1", "classifier.noise_sd=-1.0: must be a finite number >= 0"),
    ("rejector.threshold=maybe", "rejector.threshold=maybe"),
    ("certify=quick certify.N0=200", "certify.N0=200 > certify.N=100"),
    ("certify=quick certify.max=-2", "certify.max=-2: must be an integer >= 0"),
    ("certify=quick certify.systems=[cohen]", "certify.systems[...]='cohen': choose one of"),
    ("certify=quick certify.mode=predict", "certify.mode=predict: the training job certifies"),
    ("rejector.pos_weight=-1", "rejector.pos_weight=-1.0: must be a finite number > 0"),
    ("rejector.focal_gamma=-1", "rejector.focal_gamma=-1.0: must be a finite number >= 0"),
    ("rejector.selection.images=0", "rejector.selection.images=0: must be an integer >= 1"),
    ("rejector.selection.objective=auc", "rejector.selection.objective='auc': choose one of"),
])
def test_impossible_values_are_refused_before_anything_is_built(override, message):
    cfg = compose("train", ["experiment=tiny", *override.split()])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_train(cfg)


@pytest.mark.parametrize("override, message", [
    ("threshold=nan", "threshold=nan: must be a number"),
    ("mode=staged", "mode=staged certifies at one target radius"),
    ("mode=staged radius=0.5 stages=[100,1000]", "N=10000 must equal the last of stages=[100, 1000]"),
    ("mode=staged radius=0.5 stages=[100,50] N=50 N0=10", "stages must be strictly increasing"),
    ("system=plain bound=paper", "bound=paper needs a reject class"),
])
def test_impossible_certify_values(override, message):
    from dsr_lightning.config.schema import check_certify

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_certify(compose("certify", override.split()))


@pytest.mark.parametrize("override", ["threshold=abc", "wait=maybe", "compile=2x"])
def test_certify_types_are_refused_when_composing(override):
    with pytest.raises(ConfigCompositionException):
        compose("certify", [override])


def test_denoiser_stage_needs_a_positive_sigma():
    check_train(compose("train", ["experiment=tiny", "stage=classifier", "sigma=0"]))  # unused
    with pytest.raises(ConfigError, match=r"sigma=0.0: must be a finite number > 0"):
        check_train(compose("train", ["experiment=tiny", "stage=denoiser", "sigma=0"]))


def test_cli_schema_errors_name_the_key_without_traceback(tmp_path, monkeypatch, capsys):
    """The train entry point (in process; the process boundary: test_training's CLI test)."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(["train", "optim.epochs=two"], monkeypatch) != 0
    err = capsys.readouterr().err
    assert "optim.epochs" in err and "Traceback" not in err
    rc = run_cli(["train", "experiment=tiny", "T=0", f"hydra.run.dir={tmp_path / 'run'}"],
                 monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and error_lines(err) == ["error: T=0: must be an integer >= 1 (noisy copies "
                                            "per image per step)"]
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


# --- callbacks ------------------------------------------------------------------------------

def test_callbacks_group(tiny_cfg):
    cbs = build_callbacks(tiny_cfg())
    assert [type(c) for c in cbs[:3]] == [ModelCheckpoint, ModelCheckpoint, LearningRateMonitor]
    best, last = cbs[0], cbs[1]
    assert (best.monitor, best.mode, last.monitor) == ("val/auroc", "max", None)
    cbs = build_callbacks(tiny_cfg("callbacks=[default,early_stopping,rich_progress_bar]"))
    names = [type(c).__name__ for c in cbs]
    assert "EarlyStopping" in names and "RichProgressBar" in names
    es = next(c for c in cbs if isinstance(c, EarlyStopping))
    assert (es.monitor, es.mode) == ("val/auroc", "max")
    cbs = build_callbacks(tiny_cfg("+callbacks.es._target_=pytorch_lightning.callbacks.EarlyStopping",
                                   "+callbacks.es.monitor=val/loss"))
    assert any(isinstance(c, EarlyStopping) and c.monitor == "val/loss" for c in cbs)
    assert [type(c).__name__ for c in build_callbacks(tiny_cfg("callbacks=none"))] == ["EpochTime"]


def test_a_bad_callback_is_one_clear_error(tiny_cfg):
    with pytest.raises(ConfigError, match=r"callbacks.es: cannot build 'pytorch_lightning.callbacks"
                                          r".EarlyStop'"):
        build_callbacks(tiny_cfg("+callbacks.es._target_=pytorch_lightning.callbacks.EarlyStop"))


def test_trainer_callbacks_point_to_the_group(tiny_cfg):
    with pytest.raises(ConfigError, match="trainer.callbacks is not read: set callbacks through"):
        train(tiny_cfg("+trainer.callbacks=[]"))


def test_without_checkpoints_the_stage_exports_the_final_weights(tiny_cfg, tmp_path):
    res = train(tiny_cfg("stage=classifier", "callbacks=none", f"pretrained_root={tmp_path}"))
    assert res["best"] == "" and Path(res["export"]).is_file()


# --- manual optimisation: clipping and accumulation ------------------------------------------------

@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_clipping_and_accumulation(tiny_pretrained, tiny_cfg, accumulate):
    # a spy among the callbacks, added through the config as a user adds one
    res = train(tiny_cfg(tiny_pretrained.override, "++trainer.gradient_clip_val=1e-3",
                         f"++trainer.accumulate_grad_batches={accumulate}",
                         "trainer.limit_train_batches=4", "+callbacks.spy._target_=helpers.StepSpy"))
    spy = StepSpy.last
    assert res["epochs"] == 1
    # 4 batches: a step every `accumulate` batches, each after clipping to the norm 1e-3
    assert len(spy.norms) == 4 // accumulate
    assert max(spy.norms) <= 1e-3 * (1 + 1e-4)
    ckpt = torch.load(res["last"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 // accumulate


def test_bad_manual_optimisation_settings(tiny_pretrained, tiny_cfg):
    with pytest.raises(ConfigError, match="accumulate_grad_batches=0"):
        train(tiny_cfg(tiny_pretrained.override, "++trainer.accumulate_grad_batches=0"))
    with pytest.raises(ConfigError, match="gradient_clip_val=-1"):
        train(tiny_cfg(tiny_pretrained.override, "++trainer.gradient_clip_val=-1"))


# --- resume in place ------------------------------------------------------------------------

def test_resume_in_place_keeps_the_best_score(tiny_pretrained, tmp_path):
    run = tmp_path / "run"
    first = train(compose_run(tiny_pretrained, run, ["optim.epochs=1"]))
    best = Path(first["best"])
    before, score = best.read_bytes(), first["best_score"]
    assert Path(first["output_dir"]) == run

    ckpt = run / "checkpoints" / "last.ckpt"
    # the second run's epoch reads worse (helpers.WorseLater, added through the config)
    cfg = compose_run(tiny_pretrained, None, ["optim.epochs=2", "optim.phases.0.epochs=2",
                                              f"ckpt_path={ckpt}",
                                              "+callbacks.worse._target_=helpers.WorseLater"])
    assert Path(cfg.hydra.run.dir) == run  # the run folder of the checkpoint
    second = train(cfg)
    assert second["epochs"] == 2 and Path(second["output_dir"]) == run
    assert best.read_bytes() == before  # the worse epoch did not replace best.ckpt
    assert second["best_score"] == pytest.approx(score)
    m = pd.read_csv(run / "csv" / "metrics.csv")  # one CSV, both runs' epochs
    assert sorted(m["epoch"].dropna().unique().tolist()) == [0, 1]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 1


def compose_run(tiny, run: Path | None, overrides: list[str]):
    """train.yaml composed as the CLI would, the run folder from Hydra's own rule (resume) unless
    `run` is given."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    over = ["experiment=tiny", tiny.override, *overrides]
    if run is not None:
        over.append(f"hydra.run.dir={run}")
    cfg = compose("train", over)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        cfg.hydra.job.num = 0
        cfg.trainer.enable_progress_bar = False
    HydraConfig.instance().set_config(cfg)
    return cfg


# --- how it went ----------------------------------------------------------------------------

@pytest.mark.process
def test_entry_points_say_how_it_went(tiny_pretrained, tmp_path, monkeypatch, capsys):
    """train.py and certify.py end to end as launched processes, then certify's entry point again
    in process on the same file (resumed)."""
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "experiment=tiny",
                        f"hydra.run.dir={tmp_path / 'run'}", "rejector.threshold=auto"],
                       cwd=tiny_pretrained.cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **ENV})
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"best val/auroc = [-\d.e]+: .*best\.ckpt", r.stdout)
    assert "rejector threshold: " in r.stdout and "auto: acr" in r.stdout
    args = ["experiment=tiny", "system=plain", f"outdir={tmp_path / 'res'}",
            f"hydra.run.dir={tmp_path / 'c'}"]
    r = subprocess.run([sys.executable, str(REPO / "certify.py"), *args], cwd=tiny_pretrained.cwd,
                       capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    monkeypatch.chdir(tiny_pretrained.cwd)
    capsys.readouterr()
    for out in (r, None):  # a fresh file, then the same file resumed: the whole file's numbers
        if out is None:
            code = run_cli(["certify", *args], monkeypatch)
            out = SimpleNamespace(returncode=code, **dict(zip(("stdout", "stderr"),
                                                              capsys.readouterr())))
        assert out.returncode == 0, out.stderr[-2000:]
        assert re.search(r"\| plain σ=0.25 \| [\d.]+ \[[\d., ]+\] \|.* \| 4 \|", out.stdout), out.stdout
        assert "| system | r=0 |" in out.stdout and "ACR" in out.stdout


# --- the design document ------------------------------------------------------------------------

def test_every_design_citation_points_into_docs_design():
    design = (REPO / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    cited = []
    for path in [*REPO.glob("dsr_lightning/**/*.py"), *REPO.glob("dsr_lightning/**/*.yaml"),
                 *REPO.glob("tests/*.py"), *REPO.glob("scripts/*"), REPO / "README.md"]:
        for m in re.finditer(r"DESIGN(?:\.md)?(?: decision \d+)?,? §(\d+)", path.read_text()):
            cited.append((path.name, m.group(1)))
    assert cited, "no citation found: the pattern is out of date"
    missing = [(f, s) for f, s in cited if s not in sections]
    assert not missing, f"citations of missing DESIGN sections: {missing}"
    for path in REPO.glob("dsr_lightning/**/*.py"):
        assert "shared/DESIGN" not in path.read_text(), f"{path} cites a file outside the project"


def test_default_callbacks_instantiate(tiny_cfg):
    """Every node of the default callbacks instantiates (a typo in a _target_ would not)."""
    cfg = tiny_cfg()
    for node in cfg.callbacks.values():
        assert instantiate(node) is not None
