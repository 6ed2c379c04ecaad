"""benchmarks/sine_shift.py on two tiny runs of the sine example: every condition reported raw and
recalibrated with the one factor fitted on the training condition, and a method whose
adaptation diverges on some condition reported with its non-finite tasks, not dropped."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import sine_shift

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shift")
    run = tmp / "runs" / "shared" / "seed0"
    # MAML's inner step is on the summed loss: a step of 0.02 (ten times the preset's) adapts
    # 10-shot tasks and overflows on many of the 60-shot ones
    cmd = [sys.executable, str(ROOT / "examples" / "sine_regression.py"), "--compare", "maml,imaml",
           "--inner-lr", "0.02", "--meta-iters", "3", "--meta-batch", "4", "--eval-tasks", "10",
           "--recalibration-tasks", "20", "--out", str(run), "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "runs" / "shared" / "seed1" / "imaml").mkdir(parents=True)     # a run still going: no metrics.json
    shutil.copy(run / "imaml" / "last.pt", tmp / "runs" / "shared" / "seed1" / "imaml" / "last.pt")
    torch.set_num_threads(1)
    payload = sine_shift.main(["--runs", str(tmp / "runs"), "--out", str(tmp / "out"), "--tasks", "20",
                               "--shots", "1,10,60", "--x-bins=-10,10,5", "--amplitudes", "0.1:5,5:10"])
    return tmp, run, payload


def test_reports_every_condition_raw_and_recalibrated(shift):
    tmp, run, payload = shift
    assert json.loads((tmp / "out" / "shift.json").read_text())["models"].keys() == payload["models"].keys()
    for name in ("coverage_vs_shots.png", "coverage_vs_x.png", "nll_vs_x.png", "coverage_vs_amplitude.png", "table.md"):
        assert (tmp / "out" / name).stat().st_size > 0
    models = payload["models"]["shared"]
    assert list(models) == ["maml", "imaml"]
    entry = models["imaml"]["per_seed"]["0"]
    conditions = entry["conditions"]
    assert list(conditions["shots"]) == ["1", "10", "60"]
    assert list(conditions["x"]) == ["[-10, -5]", "[-5, 0]", "[0, 5]", "[5, 10]"]
    assert list(conditions["x_regions"]) == ["left", "in_range", "right"]
    assert list(conditions["amplitude"]) == ["[0.1, 5]", "[5, 10]"]
    seeds = [c["stream_seed"] for c in conditions["shots"].values()] + [
        conditions["x"]["[-10, -5]"]["stream_seed"]] + [c["stream_seed"] for c in conditions["amplitude"].values()]
    assert len(set(seeds)) == len(seeds) and 30_000 not in seeds       # a stream per condition, not the validation one
    for family in conditions.values():
        for c in family.values():
            assert c["tasks"] == 20 and c["nonfinite_tasks"] == 0
            for kind in ("raw", "recalibrated"):
                for level in ("coverage_50", "coverage_90", "coverage_95"):
                    assert 0.0 <= c[kind][level]["mean"] <= 1.0
            assert c["recalibrated"]["mse"] == c["raw"]["mse"]           # the factor moves no mean
    summary = models["imaml"]["summary"]["shots"]["10"]["recalibrated"]["coverage_90"]
    assert summary["mean"] == conditions["shots"]["10"]["recalibrated"]["coverage_90"]["mean"] and summary["std"] == 0
    assert "| imaml | recalibrated |" in (tmp / "out" / "table.md").read_text()


def test_one_factor_fitted_on_the_training_condition(shift):
    """The factor is the one the example fitted to its validation tasks (10 shots, x in [-5, 5],
    stream 30000 + S), and every condition of the model is recalibrated with it."""
    tmp, run, payload = shift
    run_metrics = json.loads((run / "metrics.json").read_text())["methods"]
    for method, entry in payload["models"]["shared"].items():
        r = entry["per_seed"]["0"]
        assert r["validation"] == {"stream_seed": 30_000, "tasks": 20, "shots": 10, "nonfinite_tasks": 0, "errors": []}
        assert r["variance_scale"] == pytest.approx(run_metrics[method]["recalibrated"]["variance_scale"], rel=1e-4)
        assert r["rebuilt_as_run"]
        factors = {c["variance_scale"] for family in r["conditions"].values() for c in family.values()}
        assert factors == {r["variance_scale"]}


def test_nonfinite_method_is_reported_not_dropped(shift):
    tmp, run, payload = shift
    maml = payload["models"]["shared"]["maml"]
    shots = maml["per_seed"]["0"]["conditions"]["shots"]
    assert shots["10"]["nonfinite_tasks"] == 0
    assert 0 < shots["60"]["nonfinite_tasks"] <= 20
    assert {"family": "shots", "condition": "60", "seed": 0, "nonfinite_tasks": shots["60"]["nonfinite_tasks"],
            "tasks": 20} in maml["nonfinite"]
    assert maml["summary"]["shots"]["60"]["nonfinite_tasks"] == {"0": shots["60"]["nonfinite_tasks"]}
    table = (tmp / "out" / "table.md").read_text()
    assert f"| maml | shared | shots 60 | 0 | {shots['60']['nonfinite_tasks']} / 20 |" in table
    # the unfinished run (a checkpoint without metrics.json) is listed, not evaluated
    assert payload["incomplete_runs"] == [str(tmp / "runs" / "shared" / "seed1" / "imaml" / "last.pt")]
    assert list(payload["models"]["shared"]["imaml"]["per_seed"]) == ["0"]


def test_per_point_step_keeps_the_training_size_and_stays_finite_at_other_sizes(shift):
    """``--per-point-step``: MAML adapted with its step on the mean support loss (the run's step
    times its 10 training shots) gives the same 10-shot results as the run's own summed step, and
    no non-finite task at 60 shots, where the summed step overflowed."""
    tmp, run, payload = shift
    per_point = sine_shift.main(["--runs", str(tmp / "runs"), "--out", str(tmp / "out_per_point"), "--tasks", "20",
                                 "--shots", "1,10,60", "--x-bins=-10,10,5", "--amplitudes", "0.1:5,5:10",
                                 "--methods", "maml", "--per-point-step"])
    assert per_point["settings"]["per_point"] is True
    summed = payload["models"]["shared"]["maml"]["per_seed"]["0"]["conditions"]["shots"]
    mean = per_point["models"]["shared"]["maml"]["per_seed"]["0"]["conditions"]["shots"]
    assert mean["10"]["raw"]["mse"] == pytest.approx(summed["10"]["raw"]["mse"], rel=1e-5)
    assert summed["60"]["nonfinite_tasks"] > 0 and mean["60"]["nonfinite_tasks"] == 0


def _summary(coverage: dict, mse: float, out: dict) -> dict:
    """A method's ``summary`` with the given raw 90 % coverage per shot count, 10-shot MSE and
    (coverage, NLL) per side out of range."""
    cell = lambda **m: {"raw": {k: {"mean": v, "std": 0.0} for k, v in m.items()}}
    shots = {k: cell(coverage_90=c, mse=mse if k == "10" else 1.0) for k, c in coverage.items()}
    regions = {side: cell(coverage_90=c, nll=n) for side, (c, n) in out.items()}
    return {"summary": {"shots": shots, "x_regions": regions}}


def test_target_findings_say_met_and_not_met_with_the_numbers():
    models = {"shared": {
        "ibaml-fullcov": _summary({"1": 0.84, "3": 0.90, "10": 0.95, "30": 0.951}, 0.04,
                                  {"left": (0.81, 1.0), "right": (0.79, 3.0)}),
        "dkt": _summary({"1": 0.7, "3": 0.7, "10": 0.9, "30": 0.99}, 0.01, {"left": (0.75, 2.1), "right": (0.75, 2.1)})}}
    lines = sine_shift.target_findings(models, "ibaml-fullcov").splitlines()
    assert lines[0] == "- ibaml-fullcov, 1 shots: 90 % coverage 0.840 (target 0.85–0.95): not met."
    assert lines[1].endswith(": met.") and lines[2].endswith(": met.") and lines[3].endswith(": not met.")
    assert lines[4] == "- ibaml-fullcov, 10 shots in range: MSE 0.0400 (target ≤ 0.05): met."
    assert lines[5] == ("- ibaml-fullcov, x < −5: 90 % coverage 0.810 (target ≥ 0.80): met; "
                        "NLL 1.00 against dkt's 2.10 (target ≤): met.")
    assert lines[6] == ("- ibaml-fullcov, x > 5: 90 % coverage 0.790 (target ≥ 0.80): not met; "
                        "NLL 3.00 against dkt's 2.10 (target ≤): not met.")


def test_recalibration_study_fits_each_map_on_the_training_condition(shift):
    from benchmarks import shift_recalibration
    tmp, run, payload = shift
    study = shift_recalibration.main(["--runs", str(tmp / "runs"), "--out", str(tmp / "recal"), "--tasks", "20",
                                      "--methods", "imaml"])
    for name in ("recalibration.json", "table.md", "coverage.png"):
        assert (tmp / "recal" / name).stat().st_size > 0
    entry = study["models"]["imaml"]["per_seed"]["0"]
    assert entry["training_sizes"] == [10]
    assert entry["fitted"]["per_shots"] == {"10": entry["fitted"]["factor"]}   # one size: one factor
    metrics = entry["metrics"]
    for condition in shift_recalibration.CONDITIONS:
        assert metrics["per_shots"][condition] == metrics["factor"][condition]
        assert len({metrics[m][condition]["mse"] for m in shift_recalibration.MAPS}) == 1   # no map moves a mean
    # the same 1-shot test tasks as the shift benchmark's
    shots = payload["models"]["shared"]["imaml"]["per_seed"]["0"]["conditions"]["shots"]["1"]["raw"]
    assert metrics["raw"]["1"]["coverage_90"] == pytest.approx(shots["coverage_90"]["mean"], rel=1e-4)   # 5 digits in the JSON
    assert metrics["raw"]["1"]["nll"] == pytest.approx(shots["nll"]["mean"], rel=1e-4)
