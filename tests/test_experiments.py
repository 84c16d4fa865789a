"""Experiments end to end: certification inside the training job, sweeps whose jobs fail alone,
W&B records read back from the offline run files, the submitit launcher, the paper's grid, and the
report of a whole sweep from hand-written result folders (numbers worked out by hand)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, certify_tiny, error_lines, run_cli

from dsr_lightning.config import compose
from dsr_lightning.identity import network_id
from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.jobs.training import train
from dsr_lightning.reports import main as report_main
from dsr_lightning.reports.sweep import find_results
from dsr_lightning.results import CERTIFY_COLUMNS

QUICK = ["certify=quick", "certify.N0=10", "certify.N=60", "certify.max=5", "certify.batch=64"]
WANDB_ENV = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run (its run-<id>.wandb file: a LevelDB-style log of 32 KiB
    blocks whose records are wandb_internal_pb2.Record messages), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []  # 7: the file header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def summary_keys(records) -> set[str]:
    return {u.key or "/".join(u.nested_key) for r in records
            if r.WhichOneof("record_type") == "summary" for u in r.summary.update}


def run_record(records):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


def train_cli(*args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **WANDB_ENV, **(env or {})})


# --- certification inside the training job -----------------------------------------------------

def test_job_certifies_its_rejector_and_the_baseline_on_the_same_images_and_noise(
        tiny_pretrained, tiny_cfg):
    # a threshold no logit exceeds: f_R never rejects, so with the same images and the same noise
    # its counts are exactly those of the denoised baseline
    res = train(tiny_cfg(tiny_pretrained.override, *QUICK, "rejector.threshold=1e9"))
    cert = res["certification"]
    assert set(cert) == {"rejection", "denoised"}
    out = Path(res["output_dir"]) / "results"
    rej, den = (pd.read_csv(cert[s]["file"], sep="\t") for s in ("rejection", "denoised"))
    assert Path(cert["rejection"]["file"]).parent == out == Path(cert["denoised"]["file"]).parent
    assert list(rej.columns) == CERTIFY_COLUMNS and rej.idx.tolist() == den.idx.tolist() == [
        0, 1, 2, 3, 4]
    for c in ("c_hat", "n_A", "n_R", "n_B", "N"):
        assert rej[c].tolist() == den[c].tolist(), c
    assert (rej.N == 60).all() and (rej.n_R == 0).all()
    rec = {s: json.loads(Path(cert[s]["file"] + ".json").read_text()) for s in cert}
    assert rec["rejection"]["files"]["rejector"] == str(Path(res["best"]).resolve())
    assert rec["rejection"]["threshold"] == 1e9 and rec["rejection"]["bound"] == "paper"
    # the baseline is the checkpoint's own f and D: the networks the rejector was trained on
    ids = {s: {r: fp["id"] for r, fp in rec[s]["networks"].items()} for s in rec}
    assert ids["denoised"] == {r: ids["rejection"][r] for r in ("classifier", "denoiser")}
    assert rec["denoised"]["files"]["rejector"] == rec["rejection"]["files"]["rejector"]
    ckpt = RunCheckpoint.read(res["best"], weights=False)
    assert rec["denoised"]["networks"]["classifier"]["id"] == network_id(
        "classifier", ckpt.recipe("classifier"))
    assert rec["denoised"]["bound"] == "cohen" and rec["rejection"]["run"]["T"] == 2
    # what a sweeper sees: a validation figure (here the monitored metric), never a test certificate
    assert res["objective"] == res["best_score"]
    assert cert["rejection"]["acc"].keys() == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_certify_none_is_the_default(tiny_pretrained, tiny_cfg):
    res = train(tiny_cfg(tiny_pretrained.override))
    assert "certification" not in res and not (Path(res["output_dir"]) / "results").exists()
    # threshold=auto (the default): the sweeper sees the choice's estimate on validation draws
    assert res["objective"] == res["threshold_choice"]["score"]
    assert res["threshold_choice"]["split"] == "val"


# --- a sweep whose jobs fail alone, on one W&B dashboard ---------------------------------------

def test_sweep_runs_every_job_reports_the_failed_one_and_lands_on_one_wandb_group(
        tiny_pretrained, tmp_path, monkeypatch, capsys):
    """`train.py -m` (the entry point in process; Hydra's basic launcher runs the jobs in turn)."""
    sweep = tmp_path / "sweepA"
    # sigma=1.0 has no denoiser: that job fails; the other two run and are certified. A path in
    # an override (pretrained_root=/...) must not nest the job folders.
    for k, v in WANDB_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tiny_pretrained.cwd)
    rc = run_cli(["train", "-m", "experiment=tiny", "sigma=0.25,1.0", "T=1,2", *QUICK,
                  "logger=wandb", tiny_pretrained.override, f"hydra.sweep.dir={sweep}"], monkeypatch)
    r = SimpleNamespace(**dict(zip(("stdout", "stderr"), capsys.readouterr())))
    assert rc == 1, r.stderr[-3000:]
    assert "sweep " in r.stdout and "4 jobs, 2 succeeded, 2 failed" in r.stdout
    assert "FAILED job 2: experiment=tiny sigma=1.0 T=1" in r.stdout
    assert "denoiser checkpoint not found" in r.stdout
    errors = [ln for ln in error_lines(r.stderr) if ln.startswith("error: job")]
    assert len(errors) == 2 and "Traceback" not in r.stderr
    jobs = {p.name.split("_")[0]: p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()}
    assert sorted(jobs) == ["0", "1", "2", "3"] and all((j / ".hydra").is_dir() for j in jobs.values())
    failed = json.loads((jobs["2"] / "FAILED.json").read_text())
    assert failed["overrides"][:3] == ["experiment=tiny", "sigma=1.0", "T=1"]
    assert failed["type"] == "ConfigError" and failed["user_error"] is True
    for num in ("0", "1"):
        assert list((jobs[num] / "results").glob("rejection_*.tsv"))
    # one shared baseline for the two jobs at sigma=0.25, written once
    (base,) = (sweep / "baselines").glob("denoised_*.tsv")
    assert len(pd.read_csv(base, sep="\t")) == 5
    groups, names = set(), set()
    for num, T in (("0", 1), ("1", 2)):
        (run_dir,) = (jobs[num] / "wandb").glob("offline-run-*")
        recs = wandb_records(run_dir)
        run = run_record(recs)
        groups.add(run.run_group)
        names.add(run.display_name)
        assert run.job_type == "rejector" and set(run.tags) == {
            "sigma=0.25", f"T={T}", "denoiser=dncnn_tiny"}
        keys = summary_keys(recs)
        for s in ("rejection", "denoised"):
            assert {f"certify/{s}/acr", f"certify/{s}/acc@0", f"certify/{s}/acc@0.5"} <= keys
        arts = {(r.artifact.type, r.artifact.name) for r in recs
                if r.WhichOneof("record_type") == "artifact"}
        assert ("certification", f"results-{run.run_id}-rejection") in arts
        assert any(t == "run_table" and "curve" in n for t, n in arts)  # the W&B line plot
    assert groups == {"sweepA"} and len(names) == 2  # one group named after the sweep


