"""The README's result tables are the committed JSON under ``docs/results/``, rendered by the
scripts that the README names: a rerun whose JSON changes without the README, or a README edit
that drifts from its JSON, fails here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_in_readme(table: str) -> None:
    missing = [line for line in table.splitlines() if line not in README.splitlines()]
    assert not missing, "README lines that differ from the committed JSON:\n" + "\n".join(missing)


def test_sine_table_is_its_json():
    rows = json.loads((ROOT / "docs/results/sine/table.json").read_text())
    table = load("sine_table").markdown({name: (r["metrics"], r["config"]) for name, r in rows.items()})
    assert_in_readme(table)


def test_sine_table_json_is_the_runs_metrics():
    """``table.json`` holds each run's ``metrics.json`` unchanged (the README's command)."""
    rows = json.loads((ROOT / "docs/results/sine/table.json").read_text())
    for name, path in [("ibaml", "3000/ibaml.json"), ("imaml", "3000/imaml.json"), ("maml", "3000/maml.json"),
                       ("abml", "3000/abml.json"), ("ibaml, 5000 iterations", "5000/ibaml.json")]:
        run = json.loads((ROOT / "docs/results/sine" / path).read_text())
        for key in ("mse", "nll", "coverage_90", "calibration_error"):
            assert rows[name]["metrics"][key] == run[key], (name, key)


def test_image_table_is_its_json():
    rows = json.loads((ROOT / "docs/results/image_benchmark/table.json").read_text())
    assert_in_readme(load("image_table").markdown(rows))


def test_image_seeds_table_is_its_json():
    payload = json.loads((ROOT / "docs/results/image_benchmark/seeds.json").read_text())
    assert_in_readme(load("image_seeds").summary_markdown(payload))
    # the README says that every image target holds at every seed and on the means
    assert payload["targets"] and all(check["met"] for check in payload["targets"])


@pytest.mark.parametrize("claim", ["horizon"])
def test_claim_tables_are_their_json(claim):
    payload = json.loads((ROOT / "docs/results/claims" / f"{claim}.json").read_text())
    assert_in_readme(payload["table"])
