"""Every ```python block of docs/api.md, and every block of README.md and the other docs pages
that starts with `import dsr_lightning as dsr`, runs: in an empty folder, with the session's tiny rejector
checkpoint copied wherever a block names a `.ckpt` file (the demo's, in the docs), and the
documented draws (n0=100, n=1000) cut tenfold, so that all of them take seconds on a CPU (the
same code runs; only the counts are smaller)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
API_MD = REPO / "docs" / "api.md"
README = REPO / "README.md"
DSR = "import dsr_lightning as dsr"
# the documented numbers of draws, and ten times fewer
FEWER = {"n0=100,": "n0=10,", "n=1000,": "n=100,",
         ", 100, 1000, 0.001, 500": ", 10, 100, 0.001, 500"}


def _fewer_draws(code: str) -> str:
    for many, few in FEWER.items():
        code = code.replace(many, few)
    assert "n=1000," not in code and "1000, 0.001" not in code, "draws left uncut"
    return code


def _blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _snippets() -> list[tuple[str, str]]:
    """(id, code) of every block to run."""
    out = [(f"api.md[{i}]", code) for i, code in enumerate(_blocks(API_MD))]
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        if path != API_MD:
            out += [(f"{path.name}[{i}]", code) for i, code in enumerate(_blocks(path))
                    if code.lstrip().startswith(DSR)]
    return out


SNIPPETS = _snippets()


def test_the_api_page_shows_every_entry_point_in_a_block():
    code = "\n".join(c for name, c in SNIPPETS if name.startswith("api.md"))
    assert len([n for n in SNIPPETS if n[0].startswith("api.md")]) >= 7
    for call in ("dsr.load(", ".certify(", ".predict(", "dsr.wrap(", "dsr.train_rejector(",
                 ".with_threshold(", ".to_frame()", "certified_accuracy(", "ConfigError"):
        assert call in code, f"docs/api.md has no block with {call}"


def test_the_readme_has_the_five_line_example():
    (code,) = [c for name, c in SNIPPETS if name.startswith("README.md")]
    lines = code.strip().splitlines()
    assert len(lines) == 5 and lines[0] == DSR
    assert "dsr.load(" in lines[1] and ".certify(" in lines[3]
    assert any(name.startswith("getting-started.md") for name, _ in SNIPPETS)


@pytest.mark.parametrize("code", [c for _, c in SNIPPETS], ids=[n for n, _ in SNIPPETS])
def test_the_block_runs_as_it_stands(code, request, tmp_path, monkeypatch, capsys):
    for where in set(re.findall(r"""["']([^"']+\.ckpt)["']""", code)):
        target = tmp_path / where
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(request.getfixturevalue("rejector"), target)  # trained once per test run
    monkeypatch.chdir(tmp_path)
    exec(compile(_fewer_draws(code), "docs block", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    if "print(" in code:
        assert out.strip(), "the block printed nothing"
    assert "Traceback" not in out
