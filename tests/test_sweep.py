"""Sweeps on Ray Tune (``python -m benchmarks.sweep``), the ``on_checkpoint`` hook of
``ibaml.train.training.fit`` that reports to it, and the protocol benchmarks' runs as Ray Tune
trials (one file, so that its Ray instances run one after the other)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ibaml
from benchmarks import _protocol as P
from benchmarks import sweep
from ibaml.data import SineTaskDistribution
from ibaml.train import training

ROOT = Path(__file__).resolve().parents[1]


def test_on_checkpoint_sees_every_written_checkpoint(tmp_path):
    torch.manual_seed(0)
    learner = ibaml.build_learner("imaml", ibaml.core.nets.MLP(1, (8,), 1), ibaml.GaussianLikelihood(1.0), inner_steps=2)
    tasks, gen = SineTaskDistribution(shots=5, query=5), torch.Generator().manual_seed(0)
    calls = []

    def record(step, path, metrics):
        calls.append((step, path, dict(metrics), path.is_file()))

    training.fit(learner, lambda: tasks.sample(4, gen), 5, folder=tmp_path, checkpoint_every=2, rng={"tasks": gen},
                 validate=lambda step: {"score": float(step)}, validate_every=2, on_checkpoint=record, progress=False)
    assert [c[0] for c in calls] == [2, 4, 5]
    assert all(path == tmp_path / "last.pt" and written for _, path, _, written in calls)
    step, _, metrics, _ = calls[-1]
    assert metrics["step"] == 5 and isinstance(metrics["loss"], float)
    assert metrics["validation"] == {"step": 5, "score": 5.0}
    assert "validation" in calls[0][2] and calls[0][2]["validation"]["step"] == 2


def test_grid_parsing_and_selection():
    assert sweep.parse_grid(["precision=0.3,1", "inner_optimizer=sgd"]) == {"precision": [0.3, 1],
                                                                         "inner_optimizer": ["sgd"]}
    with pytest.raises(ValueError, match=r"--grid 'precision': expected NAME=V1,V2"):
        sweep.parse_grid(["precision"])
    assert len(sweep.configurations({"a": [1, 2], "b": [3, 4, 5]})) == 6
    trials = [{"config": {"a": 1}, "seed": 0, "metrics": {"nll": 1.0}},
              {"config": {"a": 2}, "seed": 0, "metrics": None, "error": "boom"},
              {"config": {"a": 3}, "seed": 0, "metrics": {"nll": 0.2}}]
    rows = sweep.summarise(trials, "nll")
    assert [r["config"] for r in rows] == [{"a": 3}, {"a": 1}, {"a": 2}] and rows[-1]["failed"] == 1
    assert "| 3 | 0.2000 ± 0.0000 | 1 | 0 |" in sweep.table(rows, "nll")
    # the validation stream is none of the example's test streams (10000 + S, 20000 + S)
    assert sweep.VALIDATION_SEED not in (0, 10_000, 20_000)


def test_unknown_grid_argument_is_named(capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--grid", "precison=1,2"])
    assert "--grid precison: not an argument of ibaml.build_learner" in capsys.readouterr().err


def test_sweep_of_eight_trials_on_ray_tune_chooses_on_validation_tasks(tmp_path):
    pytest.importorskip("ray.tune", reason="Ray Tune is the optional 'sweep' extra (pip install -e '.[sweep]')")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "benchmarks.sweep", "--method", "imaml", "--grid", "precision=0.3,1,3,10",
           "--grid", "meta_lr=0.001,0.01", "--meta-iters", "4", "--meta-batch", "4", "--val-tasks", "40",
           "--hidden", "16", "--cpus", "2", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    # about 100 s alone on 2 cores; the limit guards against a hang, with room for a loaded machine
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    result = json.loads((out / "sweep.json").read_text())
    best = json.loads((out / "best_config.json").read_text())
    assert len(result["trials"]) == 8 and all(t["metrics"] is not None for t in result["trials"])
    lowest = min(result["trials"], key=lambda t: t["metrics"]["nll"])
    assert best["config"] == lowest["config"] and best["method"] == "imaml"
    assert best["split"].startswith("validation") and "test streams are not drawn" in best["split"]
    assert "chosen on validation tasks: imaml" in proc.stdout and "| precision | meta_lr |" in proc.stdout
    # the chosen configuration is a recipe's keyword arguments
    ibaml.build_learner(best["method"], ibaml.core.nets.MLP(1, (8,), 1), ibaml.GaussianLikelihood(1.0), **best["config"])


def test_protocol_runs_on_ray_tune_are_the_runs_of_threads(tmp_path, monkeypatch):
    """``--engine ray``: each run a Ray Tune trial, its metrics carried back in the trial's
    report, in the order given; the same runs as the threads engine, and a failed run recorded."""
    pytest.importorskip("ray.tune", reason="Ray Tune is the optional 'sweep' extra (pip install -e '.[sweep]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.chdir(tmp_path)          # relative folders, as the benchmarks' --out gives them
    small = ["--meta-batch", "2", "--eval-tasks", "8", "--recalibration-tasks", "8", "--seed", "0"]
    jobs = lambda root: [(f"{root}/a", ["--method", "maml", "--meta-iters", "2", *small]),
                         (f"{root}/b", ["--method", "maml", "--meta-iters", "0"]),
                         (f"{root}/c", ["--method", "imaml", "--meta-iters", "3", *small])]
    threads = P.run_all("sine_regression.py", jobs("threads"), 2, tolerate_failure=True)
    on_ray = P.run_all("sine_regression.py", jobs("ray"), 2, tolerate_failure=True, engine="ray")
    assert "meta-iters" in on_ray[1]["failed"] and (tmp_path / "ray" / "b" / "failed.json").is_file()
    for a, b in zip(threads[::2], on_ray[::2]):
        assert a["mse"] == b["mse"] and a["nll"] == b["nll"] and a["command"] == b["command"]
    assert [m["command"].split()[3] for m in on_ray[::2]] == ["maml", "imaml"]
    assert json.loads((tmp_path / "ray" / "c" / "metrics.json").read_text()) == on_ray[2]
    with pytest.raises(ValueError, match="engine 'dask': choose from threads, ray"):
        P.run_all("sine_regression.py", [], 1, engine="dask")
