"""Reports from hand-written result files whose numbers are worked out by hand below."""

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from dsr_lightning.reports import (
    abstain_rate,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_curve,
    clean_accuracy,
    count_histogram,
    default_radii,
    load_results,
    log_to_wandb,
    main,
    plot_certified_accuracy,
    plot_count_histogram,
    reject_fraction,
    summary_frame,
    summary_table,
    write_report,
)
from dsr_lightning.results import read_settings

HEADER = "idx label predict radius correct time n_A n_R n_B N pA_lower pAR_lower pB_upper c_hat"
# rejection system, N = 1000. Correct with radii 0.1 0.3 0.6 1.2; two abstain; two wrong with r > 0.
REJ_ROWS = [
    (0, 3, 3, 0.1, 1, 1.5, 800, 0, 150, 1000, 0.77, 0.77, 0.18, 3),
    (1, 5, 5, 0.3, 1, 1.5, 700, 100, 120, 1000, 0.66, 0.76, 0.14, 5),
    (2, 1, 1, 0.6, 1, 1.5, 650, 300, 30, 1000, 0.61, 0.92, 0.05, 1),
    (3, 7, 7, 1.2, 1, 1.5, 940, 50, 5, 1000, 0.92, 0.98, 0.01, 7),
    (4, 2, -1, 0.0, 0, 1.5, 200, 600, 150, 1000, 0.17, 0.77, 0.18, 2),
    (5, 4, -1, 0.0, 0, 1.5, 450, 0, 400, 1000, 0.41, 0.41, 0.44, 4),
    (6, 0, 9, 0.4, 0, 1.5, 500, 200, 250, 1000, 0.46, 0.66, 0.29, 9),
    (7, 6, 8, 0.8, 0, 2.5, 600, 150, 200, 1000, 0.56, 0.71, 0.24, 8),
]
# plain system (no rejector: n_R = 0). Correct with radii 0.2 and 0.5, one abstain, one wrong.
PLAIN_ROWS = [
    (0, 3, 3, 0.2, 1, 1.0, 600, 0, 300, 1000, 0.56, 0.56, 0.34, 3),
    (1, 5, 5, 0.5, 1, 1.0, 800, 0, 150, 1000, 0.77, 0.77, 0.18, 5),
    (2, 1, -1, 0.0, 0, 1.0, 480, 0, 470, 1000, 0.44, 0.44, 0.50, 1),
    (3, 7, 2, 0.3, 0, 1.0, 700, 0, 250, 1000, 0.66, 0.66, 0.28, 2),
]
# By hand, default radii 0, 0.25, ..., 1.25 (largest radius 1.2 rounded up to the 0.25 grid):
#   rejection: correct & r >= 0: 4/8 = 50.0 | >= 0.25: {0.3, 0.6, 1.2} 3/8 = 37.5
#              >= 0.5: 2/8 = 25.0 | >= 0.75: {1.2} 12.5 | >= 1.0: 12.5 | >= 1.25: 0.0;
#              ACR = (0.1+0.3+0.6+1.2)/8 = 0.275;
#              abstain 2/8 = 25.0 %; reject = (0+100+300+50+600+0+200+150)/8/1000 = 17.5 %.
#   plain:     2/4 = 50.0 | {0.5} 25.0 | 0.5 >= 0.5 counts: 25.0 | 0.0 | 0.0 | 0.0;
#              ACR = (0.2+0.5)/4 = 0.175; abstain 25.0 %; reject 0.0 %.
# Each certified accuracy carries its 95 % Clopper-Pearson interval over the images (e.g. 4 of 8:
# [beta.ppf(0.025, 4, 5), beta.ppf(0.975, 5, 4)] = [15.7, 84.3] %; tests/test_reports_evidence.py
# checks the bounds against scipy), the ACR its seeded percentile bootstrap interval.
EXPECTED_TABLE = """\
| system | r=0 | r=0.25 | r=0.5 | r=0.75 | r=1 | r=1.25 | ACR | images | abstain % | reject % |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| rejection σ=0.25 (paper) | 50.0 [15.7, 84.3] | 37.5 [8.5, 75.5] | 25.0 [3.2, 65.1] \
| 12.5 [0.3, 52.7] | 12.5 [0.3, 52.7] | 0.0 [0.0, 36.9] | 0.275 [0.037, 0.600] | 8 | 25.0 | 17.5 |
| plain σ=0.25 | 50.0 [6.8, 93.2] | 25.0 [0.6, 80.6] | 25.0 [0.6, 80.6] | 0.0 [0.0, 60.2] \
| 0.0 [0.0, 60.2] | 0.0 [0.0, 60.2] | 0.175 [0.000, 0.375] | 4 | 25.0 | 0.0 |
"""


