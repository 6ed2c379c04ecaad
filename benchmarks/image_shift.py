"""Few-shot image classification away from the training condition: the accuracy, NLL, per-task
and pooled ECE of meta-trained image learners at other shot counts than their training's and
on a class pool their training never saw, raw and temperature-scaled, with the temperature
fitted once at the training condition and no refit at the test conditions.

    python -m benchmarks.image_shift --runs /work/runs/image_protocol/runs/5shot --out docs/results/image_benchmark/shift

``--runs`` is searched for finished runs of ``examples/miniimagenet.py`` (a folder holding
``last.pt`` and the run's ``metrics.json``; ``python -m benchmarks.image_protocol final
--keep-runs DIR`` leaves them at ``DIR/runs/<K>shot/seed<S>/<method>/``). A checkpoint without
``metrics.json`` beside it (a run still going) is listed as incomplete and left out. Each
learner is rebuilt from its checkpoint's configuration as the example builds it
(:func:`ibaml.recipes.image_presets.image_learner_from_config`: Conv4, the method's preset with the
options recorded, the logit scale) and its meta-trained state loaded; the dataset is the
run's own (:func:`ibaml.experiments.cli.load_image_data` of its options: the stroke fixture of its
``--data-seed`` at its ``--image-size``), every task normalised with the training classes'
channel statistics, as the example does.

**Temperature scaling** (:func:`ibaml.calibration.fit_logit_scale`) is fitted once per model
to the example's own validation tasks: the validation classes at the training condition
(``ways``-way ``shots``-shot), stream seed 10000 + S, as many tasks as the run used, drawn
``eval_chunk`` at a time, so the scale is the one in the run's ``metrics.json``, which is
checked (``rebuilt_as_run``). It is applied unchanged to every condition below.

Conditions (``--tasks`` tasks each, ``ways``-way with the run's query size, every one from a
random stream of its own, :func:`stream_seeds`, apart from the example's meta-training (S),
validation (10000 + S, 30000 + S) and test (20000 + S) streams):

* **test**: the run's test classes at ``--shots`` support images per class (default 1, 5, 10);
* **shifted**: a second stroke dataset written by
  :func:`ibaml.data.fixtures.write_stroke_fixture` with other knobs (``--shifted-seed``, a
  second alphabet: every character drawn anew; ``--shifted-strokes`` strokes per character;
  ``--shifted-thickness`` stroke widths; the other knobs at their defaults), resized as the
  run's images and normalised with the training classes' statistics; its test split's
  ``--shifted-classes`` classes at ``--shifted-shots`` (default 5 and 1). It is written to
  ``--shifted-root`` (kept) or to a temporary folder (removed after).

A task whose adaptation or outputs are not finite is counted in ``nonfinite_tasks`` of its
condition and left out of that condition's metrics (a chunk that raises counts all its tasks,
its message in ``errors``); a condition where every task is non-finite has ``null`` metrics.
Nothing is dropped: the table and ``nonfinite`` in the JSON name each such condition.

Outputs in ``--out``: ``shift.json`` (per method: per seed and condition the metrics, mean ±
95% CI over tasks, the pooled reliability bins, the stream and the classes each comes from;
their mean and standard deviation over the seeds; the shifted pool's knobs), ``table.md``
(printed too), ``ece_vs_shots.png`` (pooled ECE against shots per method, raw and
temperature-scaled, mean ± std over seeds) and ``reliability_<pool>_<K>shot.png`` for the
1-shot test condition and every shifted condition (every seed's query points pooled; raw above,
temperature-scaled below). ``table.md`` and the figures are drawn from the JSON as written
(:func:`render`), so the committed JSON renders the committed table.

Why this file is long: it is one measurement, the image counterpart of
:mod:`benchmarks.sine_shift`, whose parts (rebuilding a run, the temperature refit it is
checked by, the conditions and their non-finite tasks, the summary over seeds, and the table,
sentences and figures drawn from that summary) share one JSON layout and change together.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ibaml.calibration import CalibrationReport, fit_logit_scale
from ibaml.data import DatasetError, EpisodeSampler, load_splits
from ibaml.data.fixtures import write_stroke_fixture
from ibaml.experiments.cli import check_ranges, load_image_data
from ibaml.recipes.image_presets import image_learner_from_config
from ibaml.recipes.presets import takes_gradient_steps
from ibaml.train.checkpoint import load_checkpoint

from . import _protocol as P

#: the methods in the order of the tables and figures
ORDER = ("maml", "anil", "imaml", "ibaml", "abml", "fomaml")
METRICS = ("accuracy", "nll", "ece", "ece_pooled", "mce", "brier", "confidence")
#: raw: the learned logit scale; calibrated: the scale fitted to the validation tasks
KINDS = ("raw", "calibrated")
KIND_NAMES = {"raw": "raw", "calibrated": "T-scaled"}
#: the example's stream of validation tasks (temperature scaling): seed VALIDATION + S
VALIDATION = 10_000
#: first seeds of this benchmark's streams, clear of the example's (S, 10000 + S, 20000 + S, 30000 + S)
STREAMS = {"test": 100_000, "shifted": 200_000}
POOLS = {"test": "test classes of the run's dataset", "shifted": "test classes of the shifted pool"}
#: the shifted pool's knobs that differ from the training data's (write_stroke_fixture's defaults)
SHIFTED = {"seed": 1, "strokes": (5, 8), "thickness": (1.0, 2.5)}


def stream_seeds(seed: int, shots: Dict[str, Sequence[int]]) -> Dict[str, Dict[str, int]]:
    """The seed of every condition's task stream for a model meta-trained with seed ``seed``:
    ``STREAMS[pool] + 1000 i + S`` for the i-th shot count of the pool.

    >>> stream_seeds(2, {"test": [1, 5, 10], "shifted": [1, 5]})
    {'test': {'1': 100002, '5': 101002, '10': 102002}, 'shifted': {'1': 200002, '5': 201002}}
    """
    return {pool: {str(k): STREAMS[pool] + 1000 * i + seed for i, k in enumerate(ks)} for pool, ks in shots.items()}


# ---------------------------------------------------------------------------- runs and data
def find_runs(root: Path, methods: Sequence[str] = ORDER) -> Tuple[List[dict], List[str]]:
    """``(runs, incomplete)``: every ``last.pt`` under ``root`` with the image example's
    ``metrics.json`` beside it, of one of ``methods`` (``{"folder", "method", "checkpoint",
    "metrics", "args"}``, ``args`` the configuration the run was evaluated with), and the
    checkpoints without one."""
    runs, incomplete = [], []
    for checkpoint in sorted(Path(root).rglob("last.pt")):
        metrics = checkpoint.parent / "metrics.json"
        payload = json.loads(metrics.read_text()) if metrics.is_file() else {}
        cfg = payload.get("config", {})
        if "image_shape" not in payload or "method" not in cfg:
            incomplete.append(str(checkpoint))
            continue
        if cfg["method"] in methods:
            runs.append({"folder": str(checkpoint.parent), "method": cfg["method"], "checkpoint": str(checkpoint),
                         "metrics": payload, "args": cfg})
    return runs, incomplete


#: the options of a run that decide its images (``ibaml.experiments.cli.add_image_data_options`` and the task sizes)
DATA_OPTIONS = ("dataset", "data_root", "format", "fixture", "fixture_kind", "image_size", "rotations", "split_sizes",
                "split_file", "data_seed", "workers", "ways", "shots", "query")


_DATA: dict = {}


def run_splits(args: dict, device) -> dict:
    """The run's ``{"train", "val", "test"}`` image splits, as the example reads them
    (:func:`ibaml.experiments.cli.load_image_data` of its options), kept for the next run with the same."""
    key = ("run", str(device), json.dumps({k: v for k, v in sorted(args.items()) if k in DATA_OPTIONS}))
    if key not in _DATA:
        _DATA[key] = load_image_data(argparse.Namespace(**args), device)
    return _DATA[key]


def shifted_splits(root: str, image_size: Optional[int], device) -> dict:
    """The shifted pool's splits at ``image_size`` (kept for the next run with the same)."""
    key = ("shifted", root, image_size, str(device))
    if key not in _DATA:
        _DATA[key] = load_splits(root, "miniimagenet", image_size=image_size, device=device)
    return _DATA[key]


