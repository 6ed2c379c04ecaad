"""The package layout stays readable: no library file over 500 lines unless its docstring says why
(a paragraph starting "Why this file is long:"), examples that stay thin
(options, data, a ``fit`` call and the report, at most 250 lines), and the benchmarks and
examples reach the library through its public names only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500
MAX_EXAMPLE_LINES = 250


def _files(*folders):
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _files("ibaml", "priors"), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_file_is_short(path):
    text = path.read_text()
    lines = text.count("\n")
    reason = "Why this file is long:" in (ast.get_docstring(ast.parse(text)) or "")
    assert lines <= MAX_LINES or reason, (f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it by "
                                          f"concept, or say in its docstring why it is one concept")


@pytest.mark.parametrize("path", _files("examples"), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_is_thin(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_EXAMPLE_LINES, (f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_EXAMPLE_LINES}): "
                                        f"what a user's own script would need too belongs in the library")


def _private_uses(path):
    """``(line, name)`` of every underscore name imported from, or read as an attribute of, ``ibaml``/``priors``."""
    tree = ast.parse(path.read_text())
    library = ("ibaml", "priors")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in library:
            parts = node.module.split(".")
            found += [(node.lineno, node.module) for part in parts if part.startswith("_")]
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name.split(".")[0] in library and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in library:
                found.append((node.lineno, node.attr))
    return found


@pytest.mark.parametrize("path", _files("benchmarks", "examples"), ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_use_public_names(path):
    assert _private_uses(path) == [], f"{path.relative_to(ROOT)} uses private library names"


@pytest.mark.parametrize("path", _files("benchmarks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_does_not_load_a_script(path):
    """A benchmark runs as ``python -m benchmarks.NAME``: it reaches the examples' models through
    the library (``ibaml.recipes.sine_presets``, ``ibaml.recipes.image_presets``), runs an example only as a
    subprocess, and leaves ``sys.path`` alone."""
    text = path.read_text()
    assert "spec_from_file_location" not in text and "sys.path" not in text, (
        f"{path.relative_to(ROOT)} loads a script as a module or edits sys.path")


def test_private_use_detector_finds_them(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import ibaml\nfrom ibaml.train.learner import _x\nfrom ibaml._hidden import y\nibaml.training._masked\n"
                      "from ibaml import training\nimport priors\nprint(priors.base)\n")
    assert [name for _, name in _private_uses(script)] == ["_x", "ibaml._hidden", "_masked"]


def test_import_ibaml_exposes_its_run_modules():
    """``import ibaml`` alone gives ``ibaml.train.training.fit`` (the notebooks' and README's spelling)."""
    import subprocess
    import sys
    code = "import ibaml; ibaml.train.training.fit; ibaml.train.meta_update.meta_step; ibaml.train.evaluation.over_chunks; ibaml.core.nets.MLP"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
