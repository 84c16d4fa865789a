"""The reports' evidence and trust rules, on hand-written results files whose numbers are worked
out by hand: 95 % intervals, paired comparisons (McNemar), per-class views, staged files, folder
reports that skip what they cannot read and list failed jobs, refused radii, one read per file."""

import json
import math

import numpy as np
import pytest
from scipy.stats import beta, binom

import dsr_lightning.reports.report as report_module
import dsr_lightning.reports.tables as tables_module
import dsr_lightning.results as results_module
from dsr_lightning.reports import (
    acr_interval,
    certified_accuracy,
    clopper_pearson,
    load_results,
    main,
    markdown_table,
    per_class_frame,
    read_result,
    reject_by_predicted_class,
    summary_frame,
)
from dsr_lightning.results import CERTIFY_COLUMNS, COLUMNS, ResultsFile

DATA = {"name": "CIFAR10DataModule", "split_size": 100, "sha256": "a" * 64}


def nets(classifier="c1", denoiser="d1", rejector=None) -> dict:
    """The `networks` entry of a record: each network by id (and a name for the labels)."""
    out = {"classifier": {"id": classifier, "recipe": {"name": "resnet110"}},
           "denoiser": {"id": denoiser, "recipe": {"name": "dncnn"}}}
    if rejector:
        out["rejector"] = {"id": rejector, "recipe": {"name": "rejector"}}
    return out


def settings(**over):
    base = {"format": 3, "mode": "certify", "system": "denoised", "sigma": 0.25, "N0": 100,
            "N": 1000, "alpha": 0.001, "bound": "cohen", "split": "test", "seed": 0,
            "noise": "philox-v1", "data": DATA, "networks": nets()}
    if over.get("system") == "rejection":
        base.update(bound="paper", networks=nets(rejector="r1"))
    return {**base, **over}


def row(idx, label, predict, radius, correct, n_R=0, c_hat=None, **extra):
    return {"idx": idx, "label": label, "predict": predict, "radius": float(radius),
            "correct": correct, "time": 0.5, "n_A": 900 - n_R, "n_R": n_R, "n_B": 50, "N": 1000,
            "pA_lower": 0.8, "pAR_lower": 0.8, "pB_upper": 0.1,
            "c_hat": predict if c_hat is None else c_hat, **extra}


def write(path, rows, st=None, columns=CERTIFY_COLUMNS):
    f = ResultsFile(path, st if st is not None else settings(), columns)
    f.open()
    f.append(rows)
    return path


def certified_rows(flags, radius=0.5, start=0):
    """One row per flag: correct with `radius` (1) or wrong, radius 0 (0)."""
    return [row(start + i, 0, 0 if f else 1, radius if f else 0.0, int(f))
            for i, f in enumerate(flags)]


# -- 1. intervals -------------------------------------------------------------------------------
def test_clopper_pearson_against_beta_quantiles(tmp_path):
    lo, hi = clopper_pearson([23, 0, 100], 100)
    assert lo[0] == pytest.approx(beta.ppf(0.025, 23, 78), abs=1e-12)
    assert hi[0] == pytest.approx(beta.ppf(0.975, 24, 77), abs=1e-12)
    assert lo[1] == 0 and hi[1] == pytest.approx(beta.ppf(0.975, 1, 100), abs=1e-12)
    assert hi[2] == 1 and lo[2] == pytest.approx(beta.ppf(0.025, 100, 1), abs=1e-12)
    # 23 of 100 images certified at r = 0.25: the table's cell and the frame's bounds
    path = write(tmp_path / "a.tsv", certified_rows([1] * 23 + [0] * 77, radius=0.3))
    frame = summary_frame([path], radii=[0.25])
    assert frame["acc@0.25"][0] == 0.23
    assert frame["lo@0.25"][0] == pytest.approx(beta.ppf(0.025, 23, 78), abs=1e-12)
    assert frame["hi@0.25"][0] == pytest.approx(beta.ppf(0.975, 24, 77), abs=1e-12)
    cell = (f"23.0 [{100 * beta.ppf(0.025, 23, 78):.1f}, {100 * beta.ppf(0.975, 24, 77):.1f}]")
    assert cell == "23.0 [15.2, 32.5]" and f"| {cell} |" in markdown_table(frame)