def write_tsv(path, rows, header=HEADER, settings=None):
    lines = ["\t".join(header.split())] + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    if settings is not None:
        (path.parent / f"{path.name}.json").write_text(json.dumps(settings))
    return path


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    rej = write_tsv(d / "rej.tsv", REJ_ROWS, settings={
        "system": "rejection", "sigma": 0.25, "N0": 100, "N": 1000, "alpha": 0.001,
        "bound": "paper"})
    plain = write_tsv(d / "plain.tsv", PLAIN_ROWS, settings={"system": "plain", "sigma": 0.25,
                                                              "N": 1000, "bound": "paper"})
    return rej, plain


def test_load_matches_reference_reader(files):
    rej, _ = files
    df = load_results(rej)
    ref = pd.read_csv(rej, sep="\t")  # how Cohen et al.'s analysis scripts read it
    pd.testing.assert_frame_equal(df, ref)
    assert list(df.columns[:6]) == ["idx", "label", "predict", "radius", "correct", "time"]
    assert read_settings(rej)["bound"] == "paper" and read_settings(rej.parent / "x.tsv") == {}


def test_numbers_by_hand(files):
    df = load_results(files[0])
    acc = certified_accuracy(df, [0, 0.1, 0.25, 0.5, 0.6, 0.75, 1.0, 1.2, 1.25])
    # radius >= r is inclusive: at r = 0.1, 0.6, 1.2 the row with exactly that radius still counts
    np.testing.assert_array_equal(acc, [4 / 8, 4 / 8, 3 / 8, 2 / 8, 2 / 8, 1 / 8, 1 / 8, 1 / 8, 0])
    assert average_certified_radius(df) == pytest.approx(0.275, abs=1e-12)
    assert clean_accuracy(df) == 0.5 and abstain_rate(df) == 0.25
    assert reject_fraction(df) == pytest.approx(0.175, abs=1e-12)
    # a wrong prediction with a large radius adds nothing; N from settings when there is no column
    assert reject_fraction(df.drop(columns="N"), N=1000) == pytest.approx(0.175, abs=1e-12)
    assert reject_fraction(df.drop(columns="N")) is None
    assert reject_fraction(df.drop(columns="n_R"), N=1000) is None


