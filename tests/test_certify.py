"""The certification pipeline end to end on experiment=tiny: the results file (columns, rows, the
settings record), the three systems, mode=predict, determinism, resume after a kill (torn line
included), refusal of other settings and of bad input (the file left byte-identical), DDP shards."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    CERTIFY_RUNS,
    MAX,
    N0,
    SIGMA,
    N,
    certify_tiny,
    cli,
    copy_results,
    env,
    error_lines,
    rows,
    snapshot,
)
from scipy.stats import binomtest, norm

from dsr_lightning.errors import ConfigError, ResultsError
from dsr_lightning.identity import system_id
from dsr_lightning.results import CERTIFY_COLUMNS, PREDICT_COLUMNS, REFERENCE_COLUMNS

RUNS = CERTIFY_RUNS  # name: overrides of one shared run (conftest's `runs`)
BOUNDS = {"paper": "paper", "runner_up": "runner_up", "denoised": "cohen", "plain": "cohen"}


@pytest.mark.parametrize("name", ["paper", "runner_up", "denoised", "plain"])
def test_results_file(runs, rejector, tiny_pretrained, name):
    path = runs(name)
    lines = path.read_text().split("\n")
    assert lines[0].split("\t") == CERTIFY_COLUMNS
    assert CERTIFY_COLUMNS[:6] == REFERENCE_COLUMNS == "idx label predict radius correct time".split()
    assert CERTIFY_COLUMNS[6:] == "n_A n_R n_B N pA_lower pAR_lower pB_upper c_hat".split()
    assert sum(ln.startswith("idx") for ln in lines) == 1 and lines[-1] == ""
    df = pd.read_csv(path, sep="\t")
    assert list(df.columns) == CERTIFY_COLUMNS and len(df) == MAX == len(lines) - 2
    assert df.idx.tolist() == list(range(MAX))
    assert ((df.predict == -1) == (df.radius == 0)).all() and (df.radius >= 0).all()
    assert (df.correct == (df.predict == df.label).astype(int)).all()
    assert (df.N == N).all() and (df.n_A + df.n_R + df.n_B <= df.N).all()
    assert df.c_hat.between(0, 9).all()
    cert = df[df.predict != -1]
    assert (cert.predict == cert.c_hat).all()
    # the radius is the bound's formula of the recorded lower/upper bounds (6 significant digits)
    bound = BOUNDS[name]
    if bound == "paper":
        rho = SIGMA / 2 * (norm.ppf(cert.pA_lower) + norm.ppf(cert.pAR_lower))
        assert df.pB_upper.isna().all() and df.pAR_lower.notna().all()
    elif bound == "runner_up":
        rho = SIGMA / 2 * (norm.ppf(cert.pA_lower) - norm.ppf(cert.pB_upper))
        assert df.pAR_lower.isna().all() and df.pB_upper.notna().all()
    else:
        rho = SIGMA * norm.ppf(cert.pA_lower)
        assert df.pAR_lower.isna().all() and df.pB_upper.isna().all()
        assert (df.n_R == 0).all()  # no rejector, no reject label
    np.testing.assert_allclose(cert.radius, rho, rtol=1e-4)

    rec = json.loads(Path(f"{path}.json").read_text())
    assert {k: rec[k] for k in ("mode", "system", "sigma", "N0", "N", "alpha", "bound")} == {
        "mode": "certify", "system": RUNS[name][0].split("=")[1], "sigma": SIGMA, "N0": N0, "N": N,
        "alpha": 0.01, "bound": bound}
    files, nets = rec["files"], rec["networks"]
    assert files["classifier"] and Path(files["classifier"]).is_file()
    assert (files["denoiser"] is None) == (name == "plain") == ("denoiser" not in nets)
    assert files["denoiser"] is None or Path(files["denoiser"]).is_file()
    # each network as built: its id, its recipe with the weights' hash and its probe outputs
    for fp in nets.values():
        assert len(fp["id"]) == 16 and len(fp["recipe"]["state_sha256"]) == 64
        assert fp["recipe"]["probe"]["shape"] == [3, 16, 16] and fp["recipe"]["probe"]["sketch"]
    if name in ("paper", "runner_up"):
        assert Path(files["rejector"]) == rejector.resolve() and "rejector" in nets
        assert Path(files["denoiser"]) == tiny_pretrained.denoisers[SIGMA]
    else:
        assert files["rejector"] is None and "rejector" not in nets
    # the file's name carries the system's id
    assert f"_{system_id(rec['system'], {r: fp['id'] for r, fp in nets.items()}, rec['threshold'])}_" \
        in path.name


def test_bounds_share_counts(runs):
    """Same seed and noise: paper and runner_up see the same counts; runner_up is never smaller."""
    a, b = pd.read_csv(runs("paper"), sep="\t"), pd.read_csv(runs("runner_up"), sep="\t")
    cols = ["idx", "label", "c_hat", "n_A", "n_R", "n_B", "N", "pA_lower"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert (b.radius >= a.radius - 1e-6).all()


def test_predict_mode(runs):
    path = runs("predict")
    assert path.name.endswith("_predict.tsv")
    assert path.read_text().split("\n", 1)[0].split("\t") == PREDICT_COLUMNS
    df = pd.read_csv(path, sep="\t")
    assert list(df.columns) == PREDICT_COLUMNS and df.idx.tolist() == list(range(MAX))
    assert (df.N == N).all() and (df.n_A + df.n_R + df.n_B <= df.N).all()
    assert (df.n_A >= df.n_B).all() and df.predict.between(-1, 9).all()
    assert (df.correct == (df.predict == df.label).astype(int)).all()
    # Algorithm 1: answer iff the two-sided test of the top two real classes passes at alpha
    p = [binomtest(a, a + b, 0.5).pvalue if a + b else 1.0 for a, b in zip(df.n_A, df.n_B)]
    assert ((df.predict != -1) == (np.array(p) <= 0.01)).all()
    assert json.loads(Path(f"{path}.json").read_text())["mode"] == "predict"


def test_deterministic(runs, tiny_pretrained, rejector, tmp_path):
    """Same seed and settings, fresh file: the same rows (all but the time column)."""
    again = Path(certify_tiny(tiny_pretrained, rejector, tmp_path, *RUNS["paper"])["outfile"])
    assert again != runs("paper")
    a, b = pd.read_csv(runs("paper"), sep="\t"), pd.read_csv(again, sep="\t")
    pd.testing.assert_frame_equal(a.drop(columns="time"), b.drop(columns="time"))


@pytest.mark.process
def test_resume_after_kill(tiny_pretrained, tmp_path):
    """A run killed mid-way (SIGKILL) resumes: no row lost or doubled, a torn last line is
    recomputed; other settings on the same file are refused and leave it byte-identical."""
    n_img = 12
    args = ["system=plain", "N0=10", "N=100", "batch=64", "images_per_step=1", f"max={n_img}",
            f"outfile={tmp_path / 'resume.tsv'}"]
    out = tmp_path / "resume.tsv"
    proc = subprocess.Popen(cli(tiny_pretrained, tmp_path / "run", *args),
                            cwd=tiny_pretrained.cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and len(out.read_text().split("\n")) >= 4):  # header + 2 rows
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no rows after 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    kept = out.read_text().split("\n")[1:-1]  # the whole rows (the kill may tear the last)
    done = [int(r.split("\t")[0]) for r in kept]
    assert 2 <= len(kept) < n_img and len(set(done)) == len(done)
    missing = min(set(range(n_img)) - set(done))
    with open(out, "a") as f:  # a torn line: the start of the next row, no newline
        f.write(f"{missing}\t3\t")

    res = certify_tiny(tiny_pretrained, None, tmp_path, *args)
    assert res["outfile"] == str(out) and res["done_before"] == len(kept)
    assert res["todo"] == n_img - len(kept)
    final = rows(out)
    assert final[: len(kept)] == kept  # nothing before the kill rewritten
    idx = [int(r.split("\t")[0]) for r in final]
    assert sorted(idx) == list(range(n_img)) and len(idx) == n_img
    df = pd.read_csv(out, sep="\t")
    assert len(df) == n_img and (df.N == 100).all() and df.notna()[["label", "n_A"]].all().all()
    # one image per step seeds its noise by its index: the same rows as a run never killed
    whole = pd.read_csv(certify_tiny(tiny_pretrained, None, tmp_path, *args,
                                     f"outfile={tmp_path / 'whole.tsv'}")["outfile"], sep="\t")
    pd.testing.assert_frame_equal(df.sort_values("idx", ignore_index=True).drop(columns="time"),
                                  whole.drop(columns="time"))

    # a finished file: rerunning does nothing, other settings are refused, nothing changes
    before = snapshot(out)
    assert certify_tiny(tiny_pretrained, None, tmp_path, *args)["todo"] == 0
    assert snapshot(out) == before
    for other in ("N=200", "alpha=0.05", "sigma=0.5", "seed=1", "N0=20"):
        with pytest.raises(ResultsError, match=rf"other settings \({other.split('=')[0]}: file"):
            certify_tiny(tiny_pretrained, None, tmp_path, *args, other, f"outfile={out}")
        assert snapshot(out) == before


def test_merge_shards_of_killed_run(runs, tiny_pretrained, rejector, tmp_path):
    """Shard files of a killed multi-device run (each with a torn tail) and a results file torn
    mid-merge are folded in on the next run: every index once, every row whole."""
    ref = runs("plain")
    out = copy_results(ref, tmp_path)
    header, *body = out.read_text().split("\n")[:-1]  # 4 rows: idx 0..3
    out.write_text(header + "\n" + body[0] + "\n" + body[1][:5])  # torn while merging
    record = Path(f"{out}.json").read_text()
    Path(f"{out}.rank0").write_text(body[1] + "\n" + body[3][:3])  # idx 1, torn idx 3
    Path(f"{out}.rank1").write_text(body[2] + "\n")  # idx 2
    for r in (0, 1):  # each shard carries the settings it was written under
        Path(f"{out}.rank{r}.json").write_text(record)
    res = certify_tiny(tiny_pretrained, rejector, tmp_path, "system=plain", f"outfile={out}")
    assert res["todo"] == 1  # idx 3 only
    assert not list(tmp_path.glob(f"{out.name}.rank*"))
    final = rows(out)
    assert final[:3] == body[:3]
    df = pd.read_csv(out, sep="\t")
    assert df.idx.tolist() == [0, 1, 2, 3] and df.notna()[["label", "N", "n_A"]].all().all()


@pytest.mark.parametrize("shard", ["other seed", "no record"])
def test_shards_carry_their_identity(runs, tiny_pretrained, tmp_path, shard):
    """A shard of a killed multi-device run is folded in only under its own settings: one written
    with another seed, or one without its record, is refused and the results file is untouched."""
    out = copy_results(runs("plain"), tmp_path)
    header, *body = out.read_text().split("\n")[:-1]
    out.write_text(header + "\n" + body[0] + "\n")
    part = Path(f"{out}.rank0")
    part.write_text(body[1] + "\n")
    if shard == "other seed":
        rec = json.loads(Path(f"{out}.json").read_text())
        Path(f"{part}.json").write_text(json.dumps({**rec, "seed": 1}))
    before = snapshot(out)
    with pytest.raises(ResultsError, match=r"rank0: a shard (of a run with other settings "
                                           r"\(seed: file 1 vs now 0|without its settings record)"):
        certify_tiny(tiny_pretrained, None, tmp_path, "system=plain", f"outfile={out}")
    assert snapshot(out) == before and part.read_text() == body[1] + "\n"


BAD = {  # overrides: what the error message must say
    "missing rejector": (["rejector_ckpt=/nonexistent/best.ckpt"], "rejector checkpoint not found"),
    "no rejector": (["rejector_ckpt=null"], "needs rejector_ckpt"),
    "sigma of rejector": (["sigma=0.5"], "trained for sigma=0.25"),
    "missing denoiser": (["system=denoised", "rejector_ckpt=null",
                          "denoiser.path=/nonexistent/d.pth.tar"], "denoiser checkpoint not found"),
    "missing classifier": (["system=denoised", "rejector_ckpt=null",
                            "classifier.path=/nonexistent/c.pth.tar"],
                           "classifier checkpoint not found"),
    "baseline sigma of rejector": (["system=denoised", "sigma=0.5"], "trained for sigma=0.25"),
    "sigma of denoiser": (["system=denoised", "rejector_ckpt=null", "sigma=1.0",
                          "denoiser.path=${pretrained_root}/"
                           "trained_denoisers/${data.name}/mse_obj/dncnn_tiny/noise_0.50/"
                           "checkpoint.pth.tar"], "trained for sigma=0.5"),
    "N0 > N": (["N0=200", "N=100"], "N0=200 > N=100"),
    "alpha 0": (["alpha=0"], "alpha=0.0: must be a number in (0, 1)"),
    "alpha 1": (["alpha=1"], "alpha=1.0: must be a number in (0, 1)"),
    "alpha 1.5": (["alpha=1.5"], "alpha=1.5: must be a number in (0, 1)"),
    "alpha -0.1": (["alpha=-0.1"], "alpha=-0.1: must be a number in (0, 1)"),
    "paper without rejector": (["system=plain", "bound=paper"], "bound=paper needs a reject"),
    "runner_up without rejector": (["system=denoised", "bound=runner_up"], "needs a reject"),
    "unknown system": (["system.name=foo"], "system='foo'"),
    "unknown bound": (["bound=cp"], "bound='cp': choose one of paper, runner_up, cohen"),
    "unknown mode": (["mode=guess"], "mode='guess'"),
    "N 0": (["N=0", "N0=0"], "must be an integer >= 1"),
    "unknown split": (["split=validation"], "split='validation'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_refused(runs, tiny_pretrained, rejector, tmp_path, case):
    """Each mistake is a ConfigError that says what is wrong; the existing results file that the
    run would write to is untouched (and its settings record)."""
    out = copy_results(runs("paper"), tmp_path)
    before = snapshot(out)
    overrides, message = BAD[case]
    with pytest.raises(ConfigError, match=re.escape(message)):
        certify_tiny(tiny_pretrained, rejector, tmp_path, *overrides, f"outfile={out}")
    assert snapshot(out) == before


@pytest.mark.process
def test_cli_error(runs, tiny_pretrained, tmp_path):
    """The CLI: exit code 2, one 'error:' line on stderr, the results file untouched."""
    out = copy_results(runs("paper"), tmp_path)
    before = snapshot(out)
    r = subprocess.run(cli(tiny_pretrained, tmp_path / "run",
                           "rejector_ckpt=/nonexistent/best.ckpt", f"outfile={out}"),
                       cwd=tiny_pretrained.cwd, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "rejector checkpoint not found: /nonexistent/best.ckpt" in errors[0]
    assert "Traceback" not in r.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_ddp_shards_merge(tiny_pretrained, tmp_path):
    """trainer=ddp on CPU (2 processes): 5 images (uneven shards), then resumed to 6 (one image
    for two ranks): each index exactly once, sorted, no part files left, and the same rows as one
    process (one image per step seeds its noise by its index)."""
    args = ["system=plain", "N0=10", "N=50", "images_per_step=1", f"outdir={tmp_path / 'ddp'}"]
    for n_img in (5, 6):
        r = subprocess.run(cli(tiny_pretrained, tmp_path / "run", *args, f"max={n_img}",
                               "trainer=ddp", "trainer.accelerator=cpu"),
                           cwd=tiny_pretrained.cwd, env=env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "MEMBER: 2/2" in r.stdout + r.stderr  # two processes took part
        files = list((tmp_path / "ddp").iterdir())
        assert sorted(p.suffix for p in files) == [".json", ".tsv"]  # no .rank* part left
        tsv = next(p for p in files if p.suffix == ".tsv")
        assert sum(ln.startswith("idx") for ln in tsv.read_text().split("\n")) == 1
        df = pd.read_csv(tsv, sep="\t")
        assert df.idx.tolist() == list(range(n_img))
    one = certify_tiny(tiny_pretrained, None, tmp_path / "one", *args, "max=6",
                       f"outdir={tmp_path / 'one'}")["outfile"]
    pd.testing.assert_frame_equal(df.drop(columns="time"),
                                  pd.read_csv(one, sep="\t").drop(columns="time"))
