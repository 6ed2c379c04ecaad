"""Shared pieces of the protocol benchmarks (``sine_protocol``, ``image_protocol``): an example
run as a subprocess into a folder of its own (skipped when its metrics exist, so an interrupted
stage resumes), several at a time (threads on this machine, or trials on Ray Tune with
``--engine ray``), and statistics over training seeds.

Each finished run leaves ``FOLDER/metrics.json``: the example's metrics with the command that
produced them (``"command"``); the example's other outputs (checkpoints, figures) are removed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def run_example(example: str, folder: Path, options: Sequence[str], keep: Optional[Path] = None,
                force: bool = False, tolerate_failure: bool = False) -> dict:
    """``python examples/<example> --out <run> --threads 1 --no-progress --overwrite <options>``
    unless ``folder/metrics.json`` exists (or with ``force``); returns that file's content. The
    run's own folder (checkpoints, figures) is ``keep`` when given and kept, else a scratch
    folder removed after. A run that fails raises ``RuntimeError`` with its error output; with
    ``tolerate_failure`` it is recorded instead, ``{"failed": <its last error line>, "command":
    ...}`` in ``folder/failed.json`` (returned, and returned again without a rerun)."""
    metrics, failed = folder / "metrics.json", folder / "failed.json"
    if tolerate_failure and failed.is_file() and not force:
        return json.loads(failed.read_text())
    if force or not metrics.is_file():
        scratch = keep or folder.parent / f"{folder.name}.run"
        cmd = [sys.executable, str(ROOT / "examples" / example), "--out", str(scratch), "--threads", "1",
               "--no-progress", "--overwrite", *map(str, options)]
        done = subprocess.run(cmd, capture_output=True, text=True)   # in this working folder, as the paths are
        command = " ".join(["python", f"examples/{example}", *map(str, options)])
        if done.returncode != 0 and tolerate_failure:
            record = {"failed": (done.stderr.strip().splitlines() or ["no error output"])[-1], "command": command}
            write_json(failed, record)
            if keep is None:
                shutil.rmtree(scratch, ignore_errors=True)
            return record
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        data = json.loads((scratch / "metrics.json").read_text())
        data["command"] = command
        folder.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps(data, indent=2))
        if keep is None:
            shutil.rmtree(scratch)
    return json.loads(metrics.read_text())


#: what a run records of its meta-training, which a run evaluated again from its checkpoints
#: (``--resume``, no meta-training) cannot measure: kept from the run that trained
TRAINING_KEYS = ("train_seconds", "ms_per_meta_iter", "last_loss", "inner_grad_norm", "inner_grad_norm_trace",
                 "validation", "command")


def reevaluated(trained: dict, evaluated: dict) -> dict:
    """The metrics of a run evaluated again from its checkpoints (``evaluated``) with the record
    of its meta-training (:data:`TRAINING_KEYS`) from the run that trained (``trained``), and the
    command of the evaluation as ``"reevaluated_with"``.

    >>> reevaluated({"accuracy": 0.5, "last_loss": 0.1, "command": "a"}, {"accuracy": 0.6, "last_loss": None,
    ...                                                                    "command": "a --resume d"})
    {'accuracy': 0.6, 'last_loss': 0.1, 'command': 'a', 'reevaluated_with': 'a --resume d'}
    """
    return {**evaluated, **{k: trained[k] for k in TRAINING_KEYS if k in trained},
            "reevaluated_with": evaluated.get("command")}


def run_all(example: str, jobs: Sequence[tuple], workers: int, keep_root: Optional[Path] = None,
            out: Optional[Path] = None, reevaluate: bool = False, tolerate_failure: bool = False,
            engine: str = "threads", address: Optional[str] = None) -> list:
    """``[(folder, options)]`` run ``workers`` at a time; their metrics in the order given. With
    ``keep_root``, each run's own folder is kept at ``keep_root / folder.relative_to(out)``; with
    ``reevaluate`` too, each run whose kept folder exists is evaluated again from its checkpoints
    (``--resume``, no meta-training) and its metrics replaced, the record of its meta-training
    kept (:func:`reevaluated`). ``tolerate_failure``: a failed run gives its record
    (:func:`run_example`) in place of metrics. ``engine``: ``"threads"`` (this machine) or
    ``"ray"`` (each run a Ray Tune trial, :func:`run_on_ray`; ``address`` a running cluster)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    jobs = [(Path(folder), list(options)) for folder, options in jobs]

    def one(job):
        folder, options = job
        keep = None if keep_root is None else Path(keep_root) / folder.relative_to(out)
        if reevaluate and keep is not None and keep.is_dir():
            metrics = folder / "metrics.json"
            trained = json.loads(metrics.read_text()) if metrics.is_file() else None
            evaluated = run_example(example, folder, [*options, "--resume", keep], keep, force=True)
            if trained is None:
                return evaluated
            merged = reevaluated(trained, evaluated)
            write_json(metrics, merged)
            return merged
        return run_example(example, folder, options, keep, tolerate_failure=tolerate_failure)
    if engine == "ray":
        return run_on_ray(one, jobs, workers, address)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