def test_default_radii():
    np.testing.assert_allclose(default_radii(1.2), [0, 0.25, 0.5, 0.75, 1.0, 1.25])
    np.testing.assert_allclose(default_radii(0.3), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(default_radii(1.0), [0, 0.25, 0.5, 0.75, 1.0])
    assert default_radii(3.9)[-1] == 4.0 and len(default_radii(3.9)) == 17


def test_summary_table_exact(files):
    assert summary_table(files) == EXPECTED_TABLE
    frame = summary_frame(files)
    assert frame["images"].tolist() == [8, 4] and frame["time_s"].tolist() == [1.625, 1.0]


def test_summary_table_radii_and_labels(files):
    table = summary_table(files, radii=[0.5], labels=["ours", "a|b"])
    assert table.splitlines() == [
        "| system | r=0.5 | ACR | images | abstain % | reject % |",
        "|---|---:|---:|---:|---:|---:|",
        "| ours | 25.0 [3.2, 65.1] | 0.275 [0.037, 0.600] | 8 | 25.0 | 17.5 |",
        "| a\\|b | 25.0 [0.6, 80.6] | 0.175 [0.000, 0.375] | 4 | 25.0 | 0.0 |",
    ]
    with pytest.raises(ValueError, match="1 labels for 2 files"):
        summary_table(files, labels=["x"])
    # no rejection anywhere: no reject column; no settings: file stem; same settings: stem added
    rows = summary_table([files[1]], radii=[0]).splitlines()
    assert rows[0] == "| system | r=0 | ACR | images | abstain % |"
    bare = write_tsv(files[0].parent / "bare.tsv", PLAIN_ROWS)
    twin = write_tsv(files[0].parent / "twin.tsv", PLAIN_ROWS, settings={"system": "plain",
                                                                         "sigma": 0.25})
    labels = summary_frame([bare, files[1], twin], radii=[0])["label"].tolist()
    assert labels == ["bare", "plain σ=0.25 [plain]", "plain σ=0.25 [twin]"]
    (files[0].parent / "bare.tsv.json").write_text(json.dumps({"label": "my run"}))
    assert summary_frame([bare], radii=[0])["label"].tolist() == ["my run"]
    # a staged file says so: only its accuracy at the target compares with fixed-N files
    staged = write_tsv(files[0].parent / "staged.tsv", PLAIN_ROWS, settings={
        "system": "plain", "sigma": 0.25, "mode": "staged", "radius": 0.5})
    assert summary_frame([staged], radii=[0])["label"].tolist() == [
        "plain σ=0.25 [staged, target r=0.5]"]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_results(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match=r"empty.tsv: no header line \(an empty or torn file\)"):
        load_results(tmp_path / "empty.tsv")
    pred = write_tsv(tmp_path / "pred.tsv", [(0, 3, 3, 1, 0.5)],
                     header="idx label predict correct time")
    with pytest.raises(ValueError, match=r"pred.tsv: missing column\(s\) radius \(mode=predict"):
        load_results(pred)
    bad = write_tsv(tmp_path / "bad.tsv", [(0, 3)], header="idx predict")
    with pytest.raises(ValueError, match=r"bad.tsv: missing column\(s\) label, radius, correct"):
        load_results(bad)
    text = write_tsv(tmp_path / "text.tsv", [(0, 3, 3, "big", 1)],
                     header=" ".join(HEADER.split()[:5]))
    with pytest.raises(ValueError, match="text.tsv, line 2: column radius holds 'big', not a number"):
        load_results(text)
    (tmp_path / "j.tsv.json").write_text("{oops")
    with pytest.raises(ValueError, match="j.tsv.json: the settings record is corrupt"):
        read_settings(tmp_path / "j.tsv")
    # header only: zero rows, a table row of dashes, no crash
    head = write_tsv(tmp_path / "head.tsv", [])
    assert len(load_results(head)) == 0
    assert summary_table([head], radii=[0, 0.5]).splitlines()[2] == "| head | – | – | – | 0 | – |"


def check_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes
    img = imread(path)  # (H, W, 4) floats in [0, 1]
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert img.var() > 1e-3 and len(colours) > 20


def test_certified_accuracy_curve_is_exact(files):
    df = load_results(files[0])
    x, y = certified_accuracy_curve(df, 1.26)
    np.testing.assert_allclose(x, [0, 0.1, 0.3, 0.6, 1.2, 1.26])
    # value on (x[i-1], x[i]] is y[i] (drawn with where="pre"): it drops just after each radius
    np.testing.assert_allclose(y, [4 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0])


def test_plots(files, tmp_path):
    out = plot_certified_accuracy(files, tmp_path / "a" / "curve.png", title="CIFAR-10")
    check_png(out)
    check_png(plot_count_histogram(files[0], tmp_path / "counts.png", title="σ = 0.25"))
    h, xe, ye = count_histogram(load_results(files[0]), 1000, bins=50)  # 20 draws per bin
    assert h.shape == (50, 50) and h.sum() == 8 and xe[-1] == ye[-1] == 1000
    assert h[600 // 20, 200 // 20] == 1 and h[0, 800 // 20] == 1  # rows 4 and 0: [n_R, n_A]
    no_n = write_tsv(tmp_path / "no_n.tsv", [r[:9] for r in REJ_ROWS],
                     header=" ".join(HEADER.split()[:9]))
    with pytest.raises(ValueError, match="no_n.tsv: N unknown"):
        plot_count_histogram(no_n, tmp_path / "x.png")


def test_write_report(files, tmp_path):
    res = write_report(files, tmp_path / "rep")
    assert res["report"].read_text() == res["markdown"] and EXPECTED_TABLE in res["markdown"]
    check_png(res["certified_accuracy"])
    assert list(res["counts"]) == [str(files[0])]  # only the system with rejected draws
    assert res["counts"][str(files[0])].name == "counts_rej.png"
    check_png(res["counts"][str(files[0])])
    assert "![certified accuracy](certified_accuracy.png)" in res["markdown"]
    assert "(counts_rej.png)" in res["markdown"] and "counts_plain" not in res["markdown"]
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "certified_accuracy.png", "counts_rej.png", "report.md"]


def test_cli(files, capsys):
    assert main([str(f) for f in files]) == 0
    out = capsys.readouterr().out
    assert EXPECTED_TABLE in out
    rep = files[0].parent / "report"  # default: <first file's dir>/report
    for name in ("report.md", "certified_accuracy.png", "counts_rej.png"):
        assert (rep / name).is_file() and f"wrote {rep / name}" in out


def test_cli_options(files, tmp_path, capsys):
    code = main([str(files[1]), "--out", str(tmp_path / "o"), "--labels", "base",
                 "--radii", "0", "0.5"])
    assert code == 0
    assert ("| base | 50.0 [6.8, 93.2] | 25.0 [0.6, 80.6] | 0.175 [0.000, 0.375] | 4 | 25.0 |"
            in capsys.readouterr().out)
    assert not (tmp_path / "o" / "counts_plain.png").exists()


def test_cli_bad_file_exit_2(files, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.md").write_text("earlier")
    assert main([str(files[0]), str(tmp_path / "missing.tsv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.tsv" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.md"]  # nothing written, nothing removed
    bad = write_tsv(tmp_path / "bad.tsv", [(0, 1)], header="idx label")
    assert main([str(bad), "--out", str(out)]) == 2
    assert "bad.tsv: missing column(s) predict, radius, correct" in capsys.readouterr().err


class FakeRun:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


def test_log_to_wandb_fake_run(files, tmp_path):
    wandb = pytest.importorskip("wandb")
    run = FakeRun()
    log_to_wandb(run, files, tmp_path / "w")
    (data,) = run.logged
    table = data["report/summary"]
    assert isinstance(table, wandb.Table)
    assert table.columns[:3] == ["label", "file", "images"] and "acc@0.25" in table.columns
    rows = {r[0]: dict(zip(table.columns, r)) for r in table.data}
    assert rows["rejection σ=0.25 (paper)"]["acc@0.25"] == 3 / 8
    assert rows["plain σ=0.25"]["acr"] == pytest.approx(0.175)
    assert isinstance(data["report/certified_accuracy"], wandb.Image)
    assert isinstance(data["report/counts/rej"], wandb.Image) and "report/counts/plain" not in data
    assert not any(k.startswith("certify/") for k in data)  # scalars only for a single file
    one = FakeRun()
    log_to_wandb(one, files[:1], tmp_path / "w1")
    assert one.logged[0]["certify/rejection/acc@0.5"] == 0.25  # reports.wandb.metric_key
    assert one.logged[0]["certify/rejection/acr"] == pytest.approx(0.275)
    assert one.logged[0]["certify/rejection/reject"] == pytest.approx(0.175)
    assert one.logged[0]["certify/rejection/images"] == 8


class FakeJobRun(FakeRun):
    """What reports.wandb.log_certification uses of a W&B run besides log."""

    id = "fake"

    def __init__(self):
        super().__init__()
        self.summary, self.artifacts = {}, []

    def log_artifact(self, art):
        self.artifacts.append(art)


def test_job_and_report_log_one_key_scheme(files, tmp_path):
    """The certification job (log_certification) and the report (log_to_wandb) log a results
    file's numbers under the same keys, with the same values: certify/<system>/<name>."""
    pytest.importorskip("wandb")
    from dsr_lightning.reports.wandb import log_certification, metric_key

    assert metric_key("denoised", "acc@0.25") == "certify/denoised/acc@0.25"
    for path, system in zip(files, ("rejection", "plain")):
        job, report = FakeJobRun(), FakeRun()
        radii = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
        metrics = log_certification(job, system, path, radii)
        log_to_wandb(report, [path], tmp_path / f"w_{system}", radii=radii)
        scalars = {k: v for k, v in report.logged[0].items() if k.startswith("certify/")}
        assert scalars == pytest.approx(metrics) and job.summary == metrics
        assert set(metrics) == {metric_key(system, n) for n in (
            "acr", "abstain", "reject", "images", *(f"acc@{r:g}" for r in radii))}
        assert metrics[metric_key(system, "acc@0")] == 0.5


def test_cli_wandb_offline_by_default(files, tmp_path, monkeypatch, capsys):
    calls, run = [], FakeRun()
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run)
    real = pytest.importorskip("wandb")
    fake.Table, fake.Image = real.Table, real.Image
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert main([str(files[0]), "--out", str(tmp_path / "o"), "--wandb"]) == 0
    (kw,) = calls
    assert kw["project"] == "dsr_lightning" and kw["job_type"] == "report"
    assert kw["mode"] == "offline" and run.finished and "report/summary" in run.logged[0]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main([str(files[0]), "--out", str(tmp_path / "o"), "--wandb"]) == 0
    assert calls[1]["mode"] is None  # the environment decides


@pytest.mark.slow
def test_cli_real_wandb_offline(files, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "o"
    assert main([str(f) for f in files] + ["--out", str(out), "--wandb"]) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    media = {p.relative_to(run_dir / "files" / "media").as_posix().split("_")[0]
             for p in (run_dir / "files" / "media").rglob("*.*")}
    assert media == {"images/report/certified", "images/report/counts/rej", "table/report/summary"}
