"""Can a post-hoc map of the predictive variance, fitted on the training condition only, make a
sine model's coverage hold at every support size and out of range? The models of
``benchmarks/sine_shift.py``, each recalibrated by several maps fitted to validation tasks of
its own training condition, then evaluated without refit on the shift benchmark's test tasks.

    python -m benchmarks.shift_recalibration --runs RUNS/shared --out docs/results/sine/shift_recalibration

The training condition's validation tasks (stream seed 30000 + S, the example's validation
stream): 500 tasks at the run's support size, or, for a run meta-trained over a range of sizes
(``--train-shots LOW,HIGH``), an equal share at every size of the range, drawn in order. The
maps ``v ↦ v'`` (the predictive's mean never moves), all fitted by the Gaussian NLL of those
tasks' query points:

* ``raw``: ``v' = v``;
* ``factor``: ``v' = c v`` (:func:`ibaml.calibration.fit_variance_scale`);
* ``power``: ``v' = c v^p`` (:func:`ibaml.calibration.fit_variance_power`);
* ``bins``: ``v' = c(v) v`` with ``log c`` piecewise linear in ``log v`` through 10 bins of
  equal count (:func:`ibaml.calibration.fit_variance_bins`);
* ``per_shots``: one factor per support size of the training condition, a size outside it
  taking the nearest size's (for a model meta-trained at one size, ``factor``).

Conditions, the same tasks as ``benchmarks/sine_shift.py``'s test conditions (its streams):
1, 3, 10 and 30 shots in range, and 10-shot tasks queried at x < −5 and x > 5 (its x grid's
bins pooled); with ``--streams validation``, its validation conditions, on which the map is
chosen: per method, the one whose 90 % coverage (mean over seeds) lies closest to 0.90 at its
worst condition (``closest_map``). Only Gaussian predictives are studied (a run whose likelihood has heavy tails is
left out, named). Outputs in ``--out``: ``recalibration.json`` (per method, map, condition and
seed: 90 % coverage, NLL and MSE, with the fitted maps; means and standard deviations over
seeds), ``table.md`` (printed) and ``coverage.png`` (90 % coverage per condition and map).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Dict, List

import torch

from ibaml.calibration import CalibrationReport, fit_variance_bins, fit_variance_power, fit_variance_scale
from ibaml.data.sine import SineTaskDistribution

from . import _protocol as P
from . import sine_shift as S

MAPS = ("raw", "factor", "power", "bins", "per_shots")
SHOTS = ("1", "3", "10", "30")
CONDITIONS = SHOTS + ("left", "right")
METRICS = ("coverage_90", "nll", "mse")
VALIDATION_TASKS = 500


def validation_sizes(cfg: dict) -> List[int]:
    low, high = cfg.get("train_shots") or (cfg["shots"], cfg["shots"])
    return list(range(int(low), int(high) + 1))


def validation_outputs(method, model, cfg, seed, chunk) -> Dict[int, tuple]:
    """Per support size of the training condition, ``(mean, var, y)`` on its share of the validation tasks."""
    sizes, dtype = validation_sizes(cfg), getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(S.VALIDATION + seed)
    out = {}
    for k in sizes:
        tasks = SineTaskDistribution(shots=k, query=cfg["query"]).sample(math.ceil(VALIDATION_TASKS / len(sizes)), g,
                                                                         dtype=dtype)
        m, v, _ = S.outputs(method, model, tasks.support_x, tasks.support_y, tasks.query_x, chunk, "cpu")
        ok = S.finite_tasks(m, v)
        out[k] = (m[ok], v[ok], tasks.query_y[..., 0].double()[ok])
    return out


def fit_maps(val: Dict[int, tuple]) -> tuple:
    """``(maps, fitted)``: per map a function ``(var, shots) -> var'`` and its fitted values."""
    mu, var, y = (torch.cat([t[i].reshape(-1) for t in val.values()])[None] for i in range(3))
    c = fit_variance_scale(mu, var, y)
    power = fit_variance_power(mu, var, y)
    bins = fit_variance_bins(mu, var, y, bins=10)
    per = {k: fit_variance_scale(*t) for k, t in val.items()}
    nearest = lambda k: per[min(per, key=lambda s: (abs(s - k), s))]
    maps = {"raw": lambda v, k: v, "factor": lambda v, k: c * v, "power": lambda v, k: power(v),
            "bins": lambda v, k: bins(v), "per_shots": lambda v, k: nearest(k) * v}
    fitted = {"factor": c, "power": power.to_dict(), "bins": bins.to_dict(),
              "per_shots": {str(k): f for k, f in per.items()}}
    return maps, fitted