def test_acr_bootstrap_interval(tmp_path):
    rng = np.random.default_rng(1)
    radii = rng.uniform(0, 1, 200).round(6)
    path = write(tmp_path / "a.tsv", [row(i, 0, 0, r, 1) for i, r in enumerate(radii)])
    df = load_results(path)
    lo, hi = acr_interval(df)
    assert (lo, hi) == acr_interval(df)  # seeded: the same interval every time
    # about the normal interval mean ± 1.96 sd / sqrt(n) of 200 draws
    half = 1.96 * radii.std(ddof=1) / math.sqrt(len(radii))
    assert lo < radii.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    frame = summary_frame([path], radii=[0])
    assert (frame["acr_lo"][0], frame["acr_hi"][0]) == (lo, hi)
    assert f"{radii.mean():.3f} [{lo:.3f}, {hi:.3f}]" in markdown_table(frame)


def test_report_states_what_the_intervals_mean(tmp_path):
    path = write(tmp_path / "a.tsv", certified_rows([1, 0, 1, 1]))
    assert main([str(path), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "probability ≥ 1 − α" in md and "α = 0.001" in md
    assert "choice of test images" in md and "Clopper–Pearson" in md


# -- B. exact radii, staged files ---------------------------------------------------------------
def test_exact_radii_are_not_rounded(tmp_path):
    # written as repr floats: 0.49999951 is below 0.5 and never counts there
    path = write(tmp_path / "a.tsv", [row(0, 0, 0, 0.49999951, 1), row(1, 0, 0, 0.5, 1)])
    assert "0.49999951" in path.read_text()
    np.testing.assert_array_equal(certified_accuracy(load_results(path), [0.4999995, 0.5]),
                                  [1.0, 0.5])


def test_staged_accuracy_from_certified_at_target(tmp_path):
    st = settings(mode="staged", radius=0.5, stages=[100, 1000], stage_weights=[0.3, 0.7])
    rows = [row(0, 0, 0, 0.7, 1, stage=0, draws=200, target_radius=0.5, certified_at_target=1),
            row(1, 0, 0, 0.6, 1, stage=1, draws=1100, target_radius=0.5, certified_at_target=1),
            # the column says: not certified at the target, whatever the radius column holds
            row(2, 0, 0, 0.9, 1, stage=1, draws=1100, target_radius=0.5, certified_at_target=0),
            row(3, 1, 2, 0.8, 0, stage=0, draws=200, target_radius=0.5, certified_at_target=1)]
    path = write(tmp_path / "s.tsv", rows, st, COLUMNS["staged"])
    acc = certified_accuracy(load_results(path), [0, 0.5, 0.75])
    assert acc[1] == 2 / 4 and np.isnan(acc[0]) and np.isnan(acc[2])
    frame = summary_frame([path], radii=[0, 0.25])  # the target joins the radii
    assert frame.attrs["radii"] == [0, 0.25, 0.5] and math.isnan(frame["acr"][0])
    line = markdown_table(frame).splitlines()[2]
    lo, hi = beta.ppf(0.025, 2, 3), beta.ppf(0.975, 3, 2)
    assert line.split(" | ")[1:5] == ["n/a", "n/a", f"50.0 [{100 * lo:.1f}, {100 * hi:.1f}]",
                                      "n/a"]


# -- B. folder reports: skipped files, failed jobs, refused radii --------------------------------
def test_folder_skips_predict_and_empty_files_and_lists_failed_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write(sweep / "0" / "results" / "den.tsv", certified_rows([1, 1, 0, 1]))
    pred = sweep / "1" / "results" / "pred.tsv"
    write(pred, [{"idx": 0, "label": 1, "predict": 1, "correct": 1, "time": 0.1, "n_A": 9,
                  "n_R": 0, "n_B": 1, "N": 10}], settings(mode="predict"), COLUMNS["predict"])
    empty = write(sweep / "2" / "results" / "empty.tsv", [], settings(seed=5))
    (sweep / "3").mkdir()
    (sweep / "3" / "FAILED.json").write_text(json.dumps({
        "job": 3, "overrides": ["T=2", "sigma=0.5"], "error": "boom\nmore", "type": "ValueError",
        "folder": str(sweep / "3")}))
    assert main([str(sweep), "--radii", "0", "0.5"]) == 0
    cap = capsys.readouterr()
    assert f"skipped {pred}: mode=predict" in cap.err and f"skipped {empty}: no rows" in cap.err
    assert f"1 failed job: job 3 (T=2 sigma=0.5): ValueError: boom [{sweep / '3'}]" in cap.out
    md = (sweep / "report" / "report.md").read_text()
    assert "## Skipped files" in md and f"skipped {pred}" in md and f"skipped {empty}" in md
    assert "## Failed jobs" in md and "job 3 (T=2 sigma=0.5): ValueError: boom" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| denoised")]
    assert len(table) == 1 and "nan" not in md.lower().split("## files")[0]


@pytest.mark.parametrize("bad", ["nan", "inf", "-0.5"])
def test_bad_radii_exit_2(tmp_path, capsys, bad):
    path = write(tmp_path / "a.tsv", certified_rows([1, 0]))
    assert main([str(path), "--out", str(tmp_path / "o"), "--radii", "0", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --radii must be finite and >= 0")
    assert not (tmp_path / "o").exists()
    assert main(["compare", str(path), str(path), "--radii", bad]) == 2
    assert capsys.readouterr().err.startswith("error: --radii")


def test_each_file_read_once(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    rej = write(sweep / "a" / "rej.tsv", [row(i, i % 3, i % 3, 0.4, 1, n_R=100)
                                          for i in range(6)], settings(system="rejection"))
    den = write(sweep / "b" / "den.tsv", certified_rows([1, 0, 1, 0, 1, 1]))
    rows, records = [], []
    read_rows, read_settings = results_module.read_rows, results_module.read_settings

    def counting_rows(path, *a, **k):
        rows.append(str(path))
        return read_rows(path, *a, **k)

    def counting_settings(path, *a, **k):
        records.append(str(path))
        return read_settings(path, *a, **k)

    monkeypatch.setattr(results_module, "read_rows", counting_rows)
    for module in (report_module, tables_module):
        monkeypatch.setattr(module, "read_settings", counting_settings)
    assert main([str(sweep)]) == 0
    assert sorted(rows) == sorted(records) == sorted([str(rej), str(den)])


# -- 2. paired comparisons ----------------------------------------------------------------------
# 12 shared images at r = 0.5: both 3, A only 1, B only 7, neither 1 (B holds 2 more images)
A_FLAGS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
B_FLAGS = [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0]


def pair(tmp_path, **b_settings):
    a = write(tmp_path / "a.tsv", certified_rows(A_FLAGS), settings(system="rejection"))
    b = write(tmp_path / "b.tsv", certified_rows(B_FLAGS) + certified_rows([1, 1], start=12),
              settings(**b_settings))
    return a, b


def test_mcnemar_exact_by_hand(tmp_path, capsys):
    a, b = pair(tmp_path)
    assert main(["compare", str(a), str(b), "--radii", "0", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "12 shared images" in out
    p = 2 * binom.cdf(1, 8, 0.5)
    assert p == 0.0703125
    assert "| 0.5 | 1 | 7 | 3 | 1 | 0.07031 |" in out  # A only, B only, both, neither, p
    assert "| 0 | 1 | 7 | 3 | 1 | 0.07031 |" in out  # wrong rows have radius 0: the same at r = 0
    # ACR(A) - ACR(B) on the shared images: (4 - 10) * 0.5 / 12 = -0.25, with its interval
    from dsr_lightning.reports import compare

    cmp = compare(read_result(a), read_result(b), [0.5])
    assert cmp.shared == 12 and cmp.table["p"][0] == pytest.approx(p, abs=1e-12)
    assert cmp.acr_difference == pytest.approx(-0.25, abs=1e-12)
    assert cmp.acr_lo < -0.25 < cmp.acr_hi < 0.1
    assert "No difference between" in out  # p = 0.07 > 0.05


@pytest.mark.parametrize("key,value", [("seed", 1), ("data", {**DATA, "sha256": "b" * 64}),
                                       ("split", "val"), ("noise", "other")])
def test_pairing_refused_for_other_images_or_noise(tmp_path, capsys, key, value):
    a, b = pair(tmp_path, **{key: value})
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{key} differs" in err[0]


def test_folder_compares_rejection_with_its_baseline(tmp_path, capsys):
    d = tmp_path / "runs"
    a = write(d / "rej.tsv", certified_rows([1] * 10 + [0] * 2), settings(system="rejection"))
    b = write(d / "den.tsv", certified_rows([1] * 1 + [0] * 11))
    write(d / "other_seed.tsv", certified_rows([1] * 12), settings(seed=7))
    assert main([str(d), "--radii", "0.5"]) == 0
    md = (d / "report" / "report.md").read_text()
    section = md.split("## Paired comparison")[1].split("\n## ")[0]
    # both 1, A only 9, B only 0: p = 2 * 0.5**9
    assert f"`{a}`" in section and f"`{b}`" in section and "other_seed" not in section
    assert "| 0.5 | 9 | 0 | 1 | 2 | 0.003906 |" in section
    assert "differ significantly at 5 %" in section and "rejection" in section.split(
        "significantly")[1]


def test_pairing_follows_the_networks_in_a_sweep_over_two_denoisers(tmp_path):
    """A sweep over two denoisers at one σ (experiment=paper's DnCNN and MemNet): each rejection
    file is compared with the baseline of ITS classifier and denoiser, never the other denoiser's;
    a rejection file whose baseline is absent, or whose record names no networks (an earlier
    release), gets "no baseline"."""
    d = tmp_path / "sweep"
    rej_d1 = write(d / "0" / "rej.tsv", certified_rows([1] * 10 + [0] * 2),
                   settings(system="rejection", networks=nets("c1", "dncnn", "r1")))
    rej_d2 = write(d / "1" / "rej.tsv", certified_rows([1] * 6 + [0] * 6),
                   settings(system="rejection", networks=nets("c1", "memnet", "r2")))
    base_d1 = write(d / "baselines" / "den_d1.tsv", certified_rows([1] * 1 + [0] * 11),
                    settings(networks=nets("c1", "dncnn")))
    base_d2 = write(d / "baselines" / "den_d2.tsv", certified_rows([1] * 6 + [0] * 6),
                    settings(networks=nets("c1", "memnet")))
    lone = write(d / "2" / "rej.tsv", certified_rows([1] * 12),
                 settings(system="rejection", networks=nets("c2", "dncnn", "r3")))
    old = write(d / "3" / "rej.tsv", certified_rows([1] * 12),
                {k: v for k, v in settings(system="rejection", format=2).items()
                 if k != "networks"})
    results = [read_result(p) for p in (rej_d1, rej_d2, base_d2, base_d1, lone, old)]
    from dsr_lightning.reports.compare import pair_rejection_with_baseline

    assert pair_rejection_with_baseline(results) == [(0, 3), (1, 2), (4, None), (5, None)]
    assert main([str(d), "--radii", "0.5"]) == 0
    section = (d / "report" / "report.md").read_text().split("## Paired comparison")[1]
    section = section.split("\n## ")[0]
    assert "| 0.5 | 9 | 0 | 1 | 2 | 0.003906 |" in section  # rej_d1 against base_d1
    assert "| 0.5 | 0 | 0 | 6 | 6 | 1 |" in section  # rej_d2 against base_d2: the same rows
    assert section.count("no baseline among these files") == 2


def test_a_report_merges_only_identical_files(tmp_path):
    """Two files of one identity are one experiment only when their rows are the same (a baseline
    certified by several jobs); with other rows both are shown, and their labels differ."""
    d = tmp_path / "runs"
    write(d / "a" / "den.tsv", certified_rows([1] * 4 + [0] * 2))
    write(d / "b" / "den.tsv", certified_rows([1] * 4 + [0] * 2))  # a copy
    write(d / "c" / "den.tsv", certified_rows([1] * 2 + [0] * 4))  # same identity, other rows
    assert main([str(d), "--radii", "0.5"]) == 0
    frame = summary_frame(sorted(d.rglob("den.tsv")), radii=[0.5])
    md = (d / "report" / "report.md").read_text()
    table = md.split("## Files")[0]
    assert table.count("| denoised σ=0.25") == 2  # a (or its copy b), and c
    assert len(set(frame["label"])) == 3


def test_labels_never_read_alike(tmp_path):
    """Files whose descriptions coincide are told apart by what differs in their records (the
    classifier, N, ...), else by the shortest tail of their paths."""
    d = tmp_path / "runs"
    paths = [write(d / "x" / "results" / "rej.tsv", certified_rows([1, 0]),
                   settings(system="rejection", networks=nets("c1", "d1", "r1"))),
             write(d / "y" / "results" / "rej.tsv", certified_rows([1, 0]),
                   settings(system="rejection", networks=nets("c2", "d1", "r1"))),
             write(d / "u" / "results" / "den.tsv", certified_rows([1, 0]), settings()),
             write(d / "v" / "results" / "den.tsv", certified_rows([1, 0]), settings())]
    labels = summary_frame(paths, radii=[0])["label"].tolist()
    assert len(set(labels)) == 4
    assert labels[0].endswith("[classifier=resnet110#c1]")
    assert labels[1].endswith("[classifier=resnet110#c2]")
    assert labels[2].endswith("[u/results/den]") and labels[3].endswith("[v/results/den]")
    grouped = markdown_table(summary_frame(paths, radii=[0]), grouped=True)
    rows = [ln for ln in grouped.splitlines()[2:]]
    assert len(set(rows)) == 4 and "which" in grouped.splitlines()[0]


def test_T_panels_group_by_setting(tmp_path):
    """Certified accuracy against T: one panel per setting (here two classifiers), never an
    average over files that differ in anything but T."""
    from dsr_lightning.reports.plots import t_ablation_groups

    d = tmp_path / "runs"
    paths = []
    for clf in ("c1", "c2"):
        for T in (1, 2):
            st = settings(system="rejection", networks=nets(clf, "d1", f"r-{clf}-{T}"),
                          run={"T": T, "denoiser": "dncnn", "objective": "mse_obj"})
            paths.append(write(d / f"{clf}{T}" / "rej.tsv", certified_rows([1] * T + [0]), st))
    groups = t_ablation_groups(summary_frame(paths, radii=[0]))
    assert len(groups) == 2
    assert [sorted(g["T"]) for g in groups] == [[1, 2], [1, 2]]
    assert [g["classifier"].nunique() for g in groups] == [1, 1]


# -- 3. per class -------------------------------------------------------------------------------
def test_per_class_by_hand(tmp_path):
    rows = [row(0, 3, 3, 0.6, 1, n_R=100), row(1, 3, 3, 0.2, 1, n_R=300),
            row(2, 3, 5, 0.4, 0, n_R=500), row(3, 5, 5, 0.9, 1, n_R=0),
            row(4, 5, -1, 0.0, 0, n_R=800, c_hat=3)]
    path = write(tmp_path / "a.tsv", rows, settings(system="rejection"))
    res = read_result(path)
    frame = per_class_frame(res, [0, 0.5])
    assert frame["class"].tolist() == ["3 cat", "5 dog"] and frame["images"].tolist() == [3, 2]
    assert frame["acc@0"].tolist() == [2 / 3, 1 / 2] and frame["acc@0.5"].tolist() == [1 / 3, 1 / 2]
    assert frame["reject"].tolist() == pytest.approx([0.3, 0.4])  # (100+300+500)/3, (0+800)/2
    pred = reject_by_predicted_class(res)  # c_hat: 3, 3, 5, 5, 3
    assert pred["class"].tolist() == ["3 cat", "5 dog"] and pred["images"].tolist() == [3, 2]
    assert pred["reject"].tolist() == pytest.approx([0.4, 0.25])  # (100+300+800)/3, (500+0)/2
    # not CIFAR-10: the label index
    other = write(tmp_path / "b.tsv", rows, settings(data={**DATA, "name": "SyntheticDataModule"}))
    assert per_class_frame(read_result(other), [0])["class"].tolist() == ["3", "5"]
    assert main([str(path), "--radii", "0", "0.5", "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    per_class = md.split("## Per class")[1]
    assert "| 3 cat | 3 | 66.7 | 33.3 | 30.0 |" in per_class
    assert "| 5 dog | 2 | 25.0 |" in per_class.split("per predicted class")[1]


# -- 4. the attack beside the certificates ------------------------------------------------------
def test_folder_report_puts_the_attack_beside_certified_accuracy(tmp_path, capsys):
    folder = tmp_path / "out"
    write(folder / "den.tsv", certified_rows([1, 1, 0, 1]))

    def attack_row(idx, predict, radius, attacked):
        return {**row(idx, 0, predict, radius, int(predict == 0)), "clean_predict": predict,
                "attacked_predict": attacked, "attacked_correct": int(attacked == 0),
                "perturbation_norm": 0.25, "epsilon": 0.25}

    # image 1 is certified at ε = 0.25 yet attacked into class 2: the soundness alarm
    rows = [attack_row(0, 0, 0.4, 0), attack_row(1, 0, 0.3, 2), attack_row(2, 1, 0.0, -1),
            attack_row(3, 0, 0.1, 1)]
    write(folder / "att.tsv", rows, settings(mode="attack", radius=0.25), COLUMNS["attack"])
    assert main([str(folder)]) == 0
    md = (folder / "report" / "report.md").read_text()
    section = md.split("## An attack that checks the certificates")[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("| `att.tsv`"))
    # certified at ε and right: images 0 and 1 (50 %); attacked and still right: image 0 (25 %)
    assert line == "| `att.tsv` | 0.25 | 4 | 50.0 | 25.0 | 1 |"
    assert "att.tsv" not in md.split("## Files")[0]  # not a row of the certified systems
    assert "| `att.tsv`" in capsys.readouterr().out
