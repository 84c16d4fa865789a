"""The package's layers (docs/DESIGN.md §2): each imports only the layers below it, and no import
(at the top of a module or inside a function) closes a loop between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dsr_lightning"
# the errors, the file writes every layer uses (files.py), what networks and systems are
# (identity.py) and how the package logs (logs.py)
BOTTOM = {"errors", "files", "identity", "logs"}
BELOW = {
    "errors": set(),
    "logs": set(),  # logging conventions: the standard library (Lightning's rank, imported late)
    "identity": set(),  # network and system ids, probe comparison: numpy only
    "files": {"errors"},
    "smoothing": BOTTOM,
    "models": BOTTOM,
    "data": BOTTOM,
    "results": BOTTOM,
    "tasks": BOTTOM | {"smoothing", "models", "data", "results"},
    "config": BOTTOM | {"smoothing", "models", "data", "results", "tasks"},
    "reports": BOTTOM | {"results", "smoothing"},
    "jobs": BOTTOM | {"smoothing", "models", "data", "results", "tasks", "config", "reports"},
    "cli": BOTTOM | {"smoothing", "models", "data", "results", "tasks", "config", "reports", "jobs"},
    # the Python API: beside cli, on top of the jobs
    "api": BOTTOM | {"smoothing", "models", "data", "results", "tasks", "jobs"},
}
ENTRY = {"__main__", "threshold"}  # entry points: they call cli
# the package root (only the version: imported by any layer, imports nothing) and the YAML tree
ROOT = {"__init__", "conf"}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every dsr_lightning module named by an import in the file, wherever the import stands."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dsr_lightning")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("dsr_lightning"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_layer():
    for m in _graph():
        assert _layer(m) in {*BELOW, *ENTRY, *ROOT}, f"{m}: in no layer of docs/DESIGN.md §2"
    assert not _graph()["dsr_lightning"], "the package root imports nothing"


def test_imports_run_downward_only():
    bad = [f"{m} imports {i}" for m, deps in _graph().items() for i in deps
           if _layer(m) in BELOW and _layer(i) not in ROOT | {_layer(m)}
           and _layer(i) not in BELOW[_layer(m)]]
    assert not bad, "imports that run up or across:\n" + "\n".join(sorted(bad))


def test_no_import_loop():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if d in graph.get(m, ()) and d.startswith(m + "."):
                continue  # a package's __init__ re-exporting its own modules
            if state.get(d) == 1:
                loop = path[path.index(d):] + [d]
                pytest.fail("import loop: " + " -> ".join(loop))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_imports_inside_functions():
    # jobs.training imports the certification job inside a function, after fit
    assert "dsr_lightning.jobs.certification" in _graph()["dsr_lightning.jobs.training"]


def test_files_sits_at_the_bottom_with_errors():
    # every layer writes files through it, so it may import nothing of the package but errors
    graph = _graph()
    assert graph["dsr_lightning.files"] == {"dsr_lightning.errors"}
    assert "dsr_lightning.files" in graph["dsr_lightning.models.checkpoint"]