def write_shifted_pool(root: Path, knobs: dict) -> Path:
    """:func:`ibaml.data.fixtures.write_stroke_fixture` at ``root`` with ``knobs`` (its
    arguments; ``n_classes_per_split`` one train and one validation class and the pool's test
    classes, the only split evaluated)."""
    return write_stroke_fixture(root, "pickle", **knobs)


def stroke_knobs(**given) -> dict:
    """Every knob of :func:`ibaml.data.fixtures.write_stroke_fixture`: its defaults, then ``given``.

    >>> stroke_knobs(seed=3)["strokes"], stroke_knobs(seed=3)["seed"]
    ((2, 5), 3)
    """
    params = inspect.signature(write_stroke_fixture).parameters
    return {**{k: v.default for k, v in params.items() if k not in ("root", "format")}, **given}


def shifted_knobs(seed: int, strokes: Sequence[int], thickness: Sequence[float], classes: int,
                  images_per_class: int = 30) -> dict:
    """The arguments of :func:`write_shifted_pool`: the pool's size and the knobs that differ
    from the training data's.

    >>> shifted_knobs(1, (5, 8), (1.0, 2.5), 20)["n_classes_per_split"]
    [1, 1, 20]
    """
    return {"n_classes_per_split": [1, 1, int(classes)], "images_per_class": int(images_per_class), "seed": int(seed),
            "strokes": [int(s) for s in strokes], "thickness": [float(t) for t in thickness]}


