"""Sine regression away from the training condition: the coverage, NLL and MSE of meta-trained
learners against the number of shots, the query's distance from the training range and the
task's amplitude, each from one meta-trained model (at 10 shots, or over a range of support
sizes with the example's ``--train-shots``), with no refit at the test conditions.

    python -m benchmarks.sine_shift --runs /work/runs/sine_protocol/runs --out docs/results/sine/shift

``--runs`` is searched for finished runs of ``examples/sine_regression.py`` (a folder holding
``metrics.json`` and ``<method>/last.pt``; ``python -m benchmarks.sine_protocol final --keep-runs DIR``
leaves them at ``DIR/runs/<noise>/seed<S>/<method>/``). A checkpoint without ``metrics.json``
beside it (a run still going) is listed as incomplete and left out. Each learner is rebuilt
from its checkpoint's configuration (network, likelihood, the preset's options as recorded:
``inner_lr``, ``precision``, ``noise_prior_count``, ``cg_steps``, ...) and its meta-trained
state loaded; where the run fitted its noise prior to held-out tasks (``--noise-fit-tasks``),
that fit is redone on the same tasks, as the example does before it evaluates.

Conditions (``--tasks`` evaluation tasks each, every one from a random stream of its own,
:func:`stream_seeds`, apart from the example's meta-training, validation and test streams):

* **shots**: ``--shots`` support points (default 1, 3, 5, 10, 20, 30), queries in x ∈ [−5, 5];
* **x**: 10-shot support in [−5, 5], ``--query`` queries in each bin of ``--x-bins`` (default
  width-1 bins over [−10, 10]); the bins are also pooled into regions left of, inside and
  right of the training range;
* **amplitude**: 10-shot tasks with amplitudes in each range of ``--amplitudes`` (default the
  training range [0.1, 5] and, beyond it, [5, 7.5] and [7.5, 10]), queries in [−5, 5].

``--streams validation`` draws every condition from streams of their own (seeds + 1000000), the
validation conditions on which settings are chosen; the default, the test conditions, is
evaluated once per final configuration.

Every condition is reported **raw** and **recalibrated**: one factor on the predictive variance
(:func:`ibaml.calibration.fit_variance_scale`) fitted once per model to validation tasks of the
training condition only (the example's own validation stream, seed 30000 + S, and as many of
its tasks as the run used, so the factor is the one in the run's ``metrics.json``) and applied
unchanged to every shifted condition. A task whose adaptation or prediction is not finite (or
gives a non-positive variance) is counted in ``nonfinite_tasks`` of its condition and left out
of that condition's metrics; a condition where every task is non-finite has ``null`` metrics.
Nothing is dropped: the table and ``nonfinite`` in the JSON name each such condition.

Outputs in ``--out``: ``shift.json`` (per noise model and method: per condition and seed the
metrics, mean ± 95% CI over tasks, and their mean and standard deviation over the seeds found),
``table.md`` (printed too), ``coverage_vs_shots.png``, ``coverage_vs_x.png``, ``nll_vs_x.png``
and ``coverage_vs_amplitude.png`` (mean ± std over seeds; raw above, recalibrated below).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import ibaml
from ibaml.calibration import CalibrationReport, fit_variance_scale
from ibaml.data.sine import SineTaskDistribution
from ibaml.experiments.cli import tail_family
from ibaml.recipes import presets
from ibaml.recipes.sine_presets import predictive_mean_var, sine_learner_from_config
from ibaml.train.checkpoint import load_checkpoint

from . import _protocol as P

#: the training condition of the example: support and query x range, amplitude range
TRAIN_X, TRAIN_AMP, TRAIN_SHOTS = (-5.0, 5.0), (0.1, 5.0), 10
SHOTS = (1, 3, 5, 10, 20, 30)
AMPLITUDES = ((0.1, 5.0), (5.0, 7.5), (7.5, 10.0))
METRICS = ("mse", "nll", "coverage_50", "coverage_90", "coverage_95", "calibration_error", "crps")
KINDS = ("raw", "recalibrated")
#: the example's stream of validation tasks (recalibration, noise-prior fit): seed VALIDATION + S
VALIDATION = 30_000
#: first seeds of this benchmark's streams, clear of the example's (S, 10000 + S, ..., 50000 + S)
STREAMS = {"shots": 100_000, "x": 200_000, "amplitude": 300_000}
#: the methods in the order of the tables and figures
ORDER = ("maml", "anil", "imaml", "ibaml", "ibaml-fullcov", "abml", "dkt", "imaml-hf", "ibaml-hf")
#: the methods evaluated unless ``--methods`` names others (the full-network recipes on request)
DEFAULT_METHODS = ORDER[:7]


#: added to every stream's seed for the validation conditions (``--streams validation``), on
#: which settings are chosen; the test conditions are evaluated once per final configuration
VALIDATION_OFFSET = 1_000_000


def stream_seeds(seed: int, shots: Sequence[int], amplitudes: Sequence[Tuple[float, float]], offset: int = 0) -> dict:
    """The seed of every condition's task stream for a model meta-trained with seed ``seed``:
    ``100000 + 1000 i + S`` for the i-th shot count, ``200000 + S`` for the x grid, ``300000 +
    1000 j + S`` for the j-th amplitude range (each plus ``offset``: :data:`VALIDATION_OFFSET`
    for the validation conditions).

    >>> stream_seeds(2, [1, 10], [(0.1, 5.0)], VALIDATION_OFFSET)["shots"]
    {'1': 1100002, '10': 1101002}
    """
    return {"shots": {str(k): offset + STREAMS["shots"] + 1000 * i + seed for i, k in enumerate(shots)},
            "x": offset + STREAMS["x"] + seed,
            "amplitude": {range_label(r): offset + STREAMS["amplitude"] + 1000 * j + seed
                          for j, r in enumerate(amplitudes)}}


def range_label(r) -> str:
    return f"[{r[0]:g}, {r[1]:g}]"


# ---------------------------------------------------------------------------- runs and models
def find_runs(root: Path) -> Tuple[List[dict], List[str]]:
    """``(runs, incomplete)``: every ``<folder>/<method>/last.pt`` under ``root`` whose folder holds
    the run's ``metrics.json`` (``{"folder", "method", "checkpoint", "metrics", "args"}``), and
    the checkpoints without one (runs not finished)."""
    runs, incomplete = [], []
    for checkpoint in sorted(Path(root).rglob("last.pt")):
        method, folder = checkpoint.parent.name, checkpoint.parent.parent
        if method not in ORDER:
            continue
        if not (folder / "metrics.json").is_file():
            incomplete.append(str(checkpoint))
            continue
        payload = json.loads((folder / "metrics.json").read_text())
        metrics = payload["methods"].get(method) if "methods" in payload else payload
        if metrics is None or "config" not in payload:
            incomplete.append(str(checkpoint))
            continue
        runs.append({"folder": str(folder), "method": method, "checkpoint": str(checkpoint), "metrics": metrics,
                     "args": payload["config"]})
    return runs, incomplete


#: the methods whose inner loop is SGD on a MAP objective (``--per-point-step`` applies to them)
SGD_METHODS = ("maml", "anil", "fomaml", "lazy")


def per_point_lr(method: str, cfg: dict) -> float:
    """The step on the mean support loss equal to the run's step on the summed loss at its
    training support size: ``η N₀`` (:class:`ibaml.core.inference.MAP`, ``per_point``)."""
    lr = cfg.get("inner_lr") or presets.PRESETS[method].get("inner_lr", 0.002)
    return float(lr) * int(cfg["shots"])


def rebuild(method: str, cfg: dict, device, per_point: bool = False, backtracking: int = 0,
            support_scaled: bool = False) -> torch.nn.Module:
    """The learner (or deep-kernel GP) of a run's checkpoint configuration ``cfg``, built as the
    example builds it (:func:`ibaml.recipes.sine_presets.sine_learner_from_config`), not yet loaded.
    ``per_point``: an SGD method's inner step on the mean support loss (:func:`per_point_lr`),
    the same step at the training support size and one that does not grow with the support
    size elsewhere. ``backtracking``: a gradient method's inner steps halved, up to that many
    times, where they would raise the inner objective (:class:`ibaml.core.optim.Backtracking`).
    ``support_scaled``: a gradient method's inner objective scaled by ``min(1, N₀/N)`` on a
    support of ``N`` points, ``N₀`` the training support size (``MetaLearner(inner_support_size=N₀)``):
    the trained step at ``N ≤ N₀``, the step per point of ``N₀`` beyond."""
    overrides = {}
    gradient = (method in presets.METHODS + tuple(presets.RECIPES)   # the deep-kernel GP takes no inner steps
                and presets.takes_gradient_steps(method, cfg.get("inner_optimizer"), cfg.get("prior")))
    if support_scaled and gradient:
        overrides.update(inner_support_size=int(cfg["shots"]))
    if per_point and method in SGD_METHODS:
        overrides.update(per_point=True, inner_lr=per_point_lr(method, cfg))
    if backtracking and gradient:
        overrides.update(inner_backtracking=backtracking)
    return sine_learner_from_config(cfg, device=device, **overrides)


def load_run(run: dict, device, per_point: bool = False, backtracking: int = 0,
             support_scaled: bool = False) -> Tuple[torch.nn.Module, dict]:
    """``(model, state)``: a run's learner rebuilt (:func:`rebuild`) with its meta-trained state
    loaded, and the checkpoint (``state["config"]`` its configuration)."""
    state = load_checkpoint(run["checkpoint"], map_location="cpu")
    model = rebuild(run["method"], state["config"], device, per_point, backtracking, support_scaled)
    model.load_training_state(state["training"])
    return model, state


def condition_outputs(method: str, model, tasks: SineTaskDistribution, n: int, stream: int, dtype, chunk: int,
                      device) -> Tuple[torch.Tensor, ...]:
    """``(mean, var, targets, errors)`` of :func:`outputs` on ``n`` tasks of ``tasks`` drawn from
    the stream seeded ``stream``, targets ``[T, N]`` in float64."""
    batch = tasks.sample(n, torch.Generator().manual_seed(stream), dtype=dtype)
    m, s, errs = outputs(method, model, batch.support_x, batch.support_y, batch.query_x, chunk, device)
    return m, s, batch.query_y[..., 0].double(), errs


def outputs(method: str, model, support_x, support_y, query_x, chunk: int, device) -> Tuple[torch.Tensor, ...]:
    """``(mean, var, errors)``: the predictive at ``query_x`` adapted to each task's support,
    ``chunk`` tasks at a time, ``[T, N]`` in float64 on the CPU. A chunk that raises (a failed
    Cholesky factor, say) gives NaN for its tasks, its message in ``errors``."""
    T, N = query_x.shape[0], query_x.shape[1]
    mean = torch.full((T, N), math.nan, dtype=torch.float64)
    var = mean.clone()
    errors = []
    for start in range(0, T, chunk):
        part = slice(start, start + chunk)
        try:
            m, v = predictive_mean_var(model, support_x[part].to(device), support_y[part].to(device),
                              query_x[part].to(device))
        except (RuntimeError, ValueError) as e:
            errors.append(f"tasks {start}-{min(start + chunk, T) - 1}: {(str(e).splitlines() or [type(e).__name__])[0]}")
            continue
        mean[part], var[part] = m.detach().double().cpu(), v.detach().double().cpu()
    return mean, var, errors


def finite_tasks(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``[T]``: the tasks whose predictive is finite with a positive variance at every query point."""
    return (torch.isfinite(mean) & torch.isfinite(var) & (var > 0)).all(1)