def evaluate(run: dict, settings: dict) -> dict:
    clock = time.perf_counter()
    torch.set_num_threads(settings["threads"])
    method = run["method"]
    model, state = S.load_run(run, torch.device("cpu"))
    cfg = state["config"]
    if getattr(getattr(model, "likelihood", None), "tails", None) is not None:
        return {"method": method, "seed": int(cfg["seed"]), "folder": run["folder"],
                "skipped": "its predictive has heavy tails (only Gaussian predictives are studied)"}
    seed, dtype, n, chunk = int(cfg["seed"]), getattr(torch, cfg["dtype"]), settings["tasks"], settings["chunk"]
    maps, fitted = fit_maps(validation_outputs(method, model, cfg, seed, chunk))
    seeds = S.stream_seeds(seed, S.SHOTS, S.AMPLITUDES, settings["stream_offset"])
    evaluated = {}
    for k in SHOTS:
        m, v, y, _ = S.condition_outputs(method, model, SineTaskDistribution(shots=int(k), query=settings["query"]), n,
                                         seeds["shots"][k], dtype, chunk, "cpu")
        evaluated[k] = (int(k), m, v, y)
    bins = S.x_bins(-10, 10, 1)
    base, qx, targets = S.x_grid_tasks(cfg["shots"], n, bins, settings["query"], seeds["x"], dtype)
    m, v, _ = S.outputs(method, model, base.support_x, base.support_y, qx, chunk, "cpu")
    for side, indices in S.regions(bins).items():
        if side != "in_range":
            cols = S.bin_columns(indices, settings["query"])
            evaluated[side] = (cfg["shots"], m[:, cols], v[:, cols], targets[:, cols])
    metrics = {}
    for name, fn in maps.items():
        metrics[name] = {}
        for condition, (k, mean, var, y) in evaluated.items():
            ok = S.finite_tasks(mean, var)
            report = CalibrationReport.regression(mean[ok], fn(var[ok], k), y[ok])
            metrics[name][condition] = {key: report.metrics[key]["mean"] for key in METRICS}
            metrics[name][condition]["nonfinite_tasks"] = int((~ok).sum())
    return {"method": method, "seed": seed, "folder": run["folder"], "training_sizes": validation_sizes(cfg),
            "fitted": fitted, "metrics": metrics, "seconds": time.perf_counter() - clock}


def summarize(per_seed: Dict[str, dict]) -> dict:
    return {name: {c: {key: P.seed_stats([r["metrics"][name][c][key] for r in per_seed.values()])
                       for key in METRICS} for c in CONDITIONS} for name in MAPS}


def worst_gaps(summary: dict) -> dict:
    """Per map, the largest distance of the 90 % coverage (mean over seeds) from 0.90 over the
    conditions; on the validation conditions, the map with the smallest is the one chosen."""
    return {name: max(abs(summary[name][c]["coverage_90"]["mean"] - 0.9) for c in CONDITIONS) for name in MAPS}


def target_findings(models: dict, method: str, name: str, reference: str = "dkt") -> str:
    """The targets of :data:`benchmarks.sine_shift.TARGETS` for ``method`` under the map ``name``
    (mean over seeds), one Markdown line each, met or not met with its numbers; out of range, the
    NLL against ``reference``'s lowest over every map on the same tasks."""
    summary = models[method]["summary"][name]
    low, high = S.TARGETS["band"]
    lines = []
    for k in S.TARGETS["shots"]:
        cov = summary[k]["coverage_90"]["mean"]
        lines.append(f"- {method} ({name}), {k} shots: 90 % coverage {cov:.3f} (target {low:.2f}–{high:.2f}): "
                     f"{'met' if low <= cov <= high else 'not met'}.")
    mse = summary["10"]["mse"]["mean"]
    lines.append(f"- {method}, 10 shots in range: MSE {mse:.4f} (target ≤ {S.TARGETS['mse']}): "
                 f"{'met' if mse <= S.TARGETS['mse'] else 'not met'}.")
    for side, words in (("left", "x < −5"), ("right", "x > 5")):
        cov, nll = summary[side]["coverage_90"]["mean"], summary[side]["nll"]["mean"]
        text = (f"- {method} ({name}), {words}: 90 % coverage {cov:.3f} (target ≥ {S.TARGETS['out_coverage']:.2f}): "
                f"{'met' if cov >= S.TARGETS['out_coverage'] else 'not met'}; NLL {nll:.2f}")
        if reference in models:
            ref = models[reference]["summary"]
            best = min(MAPS, key=lambda m: ref[m][side]["nll"]["mean"])
            ref_nll = ref[best][side]["nll"]["mean"]
            text += (f" against {reference}'s lowest over the maps, {ref_nll:.2f} ({best}) (target ≤): "
                     f"{'met' if nll <= ref_nll else 'not met'}")
        lines.append(text + ".")
    return "\n".join(lines)