# ---------------------------------------------------------------------------- outputs and metrics
def task_outputs(learner, sampler: EpisodeSampler, num_tasks: int, chunk: int, seed: int):
    """``(outputs [T, S, N, C], labels [T, N], errors)``: ``num_tasks`` tasks of ``sampler``
    adapted ``chunk`` at a time with the learner's and the sampler's generators started from
    ``seed`` (the example's ``task_outputs(..., seed=seed)``, the same tasks and draws), on the
    CPU in float64. A chunk that raises gives NaN for its tasks, its message in ``errors``."""
    learner.generator.manual_seed(seed)
    sampler.generator.manual_seed(seed)
    labels = torch.arange(sampler.ways).repeat_interleave(sampler.query)
    parts, errors = [], []
    for start in range(0, num_tasks, chunk):
        n = min(chunk, num_tasks - start)
        try:
            out, _ = learner.task_outputs(sampler.sample, n, chunk=n)
        except (RuntimeError, ValueError) as e:
            errors.append(f"tasks {start}-{start + n - 1}: {(str(e).splitlines() or [type(e).__name__])[0]}")
            out = n
        parts.append(out)
    shape = next((p.shape[1:] for p in parts if isinstance(p, torch.Tensor)), (1, labels.numel(), sampler.ways))
    outputs = torch.cat([p if isinstance(p, torch.Tensor) else torch.full((p, *shape), math.nan, dtype=torch.float64)
                         for p in parts])
    return outputs, labels.expand(num_tasks, -1), errors


def finite_tasks(outputs: torch.Tensor) -> torch.Tensor:
    """``[T]``: the tasks whose outputs are finite at every draw, query point and class."""
    return torch.isfinite(outputs).flatten(1).all(1)


def condition_metrics(outputs, labels, scales: Dict[str, Optional[float]]) -> dict:
    """One condition's metrics over its finite tasks (:func:`finite_tasks`) at each logit scale of
    ``scales`` (``{"raw": learned, "calibrated": fitted}``): ``{"tasks", "nonfinite_tasks", kind:
    {metric: {"mean", "ci95"}}, "bins": {kind: pooled reliability bins}}``, a kind ``None``
    where no task is finite or it has no scale.

    >>> f = torch.zeros(2, 1, 3, 2); f[0, 0, :, 0] = 2.0; f[1, 0, 0, 0] = float("nan")
    >>> out = condition_metrics(f, torch.zeros(2, 3, dtype=torch.long), {"raw": 1.0, "calibrated": None})
    >>> out["nonfinite_tasks"], out["raw"]["accuracy"]["mean"], out["calibrated"]
    (1, 1.0, None)
    """
    ok = finite_tasks(outputs)
    entry = {"tasks": int(ok.numel()), "nonfinite_tasks": int((~ok).sum()), "bins": {}}
    for kind, scale in scales.items():
        if not bool(ok.any()) or scale is None:
            entry[kind] = entry["bins"][kind] = None
            continue
        report = CalibrationReport.from_logits(outputs[ok], labels[ok], scale)
        entry[kind] = {k: report.metrics[k] for k in METRICS}
        entry["bins"][kind] = report.bins
    return entry


def run_test(metrics: dict, seed: int) -> dict:
    """The run's own test numbers (its ``metrics.json``: test classes, stream 20000 + S), for
    reference beside this benchmark's 5-shot test condition."""
    kinds = {"raw": metrics, "calibrated": metrics.get("calibrated", {})}
    return {"stream_seed": 20_000 + seed, "tasks": metrics.get("num_test_tasks"),
            **{kind: {k: m.get(k, {}).get("mean") for k in ("accuracy", "ece_pooled")} for kind, m in kinds.items()}}


def rebuild(run: dict, device, support_scaled: bool = False):
    """``(learner, splits, checkpoint)``: the run's learner built from its checkpoint's
    configuration as the example builds it, with the meta-trained state loaded, and the run's
    image splits. ``support_scaled``: a gradient method's inner objective scaled by
    ``min(1, N₀/N)`` on ``N`` support images, ``N₀ = ways · shots`` of meta-training
    (``MetaLearner(inner_support_size=N₀)``)."""
    checkpoint = load_checkpoint(run["checkpoint"], map_location="cpu")
    splits = run_splits(run["args"], device)
    config = dict(checkpoint["config"])
    if support_scaled and takes_gradient_steps(config["method"], config.get("inner_optimizer"), config.get("prior")):
        config["inner_support_size"] = int(config["ways"]) * int(config["shots"])
    learner = image_learner_from_config(config, splits["train"].image_shape, device)
    learner.load_training_state(checkpoint["training"])
    return learner, splits, checkpoint


