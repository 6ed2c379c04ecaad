"""The committed run of ``benchmarks/cg_accuracy.py``: the presets' CG meta-gradient against the
dense implicit solve along meta-training (``docs/results/cg_accuracy``)."""

import argparse
import json
from pathlib import Path

import ibaml
from ibaml import recipes
from ibaml.core.nets import MLP
from ibaml.experiments import cli

RESULT = Path(__file__).resolve().parents[1] / "docs" / "results" / "cg_accuracy" / "cg_accuracy.json"
SINE = {"sine/imaml", "sine/ibaml"}
IMAGE = {"image/imaml-1shot", "image/ibaml-1shot", "image/imaml-5shot", "image/ibaml-5shot"}


def test_every_preset_meets_the_bound_at_every_recorded_step():
    payload = json.loads(RESULT.read_text())
    assert payload["bound"] == 1e-3 and payload["measure_dtype"] == "float64"
    by_preset = {r["preset"]: r for r in payload["results"]}
    assert set(by_preset) == SINE | IMAGE
    failing = []
    for name, result in by_preset.items():
        assert result["default_cg_iters"] == 20
        steps = [p["step"] for p in result["points"]]
        assert steps[0] == 0 and len(steps) >= 2, (name, steps)   # at initialisation and later
        for point in result["points"]:
            row = point["cg"]["20"]
            if row["max_task_rel_error"] > payload["bound"]:
                failing.append((name, point["step"], row["max_task_rel_error"]))
            assert row["mean_rel_error"] <= row["max_task_rel_error"] * (1 + 1e-9)
    assert not failing, failing
    assert {e["preset"]: e["holds"] for e in payload["summary"]} == dict.fromkeys(by_preset, True)


def test_the_defaults_are_the_measured_count():
    parser = argparse.ArgumentParser()
    cli.add_run_options(parser, meta_iters=1, meta_batch=1)
    assert parser.parse_args([]).cg_steps == 20
    learner = ibaml.build_learner("imaml", MLP(1, (4,), 1), recipes.regression_likelihood("shared"))
    assert learner.estimator.solver.max_iter == 20