#: how :func:`run_all` runs its jobs: threads of this process, or trials on Ray Tune
ENGINES = ("threads", "ray")


def _ray_trial(config: dict, run=None, jobs=(), cwd: str = ".") -> None:
    """A Ray Tune trial: ``run(jobs[config["index"]])`` in the driver's working folder ``cwd``
    (Tune starts a trial in a folder of its own; the jobs' paths are relative to the driver's),
    its result reported as JSON text."""
    import os

    from ray import tune

    os.chdir(cwd)
    tune.report({"done": True, "result": json.dumps(run(jobs[config["index"]]))})


def run_on_ray(run, jobs: Sequence, workers: int, address: Optional[str] = None) -> list:
    """``[run(job) for job in jobs]``, each a Ray Tune trial of one CPU, ``workers`` at a time,
    in the order given (``run(job)`` returns JSON-serialisable data, carried back in the trial's
    report, so no folder need be shared with the driver). Ray starts on this machine and stops
    after, or joins the cluster at ``address`` (each node runs a trial in the driver's working
    folder, so the repository sits at the same path on every node). A trial that raises raises
    ``RuntimeError`` here with its error. Ray Tune is the ``sweep`` extra (``pip install -e ".[sweep]"``)."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise RuntimeError('--engine ray needs Ray Tune: pip install -e ".[sweep]"') from None
    import tempfile

    ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}} if address is None else None)
    try:
        with tempfile.TemporaryDirectory(prefix="protocol-ray-") as storage:
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(_ray_trial, run=run, jobs=list(jobs), cwd=str(Path.cwd())),
                                    {"cpu": 1}),
                param_space={"index": tune.grid_search(list(range(len(jobs))))},
                tune_config=tune.TuneConfig(max_concurrent_trials=workers),
                run_config=tune.RunConfig(name="protocol", storage_path=storage, verbose=0))
            results = tuner.fit()
            by_index = {}
            for result in results:
                if result.error is not None or not (result.metrics or {}).get("done"):
                    raise RuntimeError(f"a run on Ray failed: {result.error}")
                by_index[result.config["index"]] = json.loads(result.metrics["result"])
    finally:
        ray.shutdown()
    return [by_index[i] for i in range(len(jobs))]


def option_value(value) -> str:
    """An option's value as written in folder names and tables: ``1e-2`` → ``"0.01"``, ``"sgd"``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_label(settings: dict) -> str:
    """``{"--inner-lr": 0.01, "--inner-optimizer": "sgd"}`` → ``"inner-lr_0.01_inner-optimizer_sgd"``
    (a selection run's folder name)."""
    return "_".join(f"{k.strip('-')}_{option_value(v)}" for k, v in settings.items())


def row_options(row: dict) -> dict:
    """The command-line options of a row of a selection's ``tried`` (its ``--`` keys), without its scores."""
    return {k: v for k, v in row.items() if k.startswith("--")}


def seed_stats(values: Sequence[float]) -> dict:
    """``{"per_seed", "mean", "std"}`` (sample standard deviation; 0 for one seed)."""
    values = list(values)
    return {"per_seed": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_difference(mine: dict, theirs: dict) -> Optional[dict]:
    """Two rows' metric paired by training seed (each ``{"seeds": [...], "per_seed": [...]}``):
    on the seeds both have, the differences ``mine − theirs``, their mean, sample standard
    deviation and 95 % Student-t interval ``mean ± t₀.₉₇₅,ₙ₋₁ · sd / √n``, whether that interval
    excludes 0 (``ordered``: the seeds order the rows), and ``seeds_to_order``: about how many
    seeds a difference of this mean and spread would need before its 95 % interval excludes 0,
    the least ``n`` with ``t₀.₉₇₅,ₙ₋₁ · sd / √n < |mean|`` (``None`` where that takes more than
    10 000). ``None`` for fewer than 2 common seeds.

    >>> d = paired_difference({"seeds": [0, 1, 2], "per_seed": [0.02, 0.03, 0.01]},
    ...                       {"seeds": [0, 1, 2], "per_seed": [0.01, 0.01, 0.02]})
    >>> round(d["mean"], 4), d["ordered"], d["seeds_to_order"]
    (0.0067, False, 23)
    """
    from scipy import stats

    theirs_by_seed = dict(zip(theirs["seeds"], theirs["per_seed"]))
    diffs = [v - theirs_by_seed[s] for s, v in zip(mine["seeds"], mine["per_seed"]) if s in theirs_by_seed]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return {"differences": diffs, "mean": mean, "std": sd, "ci95": [mean - half, mean + half],
            "ordered": mean - half > 0 or mean + half < 0,
            "seeds_to_order": next((n for n in range(2, 10_001)
                                    if float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) < abs(mean)), None)}