def evaluate_run(run: dict, settings: dict) -> dict:
    """The temperature fit and every condition of ``settings`` for one run: see the module docstring."""
    clock, device = time.perf_counter(), torch.device(settings["device"])
    torch.set_num_threads(settings["threads"])
    learner, splits, state = rebuild(run, device, settings.get("support_scaled", False))
    cfg, args, method = state["config"], run["args"], run["method"]
    dtype, seed = getattr(torch, cfg["dtype"]), int(cfg["seed"])
    ways, shots, query = int(cfg["ways"]), int(cfg["shots"]), int(cfg["query"])
    mean, std = splits["train"].channel_stats()     # every task normalised as the training's

    def sampler(data, k: int) -> EpisodeSampler:
        return EpisodeSampler(data, ways, k, query, seed=0, mean=mean, std=std, dtype=dtype)

    learned = float(learner.likelihood.scale.detach())
    val_tasks, val_chunk = int(args.get("val_tasks", 100)), int(args.get("eval_chunk", 25))
    out, y, errors = task_outputs(learner, sampler(splits["val"], shots), val_tasks, val_chunk, VALIDATION + seed)
    ok = finite_tasks(out)
    fitted = fit_logit_scale(out[ok], y[ok]) if bool(ok.any()) else None
    in_run = run["metrics"].get("calibrated", {}).get("logit_scale")
    result = {"folder": run["folder"], "method": method, "seed": seed, "data_seed": args.get("data_seed"),
              "config": {k: cfg.get(k) for k in ("ways", "shots", "query", "channels", "image_size", "inner_steps",
                                                 "eval_inner_steps", "inner_lr", "precision", "kl_weight", "cg_steps",
                                                 "predictive_samples", "meta_iters", "dtype")},
              "checkpoint_step": int(state["step"]),
              "validation": {"classes": "validation classes of the run's dataset", "stream_seed": VALIDATION + seed,
                             "tasks": val_tasks, "shots": shots, "chunk": val_chunk,
                             "nonfinite_tasks": int((~ok).sum()), "errors": errors},
              "logit_scale": {"learned": learned, "learned_in_run": run["metrics"].get("logit_scale"),
                              "fitted": fitted, "fitted_in_run": in_run},
              "rebuilt_as_run": (fitted is not None and in_run is not None
                                 and math.isclose(fitted, in_run, rel_tol=settings["check_tol"])),
              "fitted_relative_difference": None if fitted is None or not in_run else abs(fitted / in_run - 1),
              "run_test": run_test(run["metrics"], seed)}
    pools = {"test": splits["test"]}
    if settings["shifted_root"] is not None:
        pools["shifted"] = shifted_splits(settings["shifted_root"], args.get("image_size"), device)["test"]
    chunk = settings["chunk"] or val_chunk
    conditions: dict = {}
    for pool, streams in stream_seeds(seed, {p: settings["shots"][p] for p in pools}).items():
        conditions[pool] = {}
        for label, stream in streams.items():
            k = int(label)
            cell = {"classes": POOLS[pool], "shots": k, "ways": ways, "query": query, "stream_seed": stream}
            try:
                out, y, errors = task_outputs(learner, sampler(pools[pool], k), settings["tasks"], chunk, stream)
            except DatasetError as e:   # too few images per class for this many shots
                out, y, errors = (torch.full((settings["tasks"], 1, ways * query, ways), math.nan),
                                  torch.zeros(settings["tasks"], ways * query, dtype=torch.long), [str(e)])
            conditions[pool][label] = {**cell, "errors": errors,
                                       **condition_metrics(out, y, {"raw": learned, "calibrated": fitted})}
    return {**result, "conditions": conditions, "seconds": time.perf_counter() - clock}


# ---------------------------------------------------------------------------- summaries over the seeds
def _cells(r: dict):
    """``(pool, shots, cell)`` of one run's validation tasks and every condition."""
    yield "validation", r["validation"]["shots"], r["validation"]
    yield from ((pool, int(label), c) for pool, entries in r["conditions"].items() for label, c in entries.items())


def nonfinite_list(per_seed: Dict[str, dict]) -> List[dict]:
    """Every condition (the validation tasks included) of every seed with a non-finite task."""
    return [{"pool": pool, "shots": shots, "seed": int(seed), "nonfinite_tasks": c["nonfinite_tasks"],
             "tasks": c["tasks"]}
            for seed, r in per_seed.items() for pool, shots, c in _cells(r) if c["nonfinite_tasks"]]


def summarize(per_seed: Dict[str, dict]) -> dict:
    """Per pool, shot count, kind and metric, the mean and standard deviation over the seeds
    (:func:`benchmarks._protocol.summarize_conditions`)."""
    return P.summarize_conditions(per_seed, KINDS, METRICS)


def pooled_bins(per_seed: Dict[str, dict], pool: str, label: str, kind: str) -> Optional[dict]:
    """The reliability bins of one condition with every seed's query points pooled: counts
    summed, each bin's confidence and accuracy weighted by the seeds' counts."""
    bins = [r["conditions"][pool][label]["bins"][kind] for r in per_seed.values()]
    bins = [b for b in bins if b is not None]
    if not bins:
        return None
    count = [sum(b["count"][i] for b in bins) for i in range(len(bins[0]["count"]))]

    def weighted(key, i):
        total = sum(b["count"][i] * b[key][i] for b in bins if b["count"][i])
        return total / count[i] if count[i] else math.nan

    return {"edges": bins[0]["edges"], "count": count, **{key: [weighted(key, i) for i in range(len(count))]
                                                          for key in ("confidence", "accuracy")}}


# ---------------------------------------------------------------------------- table, findings, figures
def columns(settings: dict) -> List[Tuple[str, str, str]]:
    """``(heading, pool, label)`` of every condition measured: the test classes, then the shifted pool."""
    def heading(pool, k):
        return ("shifted " if pool == "shifted" else "") + f"{k} shot" + ("" if k == 1 else "s")
    order = {"test": sorted(settings["shots"]["test"]), "shifted": sorted(settings["shots"]["shifted"], reverse=True)}
    return [(heading(pool, k), pool, str(k)) for pool in ("test", "shifted") for k in order[pool]
            if pool in settings["pools"]]


def _cell(entry: dict, pool: str, label: str, kind: str, metric: str) -> str:
    cell = entry["summary"].get(pool, {}).get(label)
    if cell is None:
        return "–"
    stats = cell[kind][metric]
    text = "non-finite" if stats is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    bad = {s: n for s, n in cell["nonfinite_tasks"].items() if n}
    if bad:
        text += " (non-finite: " + ", ".join(f"seed {s} {n}" for s, n in bad.items()) + ")"
    return text


