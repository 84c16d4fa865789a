"""mode=staged in the certification pipeline on experiment=tiny: its columns and settings record,
agreement with the statistics (each row is certify_details of its stopping look), one stage equal
to mode=certify, resume and refusal of other staged settings, bad input, the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import MAX, N0, SIGMA, N, certify_tiny, copy_results, run_cli, snapshot

from dsr_lightning.errors import ConfigError, ResultsError
from dsr_lightning.results import CERTIFY_COLUMNS, REFERENCE_COLUMNS, STAGED_COLUMNS
from dsr_lightning.smoothing import staged_look

# the session's tiny rejector and shared runs: conftest's `rejector` and `runs`
ALPHA = 0.01
STAGES, WEIGHTS, RADIUS = [10, 20, N], [0.2, 0.3, 0.5], 0.02
# bound=paper by name: the session's random-init rejector never rejects (threshold +inf), and such
# an f_R is otherwise certified with bound=cohen (jobs.certification._never_rejecting)
STAGED = ["mode=staged", "bound=paper", f"radius={RADIUS}", f"stages=[{','.join(map(str, STAGES))}]",
          f"stage_weights=[{','.join(map(str, WEIGHTS))}]"]


@pytest.fixture(scope="module")
def staged_run(tiny_pretrained, rejector, once) -> Path:
    """The staged certification of the session's rejector, once per test run (conftest)."""
    made = once("staged", lambda out: {"outfile": certify_tiny(
        tiny_pretrained, rejector, out, "system=rejection", *STAGED)["outfile"]})
    return Path(made["outfile"])


def test_staged_results_file(staged_run, rejector):
    path = staged_run
    assert path.name.endswith(f"_paper_staged_r{RADIUS}.tsv")
    assert path.read_text().split("\n", 1)[0].split("\t") == STAGED_COLUMNS
    assert STAGED_COLUMNS[:6] == REFERENCE_COLUMNS and STAGED_COLUMNS[:14] == CERTIFY_COLUMNS
    df = pd.read_csv(path, sep="\t")
    assert list(df.columns) == STAGED_COLUMNS and df.idx.tolist() == list(range(MAX))
    assert ((df.predict == -1) == (df.radius == 0)).all()
    assert (df.correct == (df.predict == df.label).astype(int)).all()
    assert (df.N == np.array(STAGES)[df.stage]).all() and (df.draws == N0 + df.N).all()
    assert (df.target_radius == RADIUS).all()
    assert (df.certified_at_target == (df.radius >= RADIUS)).all()
    # each row is the decision of its stopping look (paper: it depends on n_A, n_R, N alone)
    counts = np.zeros((len(df), 11), dtype=np.int64)  # K = 10 real classes + reject
    rows = np.arange(len(df))
    counts[rows, df.c_hat], counts[:, 10] = df.n_A, df.n_R
    counts[rows, (df.c_hat + 1) % 10] = df.N - df.n_A - df.n_R  # B and the rest
    for s in np.unique(df.stage):
        at = (df.stage == s).to_numpy()
        d, certified, stop = staged_look(counts[at], df.c_hat[at].to_numpy(), s, STAGES, WEIGHTS,
                                         ALPHA, SIGMA, RADIUS, "paper")
        assert stop.all()  # certified at the target, hopeless, or the last look
        np.testing.assert_array_equal(df.certified_at_target[at], certified)
        np.testing.assert_allclose(df.pA_lower[at], d.pA_lower, rtol=1e-5)
        np.testing.assert_allclose(df.pAR_lower[at], d.pAR_lower, rtol=1e-5)
        np.testing.assert_allclose(df.radius[at], d.radius, rtol=1e-4, atol=1e-6)
    rec = json.loads(Path(f"{path}.json").read_text())
    assert {k: rec[k] for k in ("mode", "N0", "N", "alpha", "bound", "radius", "stages",
                                "stage_weights")} == {
        "mode": "staged", "N0": N0, "N": N, "alpha": ALPHA, "bound": "paper", "radius": RADIUS,
        "stages": STAGES, "stage_weights": WEIGHTS}
    assert Path(rec["files"]["rejector"]) == rejector.resolve() and "rejector" in rec["networks"]


def test_staged_saves_draws(staged_run):
    """Not vacuous on the tiny system: some images certified at the target before the last look,
    so they spent fewer draws than fixed N."""
    df = pd.read_csv(staged_run, sep="\t")
    assert (df.stage < len(STAGES) - 1).any() and df.draws.mean() < N0 + N