def condition_metrics(mean, var, y, scale: Optional[float], tails=None) -> dict:
    """One condition's metrics over its finite tasks (:func:`finite_tasks`), raw and with the
    variance times ``scale``: ``{"tasks", "nonfinite_tasks", "variance_scale", "raw", "recalibrated"}``, each
    metric ``{"mean", "ci95"}`` over tasks (``None`` where no task is finite or no factor).

    >>> mean = torch.tensor([[0.0, 0.0], [float("nan"), 0.0]]); y = torch.ones(2, 2)
    >>> out = condition_metrics(mean, torch.ones(2, 2), y, 2.0)
    >>> out["nonfinite_tasks"], out["raw"]["mse"]["mean"], out["recalibrated"]["mse"]["mean"]
    (1, 1.0, 1.0)
    >>> condition_metrics(mean[1:], torch.ones(1, 2), y[1:], 2.0)["raw"] is None     # no task finite
    True
    """
    ok = finite_tasks(mean, var)
    entry = {"tasks": int(ok.numel()), "nonfinite_tasks": int((~ok).sum()), "variance_scale": scale}
    for kind, factor in zip(KINDS, (1.0, scale)):
        if not bool(ok.any()) or factor is None:
            entry[kind] = None
            continue
        report = CalibrationReport.regression(mean[ok], factor * var[ok], y[ok], tails=tails)
        entry[kind] = {k: report.metrics[k] for k in METRICS}
    return entry