def metric_table(models: dict, settings: dict, metric: str, kinds: Sequence[str] = KINDS) -> List[str]:
    """A markdown table of ``metric``: a row per method and kind, a column per condition, mean ±
    std over the seeds."""
    cols = columns(settings)
    lines = ["| method | | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, entry in models.items():
        for kind in kinds:
            cells = [_cell(entry, pool, label, kind, metric) for _, pool, label in cols]
            lines.append(f"| {method} | {KIND_NAMES[kind]} | " + " | ".join(cells) + " |")
    return lines


def scale_table(models: dict) -> List[str]:
    """The learned logit scale and the one fitted to the validation tasks, mean ± std over seeds,
    and whether the refit equals the run's own at every seed."""
    lines = ["| method | seeds | learned τ | fitted τ (validation, training condition) | refit equals the run's |",
             "|---|---|---|---|---|"]
    for method, entry in models.items():
        stats = {k: P.seed_stats([r["logit_scale"][k] for r in entry["per_seed"].values()])
                 for k in ("learned", "fitted")}
        lines.append(f"| {method} | {len(entry['seeds'])} | " + " | ".join(
            f"{stats[k]['mean']:.2f} ± {stats[k]['std']:.2f}" for k in ("learned", "fitted"))
            + f" | {'yes' if entry['rebuilt_as_run'] else 'no'} |")
    return lines


def findings(models: dict, settings: dict, method: str = "ibaml",
             others: Sequence[str] = ("maml", "anil")) -> List[str]:
    """Per condition and kind, ``method``'s pooled ECE against each of ``others``' (mean over
    seeds, the margin, and at how many seeds it is below), and the accuracies."""
    if method not in models or not any(o in models for o in others):
        return []
    lines = []
    for heading, pool, label in columns(settings):
        for kind in KINDS:
            mine = models[method]["summary"][pool][label][kind]["ece_pooled"]
            parts = []
            for other in (o for o in others if o in models):
                theirs = models[other]["summary"][pool][label][kind]["ece_pooled"]
                if mine is None or theirs is None:
                    parts.append(f"not comparable with {other}'s (non-finite)")
                    continue
                gap = mine["mean"] - theirs["mean"]
                theirs_by_seed = models[other]["per_seed"]
                per_seed = [(r["conditions"][pool][label][kind], theirs_by_seed[s]["conditions"][pool][label][kind])
                            for s, r in models[method]["per_seed"].items() if s in theirs_by_seed]
                below = sum(a["ece_pooled"]["mean"] < b["ece_pooled"]["mean"] for a, b in per_seed if a and b)
                parts.append(f"{'below' if gap < 0 else 'not below'} {other}'s {theirs['mean']:.4f} "
                             f"({'by' if gap < 0 else 'above by'} {abs(gap):.4f}; "
                             f"below at {below} of {len(per_seed)} seeds)")
            if mine is not None:
                lines.append(f"At {heading} ({KIND_NAMES[kind]}), {method}'s pooled ECE {mine['mean']:.4f} is "
                             + "; ".join(parts) + ".")
        acc = {m: models[m]["summary"][pool][label]["raw"]["accuracy"] for m in (method, *others) if m in models}
        if all(acc.values()):
            lines.append(f"At {heading}, accuracy: " + ", ".join(f"{m} {a['mean']:.3f}" for m, a in acc.items()) + ".")
    return [f"- {line}" for line in lines]


def support_size_findings(new: dict, old: dict, method: str, new_label: str, old_label: str) -> str:
    """A markdown list item for ``method`` in two payloads' ``models`` (the same models adapted two
    ways on the same tasks): the test-class support sizes at which its raw metrics are equal in
    both (every seed's, to the digit recorded), and at each other size its accuracy, NLL and
    pooled ECE (raw, mean over seeds) in both."""
    if method not in new or method not in old:
        return ""
    a, b = new[method], old[method]
    mean = lambda e, label, metric: e["summary"]["test"][label]["raw"][metric]["mean"]
    same, changed = [], []
    for label in a["summary"]["test"]:
        cells = [[s["conditions"]["test"][label]["raw"] for s in e["per_seed"].values()] for e in (a, b)]
        (same if cells[0] == cells[1] else changed).append(label)
    text = f"- {method}: the same at {', '.join(same) or 'no'} shots (every seed)"
    for label in changed:
        text += (f"; at {label} shots accuracy {mean(a, label, 'accuracy'):.3f} {new_label} against "
                 f"{mean(b, label, 'accuracy'):.3f} {old_label}, NLL {mean(a, label, 'nll'):.3f} against "
                 f"{mean(b, label, 'nll'):.3f}, pooled ECE {mean(a, label, 'ece_pooled'):.3f} against "
                 f"{mean(b, label, 'ece_pooled'):.3f}")
    return text + "."


def markdown(models: dict, settings: dict) -> str:
    """Tables of pooled ECE, accuracy, NLL and per-task ECE (mean ± std over seeds), the logit
    scales, the non-finite tasks, and :func:`findings`."""
    lines = ["### Pooled ECE", "", *metric_table(models, settings, "ece_pooled"), "",
             "### Accuracy", "", *metric_table(models, settings, "accuracy", ("raw",)), "",
             "### NLL", "", *metric_table(models, settings, "nll"), "",
             "### Per-task ECE", "", *metric_table(models, settings, "ece"), "",
             "### Logit scales", "", *scale_table(models), ""]
    flagged = [f"| {m} | {e['pool']} {e['shots']}-shot | {e['seed']} | {e['nonfinite_tasks']} / {e['tasks']} |"
               for m, entry in models.items() for e in entry["nonfinite"]]
    if flagged:
        lines += ["### Non-finite tasks (left out of their condition's metrics)", "",
                  "| method | condition | seed | tasks non-finite |", "|---|---|---|---|", *flagged, ""]
    found = findings(models, settings)
    if found:
        lines += ["### iBaML's pooled ECE against MAML's and ANIL's", "", *found, ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ece_figure(models: dict, settings: dict, train_shots: Optional[int]):
    """Pooled ECE against shots, a line per method (solid: the test classes, dashed with open
    markers: the shifted pool), mean ± std over seeds; raw left, temperature-scaled right."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for method, entry in models.items():
            colour = f"C{ORDER.index(method) if method in ORDER else len(ORDER)}"
            for pool, style in (("test", dict(ls="-", marker="o")), ("shifted", dict(ls="--", marker="s", mfc="none"))):
                cells = entry["summary"].get(pool, {})
                ks = sorted(cells, key=int)
                stats = [cells[k][kind]["ece_pooled"] for k in ks]
                if not ks:
                    continue
                ax.errorbar([int(k) for k in ks], [math.nan if s is None else s["mean"] for s in stats],
                            yerr=[math.nan if s is None else s["std"] for s in stats], color=colour, capsize=2, ms=4,
                            label=f"{method}, {'test classes' if pool == 'test' else 'shifted pool'}", **style)
        if train_shots is not None:
            ax.axvline(train_shots, color="0.5", ls=":", lw=1)
        ticks = sorted({int(k) for e in models.values() for cells in e["summary"].values() for k in cells})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("shots (support images per class; dotted: meta-training's)")
        ax.set_title(f"pooled ECE, {KIND_NAMES[kind]}")
    axes[0].set_ylabel("pooled ECE (mean ± std over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    return fig


def reliability_figure(models: dict, pool: str, label: str):
    """A reliability diagram per method (columns) with every seed's query points pooled, raw
    (top) and temperature-scaled (bottom), drawn by
    :meth:`ibaml.calibration.CalibrationReport.plot_reliability_diagram`."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(models), figsize=(3.4 * len(models), 7), squeeze=False)
    for col, (method, entry) in enumerate(models.items()):
        for row, kind in enumerate(KINDS):
            bins = pooled_bins(entry["per_seed"], pool, label, kind)
            if bins is None:
                axes[row][col].set_axis_off()
                continue
            CalibrationReport("classification", {}, f"{method}, {KIND_NAMES[kind]}\n",
                              bins=bins).plot_reliability_diagram(ax=axes[row][col])
    shots = f"{label} shot" + ("" if label == "1" else "s")
    fig.suptitle(f"{POOLS[pool]}, {shots}: reliability, query points of every seed pooled")
    fig.tight_layout()
    return fig


def save_figures(models: dict, settings: dict, out: Path, train_shots: Optional[int]) -> List[str]:
    plt = _pyplot()
    figures = {"ece_vs_shots.png": ece_figure(models, settings, train_shots)}
    for _, pool, label in columns(settings):
        if pool == "shifted" or label == "1":
            figures[f"reliability_{pool}_{label}shot.png"] = reliability_figure(models, pool, label)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
    return list(figures)


# ---------------------------------------------------------------------------- main
def _values(text: str, kind=int) -> list:
    """``"1,5"`` → ``[1, 5]`` (each value read by ``kind``)."""
    return [kind(v) for v in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, metavar="DIR",
                   help="folder searched for the image example's finished runs (last.pt beside metrics.json)")
    p.add_argument("--methods", default=",".join(ORDER), help="comma-separated methods to evaluate")
    p.add_argument("--tasks", type=int, default=600, help="evaluation tasks per condition")
    p.add_argument("--out", default="docs/results/image_benchmark/shift")
    p.add_argument("--shots", default="1,5,10", help="comma-separated support sizes on the test classes")
    p.add_argument("--shifted-shots", default="5,1", help="comma-separated support sizes on the shifted pool")
    p.add_argument("--shifted-seed", type=int, default=SHIFTED["seed"],
                   help="the shifted pool's generator seed (its alphabet); must differ from the runs' --data-seed")
    p.add_argument("--shifted-strokes", default=",".join(map(str, SHIFTED["strokes"])), metavar="MIN,MAX",
                   help="strokes per character of the shifted pool (the training data's: 2,5)")
    p.add_argument("--shifted-thickness", default=",".join(f"{t:g}" for t in SHIFTED["thickness"]), metavar="MIN,MAX",
                   help="stroke widths of the shifted pool, pixels of 84 (the training data's: 2,6)")
    p.add_argument("--shifted-classes", type=int, default=20, help="classes of the shifted pool")
    p.add_argument("--shifted-root", default=None, metavar="DIR",
                   help="write the shifted pool here and keep it (default: a temporary folder, removed after)")
    p.add_argument("--chunk", type=int, default=None, help="tasks adapted at a time (default: the run's --eval-chunk)")
    p.add_argument("--check-tol", type=float, default=1e-3,
                   help="relative tolerance between the refitted logit scale and the run's own")
    p.add_argument("--jobs", type=int, default=1, help="models evaluated at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--update", action="store_true",
                   help="keep the models of the methods not in --methods from an existing OUT/shift.json measured "
                        "with the same tasks, shots and shifted pool (after some methods' runs were redone)")
    p.add_argument("--support-scaled-step", action="store_true",
                   help="adapt the gradient methods (maml, anil, abml, ...) with the inner objective scaled by "
                        "min(1, N0/N) on N support images, N0 = ways x shots of meta-training")
    args = p.parse_args(argv)
    try:
        args.shots = {"test": sorted(set(_values(args.shots))),
                      "shifted": sorted(set(_values(args.shifted_shots)), reverse=True) if args.shifted_shots else []}
        args.shifted_strokes = _values(args.shifted_strokes)
        args.shifted_thickness = _values(args.shifted_thickness, float)
    except ValueError as e:
        p.error(f"--shots, --shifted-shots, --shifted-strokes or --shifted-thickness: {e}")
    if min(args.shots["test"] + args.shots["shifted"]) < 1:
        p.error("--shots and --shifted-shots must be positive")
    if len(args.shifted_strokes) != 2 or not 1 <= args.shifted_strokes[0] <= args.shifted_strokes[1]:
        p.error(f"--shifted-strokes must be MIN,MAX with 1 <= MIN <= MAX, got {args.shifted_strokes}")
    if len(args.shifted_thickness) != 2 or not 0 < args.shifted_thickness[0] <= args.shifted_thickness[1]:
        p.error(f"--shifted-thickness must be MIN,MAX with 0 < MIN <= MAX, got {args.shifted_thickness}")
    check_ranges(p, args, minimum=dict.fromkeys(("tasks", "jobs", "threads", "shifted_classes", "chunk"), 1))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} given but CUDA is not available on this machine")
    args.methods = tuple(args.methods.split(","))
    return args


def gather(results: List[dict]) -> dict:
    """``{method: {"per_seed", "seeds", "logit_scale", "rebuilt_as_run", "nonfinite", "summary"}}``
    in :data:`ORDER`, seeds ascending."""
    def rank(r):
        return ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER), r["method"], r["seed"]

    models: dict = {}
    for r in sorted(results, key=rank):
        twin = models.get(r["method"], {}).get(str(r["seed"]))
        if twin is not None:
            raise SystemExit(f"two runs of {r['method']} at seed {r['seed']}: {twin['folder']} and {r['folder']}")
        models.setdefault(r["method"], {})[str(r["seed"])] = r
    return {method: {"per_seed": runs, "seeds": [int(s) for s in runs],
                     "logit_scale": {s: r["logit_scale"]["fitted"] for s, r in runs.items()},
                     "rebuilt_as_run": all(r["rebuilt_as_run"] for r in runs.values()),
                     "nonfinite": nonfinite_list(runs), "summary": summarize(runs)} for method, runs in models.items()}