def summarize_conditions(per_seed: dict, kinds: Sequence[str], metrics: Sequence[str]) -> dict:
    """Over the seeds of a shift benchmark (``per_seed[seed]["conditions"][group][label][kind][metric]``
    each ``{"mean", ...}`` over tasks, or ``cell[kind] = None`` where no task was finite): per
    group, label, kind and metric, the mean and sample standard deviation over the seeds of the
    metric's mean (``{"mean", "std"}``, with ``"seeds"`` where it is defined at only some seeds,
    ``None`` at none), and the non-finite tasks per seed.

    >>> cell = lambda v: {"nonfinite_tasks": 0, "raw": {"mse": {"mean": v}}}
    >>> summarize_conditions({"0": {"conditions": {"shots": {"1": cell(1.0)}}},
    ...                       "1": {"conditions": {"shots": {"1": cell(3.0)}}}}, ["raw"], ["mse"])
    {'shots': {'1': {'nonfinite_tasks': {'0': 0, '1': 0}, 'raw': {'mse': {'mean': 2.0, 'std': 1.4142135623730951}}}}}
    """
    out: dict = {}
    for group, entries in next(iter(per_seed.values()))["conditions"].items():
        for label in entries:
            cells = {s: r["conditions"][group][label] for s, r in per_seed.items()}
            summary = {"nonfinite_tasks": {s: c["nonfinite_tasks"] for s, c in cells.items()}}
            for kind in kinds:
                summary[kind] = {}
                for metric in metrics:
                    values = {s: c[kind][metric]["mean"] for s, c in cells.items() if c[kind] is not None}
                    stats = seed_stats(list(values.values())) if values else None
                    summary[kind][metric] = stats and {"mean": stats["mean"], "std": stats["std"]}
                    if stats and len(values) < len(cells):
                        summary[kind][metric]["seeds"] = [int(s) for s in values]
            out.setdefault(group, {})[label] = summary
    return out


def write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def write_table(out: Path, protocol: str, summary: dict, text: str) -> dict:
    """``out/table.json`` (``{"protocol", "tables": summary}``) and ``out/table.md`` (``text``),
    printed; returns the JSON payload."""
    payload = {"protocol": protocol, "tables": summary}
    write_json(out / "table.json", payload)
    (out / "table.md").write_text(text)
    print(text)
    return payload


def stage_parser(description: str, out: str, stages=("select", "final", "table"),
                 **defaults) -> "argparse.ArgumentParser":
    """The options every protocol benchmark shares: the stage (one of ``stages``), ``--out``,
    ``--seeds``, ``--jobs`` and the defaults given (``meta_iters``, ``eval_tasks``, ``val_tasks``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("stage", choices=stages)
    p.add_argument("--reevaluate", action="store_true",
                   help="final: evaluate the kept runs (--keep-runs) again from their checkpoints, no meta-training")
    p.add_argument("--out", default=out)
    p.add_argument("--meta-iters", type=int, default=defaults["meta_iters"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--eval-tasks", type=int, default=defaults["eval_tasks"], help="test tasks per run")
    p.add_argument("--val-tasks", type=int, default=defaults["val_tasks"],
                   help="validation tasks of the post-hoc recalibration")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--engine", choices=ENGINES, default="threads",
                   help="run the runs as threads of this process, or as Ray Tune trials (the 'sweep' extra)")
    p.add_argument("--address", default=None,
                   help="--engine ray: a running Ray cluster (default: a local Ray on this machine)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None, metavar="A,B",
                   help="only these methods, in this order: their final runs and their selection grids")
    p.add_argument("--keep-runs", default=None, metavar="DIR",
                   help="keep the final runs' folders (checkpoints, figures) under DIR instead of removing them")
    return p


def rounded(value, digits: int = 6):
    """``value`` with every float to ``digits`` significant digits (NaN and Inf as ``None``).

    >>> rounded({"a": [0.123456789, float("nan")], "b": 3})
    {'a': [0.123457, None], 'b': 3}
    """
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value
