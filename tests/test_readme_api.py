"""The Python snippets of the README (section "Python") and of docs/getting-started.md (section "The
Python API in functions") run as they stand."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GETTING_STARTED = REPO / "docs" / "getting-started.md"


def _section(path: Path, heading: str) -> list[str]:
    """The ```python blocks of the section `heading` (up to the next heading of its level)."""
    text = path.read_text()
    level = heading.split(" ", 1)[0]
    section = text.split(f"\n{heading}\n", 1)[1].split(f"\n{level} ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _snippets() -> list[str]:
    return _section(GETTING_STARTED, "## The Python API in functions")


def test_the_readme_has_the_five_line_example():
    (code,) = _section(README, "## Python")
    lines = code.strip().splitlines()
    assert len(lines) == 5 and lines[0] == "import dsr_lightning as dsr"
    assert "dsr.load(" in lines[1] and ".certify(" in lines[3]


def test_the_readme_example_runs(rejector, tmp_path, monkeypatch, capsys):
    """The README's example, with the session's tiny rejector where it looks for the demo's."""
    import dsr_lightning

    if not hasattr(dsr_lightning, "load"):
        pytest.skip("dsr_lightning.load (the object API of issue 28) is not in this checkout yet")
    (code,) = _section(README, "## Python")
    where = re.search(r'dsr\.load\("([^"]+)"\)', code).group(1)
    (tmp_path / where).parent.mkdir(parents=True)
    shutil.copy(rejector, tmp_path / where)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README example", "exec"), scope)
    cert, x = scope["cert"], scope["x"]
    assert len(cert.prediction) == len(cert.radius) == len(x) == 8
    assert (cert.radius >= 0).all()
    assert capsys.readouterr().out.strip()  # it printed the predictions and radii


def test_getting_started_has_the_two_api_snippets():
    snippets = _snippets()
    assert len(snippets) == 2
    assert "api.load_system(" in snippets[0] and "api.train_rejector(" in snippets[1]


def test_load_a_system_and_certify_a_batch(rejector, tmp_path, monkeypatch, capsys):
    """Snippet 1, with the session's tiny rejector where the snippet looks for the demo's."""
    code = _snippets()[0]
    where = re.search(r'api\.load_system\("([^"]+)"\)', code).group(1)
    (tmp_path / where).parent.mkdir(parents=True)
    shutil.copy(rejector, tmp_path / where)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "getting-started snippet 1", "exec"), scope)
    cert, x = scope["cert"], scope["x"]
    assert len(cert["prediction"]) == len(x) == 4
    assert (cert["radius"] >= 0).all() and set(cert["correct"]) <= {0, 1}
    assert ((cert["prediction"] == -1) == (cert["radius"] == 0)).all()
    assert 0 <= cert.certified_accuracy(0.25) <= 1
    assert "[" in capsys.readouterr().out  # it printed the predictions


def test_wrap_own_modules_train_heads_and_certify(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippets()[1], "getting-started snippet 2", "exec"), scope)
    system, cert, f = scope["system"], scope["cert"], scope["f"]
    assert not any(p.requires_grad for p in f.parameters())  # f stays frozen
    assert system.rejector is not None and system.num_classes == 10
    assert system.rejector.feature_channels == [16]  # fused with f's layer "1"
    assert len(cert["prediction"]) == 2
    assert not list(tmp_path.iterdir())  # no files
    with pytest.raises(ValueError, match="without labels"):
        type(cert)({"prediction": cert["prediction"], "radius": cert["radius"]}) \
            .certified_accuracy()