def sine_targets(info: dict, x: torch.Tensor) -> torch.Tensor:
    """``A_t sin(x − φ_t)`` at per-task inputs ``x [T, N, 1]`` (noiseless, as the example's tasks)."""
    return info["amplitude"].reshape(-1, 1, 1) * torch.sin(x - info["phase"].reshape(-1, 1, 1))


def x_grid_tasks(shots: int, n: int, bins: Sequence[Tuple[float, float]], q: int, stream: int, dtype):
    """The x grid's tasks: ``n`` tasks of ``shots`` support points in the training range (stream
    seed ``stream``), then from the same stream ``q`` query inputs drawn uniformly in every bin,
    ``(tasks, query_x [n, len(bins) q, 1], targets [n, len(bins) q])``; one adaptation per task
    serves every bin."""
    g = torch.Generator().manual_seed(stream)
    base = SineTaskDistribution(shots=shots, query=1).sample(n, g, dtype=dtype)
    lows = torch.tensor([b[0] for b in bins], dtype=dtype).view(1, -1, 1)
    widths = torch.tensor([b[1] - b[0] for b in bins], dtype=dtype).view(1, -1, 1)
    qx = (lows + widths * torch.rand((n, len(bins), q), generator=g, dtype=dtype)).reshape(n, -1, 1)
    return base, qx, sine_targets(base.info, qx.double())[..., 0]


def bin_columns(indices: Sequence[int], q: int) -> torch.Tensor:
    """The query columns of :func:`x_grid_tasks` that fall in the bins ``indices``."""
    return torch.cat([torch.arange(i * q, (i + 1) * q) for i in indices])


def x_bins(low: float, high: float, width: float) -> List[Tuple[float, float]]:
    """Bins of ``width`` over ``[low, high]``.

    >>> x_bins(-10, 10, 5)
    [(-10.0, -5.0), (-5.0, 0.0), (0.0, 5.0), (5.0, 10.0)]
    """
    low, high, width = float(low), float(high), float(width)
    count = int(round((high - low) / width)) if width > 0 else 0
    if count < 1 or not math.isclose(low + count * width, high):
        raise ValueError(f"--x-bins: the width {width:g} must divide [{low:g}, {high:g}]")
    return [(low + i * width, low + (i + 1) * width) for i in range(count)]