def markdown(models: dict) -> str:
    heads = [f"{k} shots" for k in SHOTS] + ["x < −5", "x > 5"]
    lines = []
    for metric, digits in (("coverage_90", 3), ("nll", 2)):
        lines += [f"### {metric} (mean ± std over seeds)", "", "| method | map | " + " | ".join(heads) + " |",
                  "|---|---|" + "---|" * len(heads)]
        for method, entry in models.items():
            for name in MAPS:
                cells = [entry["summary"][name][c][metric] for c in CONDITIONS]
                lines.append(f"| {method} | {name}{' (closest)' if name == entry['closest_map'] else ''} | " + " | ".join(
                    f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" for s in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(models: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False, sharey=True)
    x = range(len(CONDITIONS))
    for ax, (method, entry) in zip(axes[0], models.items()):
        for i, name in enumerate(MAPS):
            stats = [entry["summary"][name][c]["coverage_90"] for c in CONDITIONS]
            ax.errorbar([j + 0.1 * (i - 2) for j in x], [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                        marker="o", ms=3, ls="", capsize=2, label=name)
        ax.axhspan(0.85, 0.95, color="0.92", zorder=0)
        ax.axhline(0.9, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(x), [f"{k} sh." for k in SHOTS] + ["x<−5", "x>5"])
        ax.set_title(method)
    axes[0][0].set_ylabel("90 % coverage")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, metavar="DIR", help="folder searched for finished runs of the example")
    p.add_argument("--out", default="docs/results/sine/shift_recalibration")
    p.add_argument("--methods", default="ibaml,ibaml-fullcov,dkt")
    p.add_argument("--tasks", type=int, default=1000, help="evaluation tasks per condition")
    p.add_argument("--query", type=int, default=10)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--streams", choices=("test", "validation"), default="test",
                   help="the shift benchmark's test conditions, or its validation conditions (seeds + 1000000), "
                        "on which the map is chosen")
    args = p.parse_args(argv)
    if min(args.tasks, args.query, args.chunk, args.threads) < 1:
        p.error("--tasks, --query, --chunk and --threads must be positive")
    runs, _ = S.find_runs(Path(args.runs))
    runs = [r for r in runs if r["method"] in args.methods.split(",")]
    if not runs:
        raise SystemExit(f"no finished run of {args.methods} under {args.runs}")
    settings = {"tasks": args.tasks, "query": args.query, "chunk": args.chunk, "threads": args.threads,
                "stream_offset": S.VALIDATION_OFFSET if args.streams == "validation" else 0}
    clock, models, skipped = time.perf_counter(), {}, []
    for run in runs:
        result = evaluate(run, settings)
        if "skipped" in result:
            skipped.append(result)
            print(f"{run['method']} seed {result['seed']} left out: {result['skipped']}")
            continue
        models.setdefault(run["method"], {"per_seed": {}})["per_seed"][str(result["seed"])] = result
        print(f"{run['method']} seed {result['seed']}: {result['seconds']:.0f} s", flush=True)
    models = {m: models[m] for m in S.ORDER if m in models}
    for entry in models.values():
        entry["summary"] = summarize(entry["per_seed"])
        entry["worst_gap"] = worst_gaps(entry["summary"])
        entry["closest_map"] = min(MAPS, key=lambda name: entry["worst_gap"][name])
    payload = {"protocol": __doc__.split("\n\n")[2].strip(), "runs": str(args.runs), "settings": settings,
               "split": f"{args.streams} conditions",
               "validation": f"stream seed {S.VALIDATION} + S, {VALIDATION_TASKS} tasks of the training condition",
               "test_streams": "those of benchmarks/sine_shift.py (shots: 100000 + 1000 i + S; x grid: 200000 + S)",
               "skipped": skipped, "seconds": time.perf_counter() - clock, "torch": torch.__version__,
               "models": models}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = P.rounded(payload, 5)          # the tables from the numbers the JSON holds
    models = payload["models"]
    P.write_json(out / "recalibration.json", payload)
    text = markdown(models)
    (out / "table.md").write_text(text)
    fig = figure(models)
    fig.savefig(out / "coverage.png", dpi=90, bbox_inches="tight")
    print(text)
    for method, entry in models.items():
        print(f"\n{method}, closest map {entry['closest_map']}:\n" + target_findings(models, method, entry["closest_map"]))
    return payload


if __name__ == "__main__":
    main()
