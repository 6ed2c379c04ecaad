"""A hyper-parameter sweep of a method's preset on the sine task with Ray Tune, scored on
validation tasks only.

    python -m benchmarks.sweep --method imaml --grid precision=0.3,1,3 --grid meta_lr=0.001,0.003 --out runs/sweep
    python -m benchmarks.sweep --method maml --address ray://head:10001 --out /shared/sweep   # on a Ray cluster

Each trial is one configuration (a point of the ``--grid`` product, each at every ``--seeds``
seed) in a process of its own, one CPU and ``--threads`` torch threads each. A trial builds the
method's recipe (:func:`ibaml.build_learner`, the grid's values overriding the preset), the
network ``MLP(1, hidden, 1)`` and the method's noise model (:func:`ibaml.recipes.regression_likelihood`),
meta-trains it with :func:`ibaml.train.training.fit` on the training stream (seed ``S``) and reports
the training loss at each checkpoint to Tune (``fit``'s ``on_checkpoint``). It is then scored
on ``--val-tasks`` **validation** tasks, the stream of seed ``40000 + S`` (the example's
``--eval-split val`` stream): MSE, NLL, 90 % coverage, calibration error, CRPS. The test streams
(``10000 + S``, ``20000 + S``) are never drawn.

Selection: the configuration with the lowest ``--metric`` averaged over the seeds.

Outputs in ``--out``: ``sweep.json`` (every trial's configuration, seed, validation metrics
and time; per configuration the mean and standard deviation over the seeds; the chosen one),
``best_config.json`` (``{"method", "config", ...}``: ``config`` holds keyword arguments of
:func:`ibaml.build_learner`, so that a recipe reads it as
``ibaml.build_learner(method, net, likelihood, **json.load(f)["config"])``), and a table on
standard output. Ray runs locally by default (a Ray instance on this machine, started and
stopped with the sweep); ``--address`` joins a running cluster. Ray is the ``sweep`` extra:
``pip install -e ".[sweep]"``.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch

import ibaml
from ibaml import recipes
from ibaml.data import SineTaskDistribution
from ibaml.train import training

from . import _harness as H

#: seed of the validation stream, added to the training seed (the test streams are 10000 + S and 20000 + S)
VALIDATION_SEED = 40_000
#: metrics a sweep can minimise (validation means)
METRICS = ("nll", "mse", "crps", "calibration_error")
#: the grid of a method when none is given: its regulariser or step size, and the meta learning rate
DEFAULT_GRID = {
    "maml": {"inner_lr": [0.001, 0.002, 0.004], "meta_lr": [0.001, 0.003]},
    "anil": {"inner_lr": [0.002, 0.005, 0.01], "meta_lr": [0.001, 0.003]},
    "fomaml": {"inner_lr": [0.001, 0.002, 0.004], "meta_lr": [0.001, 0.003]},
    "imaml": {"precision": [0.3, 1.0, 3.0], "meta_lr": [0.001, 0.003]},
    "abml": {"kl_weight": [0.3, 1.0, 3.0], "meta_lr": [0.001, 0.003]},
    "ibaml": {"kl_weight": [0.3, 1.0, 3.0], "meta_lr": [0.001, 0.003]},
    "lazy": {"precision": [0.3, 1.0, 3.0], "meta_lr": [0.001, 0.003]},
}


def tunable_names() -> List[str]:
    """The keyword arguments a grid may set: those of :func:`ibaml.build_learner` and of
    :class:`ibaml.MetaLearner` that it passes on (``meta_lr``, ...)."""
    names = set(inspect.signature(ibaml.build_learner).parameters) | set(inspect.signature(ibaml.MetaLearner).parameters)
    return sorted(names - {"method", "net", "likelihood", "learner_kwargs", "model", "prior", "process_group", "self"})


def parse_value(text: str):
    """A grid value from the command line: an integer, a float, ``true``/``false``/``none``, or text.

    >>> [parse_value(v) for v in ("3", "0.5", "1e-3", "true", "none", "sgd")]
    [3, 0.5, 0.001, True, None, 'sgd']
    """
    special = {"true": True, "false": False, "none": None}
    if text.lower() in special:
        return special[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_grid(items: Sequence[str]) -> Dict[str, list]:
    """``["precision=0.3,1", "meta_lr=0.001"]`` → ``{"precision": [0.3, 1], "meta_lr": [0.001]}``.

    >>> parse_grid(["precision=0.3,1", "meta_lr=0.001"])
    {'precision': [0.3, 1], 'meta_lr': [0.001]}
    """
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise ValueError(f"--grid {item!r}: expected NAME=V1,V2,... (e.g. --grid precision=0.3,1,3)")
        grid[name.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


def configurations(grid: Mapping[str, Sequence]) -> List[dict]:
    """Every point of the grid's product, in a fixed order.

    >>> configurations({"a": [1, 2], "b": [0]})
    [{'a': 1, 'b': 0}, {'a': 2, 'b': 0}]
    """
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def summarise(trials: Sequence[Mapping], metric: str) -> List[dict]:
    """Per configuration (in order of first appearance), the mean and standard deviation over
    its seeds of each validation metric, best (lowest ``metric``) first; failed trials count
    under ``"failed"``.

    >>> rows = summarise([{"config": {"a": 1}, "seed": 0, "metrics": {"nll": 2.0}},
    ...                   {"config": {"a": 1}, "seed": 1, "metrics": {"nll": 1.0}},
    ...                   {"config": {"a": 2}, "seed": 0, "metrics": {"nll": 0.5}}], "nll")
    >>> [(r["config"], r["mean"]["nll"], r["seeds"]) for r in rows]
    [({'a': 2}, 0.5, [0]), ({'a': 1}, 1.5, [0, 1])]
    """
    groups: Dict[str, dict] = {}
    for t in trials:
        row = groups.setdefault(json.dumps(t["config"], sort_keys=True),
                                {"config": t["config"], "seeds": [], "values": {}, "failed": 0})
        if t.get("metrics") is None:
            row["failed"] += 1
            continue
        row["seeds"].append(t["seed"])
        for k, v in t["metrics"].items():
            row["values"].setdefault(k, []).append(v)
    rows = []
    for row in groups.values():
        values = row.pop("values")
        row["mean"] = {k: statistics.fmean(v) for k, v in values.items()}
        row["std"] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        rows.append(row)
    return sorted(rows, key=lambda r: r["mean"].get(metric, float("inf")))


def table(rows: Sequence[Mapping], metric: str) -> str:
    """The configurations as a Markdown table, ``metric`` mean ± standard deviation over seeds."""
    names = list(rows[0]["config"]) if rows else []
    head = "| " + " | ".join(names + [f"validation {metric}", "seeds", "failed"]) + " |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for r in rows:
        value = f"{r['mean'][metric]:.4f} ± {r['std'][metric]:.4f}" if metric in r["mean"] else "—"
        cells = [str(r["config"][n]) for n in names] + [value, str(len(r["seeds"])), str(r["failed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_trial(config: dict) -> None:
    """One trial, in a Ray worker: meta-train the configured recipe on the training stream and
    report its validation metrics (``config`` holds the grid's values plus ``"_run"``, the sweep's settings)."""
    from ray import tune

    run, overrides = config["_run"], {k: v for k, v in config.items() if k not in ("_run", "seed")}
    seed = int(config["seed"])
    torch.set_num_threads(run["threads"])
    dtype = getattr(torch, run["dtype"])
    noise = recipes.REGRESSION_NOISE.get(run["method"], "shared")
    torch.manual_seed(seed)
    net = ibaml.core.nets.MLP(1, tuple(run["hidden"]), 1, noise_head=noise.startswith("task")).to(dtype)
    learner = ibaml.build_learner(run["method"], net, recipes.regression_likelihood(noise).to(dtype), seed=seed,
                                  **overrides)
    tasks = SineTaskDistribution(shots=run["shots"], query=run["query"])
    gen = torch.Generator().manual_seed(seed)

    def report(step, path, metrics):   # training progress, at each checkpoint
        tune.report({"step": step, "train_loss": float(metrics["loss"])})

    fit = training.fit(learner, lambda: tasks.sample(run["meta_batch"], gen, dtype=dtype), run["meta_iters"],
                       folder=Path(tune.get_context().get_trial_dir()) / "run", rng={"tasks": gen},
                       checkpoint_every=max(1, run["meta_iters"] // 4), on_checkpoint=report, progress=False)
    validation = tasks.sample(run["val_tasks"], torch.Generator().manual_seed(VALIDATION_SEED + seed), dtype=dtype)
    metrics = learner.evaluate(validation).metrics
    tune.report({"step": fit.step, "train_seconds": fit.seconds, "done": True,
                 **{f"val_{k}": float(metrics[k]["mean"]) for k in METRICS + ("coverage_90",)}})


def run_sweep(args, grid: Mapping[str, Sequence]) -> List[dict]:
    """Run every configuration of ``grid`` at every seed on Ray Tune; one record per trial."""
    import ray
    from ray import tune

    run = {k: getattr(args, k) for k in ("method", "meta_iters", "meta_batch", "val_tasks", "shots", "query",
                                         "threads", "dtype", "hidden")}
    space = {k: tune.grid_search(list(v)) for k, v in grid.items()}
    space.update(seed=tune.grid_search(list(args.seeds)), _run=run)
    ray.init(address=args.address, num_cpus=None if args.address else args.cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(run_trial, {"cpu": 1}), param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=args.cpus or None),
            run_config=tune.RunConfig(name="sweep", storage_path=str(Path(args.out).resolve() / "ray"), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    trials = []
    for result in results:
        config = {k: v for k, v in result.config.items() if k not in ("_run", "seed")}
        m = result.metrics or {}
        ok = result.error is None and m.get("done")
        trials.append({"config": config, "seed": result.config["seed"],
                       "metrics": {k: m[f"val_{k}"] for k in METRICS + ("coverage_90",)} if ok else None,
                       "train_seconds": m.get("train_seconds"),
                       "error": None if result.error is None else str(result.error).strip().splitlines()[-1]})
    return sorted(trials, key=lambda t: (json.dumps(t["config"], sort_keys=True), t["seed"]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="imaml", choices=ibaml.METHODS)
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help=f"values of a recipe argument (repeatable; default: the method's DEFAULT_GRID); "
                        f"names: {', '.join(tunable_names())}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, each config runs at every one")
    p.add_argument("--metric", default="nll", choices=METRICS, help="validation metric to minimise")
    p.add_argument("--meta-iters", type=int, default=300)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--val-tasks", type=int, default=500, help="validation tasks scored per trial")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--query", type=int, default=10)
    p.add_argument("--hidden", default="40,40", help="hidden widths of the MLP")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--cpus", type=int, default=None, help="trials at a time (local Ray: CPUs it may use)")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: a local Ray on this machine)")
    p.add_argument("--out", default="runs/sweep", help="output folder: sweep.json, best_config.json")
    args = p.parse_args(argv)
    for name in ("meta_iters", "meta_batch", "val_tasks", "shots", "query", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        args.grid = parse_grid(args.grid) or DEFAULT_GRID[args.method]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.hidden = [int(h) for h in args.hidden.split(",")]
    except ValueError as e:
        p.error(str(e))
    unknown = sorted(set(args.grid) - set(tunable_names()))
    if unknown:
        p.error(f"--grid {', '.join(unknown)}: not an argument of ibaml.build_learner (choose from "
                f"{', '.join(tunable_names())})")
    return args


def main(argv=None) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit('error: the sweep needs Ray Tune: pip install -e ".[sweep]"')
    args = parse_args(argv)
    start = time.perf_counter()
    trials = run_sweep(args, args.grid)
    rows = summarise(trials, args.metric)
    done = [r for r in rows if args.metric in r["mean"]]
    if not done:
        sys.exit(f"error: every trial failed; first error: {trials[0]['error']}")
    best = done[0]
    out = Path(args.out)
    split = (f"validation: {args.val_tasks} tasks of the stream of seed {VALIDATION_SEED} + S (x in [-5, 5]); "
             f"the test streams are not drawn")
    chosen = {"method": args.method, "config": best["config"], "metric": args.metric,
              "validation_mean": best["mean"][args.metric], "validation_std": best["std"][args.metric],
              "seeds": best["seeds"], "split": split, "meta_iters": args.meta_iters, "meta_batch": args.meta_batch}
    payload = {"method": args.method, "grid": args.grid, "seeds": args.seeds, "metric": args.metric, "split": split,
               "settings": {k: getattr(args, k) for k in ("meta_iters", "meta_batch", "val_tasks", "shots", "query",
                                                          "hidden", "dtype", "threads")},
               "ray": __import__("ray").__version__, "address": args.address or "local",
               "trials": trials, "configs": rows, "best": chosen, "seconds": time.perf_counter() - start,
               **H.environment(torch.device("cpu"))}
    H.write_json_file(out / "sweep.json", payload)
    H.write_json_file(out / "best_config.json", chosen)
    print(table(rows, args.metric))
    print(f"\nchosen on validation tasks: {args.method} {json.dumps(best['config'])} "
          f"({args.metric} {best['mean'][args.metric]:.4f}); {len(trials)} trials in {payload['seconds']:.0f} s")
    print(f"wrote {out / 'sweep.json'} and {out / 'best_config.json'}")
    return payload


if __name__ == "__main__":
    main()