def regions(bins: Sequence[Tuple[float, float]]) -> Dict[str, List[int]]:
    """The bins left of, inside and right of the training range ``[−5, 5]`` (by index)."""
    lo, hi = TRAIN_X
    out = {"left": [i for i, b in enumerate(bins) if b[1] <= lo],
           "in_range": [i for i, b in enumerate(bins) if b[0] >= lo and b[1] <= hi],
           "right": [i for i, b in enumerate(bins) if b[0] >= hi]}
    return {k: v for k, v in out.items() if v}


def evaluate_run(run: dict, settings: dict) -> dict:
    """Every condition of ``settings`` for one run: see the module docstring."""
    clock = time.perf_counter()
    torch.set_num_threads(settings["threads"])
    device, method = torch.device(settings["device"]), run["method"]
    model, state = load_run(run, device, settings.get("per_point", False), settings.get("backtracking", 0),
                            settings.get("support_scaled", False))
    cfg, args = state["config"], run["args"]
    dtype, seed, chunk = getattr(torch, cfg["dtype"]), int(cfg["seed"]), settings["chunk"]
    train = SineTaskDistribution(shots=cfg["shots"], query=cfg["query"])
    # the example's validation tasks: as many drawn as it drew, so that they are the same tasks
    recal_tasks = int(args.get("recalibration_tasks", 500))
    noise_fit = int(args.get("noise_fit_tasks", 0)) if method != "dkt" else 0
    val = train.sample(max(recal_tasks, noise_fit), torch.Generator().manual_seed(VALIDATION + seed), dtype=dtype)
    result = {"folder": run["folder"], "method": method, "seed": seed, "noise": cfg.get("noise", "shared"),
              "config": {k: cfg.get(k) for k in ("network", "noise", "shots", "query", "inner_steps", "eval_inner_steps",
                                                 "inner_lr", "precision", "noise_prior_count", "learn_noise_prior_count",
                                                 "cg_steps", "cg_damping", "meta_lr", "dtype")},
              "meta_iters": args.get("meta_iters"), "checkpoint_step": int(state["step"])}
    if noise_fit and isinstance(model.likelihood, ibaml.ConjugateNoiseGaussianLikelihood):
        fitted = model.fit_noise_prior(val.to(device), noise_fit, chunk=250,
                                       tails=tail_family(args.get("noise_fit_tails", "lognormal")))
        result["noise_prior_fit"] = fitted
    tails = getattr(getattr(model, "likelihood", None), "tails", None)
    v = val[:recal_tasks]
    mean, var, errors = outputs(method, model, v.support_x, v.support_y, v.query_x, chunk, device)
    y = v.query_y[..., 0].double()
    ok = finite_tasks(mean, var)
    scale = fit_variance_scale(mean[ok], var[ok], y[ok], tails=tails) if bool(ok.any()) else None
    in_run = run["metrics"].get("recalibrated", {}).get("variance_scale")
    result["validation"] = {"stream_seed": VALIDATION + seed, "tasks": recal_tasks, "shots": cfg["shots"],
                            "nonfinite_tasks": int((~ok).sum()), "errors": errors}
    result["variance_scale"] = scale
    result["variance_scale_in_run"] = in_run
    result["rebuilt_as_run"] = (scale is not None and in_run is not None
                                and math.isclose(scale, in_run, rel_tol=settings["check_tol"]))
    seeds = stream_seeds(seed, settings["shots"], settings["amplitudes"], settings.get("stream_offset", 0))
    n, q = settings["tasks"], settings["query"]
    conditions = {"shots": {}, "x": {}, "x_regions": {}, "amplitude": {}}

    def run_condition(tasks: SineTaskDistribution, stream: int):
        return condition_outputs(method, model, tasks, n, stream, dtype, chunk, device)

    for k in settings["shots"]:
        stream = seeds["shots"][str(k)]
        m, s, t, errs = run_condition(SineTaskDistribution(shots=k, query=q), stream)
        conditions["shots"][str(k)] = dict(shots=k, stream_seed=stream, errors=errs,
                                           **condition_metrics(m, s, t, scale, tails))
    bins = settings["x_bins"]
    base, qx, t = x_grid_tasks(cfg["shots"], n, bins, q, seeds["x"], dtype)
    m, s, errs = outputs(method, model, base.support_x, base.support_y, qx, chunk, device)

    for i, b in enumerate(bins):
        cols = bin_columns([i], q)
        conditions["x"][range_label(b)] = dict(x_range=list(b), stream_seed=seeds["x"], errors=errs,
                                               **condition_metrics(m[:, cols], s[:, cols], t[:, cols], scale, tails))
    for name, indices in regions(bins).items():
        cols = bin_columns(indices, q)
        conditions["x_regions"][name] = dict(x_range=[bins[indices[0]][0], bins[indices[-1]][1]],
                                             stream_seed=seeds["x"], errors=errs,
                                             **condition_metrics(m[:, cols], s[:, cols], t[:, cols], scale, tails))
    for r in settings["amplitudes"]:
        stream = seeds["amplitude"][range_label(r)]
        m, s, t, errs = run_condition(SineTaskDistribution(shots=cfg["shots"], query=q, amp_range=r), stream)
        conditions["amplitude"][range_label(r)] = dict(amp_range=list(r), stream_seed=stream, errors=errs,
                                                       **condition_metrics(m, s, t, scale, tails))
    result["conditions"] = conditions
    result["seconds"] = time.perf_counter() - clock
    return result


