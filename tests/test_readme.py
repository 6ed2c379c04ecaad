"""The README's Python examples run as written, with only their loop lengths and task counts
shortened (each shortening must match the README's text, so a changed example fails here until
this file follows it)."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block_with(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}, found {len(found)}"
    return found[0]


def shortened(code: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def run(code: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    return out.getvalue()


def test_every_python_block_parses():
    blocks = python_blocks()
    assert len(blocks) >= 4
    for code in blocks:
        ast.parse(code)


def test_api_example_and_training_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    api = shortened(block_with("learner.meta_step(tasks.sample(25, gen))"),
                    {"for _ in range(1000):": "for _ in range(3):", "tasks.sample(100, gen)": "tasks.sample(8, gen)"})
    printed = run(api, namespace).splitlines()
    mean_norm, rho_norm = (float(v) for v in printed[0].split())
    assert mean_norm >= 0 and rho_norm >= 0
    table = "\n".join(printed[1:])
    assert "| mse | " in table and "| coverage_90 | " in table
    mean, var = namespace["mean"], namespace["var"]
    assert mean.shape == var.shape == namespace["test"].query_y.shape and bool((var > 0).all())

    fit = shortened(block_with("validate_every=200"),
                    {"1000, folder=": "4, folder=", "checkpoint_every=100": "checkpoint_every=2",
                     "validate_every=200": "validate_every=2"})
    run(fit, namespace)
    result, out = namespace["result"], namespace["out"]
    assert result.steps_run == 4 and len(result.history) == 2
    assert (tmp_path / "runs" / "mine" / "last.pt").is_file()
    assert out.loss.shape == (25,) and all(g.shape[0] == 25 for g in out.grads.values())


def test_custom_prior_example():
    code = shortened(block_with("class Laplace(priors.Prior)"),
                     {"for _ in range(20):": "for _ in range(2):", "tasks.sample(100, gen)": "tasks.sample(8, gen)"})
    printed = run(code, {}).splitlines()
    expected = re.search(r"print\(sorted\(learner\.meta_params\(\)\)\)\s+# (\[.*\])", code).group(1)
    assert printed[0] == expected


def test_image_script_example(tmp_path, monkeypatch):
    from ibaml.data import write_fixture

    monkeypatch.chdir(tmp_path)
    root = write_fixture(tmp_path / "data", "miniimagenet", ways=5, shots=1, query=15)
    code = shortened(block_with("image_learner("),
                     {'"/data/miniimagenet"': repr(str(root)), "hidden=32": "hidden=4",
                      "sample(4), 1000, folder=": "sample(2), 2, folder=", "checkpoint_every=100": "checkpoint_every=1",
                      "sample, 200, chunk=25": "sample, 4, chunk=2"})
    namespace: dict = {}
    run(code, namespace)
    report = namespace["report"]
    assert 0 <= report.metrics["accuracy"]["mean"] <= 1 and "ece" in report.metrics
    assert (tmp_path / "runs" / "mine" / "last.pt").is_file()
