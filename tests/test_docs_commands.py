"""Every command the README and the documentation pages show still works as written (without
running it): each `dsr-train` and `dsr-certify` line of a fenced shell block is composed with the
package's Hydra tree and passes the config checks (config.schema.check_train / check_certify); each
`dsr-report` and `dsr-threshold` line is parsed by that command's own argument parser. A command a
release renames, removes or makes invalid fails here, not in a reader's terminal. Also: one
spelling per command in the documents, the config groups page matches conf/, and each entry point's
`--help` says what it does."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from dsr_lightning import cli
from dsr_lightning.config import CONFIG_DIR, compose
from dsr_lightning.config.schema import check_certify, check_train

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = ("dsr-train", "dsr-certify", "dsr-report", "dsr-threshold")
SHELL = ("bash", "sh", "shell", "console")
DUMMY = "dummy"  # what a placeholder <...> stands for
# Hydra's own flags: those that take a value, and those that do not
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path",
                     "-cp", "--config-dir", "-cd", "--experimental-rerun"}
HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "--info", "-i", "--run", "-r"}
# spellings of the commands the documents no longer use (one spelling per command)
OLD_SPELLINGS = [r"python3? (?:\S*/)?train\.py", r"python3? (?:\S*/)?certify\.py",
                 r"python3? -m dsr_lightning\b", r"\bmake report\b"]


def shell_lines(text: str) -> list[str]:
    """The logical lines of the fenced shell blocks of a Markdown text (continuations joined)."""
    lines = []
    for lang, body in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        if lang not in SHELL:
            continue
        lines += [ln.strip() for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]
    return lines


def commands(path: Path) -> list[tuple[str, list[str], str]]:
    """(command, arguments, the line) for each documented command line: comments dropped,
    placeholders `<...>` replaced by a dummy value, `...` (the reader's other settings) dropped;
    leading VAR=value assignments skipped."""
    found = []
    for line in shell_lines(path.read_text()):
        line = re.sub(r"<[^<>\n]*>", DUMMY, line)
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words and words[0] in COMMANDS:
            found.append((words[0], [w for w in words[1:] if w != "..."], line))
    return found


ALL = [(p.relative_to(REPO).as_posix(), *c) for p in DOCS for c in commands(p)]


def test_the_documents_show_each_command():
    """The extraction finds the commands (a change of the fence or command names would otherwise
    leave the tests below with nothing to check)."""
    shown = {c for _, c, _, _ in ALL}
    assert shown == set(COMMANDS), f"commands found: {shown}"
    readme = [c for f, c, _, _ in ALL if f == "README.md"]
    assert {"dsr-train", "dsr-certify", "dsr-report"} <= set(readme)
    assert len(ALL) >= 40, len(ALL)


def hydra_overrides(args: list[str]) -> list[str]:
    """A Hydra command line's overrides, with Hydra's flags dropped and each sweep (a,b / range /
    choice) reduced to its first value: the config of the sweep's first job."""
    overrides, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in HYDRA_VALUE_FLAGS:
            skip = True
        elif a in HYDRA_FLAGS or a in ("--help", "-h", "--hydra-help"):
            continue
        elif a.startswith("-"):
            raise AssertionError(f"unknown flag {a!r}")
        else:
            overrides.append(a)
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def compose_checked(name: str, overrides: list[str], out_dir: Path):
    """Compose conf/<name>.yaml with the overrides (Hydra's node too, so its own groups such as
    hydra/launcher are checked), resolve it as a job would, and run the schema's checks."""
    cfg = compose(name, overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    try:
        (check_train if name == "train" else check_certify)(cfg)
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
    finally:
        HydraConfig.instance().cfg = None
    return cfg


HYDRA_CMDS = [c for c in ALL if c[1] in ("dsr-train", "dsr-certify")]


@pytest.mark.parametrize("where,cmd,args,line", HYDRA_CMDS,
                         ids=[f"{c[0]}:{c[3][:60]}" for c in HYDRA_CMDS])
def test_train_and_certify_commands_compose(where, cmd, args, line, tmp_path):
    overrides = hydra_overrides(args)
    name = "train" if cmd == "dsr-train" else "certify"
    try:
        cfg = compose_checked(name, overrides, tmp_path)
    except Exception as e:  # noqa: BLE001 - the message names the document and the line
        pytest.fail(f"{where}: `{line}` does not compose: {type(e).__name__}: {e}")
    assert cfg.get("sigma") is not None


class _Parsed(Exception):  # noqa: N818 - a signal, not an error
    pass


def parsed(main, argv: list[str], monkeypatch) -> argparse.Namespace:
    """argv as the command's own parser reads it, stopping right after the parse (nothing runs);
    an argument the parser refuses exits with status 2 and fails the test."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed) as got:
        main(argv)
    return got.value.args[0]


ARGPARSE_CMDS = [c for c in ALL if c[1] in ("dsr-report", "dsr-threshold")]


@pytest.mark.parametrize("where,cmd,args,line", ARGPARSE_CMDS,
                         ids=[f"{c[0]}:{c[3][:60]}" for c in ARGPARSE_CMDS])
def test_report_and_threshold_commands_parse(where, cmd, args, line, monkeypatch):
    assert "--help" not in args and "-h" not in args, f"{where}: `{line}`: show --help in prose"
    main = cli.report_main if cmd == "dsr-report" else cli.threshold_main
    try:
        ns = parsed(main, args, monkeypatch)
    except SystemExit as e:
        pytest.fail(f"{where}: `{line}` is refused by {cmd}'s parser (exit {e.code})")
    assert vars(ns), line


def test_the_parse_check_can_fail(monkeypatch):
    """The check above refuses what the parsers refuse (an unknown option)."""
    with pytest.raises(SystemExit):
        parsed(cli.report_main, ["outputs", "--no-such-option"], monkeypatch)
    with pytest.raises(SystemExit):
        parsed(cli.threshold_main, ["a.ckpt", "--images", "0"], monkeypatch)


def test_the_compose_check_can_fail(tmp_path):
    """The compose check refuses an unknown group option, an unknown key and a bad value."""
    for bad in (["denoiser=no_such_denoiser"], ["no_such_key=1"], ["sigma=-1"]):
        with pytest.raises(Exception):  # noqa: B017 - Hydra's, OmegaConf's or our ConfigError
            compose_checked("train", hydra_overrides(bad), tmp_path)
    assert hydra_overrides(["-m", "sigma=0.25,0.5", "T=range(1,3)", "--cfg", "job"]) == \
        ["sigma=0.25", "T=1"]


def test_placeholders_and_continuations(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```bash\nSIGMA=0.5 dsr-train stage=denoiser \\\n  stage.init_from=<a b> ...  "
                   "# a comment\ndsr-report <folder>\n```\n```python\ndsr-train x=1\n```\n")
    assert [(c, a) for c, a, _ in commands(doc)] == [
        ("dsr-train", ["stage=denoiser", f"stage.init_from={DUMMY}"]), ("dsr-report", [DUMMY])]


# --- one spelling per command ---------------------------------------------------------------------

def _user_facing() -> list[tuple[Path, str]]:
    """The documents, the config comments and the scripts' messages (echo lines)."""
    out = [(p, p.read_text()) for p in [*DOCS, REPO / "benchmarks" / "README.md"]]
    for p in sorted(CONFIG_DIR.rglob("*.yaml")):
        out.append((p, "\n".join(ln.split("#", 1)[1] for ln in p.read_text().splitlines()
                                 if "#" in ln)))
    for p in sorted((REPO / "scripts").glob("*.sh")):
        out.append((p, "\n".join(ln for ln in p.read_text().splitlines()
                                 if ln.strip().startswith("echo"))))
    return out


def test_one_spelling_per_command():
    bad = [f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {m.group(0)!r}"
           for p, text in _user_facing() for pat in OLD_SPELLINGS
           for m in re.finditer(pat, text)]
    assert not bad, "use dsr-train / dsr-certify / dsr-report / dsr-threshold:\n" + "\n".join(bad)


# --- the config groups page ------------------------------------------------------------------------

def test_the_config_groups_table_lists_every_option():
    """docs/training.md's table of groups names every option of every group in conf/."""
    rows = {}
    for m in re.finditer(r"^\| `([\w/]+)` \| (.*?) \|", (REPO / "docs" / "training.md").read_text(),
                         flags=re.M):
        rows[m.group(1)] = set(re.findall(r"`([\w-]+)`", m.group(2)))
    groups = [d for d in sorted(CONFIG_DIR.iterdir()) if d.is_dir() and list(d.glob("*.yaml"))
              and d.name != "hydra"]
    assert len(groups) >= 12
    for d in groups:
        options = {f.stem for f in d.glob("*.yaml")}
        assert d.name in rows, f"docs/training.md has no row for the group {d.name}"
        assert options <= rows[d.name], f"{d.name}: not in docs/training.md: {options - rows[d.name]}"


# --- each entry point says what it does ------------------------------------------------------------

@pytest.mark.process
@pytest.mark.parametrize("script,says", [("train.py", "dsr-train: train one stage"),
                                         ("certify.py", "dsr-certify: certify a smoothed")])
def test_hydra_help_says_what_the_command_does(script, says):
    r = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert says in r.stdout and "== Configuration groups ==" in r.stdout
    assert "powered by Hydra" not in r.stdout  # our header, not Hydra's default


@pytest.mark.parametrize("main,says", [(cli.report_main, "tables and figures"),
                                       (cli.threshold_main, "threshold")])
def test_argparse_help_says_what_the_command_does(main, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert says in capsys.readouterr().out.lower()


# --- the README -------------------------------------------------------------------------------------

def test_the_readme_fits_a_screen_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 1 and (REPO / images[0]).is_file(), images
    assert re.search(r"^make demo\b.*\n^make test\b", text, flags=re.M)
    nav = (REPO / "mkdocs.yml").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if target.startswith("http"):
            continue
        # a page another change adds is in the site's nav, which the strict site build checks
        assert (REPO / target).exists() or (
            target.startswith("docs/") and f": {target[5:]}" in nav), target