# ---------------------------------------------------------------------------- over seeds
def nonfinite_list(per_seed: Dict[str, dict]) -> List[dict]:
    """Every condition (validation included) of every seed with a non-finite task."""
    found = []
    for seed, r in per_seed.items():
        if r["validation"]["nonfinite_tasks"]:
            found.append({"family": "validation", "condition": "10-shot validation", "seed": int(seed),
                          "nonfinite_tasks": r["validation"]["nonfinite_tasks"], "tasks": r["validation"]["tasks"]})
        for family, entries in r["conditions"].items():
            for label, e in entries.items():
                if e["nonfinite_tasks"]:
                    found.append({"family": family, "condition": label, "seed": int(seed),
                                  "nonfinite_tasks": e["nonfinite_tasks"], "tasks": e["tasks"]})
    return found


def summarize(per_seed: Dict[str, dict]) -> dict:
    """Per condition family, label, kind and metric, the mean and standard deviation over the
    seeds found (:func:`benchmarks._protocol.summarize_conditions`)."""
    return P.summarize_conditions(per_seed, KINDS, METRICS)


# ---------------------------------------------------------------------------- table and figures
def _number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, or in powers of ten from 10⁵ on (a diverged method's
    mean is not a row of digits).

    >>> _number(0.12345, 3), _number(2.41e70, 2)
    ('0.123', '2.41e+70')
    """
    return f"{value:.{digits}e}" if abs(value) >= 1e5 else f"{value:.{digits}f}"


def _cell(summary: dict, family: str, label: str, kind: str, metric: str, digits: int) -> str:
    cell = summary.get(family, {}).get(label)
    if cell is None:
        return "–"
    bad = {s: n for s, n in cell["nonfinite_tasks"].items() if n}
    stats = cell[kind][metric]
    text = "non-finite" if stats is None else f"{_number(stats['mean'], digits)} ± {_number(stats['std'], digits)}"
    if bad:
        text += " (non-finite: " + ", ".join(f"seed {s} {n}" for s, n in bad.items()) + ")"
    return text


def table_columns(settings: dict) -> List[Tuple[str, str, str]]:
    """``(heading, family, label)``: 1, 3, 10 and 30 shots where measured, the regions out of range."""
    cols = [(f"{k} shots", "shots", str(k)) for k in (1, 3, 10, 30) if k in settings["shots"]]
    cols += [("x < −5", "x_regions", "left"), ("x > 5", "x_regions", "right")]
    return cols


def markdown(models: dict, settings: dict) -> str:
    """Per noise model a table per metric (90% coverage, NLL, MSE): rows method × raw/recalibrated,
    mean ± std over seeds, with the seeds and tasks that were not finite."""
    cols = table_columns(settings)
    lines = []
    for noise, methods in models.items():
        for metric, digits in (("coverage_90", 3), ("nll", 2), ("mse", 3)):
            lines += [f"### {noise} noise: {metric}", "",
                      "| method | | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
            for method, entry in methods.items():
                for kind in KINDS:
                    cells = [_cell(entry["summary"], family, label, kind, metric, digits) for _, family, label in cols]
                    lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
            lines.append("")
    flagged = [f"| {m} | {noise} | {e['family']} {e['condition']} | {e['seed']} | {e['nonfinite_tasks']} / {e['tasks']} |"
               for noise, methods in models.items() for m, entry in methods.items() for e in entry["nonfinite"]]
    if flagged:
        lines += ["### Non-finite tasks (left out of their condition's metrics)", "",
                  "| method | noise | condition | seed | tasks non-finite |", "|---|---|---|---|---|", *flagged, ""]
    return "\n".join(lines)


#: the targets of a model whose uncertainty holds away from the fit (shared noise, raw, no refit):
#: 90 % coverage within the band at each support size, in-range 10-shot MSE at most ``mse``, out of
#: range coverage at least ``out_coverage`` and NLL at most the deep-kernel GP's on the same tasks
TARGETS = {"band": (0.85, 0.95), "shots": ("1", "3", "10", "30"), "mse": 0.05, "out_coverage": 0.80}


def _mean(entry: dict, family: str, label: str, metric: str, kind: str = "raw") -> float:
    return entry["summary"][family][label][kind][metric]["mean"]


def target_findings(models: dict, method: str, reference: str = "dkt", noise: str = "shared") -> str:
    """One line per target of :data:`TARGETS` for ``method`` (raw predictive, mean over seeds),
    each saying met or not met with its numbers, out of range against ``reference`` on the same
    tasks: Markdown list items written from the JSON, which the docs page holds verbatim."""
    entry, ref = models[noise][method], models[noise].get(reference)
    low, high = TARGETS["band"]
    lines = []
    for k in TARGETS["shots"]:
        cov = _mean(entry, "shots", k, "coverage_90")
        verdict = "met" if low <= cov <= high else "not met"
        lines.append(f"- {method}, {k} shots: 90 % coverage {cov:.3f} (target {low:.2f}–{high:.2f}): {verdict}.")
    mse = _mean(entry, "shots", "10", "mse")
    lines.append(f"- {method}, 10 shots in range: MSE {mse:.4f} (target ≤ {TARGETS['mse']}): "
                 f"{'met' if mse <= TARGETS['mse'] else 'not met'}.")
    for side, words in (("left", "x < −5"), ("right", "x > 5")):
        cov, nll = _mean(entry, "x_regions", side, "coverage_90"), _mean(entry, "x_regions", side, "nll")
        text = f"- {method}, {words}: 90 % coverage {cov:.3f} (target ≥ {TARGETS['out_coverage']:.2f}): " \
               f"{'met' if cov >= TARGETS['out_coverage'] else 'not met'}; NLL {nll:.2f}"
        if ref is not None:
            ref_nll = _mean(ref, "x_regions", side, "nll")
            text += f" against {reference}'s {ref_nll:.2f} (target ≤): {'met' if nll <= ref_nll else 'not met'}"
        lines.append(text + ".")
    return "\n".join(lines)


def in_range_findings(models: dict, method: str, shots: str = "10", noise: str = "shared") -> str:
    """Markdown list items comparing ``method`` with every other row of ``models`` (one or more
    benchmark payloads' ``models`` merged, the same task streams) at ``shots`` shots in range:
    whether its NLL (raw and recalibrated) is the lowest and by how much, its recalibrated 90 %
    coverage against the band 0.88–0.92, and its MSE against each other head method's."""
    rows = models[noise]
    cell = lambda m, kind, metric: _mean(rows[m], "shots", shots, metric, kind)
    others = [m for m in rows if m != method]
    lines = []
    for kind in KINDS:
        best = min(others, key=lambda m: cell(m, kind, "nll"))
        mine, theirs = cell(method, kind, "nll"), cell(best, kind, "nll")
        verdict = "the lowest" if mine < theirs else "not the lowest"
        lines.append(f"- {shots} shots in range, {kind}: {method}'s NLL {mine:.3f} is {verdict} of the "
                     f"{len(rows)} rows (next, {best}: {theirs:.3f}; margin {theirs - mine:.3f}).")
    cov = cell(method, "recalibrated", "coverage_90")
    lines.append(f"- {shots} shots in range: {method}'s recalibrated 90 % coverage {cov:.3f} "
                 f"({'within' if 0.88 <= cov <= 0.92 else 'outside'} 0.88–0.92).")
    mse = cell(method, "raw", "mse")
    compared = ", ".join(f"{m} {cell(m, 'raw', 'mse'):.4f} ({'≤' if mse <= cell(m, 'raw', 'mse') else '>'})"
                         for m in others)
    lines.append(f"- {shots} shots in range: {method}'s MSE {mse:.4f} against {compared}.")
    return "\n".join(lines)


#: the conditions :func:`change_findings` reads: ``(words, family, label)``
CHANGE_CONDITIONS = (("1 shot", "shots", "1"), ("3 shots", "shots", "3"), ("10 shots", "shots", "10"),
                     ("x < −5", "x_regions", "left"), ("x > 5", "x_regions", "right"))


def change_findings(new: dict, old: dict, method: str, new_label: str, old_label: str) -> str:
    """Markdown list items, per noise model that both payloads' ``models`` hold and condition of
    :data:`CHANGE_CONDITIONS`, ``method``'s raw 90 % coverage and NLL in ``new`` against ``old``
    (two models of one method on the same task streams, a setting changed)."""
    lines = []
    for noise in (n for n in new if n in old and method in new[n] and method in old[n]):
        a, b = new[noise][method], old[noise][method]
        for words, family, label in CHANGE_CONDITIONS:
            cov, cov_old = _mean(a, family, label, "coverage_90"), _mean(b, family, label, "coverage_90")
            nll, nll_old = _mean(a, family, label, "nll"), _mean(b, family, label, "nll")
            lines.append(f"- {noise} noise, {method}, {words}: 90 % coverage {cov:.3f} {new_label} against "
                         f"{cov_old:.3f} {old_label}; NLL {nll:.2f} against {nll_old:.2f}.")
    return "\n".join(lines)


def support_size_findings(new: dict, old: dict, method: str, new_label: str, old_label: str) -> str:
    """Markdown list items, per noise model that both payloads' ``models`` hold: the support
    sizes at which ``method``'s raw metrics in ``new`` equal those in ``old`` (every seed's, to
    the digit recorded), and at each other size its MSE, 90 % coverage and NLL in both (the same
    models adapted two ways on the same tasks)."""
    lines = []
    for noise in (n for n in new if n in old and method in new[n] and method in old[n]):
        a, b = new[noise][method], old[noise][method]
        same, changed = [], []
        for label in a["summary"]["shots"]:
            cells = [[s["conditions"]["shots"][label]["raw"] for s in e["per_seed"].values()] for e in (a, b)]
            (same if cells[0] == cells[1] else changed).append(label)
        text = f"- {noise} noise, {method}: the same at {', '.join(same) or 'no'} shots (every seed)"
        for label in changed:
            mse, mse_old = _mean(a, "shots", label, "mse"), _mean(b, "shots", label, "mse")
            cov, cov_old = _mean(a, "shots", label, "coverage_90"), _mean(b, "shots", label, "coverage_90")
            nll, nll_old = _mean(a, "shots", label, "nll"), _mean(b, "shots", label, "nll")
            text += (f"; at {label} shots MSE {_number(mse, 3)} {new_label} against {_number(mse_old, 3)} {old_label}, "
                     f"90 % coverage {cov:.3f} against {cov_old:.3f}, NLL {_number(nll, 2)} against {_number(nll_old, 2)}")
        lines.append(text + ".")
    return "\n".join(lines)


def _series(entry: dict, family: str, kind: str, metric: str):
    labels = list(entry["summary"][family])
    stats = [entry["summary"][family][label][kind][metric] for label in labels]
    mean = [math.nan if s is None else s["mean"] for s in stats]
    std = [math.nan if s is None else s["std"] for s in stats]
    return labels, mean, std


def figure(models: dict, family: str, metric: str, x_of, xlabel: str, shade=None, target=None, logx=False,
           symlog=False, mark=None):
    """Rows raw / recalibrated, a column per noise model; one line per method, mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    noises = list(models)
    fig, axes = plt.subplots(2, len(noises), figsize=(5.2 * len(noises), 7), squeeze=False, sharex=True)
    for col, noise in enumerate(noises):
        for row, kind in enumerate(KINDS):
            ax = axes[row][col]
            for method, entry in models[noise].items():
                labels, mean, std = _series(entry, family, kind, metric)
                x = [x_of(entry, label) for label in labels]
                bad = any(n for label in labels for n in entry["summary"][family][label]["nonfinite_tasks"].values())
                ax.errorbar(x, mean, yerr=std, marker="o", ms=3, capsize=2, color=f"C{ORDER.index(method)}",
                            label=method + (" (some tasks non-finite)" if bad else ""))
            if shade is not None:
                ax.axvspan(*shade, color="0.9", zorder=0, label="training range")
            if target is not None:
                ax.axhline(target, color="k", ls="--", lw=1)
            if mark is not None:   # the training condition
                ax.axvline(mark, color="0.5", ls=":", lw=1)
            if logx:
                ax.set_xscale("log")
                ticks = sorted({x_of(e, label) for e in models[noise].values() for label in e["summary"][family]})
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            if symlog:
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_title(f"{noise} noise, {kind}")
            ax.set_ylabel(metric)
            if row == 1:
                ax.set_xlabel(xlabel)
    handles = {}
    for ax in axes.flat:   # one legend for all panels (a method's colour is the same in each)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    return fig


def save_figures(models: dict, settings: dict, out: Path) -> List[str]:
    import matplotlib.pyplot as plt

    def centre(key):
        return lambda entry, label: sum(next(iter(entry["per_seed"].values()))["conditions"][key][label][
            "x_range" if key == "x" else "amp_range"]) / 2

    figures = {
        "coverage_vs_shots.png": figure(models, "shots", "coverage_90", lambda e, label: int(label),
                                        "shots (support points; dotted: meta-training's)", target=0.9, logx=True,
                                        mark=TRAIN_SHOTS),
        "coverage_vs_x.png": figure(models, "x", "coverage_90", centre("x"), "query x (bin centre)",
                                    shade=TRAIN_X, target=0.9),
        "nll_vs_x.png": figure(models, "x", "nll", centre("x"), "query x (bin centre)", shade=TRAIN_X, symlog=True),
        "coverage_vs_amplitude.png": figure(models, "amplitude", "coverage_90", centre("amplitude"),
                                            "amplitude (range centre)", shade=TRAIN_AMP, target=0.9),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
    return list(figures)


# ---------------------------------------------------------------------------- main
def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, metavar="DIR", help="folder searched for finished runs of the example")
    p.add_argument("--out", default="docs/results/sine/shift")
    p.add_argument("--tasks", type=int, default=1000, help="evaluation tasks per condition")
    p.add_argument("--query", type=int, default=10, help="query points per task (per bin on the x grid)")
    p.add_argument("--shots", default=",".join(map(str, SHOTS)), help="comma-separated support sizes")
    p.add_argument("--x-bins", default="-10,10,1", metavar="LOW,HIGH,WIDTH",
                   help="the query grid's bins (written --x-bins=-10,10,1, the value starting with a minus)")
    p.add_argument("--amplitudes", default=",".join(f"{a:g}:{b:g}" for a, b in AMPLITUDES),
                   help="comma-separated amplitude ranges LOW:HIGH")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods to evaluate")
    p.add_argument("--streams", choices=("test", "validation"), default="test",
                   help="the test conditions' task streams, or the validation conditions' (seeds + 1000000), "
                        "on which settings are chosen")
    p.add_argument("--chunk", type=int, default=250, help="tasks adapted at a time")
    p.add_argument("--check-tol", type=float, default=1e-3,
                   help="relative tolerance between the refitted variance factor and the run's own")
    p.add_argument("--jobs", type=int, default=1, help="models evaluated at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--per-point-step", action="store_true",
                   help="adapt the SGD methods (maml, anil, fomaml, lazy) with their step on the mean support loss "
                        "(the run's step times its training support size), so the step does not grow with the shots")
    p.add_argument("--backtracking", type=int, default=0, metavar="N",
                   help="adapt the gradient methods (maml, anil, fomaml, lazy, abml, ...) with each inner step halved, "
                        "up to N times, where it would raise the inner objective (ibaml.core.optim.Backtracking)")
    p.add_argument("--support-scaled-step", action="store_true",
                   help="adapt the gradient methods with the inner objective scaled by min(1, N0/N) on N support points "
                        "(N0 the training support size; MetaLearner(inner_support_size=N0))")
    args = p.parse_args(argv)
    try:
        args.shots = sorted({int(k) for k in args.shots.split(",")})
        args.x_bins = x_bins(*_floats(args.x_bins))
        args.amplitudes = [tuple(_floats(r.replace(":", ","))) for r in args.amplitudes.split(",")]
    except (TypeError, ValueError) as e:
        p.error(f"--shots, --x-bins or --amplitudes: {e}")
    if min(args.shots) < 1 or any(len(r) != 2 or not 0 <= r[0] < r[1] for r in args.amplitudes):
        p.error("--shots must be positive and each --amplitudes range LOW:HIGH with 0 <= LOW < HIGH")
    if args.backtracking < 0:
        p.error(f"--backtracking must be 0 (off) or a positive number of halvings, got {args.backtracking}")
    for name in ("tasks", "query", "chunk", "jobs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    args.methods = args.methods.split(",")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} given but CUDA is not available on this machine")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs, incomplete = find_runs(Path(args.runs))
    runs = [r for r in runs if r["method"] in args.methods]
    if not runs:
        raise SystemExit(f"no finished run of {', '.join(args.methods)} under {args.runs}")
    settings = {"tasks": args.tasks, "query": args.query, "shots": args.shots, "x_bins": args.x_bins,
                "amplitudes": args.amplitudes, "chunk": args.chunk, "check_tol": args.check_tol,
                "threads": args.threads, "device": args.device, "per_point": args.per_point_step,
                "backtracking": args.backtracking, "support_scaled": args.support_scaled_step,
                "stream_offset": VALIDATION_OFFSET if args.streams == "validation" else 0}
    clock = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(evaluate_run, runs, [settings] * len(runs)))
    else:
        results = [evaluate_run(r, settings) for r in runs]
    models: dict = {}
    for r in results:
        per_seed = models.setdefault(r["noise"], {}).setdefault(r["method"], {"per_seed": {}})["per_seed"]
        if str(r["seed"]) in per_seed:
            raise SystemExit(f"two runs of {r['method']} ({r['noise']} noise) at seed {r['seed']}: "
                             f"{per_seed[str(r['seed'])]['folder']} and {r['folder']}")
        per_seed[str(r["seed"])] = r
        print(f"{r['noise']} {r['method']} seed {r['seed']}: {r['seconds']:.0f} s, variance factor "
              f"{r['variance_scale']} (run's {r['variance_scale_in_run']})", flush=True)
    for noise in models:
        models[noise] = {m: models[noise][m] for m in ORDER if m in models[noise]}
        for entry in models[noise].values():
            entry["per_seed"] = dict(sorted(entry["per_seed"].items(), key=lambda kv: int(kv[0])))
            entry["seeds"] = [int(s) for s in entry["per_seed"]]
            entry["variance_scale"] = {s: r["variance_scale"] for s, r in entry["per_seed"].items()}
            entry["rebuilt_as_run"] = all(r["rebuilt_as_run"] for r in entry["per_seed"].values())
            entry["nonfinite"] = nonfinite_list(entry["per_seed"])
            entry["summary"] = summarize(entry["per_seed"])
    models = {n: models[n] for n in ("shared", "conjugate") if n in models} | {
        n: v for n, v in models.items() if n not in ("shared", "conjugate")}
    payload = {
        "protocol": "each model meta-trained once (10 shots, x in [-5, 5], amplitudes [0.1, 5]) and evaluated with "
                    "no refit at every condition; recalibrated: one factor on the predictive variance fitted to "
                    f"validation tasks of the training condition only (stream seed {VALIDATION} + S, the run's own "
                    "recalibration tasks) and applied unchanged to every condition; metrics over the finite tasks "
                    "(mean and 95% CI over tasks), then mean and sample std over the seeds found",
        "split": "validation conditions" if args.streams == "validation" else "test conditions",
        "streams": {"validation": f"{VALIDATION} + S", "shots": "100000 + 1000 i + S (i-th shot count)",
                    "x": "200000 + S (support, then the queries of every bin)",
                    "amplitude": "300000 + 1000 j + S (j-th amplitude range)",
                    "offset": settings["stream_offset"]},
        "settings": {k: v for k, v in settings.items() if k != "check_tol"},
        "runs": str(args.runs), "incomplete_runs": incomplete, "seconds": time.perf_counter() - clock,
        "torch": torch.__version__, "models": models,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift.json").write_text(json.dumps(P.rounded(payload, 5), separators=(",", ":")))
    text = markdown(models, settings)
    (out / "table.md").write_text(text)
    save_figures(models, settings, out)
    print(text)
    mismatched = [f"{r['noise']} {r['method']} seed {r['seed']}" for r in results if not r["rebuilt_as_run"]]
    if mismatched:
        print("variance factor differs from the run's own (rebuilt model not the run's?): " + ", ".join(mismatched))
    if incomplete:
        print(f"{len(incomplete)} checkpoint(s) without metrics.json (unfinished runs) left out")
    print(f"wrote {out / 'shift.json'}, {out / 'table.md'} and the figures in {out}")
    return payload


if __name__ == "__main__":
    main()