def shifted_record(knobs: dict, data_seeds: list, root: Optional[str], image_sizes: list) -> dict:
    """What ``shift.json`` says of the shifted pool: every knob it was written with, those that
    differ from the training data's (training, shifted), and how it was read."""
    defaults = stroke_knobs()
    return {"writer": "ibaml.data.fixtures.write_stroke_fixture", "format": "pickle", "knobs": stroke_knobs(**knobs),
            "changed (training, shifted)": {"seed": [data_seeds, knobs["seed"]],
                                            **{k: [list(defaults[k]), knobs[k]] for k in ("strokes", "thickness")}},
            "evaluated_split": "test", "root": root, "image_size": image_sizes,
            "normalised_with": "the training classes' channel statistics"}


def evaluate_all(runs: List[dict], settings: dict, jobs: int) -> List[dict]:
    """:func:`evaluate_run` of every run, ``jobs`` processes at a time (here when ``jobs`` is 1)."""
    if jobs == 1:
        return [evaluate_run(r, settings) for r in runs]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(evaluate_run, runs, [settings] * len(runs)))


#: the settings two measurements must share for their models to sit in one table
SHARED_SETTINGS = ("tasks", "shots", "chunk", "pools")


def kept_results(previous: dict, settings: dict, methods: Sequence[str], knobs: Optional[dict]) -> List[dict]:
    """The per-seed results of ``previous`` (a ``shift.json``) for the methods not in
    ``methods``, after checking that it measured the same conditions (:data:`SHARED_SETTINGS`
    and the shifted pool's knobs, :func:`stroke_knobs`, ``None`` without a shifted pool) as
    ``settings`` and ``knobs`` do."""
    for key in SHARED_SETTINGS:
        if previous["settings"].get(key) != json.loads(json.dumps(settings[key])):
            raise SystemExit(f"--update: the existing shift.json has {key} {previous['settings'].get(key)!r}, this "
                             f"run {settings[key]!r}; measure every method again instead")
    if (previous.get("shifted_pool") or {}).get("knobs") != json.loads(json.dumps(P.rounded(knobs, 5))):
        raise SystemExit("--update: the existing shift.json's shifted pool has other knobs; measure every method again")
    return [r for method, entry in previous["models"].items() if method not in methods
            for r in entry["per_seed"].values()]


