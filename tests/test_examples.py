import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sine_example_compare_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "sine_regression.py"), "--compare", "maml,imaml,ibaml",
           "--meta-iters", "5", "--meta-batch", "4", "--eval-tasks", "20", "--inner-steps", "3", "--out", str(out),
           "--no-progress", "--noise-fit-tasks", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("maml", "imaml", "ibaml"):
        m = metrics["methods"][method]
        for key in ("mse", "nll", "coverage_90"):
            assert set(m[key]) == {"mean", "ci95"}
        assert "out_of_range" in m
        assert m["skipped_tasks"] == 0
        assert (out / method / "predictive_bands.png").stat().st_size > 0
        assert (out / method / "last.pt").stat().st_size > 0  # the final checkpoint is always written
        recal = m["recalibrated"]        # every method: one variance factor fitted to validation tasks
        assert recal["mse"] == m["mse"] and recal["variance_scale"] > 0
        assert m["splits"]["evaluated"].startswith("test: stream seeds 10000")
    fitted = metrics["methods"]["ibaml"]["noise_prior_fit"]       # its conjugate noise fitted to held-out tasks
    assert fitted["tasks"] == 30
    assert metrics["methods"]["ibaml"]["noise_prior"]["scale"] == pytest.approx(fitted["prior_noise"][1], rel=1e-5)
    tails = metrics["methods"]["ibaml"]["noise_prior"]["tails"]      # the default heavy-tailed predictive
    assert tails["family"] == "lognormal_scale" and fitted["tails"] == [None, tails]
    assert "noise_prior_fit" not in metrics["methods"]["imaml"]
    assert "| ibaml |" in (out / "report.md").read_text()
    assert "| ibaml |" in proc.stdout
    assert "non-finite tasks skipped in meta-training: maml 0, imaml 0, ibaml 0" in proc.stdout


def test_sine_example_rejects_unknown_method(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "sine_regression.py"), "--method", "reptile", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "reptile" in proc.stderr
    cmd = [sys.executable, str(ROOT / "examples" / "sine_regression.py"), "--noise-fit-tasks", "-1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--noise-fit-tasks" in proc.stderr


def test_sine_example_fits_the_predictive_family_asked_for(tmp_path):
    """``--noise-fit-tails student_t`` gives a Student-t predictive, ``none`` the Gaussian, and the
    evaluation resumed from the same checkpoint gives the same means (the fit moves no mean)."""
    base = [sys.executable, str(ROOT / "examples" / "sine_regression.py"), "--method", "ibaml", "--meta-iters", "3",
            "--meta-batch", "4", "--eval-tasks", "20", "--inner-steps", "3", "--no-progress", "--noise-fit-tasks", "30"]
    results = {}
    for family in ("student_t", "none"):
        out = tmp_path / family
        extra = ["--resume", str(tmp_path / "student_t")] if family == "none" else []
        proc = subprocess.run(base + ["--noise-fit-tails", family, "--out", str(out)] + extra,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[family] = json.loads((out / "metrics.json").read_text())
    assert results["student_t"]["noise_prior"]["tails"]["family"] == "student_t"
    assert results["none"]["noise_prior"]["tails"] is None
    assert results["none"]["mse"] == results["student_t"]["mse"]


def test_sine_example_chooses_on_validation_streams_and_runs_anil(tmp_path):
    """``--eval-split val`` evaluates on validation streams, not the test ones: other numbers,
    the same model; ANIL (MAML on the head) runs beside the deep-kernel GP."""
    base = [sys.executable, str(ROOT / "examples" / "sine_regression.py"), "--compare", "anil,dkt", "--meta-iters", "3",
            "--meta-batch", "4", "--eval-tasks", "20", "--recalibration-tasks", "20", "--no-progress"]
    results = {}
    for split in ("test", "val"):
        extra = ["--resume", str(tmp_path / "test")] if split == "val" else []
        proc = subprocess.run(base + ["--eval-split", split, "--out", str(tmp_path / split)] + extra,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[split] = json.loads((tmp_path / split / "metrics.json").read_text())["methods"]
    for method in ("anil", "dkt"):
        test, val = results["test"][method], results["val"][method]
        assert val["splits"]["evaluated"].startswith("val: stream seeds 40000")
        assert val["mse"] != test["mse"]
        assert val["recalibrated"]["variance_scale"] == pytest.approx(test["recalibrated"]["variance_scale"])