@pytest.mark.slow
def test_submitit_local_launcher(tiny_pretrained, tmp_path):
    sweep = tmp_path / "sub"
    r = train_cli("-m", "experiment=tiny", "sigma=0.25,1.0", "hydra/launcher=submitit_local",
                  f"hydra.sweep.dir={sweep}", cwd=tiny_pretrained.cwd)
    assert r.returncode == 1, r.stderr[-3000:]  # the sigma=1.0 job fails, alone
    assert "2 jobs, 1 succeeded, 1 failed" in r.stdout and "FAILED job 1" in r.stdout
    assert (sweep / "0_experiment=tiny,sigma=0.25" / "checkpoints" / "last.ckpt").is_file()
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # submitit ran the jobs


def test_slurm_launcher_config():
    cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                            "hydra.launcher.timeout_min=60"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 60, 1)


# --- W&B: log_model offline, certify.py linked to the training run -------------------------------

def test_wandb_log_model_offline_and_certify_linked(tiny_pretrained, tiny_cfg, tmp_path,
                                                    monkeypatch):
    for k, v in WANDB_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    res = train(tiny_cfg(tiny_pretrained.override, "logger=wandb", "logger.wandb.log_model=true",
                         out=tmp_path / "run"))
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    recs = wandb_records(run_dir)
    train_run = run_record(recs)
    assert any(r.artifact.type == "model" for r in recs
               if r.WhichOneof("record_type") == "artifact")  # the checkpoints, offline
    ckpt = torch.load(res["best"], map_location="cpu", weights_only=False)
    assert ckpt["dsr_wandb"]["id"] == train_run.run_id

    out = certify_tiny(tiny_pretrained, Path(res["best"]), tmp_path / "c", "system=rejection",
                       "N0=10", "N=50", "max=3", "logger=wandb", f"outdir={tmp_path / 'c'}")
    assert out["wandb_run"]
    (cdir,) = (tmp_path / "c" / "wandb").glob("offline-run-*")
    crecs = wandb_records(cdir)
    crun = run_record(crecs)
    assert crun.run_group == train_run.run_group and crun.job_type == "certify"
    assert list(crun.tags) == list(train_run.tags)  # the rejector's sigma, T and denoiser
    config = {u.key: u.value_json for r in crecs if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert json.loads(config["rejector_run_id"]) == train_run.run_id
    assert "certify/rejection/acr" in summary_keys(crecs)


# --- the paper as one command ------------------------------------------------------------------

def test_paper_experiment_is_the_papers_grid():
    cfg = compose("train", ["experiment=paper"])
    ch = cfg.hydra.runtime.choices
    assert (ch.classifier, ch.denoiser, ch.rejector, ch.optim, ch.certify, ch.data) == (
        "resnet110", "dncnn", "resnet34", "paper", "paper", "cifar10")
    assert cfg.T == 20 and (cfg.certify.N0, cfg.certify.N, cfg.certify.alpha,
                            cfg.certify.skip) == (100, 10_000, 0.01, 20)
    assert cfg.certify.systems == ["rejection", "denoised"]
    params = cfg.hydra.sweeper.params
    assert params.sigma == "0.12,0.25,0.5,1.0" and params.denoiser == "dncnn,memnet"
    jobs = [compose("train", ["experiment=paper", f"sigma={s}", f"denoiser={d}"])
            for s in (0.12, 1.0) for d in ("dncnn", "memnet")]
    paths = {j.denoiser.path for j in jobs}
    assert "pretrained_models/trained_denoisers/cifar10/mse_obj/memnet/epochs_90/noise_0.12/" \
           "checkpoint.pth.tar" in paths and len(paths) == 4


# --- the report of a sweep ----------------------------------------------------------------------

def write_results(path: Path, rows: list[tuple], settings: dict | None) -> Path:
    """A results file in the certify format (rows: idx label predict radius correct) and its
    settings record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(CERTIFY_COLUMNS)]
    for idx, label, pred, radius, correct in rows:
        lines.append("\t".join(map(str, (idx, label, pred, radius, correct, 0.5, 900, 0, 50, 1000,
                                         0.8, 0.8, 0.1, label))))
    path.write_text("\n".join(lines) + "\n")
    if settings is not None:
        Path(f"{path}.json").write_text(json.dumps({"format": 3, "mode": "certify", "N": 1000,
                                                    **settings}))
    return path


def setting(system, sigma, T=None, den="dncnn", obj="mse_obj", clf="c1", **extra):
    """A record's settings: each network by id (one rejector per σ and T)."""
    nets = {"classifier": {"id": clf, "recipe": {"name": "resnet8"}},
            "denoiser": {"id": f"{den}-{sigma}", "recipe": {"name": den}}}
    if system == "rejection":
        nets["rejector"] = {"id": f"{sigma}-{T}", "recipe": {"name": "rejector"}}
    return {"system": system, "sigma": sigma, "bound": "paper" if system == "rejection"
            else "cohen", "run": {"T": T, "denoiser": den, "objective": obj}, "networks": nets,
            **extra}


# four images each; by hand, at r = 0 / 0.25 / 0.5 and the ACR:
ROWS = {
    "A": [(0, 1, 1, 0.3, 1), (1, 2, 2, 0.6, 1), (2, 3, -1, 0.0, 0), (3, 4, 5, 0.2, 0)],
    # 50 / 50 / 25 %, ACR (0.3 + 0.6) / 4 = 0.225
    "B": [(0, 1, 1, 0.1, 1), (1, 2, 2, 0.2, 1), (2, 3, 3, 0.9, 1), (3, 4, -1, 0.0, 0)],
    # 75 / 25 / 25 %, ACR 1.2 / 4 = 0.3
    "C": [(0, 1, 1, 0.5, 1), (1, 2, 2, 0.5, 1), (2, 3, 3, 0.5, 1), (3, 4, 4, 0.5, 1)],
    # 100 / 100 / 100 %, ACR 0.5
}


def test_sweep_report_by_hand(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_results(sweep / "0_T=1" / "results" / "rej.tsv", ROWS["A"], setting("rejection", 0.25, 1))
    write_results(sweep / "1_T=2" / "results" / "rej.tsv", ROWS["B"], setting("rejection", 0.25, 2))
    write_results(sweep / "2_s0.5" / "results" / "rej.tsv", ROWS["C"], setting("rejection", 0.5, 2))
    base = setting("denoised", 0.25)
    write_results(sweep / "baselines" / "den.tsv", ROWS["B"], base)
    write_results(sweep / "copy" / "den.tsv", ROWS["B"], base)  # the same experiment again
    # two files of the reference scripts, no records, whose stems would collide
    write_results(sweep / "ref" / "sigma_0.25", ROWS["A"], None)
    write_results(sweep / "ref" / "sigma_0.50", ROWS["C"], None)
    run = sweep / "0_T=1"  # a training run's log: Table 1
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "stage: {name: rejector}\ndenoiser: {name: dncnn, objective: mse_obj}\nsigma: 0.25\nT: 1\n")
    (run / "csv").mkdir()
    pd.DataFrame({"epoch": [0, 0, 1], "train/epoch_time_s": [np.nan, 10.0, 14.0]}).to_csv(
        run / "csv" / "metrics.csv", index=False)

    assert len(find_results(sweep)) == 7
    assert report_main([str(sweep), "--radii", "0", "0.25", "0.5"]) == 0
    out = capsys.readouterr().out
    rep = sweep / "report"
    table = [ln for ln in out.splitlines() if ln.startswith("| 0.25 |") or ln.startswith("| 0.5 |")
             or ln.startswith("| – |")]
    # the numbers by hand; each also carries its 95 % interval (e.g. 2 of 4: [6.8, 93.2])
    assert "| 50.0 [6.8, 93.2] |" in table[0]
    # the two files of the reference scripts read alike by setting: a `which` column names them
    assert [re.sub(r" \[[^]]*\]", "", ln) for ln in table] == [
        "| – | – | – | – | – | sigma_0.25 | 50.0 | 50.0 | 25.0 | 0.225 | 4 | 25.0 |",
        "| – | – | – | – | – | sigma_0.50 | 100.0 | 100.0 | 100.0 | 0.500 | 4 | 0.0 |",
        "| 0.25 | – | dncnn | mse_obj | denoised |  | 75.0 | 25.0 | 25.0 | 0.300 | 4 | 25.0 |",
        "| 0.25 | 1 | dncnn | mse_obj | rejection |  | 50.0 | 50.0 | 25.0 | 0.225 | 4 | 25.0 |",
        "| 0.25 | 2 | dncnn | mse_obj | rejection |  | 75.0 | 25.0 | 25.0 | 0.300 | 4 | 25.0 |",
        "| 0.5 | 2 | dncnn | mse_obj | rejection |  | 100.0 | 100.0 | 100.0 | 0.500 | 4 | 0.0 |",
    ]
    assert "| rejector | dncnn | mse_obj | 0.25 | 1 | 2 | 12.0 |" in out  # Table 1
    md = (rep / "report.md").read_text()
    assert "**sigma_0.25**" in md and "**sigma_0.50**" in md  # labels never collapse to a stem
    assert "rejection dncnn (mse_obj) σ=0.25 T=1 (paper)" in md
    for png in ("certified_accuracy.png", "certified_accuracy_by_sigma.png", "accuracy_vs_T.png"):
        assert (rep / png).stat().st_size > 10_000, png

    # T does not vary: no T ablation
    other = tmp_path / "other"
    write_results(other / "a" / "rej.tsv", ROWS["A"], setting("rejection", 0.25, 2))
    write_results(other / "b" / "rej.tsv", ROWS["C"], setting("rejection", 0.5, 2))
    assert report_main([str(other)]) == 0
    assert not (other / "report" / "accuracy_vs_T.png").exists()
    assert (other / "report" / "certified_accuracy_by_sigma.png").is_file()
    # an empty folder is one clear error
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    assert "no results files below this folder" in capsys.readouterr().err