def render(payload: dict, out: Path) -> str:
    """``table.md`` and the figures in ``out`` from ``payload`` (``shift.json``'s content, so that
    the committed JSON renders the committed table); returns the table's text."""
    models, settings = payload["models"], payload["settings"]
    text = markdown(models, settings)
    (out / "table.md").write_text(text)
    shots = payload["training_data"]["training_shots"]
    save_figures(models, settings, out, shots[0] if len(shots) == 1 else None)
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs, incomplete = find_runs(Path(args.runs), args.methods)
    if not runs:
        raise SystemExit(f"no finished image run of {', '.join(args.methods)} under {args.runs}")
    torch.set_num_threads(args.threads)
    knobs = shifted_knobs(args.shifted_seed, args.shifted_strokes, args.shifted_thickness, args.shifted_classes)
    clash = sorted({r["folder"] for r in runs if r["args"].get("data_seed") == args.shifted_seed})
    if args.shots["shifted"] and clash:
        raise SystemExit(f"--shifted-seed {args.shifted_seed} is the --data-seed of {clash[0]}: the shifted pool would "
                         f"draw the training alphabet again; pick another")
    scratch = None if args.shifted_root else tempfile.mkdtemp(prefix="ibaml-shift-")
    root = Path(args.shifted_root or scratch)
    if args.shots["shifted"]:
        write_shifted_pool(root, knobs)
    settings = {"tasks": args.tasks, "shots": args.shots, "chunk": args.chunk, "check_tol": args.check_tol,
                "threads": args.threads, "device": args.device, "support_scaled": args.support_scaled_step,
                "shifted_root": str(root) if args.shots["shifted"] else None,
                "pools": ["test"] + (["shifted"] if args.shots["shifted"] else [])}
    clock = time.perf_counter()
    try:
        results = evaluate_all(runs, settings, args.jobs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for r in results:
        print(f"{r['method']} seed {r['seed']}: {r['seconds']:.0f} s, fitted logit scale {r['logit_scale']['fitted']} "
              f"(run's {r['logit_scale']['fitted_in_run']})", flush=True)
    out = Path(args.out)
    previous = json.loads((out / "shift.json").read_text()) if args.update and (out / "shift.json").is_file() else None
    measured = sorted({r["method"] for r in results})
    if previous:
        results += kept_results(previous, settings, args.methods,
                                stroke_knobs(**knobs) if args.shots["shifted"] else None)
    models = gather(results)
    train_shots = sorted({r["config"]["shots"] for r in results})
    data_seeds = sorted({r["data_seed"] for r in results}, key=str)
    payload = {
        "protocol": "each model meta-trained once and evaluated with no refit at every condition; temperature-scaled: "
                    "the logit scale fitted to the run's own validation tasks (validation classes, training "
                    f"condition, stream seed {VALIDATION} + S) and applied unchanged to every condition; metrics "
                    "over the finite tasks (mean and 95% CI over tasks; pooled ECE's CI by resampling tasks), then "
                    "mean and sample std over the seeds found",
        "split": "test classes of the runs' dataset and of the shifted pool (no validation class is evaluated)",
        "streams": {"validation": f"{VALIDATION} + S (the example's temperature-scaling tasks)",
                    "test": f"{STREAMS['test']} + 1000 i + S (i-th of --shots)",
                    "shifted": f"{STREAMS['shifted']} + 1000 j + S (j-th of --shifted-shots)",
                    "example's own": "S meta-training, 10000 + S validation, 20000 + S test, 30000 + S selection"},
        "training_data": {"data_seeds": data_seeds, "training_shots": train_shots,
                          "knobs": {**stroke_knobs(), "seed": "the run's --data-seed"},
                          "fixture": "ibaml.data.write_fixture(kind='strokes') as the example writes it"},
        "shifted_pool": shifted_record(knobs, data_seeds, args.shifted_root,
                                       sorted({str(r["config"]["image_size"]) for r in results}))
        if args.shots["shifted"] else None,
        "settings": {k: v for k, v in settings.items() if k not in ("check_tol", "shifted_root")},
        "runs": str(args.runs), "incomplete_runs": incomplete,
        "seconds": time.perf_counter() - clock + (previous["seconds"] if previous else 0.0),
        "torch": torch.__version__, "models": models,
    }
    if previous:
        payload["updated"] = {"measured_again": measured, "kept": sorted(set(models) - set(measured))}
    saved = P.rounded(payload, 5)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift.json").write_text(json.dumps(saved, separators=(",", ":")))
    notes = {"fitted logit scale differs from the run's own (rebuilt model not the run's?)":
             [f"{r['method']} seed {r['seed']}" for r in results if not r["rebuilt_as_run"]],
             "checkpoints without metrics.json (unfinished runs) left out": incomplete}
    print("\n".join([render(saved, out), *(f"{note}: {', '.join(which)}" for note, which in notes.items() if which),
                     f"shift.json, table.md and the figures are in {out}"]))
    return payload


if __name__ == "__main__":
    main()