def test_one_stage_equals_certify_mode(runs, tiny_pretrained, rejector, tmp_path):
    """stages=[N], stage_weights=[1]: the same draws and certificates as mode=certify."""
    one = certify_tiny(tiny_pretrained, rejector, tmp_path, "system=rejection", "mode=staged",
                       "bound=paper", f"radius={RADIUS}", f"stages=[{N}]",
                       "stage_weights=[1.0]")["outfile"]
    a, b = pd.read_csv(runs("paper"), sep="\t"), pd.read_csv(one, sep="\t")
    cols = [c for c in CERTIFY_COLUMNS if c != "time"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert (b.stage == 0).all() and (b.certified_at_target == (b.radius >= RADIUS)).all()
    # the certify-mode record has none of the staged keys (a record names its mode's settings)
    rec = json.loads(Path(f"{runs('paper')}.json").read_text())
    assert not {"radius", "stages", "stage_weights"} & set(rec)


def test_staged_resume_and_refusal(staged_run, tiny_pretrained, rejector, tmp_path):
    """A staged file resumes under the same settings; another radius, stages or weights, or
    mode=certify on it, is refused and leaves it byte-identical."""
    out = copy_results(staged_run, tmp_path)
    full = out.read_text()
    header, *body = full.split("\n")[:-1]
    out.write_text(header + "\n" + "\n".join(body[:2]) + "\n")  # as if killed after 2 images
    res = certify_tiny(tiny_pretrained, rejector, tmp_path, "system=rejection", *STAGED,
                       f"outfile={out}")
    assert res["done_before"] == 2 and res["todo"] == MAX - 2
    a, b = pd.read_csv(staged_run, sep="\t"), pd.read_csv(out, sep="\t")
    assert b.idx.tolist() == list(range(MAX))
    pd.testing.assert_frame_equal(a.drop(columns="time").iloc[:2], b.drop(columns="time").iloc[:2])
    before = snapshot(out)
    for other, key in (("radius=0.03", "radius"), ("stages=[10,30,50]", "stages"),
                       ("stage_weights=[0.1,0.2,0.7]", "stage_weights"),
                       ("mode=certify", "mode")):
        overrides = [o for o in STAGED if o.split("=")[0] != other.split("=")[0]]
        with pytest.raises(ResultsError, match=rf"other settings \({key}: file"):
            certify_tiny(tiny_pretrained, rejector, tmp_path, "system=rejection", *overrides,
                         other, f"outfile={out}")
        assert snapshot(out) == before


BAD = {  # overrides on top of STAGED: what the error message must say
    "no radius": (["radius=null"], "set radius="),
    "radius 0": (["radius=0"], "radius=0.0: must be a finite number > 0"),
    "radius -1": (["radius=-1"], "radius=-1.0: must be a finite number > 0"),
    "decreasing": ([f"stages=[20,10,{N}]"], "strictly increasing"),
    "repeated": ([f"stages=[10,10,{N}]"], "strictly increasing"),
    "zero stage": ([f"stages=[0,10,{N}]"], "integer >= 1"),
    "sum": (["stage_weights=[0.2,0.3,0.6]"], "sum to 1"),
    "negative": (["stage_weights=[0.6,-0.1,0.5]"], "> 0"),
    "lengths": (["stage_weights=[0.5,0.5]"], "one weight per stage"),
    "N not last": ([f"N={2 * N}"], f"N={2 * N} must equal the last of stages"),
    "no stages": (["stages=[]", "stage_weights=[]"], "non-empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_staged_bad_input(runs, tiny_pretrained, rejector, tmp_path, case):
    """Each mistake is a ConfigError saying what is wrong; the results file is untouched."""
    out = copy_results(runs("paper"), tmp_path)
    before = snapshot(out)
    overrides, message = BAD[case]
    with pytest.raises(ConfigError, match=re.escape(message)):
        certify_tiny(tiny_pretrained, rejector, tmp_path, "system=rejection", *STAGED,
                     *overrides, f"outfile={out}")
    assert snapshot(out) == before


def test_staged_cli(tiny_pretrained, tmp_path, monkeypatch, capsys):
    """The command line as a user types it (list overrides), system=plain: a staged file
    (certify.py's entry point in process: Hydra parses the overrides as from a shell)."""
    out = tmp_path / "cli.tsv"
    monkeypatch.chdir(tiny_pretrained.cwd)
    rc = run_cli(["certify", "experiment=tiny", tiny_pretrained.override,
                  f"hydra.run.dir={tmp_path / 'run'}", "system=plain",
                  *(o for o in STAGED if o != "bound=paper"), f"N0={N0}",
                  f"N={N}", "max=2", f"outfile={out}"], monkeypatch)
    assert rc == 0, capsys.readouterr().err[-3000:]
    df = pd.read_csv(out, sep="\t")
    assert list(df.columns) == STAGED_COLUMNS and df.idx.tolist() == [0, 1]
    assert (df.n_R == 0).all() and df.pAR_lower.isna().all()  # cohen: no reject class
    assert json.loads(Path(f"{out}.json").read_text())["stages"] == STAGES
