"""Sine regression under the results protocol: settings chosen on validation tasks only, every
method of a table with the same noise model and the same post-hoc recalibration, several
training seeds, the test streams evaluated once per final configuration.

    python -m benchmarks.sine_protocol select --out docs/results/sine/protocol
    python -m benchmarks.sine_protocol final --out docs/results/sine/protocol
    python -m benchmarks.sine_protocol table --out docs/results/sine/protocol

``select`` runs ``examples/sine_regression.py`` with ``--eval-split val`` (validation streams,
never the test ones) for every value of each stage of each method's grid (:data:`GRID`) at seed 0
and ``--select-iters`` meta-iterations, and keeps the setting with the lowest recalibrated
validation NLL in range: ``DIR/selection.json`` (a value whose run fails, non-finite
predictions on some validation task for instance, is recorded with its error and not chosen). ``final`` runs every method of both tables
(:data:`TABLES`: one learned noise shared by all tasks for every method, and a per-task
conjugate noise for every method that can take one) at each seed with the selected values and
``--meta-iters`` meta-iterations, on the test streams: ``DIR/runs/<table>/seed<S>/<method>``.
``table`` gathers them: per table and method, the mean and standard deviation over the seeds
of each metric, raw and recalibrated (one factor on the predictive variance fitted to
validation tasks, :func:`ibaml.calibration.fit_variance_scale`, the same step for every
method; the same factor with a Student-t's or a log-normal mixture's shape; and the one of these
three each run chooses by its validation NLL, :func:`chosen_family`), beside the widest 95 %
interval over tasks of one run: ``DIR/table.json`` and ``DIR/table.md``.

Runs are subprocesses of the example (``--jobs`` at a time, one thread each; threads of this
process, or Ray Tune trials with ``--engine ray`` and ``--address`` for a cluster); a run whose
``metrics.json`` exists is not run again, so an interrupted stage resumes where it stopped
(``benchmarks/_protocol.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import _protocol as P

#: the KL weights tried for the variational methods over every weight, implicit and explicit alike
FULL_NETWORK_KL_WEIGHTS = (2e-4, 1e-3, 5e-3, 2.5e-2, 0.125)
#: per method, the stages of its selection on validation: ``(option, values)``, each stage run
#: with the best setting of the stages before it held fixed; the method takes the best setting
#: over all its stages. iBaML: the noise pseudo-count a₀, then the weight β of the KL term of
#: its outer objective at that a₀ (β = 1, the default, is the first stage's best run). A key
#: ``"<method>/<noise>"`` is a choice that the ``noise`` table makes for itself, under its own
#: noise model, over the method's (:func:`table_options`): β interacts with the noise model (with
#: one shared noise the weak pull chosen under the per-task noise let one seed's extrapolation
#: run away), so the shared-noise table chooses iBaML's β again (a₀ plays no part there). ABML,
#: the same model differentiated through its inner steps, has β chosen on the same grid and the
#: same way.
GRID = {
    "maml": [("--inner-lr", (0.001, 0.002, 0.004))],
    "anil": [("--inner-lr", (0.002, 0.005, 0.01, 0.02, 0.05))],
    "imaml": [("--precision", (0.1, 0.3, 1.0, 3.0))],
    "ibaml": [("--noise-prior-count", (1.0, 5.0, 20.0)), ("--kl-weight", (0.2, 0.05, 0.01))],
    "ibaml/shared": [("--kl-weight", (1.0, 0.2, 0.05, 0.01))],
    "abml": [("--kl-weight", (1.0, 0.2, 0.05, 0.01))],
    "abml/shared": [("--kl-weight", (1.0, 0.2, 0.05, 0.01))],
    "imaml-gd": [("--precision", (0.5, 2.0, 8.0, 32.0, 128.0, 512.0))],
    "ibaml-all": [("--kl-weight", FULL_NETWORK_KL_WEIGHTS)],
    "abml-all": [("--kl-weight", FULL_NETWORK_KL_WEIGHTS)],
}
#: the noise model each value is chosen under (the table the method's headline row is in; a
#: ``"<method>/<noise>"`` key of :data:`GRID`, under that noise)
SELECT_NOISE = {"maml": "shared", "anil": "shared", "imaml": "shared", "ibaml": "conjugate", "abml": "conjugate",
                "imaml-gd": "shared",
                "ibaml-all": "shared", "abml-all": "shared"}
#: a method that takes another's chosen value (iMAML-HF solves iMAML-GD's inner problem otherwise)
SHARES_CHOICE = {"imaml-hf": "imaml-gd", "ibaml-hf": "ibaml-all"}
#: the comparison tables: one noise model for every method of a table
TABLES = {
    "shared": ("maml", "anil", "imaml", "ibaml", "abml", "dkt", "imaml-gd", "imaml-hf", "ibaml-all", "ibaml-hf",
               "abml-all"),
    "conjugate": ("maml", "anil", "imaml", "ibaml", "abml"),
}
#: in words, what each method adapts and how (the rows of the table)
DESCRIBE = {
    "maml": "all weights, 10 SGD steps (5 in meta-training), explicit",
    "anil": "the head, 10 SGD steps (5 in meta-training), explicit",
    "imaml": "the head (ridge), 2 Newton steps, implicit",
    "ibaml": "the head (mean-field Bayesian linear regression), 10 Newton steps, implicit",
    "abml": "the head (mean-field), 10 proximal steps, explicit",
    "dkt": "a GP on learned features (deep kernel), exact inference",
    "imaml-gd": "all weights (isotropic prior), 20 Adam steps, implicit",
    "imaml-hf": "all weights (isotropic prior), 10 Newton-CG steps with adapted damping and a line search, implicit",
    "ibaml-all": "all weights (mean-field, diagonal prior), 20 Adam steps on 4 draws, implicit",
    "ibaml-hf": "all weights (mean-field, diagonal prior), 10 Newton-CG steps with adapted damping and a line search "
                "on 4 draws, implicit",
    "abml-all": "all weights (mean-field), 10 SGD steps on 4 draws, explicit",
}
METRICS = ("mse", "nll", "coverage_90", "calibration_error")
#: the rows with a prior over every weight (the papers' configuration)
FULL_NETWORK = ("imaml-gd", "imaml-hf", "ibaml-all", "ibaml-hf", "abml-all")


def run_all(jobs: list, args, keep: bool = False, tolerate_failure: bool = False) -> list:
    """``[(method, folder, options)]`` through the example, ``--jobs`` at a time, with the
    evaluation sizes of ``args``; their metrics in order (``keep``: the runs' folders kept under
    ``--keep-runs``, and evaluated again from there with ``--reevaluate``; ``tolerate_failure``:
    a failed run's record in place of its metrics, :func:`benchmarks._protocol.run_example`)."""
    sizes = ["--eval-tasks", args.eval_tasks, "--recalibration-tasks", args.val_tasks]
    return P.run_all("sine_regression.py", [(folder, ["--method", method, *sizes, *options])
                                            for method, folder, options in jobs], args.jobs,
                     tolerate_failure=tolerate_failure, keep_root=args.keep_runs if keep else None, out=Path(args.out),
                     reevaluate=keep and args.reevaluate, engine=args.engine, address=args.address)


def noise_options(method: str, noise: str) -> list:
    return [] if method == "dkt" else ["--noise", noise]


def _selection_score(row: dict) -> float:
    """A tried value's validation score: its recalibrated NLL, ``inf`` where its run failed."""
    return math.inf if row["nll_recalibrated"] is None else row["nll_recalibrated"]


def _method_and_noise(key: str) -> tuple:
    """``"ibaml/shared"`` → ``("ibaml", "shared")``; ``"anil"`` → ``("anil", SELECT_NOISE["anil"])``."""
    method, _, noise = key.partition("/")
    return method, noise or SELECT_NOISE[method]


def table_options(chosen: dict, method: str, noise: str) -> dict:
    """The options ``method`` runs with in the ``noise`` table: its choice, with the table's own
    choice (a ``"<method>/<noise>"`` key) over it.

    >>> table_options({"ibaml": {"--a": 1, "--b": 1}, "ibaml/shared": {"--b": 2}}, "ibaml", "shared")
    {'--a': 1, '--b': 2}
    """
    return {**chosen.get(SHARES_CHOICE.get(method, method), {}), **chosen.get(f"{method}/{noise}", {})}


def select(args) -> dict:
    out = Path(args.out)
    methods = [m for m in GRID if not args.methods or m.partition("/")[0] in args.methods]
    tried = {}
    for stage in range(max(len(GRID[m]) for m in methods)):
        jobs, keys = [], []
        for key in (k for k in methods if stage < len(GRID[k])):
            option, values = GRID[key][stage]
            method, noise = _method_and_noise(key)
            held = P.row_options(min(tried[key], key=_selection_score)) if stage else {}
            for value in values:
                settings = {**held, option: value}
                jobs.append((method, out / "select" / f"{key.replace('/', '-')}_{P.settings_label(settings)}",
                             noise_options(method, noise) + [str(x) for kv in settings.items() for x in kv]
                             + ["--eval-split", "val", "--meta-iters", str(args.select_iters), "--seed", "0"]))
                keys.append((key, settings))
        for (key, settings), m in zip(keys, run_all(jobs, args, tolerate_failure=True)):
            scores = ({"nll_recalibrated": None, "failed": m["failed"]} if "failed" in m else
                      {"nll_recalibrated": m["recalibrated"]["nll"]["mean"], "mse": m["mse"]["mean"],
                       "nll_raw": m["nll"]["mean"]})
            tried.setdefault(key, []).append({**settings, "split": "validation", **scores})
    if args.methods:   # the other methods' choices stand as recorded (none on a first selection)
        recorded = out / "selection.json"
        earlier = json.loads(recorded.read_text())["tried"] if recorded.is_file() else {}
        tried = {m: tried.get(m, earlier.get(m)) for m in GRID if m in tried or m in earlier}
    chosen = {method: P.row_options(min(rows, key=_selection_score)) for method, rows in tried.items()}
    payload = {"criterion": "lowest recalibrated NLL in range on validation tasks (stream seeds 40000 + S), "
                            f"seed 0, {args.select_iters} meta-iterations; a method's later stages hold its "
                            "best setting of the earlier ones",
               "noise": SELECT_NOISE, "tried": tried, "chosen": chosen}
    P.write_json(out / "selection.json", payload)
    for method, rows in tried.items():
        print(f"{method}: " + ", ".join(f"{P.settings_label(P.row_options(r))}: NLL {_selection_score(r):.3f}" for r in rows)
              + f" -> {chosen[method]}")
    return payload


def final(args) -> dict:
    out = Path(args.out)
    chosen = json.loads((out / "selection.json").read_text())["chosen"]
    jobs = []
    for noise, methods in TABLES.items():
        for seed in args.seeds:
            for method in (m for m in args.methods or methods if m in methods):
                options = [str(x) for option_value in table_options(chosen, method, noise).items()
                           for x in option_value]
                jobs.append((method, out / "runs" / noise / f"seed{seed}" / method,
                             noise_options(method, noise) + options + [
                                 "--meta-iters", str(args.meta_iters), "--seed", str(seed)]))
    run_all(jobs, args, keep=True)
    return table(args)


#: the heavy-tailed recalibration families the example fits beside the Gaussian factor
FAMILIES = ("student_t", "lognormal")
FAMILY_NAMES = {"gaussian": "Gaussian factor", "student_t": "Student-t", "lognormal": "log-normal mixture"}


def family_summary(runs: list) -> dict:
    """Over the seeds, one recalibration family's metrics in and out of range, its held-out
    (validation) NLL and its fitted factor and shape per seed."""
    return {"in_range": {k: P.seed_stats([r[k]["mean"] for r in runs]) for k in METRICS},
            "out_of_range": {k: P.seed_stats([r["out_of_range"][k]["mean"] for r in runs]) for k in METRICS},
            "validation_nll": P.seed_stats([r["validation_nll"] for r in runs]),
            "variance_scale": [r["variance_scale"] for r in runs], "tails": [r.get("tails") for r in runs]}


def chosen_family(run: dict) -> str:
    """The recalibration family of one run with the lowest NLL on its validation tasks: the
    Gaussian factor, or the factor with a Student-t's or a log-normal mixture's shape
    (:data:`FAMILIES`), each fitted to the same held-out tasks; the choice never sees the test
    streams."""
    return min(("gaussian", *FAMILIES), key=lambda f: _family(run, f)["validation_nll"])


def chosen_summary(runs: list) -> dict:
    """:func:`family_summary` of each run's :func:`chosen_family`, with the families chosen per seed."""
    families = [chosen_family(r) for r in runs]
    return dict(family_summary([_family(r, f) for r, f in zip(runs, families)]), family=families)


def _family(entry: dict, family: str) -> dict:
    """One recalibration family's block of a summary entry, the Gaussian factor's included."""
    return entry["recalibrated"] if family == "gaussian" else entry["recalibrated_tails"][family]


def families_markdown(summary: dict) -> str:
    """Per noise model, the recalibrated NLL and 90% coverage in range of every row under each
    family (the factor alone, and with a Student-t's or a log-normal mixture's shape)."""
    names = ("gaussian", *FAMILIES)
    lines = []
    for noise, rows in summary.items():
        rows = {m: e for m, e in rows.items() if "recalibrated_tails" in e}
        if not rows:
            continue
        head = (["method", "seeds"] + [f"NLL, {FAMILY_NAMES[f]}" for f in names]
                + [f"90% cov., {FAMILY_NAMES[f]}" for f in names] + [f"validation NLL, {FAMILY_NAMES[f]}" for f in names]
                + ["chosen on validation, per seed", "NLL, chosen", "90% cov., chosen"])
        lines += [f"Noise model: **{noise}**, recalibrated", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, e in rows.items():
            cells = [f"{_family(e, f)['in_range'][k]['mean']:.3f} ± {_family(e, f)['in_range'][k]['std']:.3f}"
                     for k in ("nll", "coverage_90") for f in names]
            cells += [f"{_family(e, f)['validation_nll']['mean']:.3f}" for f in names]
            chosen = e["recalibrated_chosen"]
            cells += [" / ".join(FAMILY_NAMES[f] for f in chosen["family"])]
            cells += [f"{chosen['in_range'][k]['mean']:.3f} ± {chosen['in_range'][k]['std']:.3f}" for k in ("nll", "coverage_90")]
            lines.append("| " + " | ".join([method, str(len(e["seeds"]))] + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summarize(out: Path) -> dict:
    """``{table: {method: {"raw"|"recalibrated": {where: {metric: stats}}}}}`` over the seeds found."""
    summary = {}
    for table, methods in TABLES.items():
        for method in methods:
            runs = sorted((out / "runs" / table).glob(f"seed*/{method}/metrics.json"))
            if not runs:
                continue
            data = [json.loads(r.read_text()) for r in runs]
            entry = {"adapts": DESCRIBE[method], "seeds": [int(r.parent.parent.name[4:]) for r in runs],
                     "config": {k: data[0]["config"].get(k) for k in ("meta_iters", "inner_lr", "precision",
                                                                      "noise_prior_count", "noise", "cg_steps",
                                                                      "kl_weight")}}
            for kind in ("raw", "recalibrated"):
                entry[kind] = {}
                for where in ("in_range", "out_of_range"):
                    def pick(d):
                        d = d if kind == "raw" else d["recalibrated"]
                        return d if where == "in_range" else d["out_of_range"]
                    entry[kind][where] = {k: dict(P.seed_stats([pick(d)[k]["mean"] for d in data]),
                                                  ci95_over_tasks=max(pick(d)[k]["ci95"] for d in data))
                                          for k in METRICS}
            entry["recalibrated"]["variance_scale"] = [d["recalibrated"]["variance_scale"] for d in data]
            if all(d.get("inner_grad_norm") for d in data):   # ||∇_b G|| over the last tenth of meta-training
                last = [d["inner_grad_norm"][-1] for d in data]
                entry["inner_grad_norm_last"] = {b: P.seed_stats([x[b] for x in last]) for b in last[0] if b != "step"}
            if all("recalibrated_tails" in d and "validation_nll" in d["recalibrated"] for d in data):
                entry["recalibrated"]["validation_nll"] = P.seed_stats([d["recalibrated"]["validation_nll"]
                                                                        for d in data])
                entry["recalibrated_tails"] = {family: family_summary([d["recalibrated_tails"][family] for d in data])
                                               for family in FAMILIES}
                entry["recalibrated_chosen"] = chosen_summary(data)
            summary.setdefault(table, {})[method] = entry
    return summary


#: the columns of the full table: (header, kind, where, metric, decimals)
COLUMNS = (("MSE", "raw", "in_range", "mse", 3), ("NLL raw", "raw", "in_range", "nll", 3),
           ("NLL recal.", "recalibrated", "in_range", "nll", 3),
           ("90% cov. raw", "raw", "in_range", "coverage_90", 3),
           ("90% cov. recal.", "recalibrated", "in_range", "coverage_90", 3),
           ("cal. error raw", "raw", "in_range", "calibration_error", 3),
           ("cal. error recal.", "recalibrated", "in_range", "calibration_error", 3),
           ("MSE, x∈[5,10]", "raw", "out_of_range", "mse", 2),
           ("NLL recal., x∈[5,10]", "recalibrated", "out_of_range", "nll", 2),
           ("90% cov. recal., x∈[5,10]", "recalibrated", "out_of_range", "coverage_90", 3),
           ("NLL, chosen recal.", "recalibrated_chosen", "in_range", "nll", 3),
           ("90% cov., chosen recal.", "recalibrated_chosen", "in_range", "coverage_90", 3),
           ("90% cov., chosen recal., x∈[5,10]", "recalibrated_chosen", "out_of_range", "coverage_90", 3))
#: the README's headline columns ("chosen recal.": the recalibration each run chooses on validation, :func:`chosen_family`)
HEADLINE = ("MSE", "NLL raw", "NLL, chosen recal.", "90% cov. raw", "90% cov., chosen recal.",
            "90% cov., chosen recal., x∈[5,10]")


def markdown(summary: dict, columns=None, describe: bool = True) -> str:
    """One table per noise model: mean ± std over the seeds of each column (default: all of
    :data:`COLUMNS`; the README's :data:`HEADLINE` with ``describe=False``; "—" where a row's runs
    do not report the heavy-tailed recalibrations that the chosen one picks among)."""
    cols = [c for c in COLUMNS if columns is None or c[0] in columns]
    lines = []
    for noise, rows in summary.items():
        head = ["method"] + (["adapts"] if describe else []) + ["seeds"] + [c[0] for c in cols]
        lines += [f"Noise model: **{noise}**" + (" (one learned noise for all tasks)" if noise == "shared" else
                                                 " (a noise per task, Normal–inverse-gamma)"), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, e in rows.items():
            cells = [f"{e[kind][where][k]['mean']:.{d}f} ± {e[kind][where][k]['std']:.{d}f}" if kind in e else "—"
                     for _, kind, where, k, d in cols]
            lines.append("| " + " | ".join([method] + ([e["adapts"]] if describe else []) + [str(len(e["seeds"]))]
                                           + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _mean(entry: dict, kind: str, where: str, metric: str) -> float:
    return entry[kind][where][metric]["mean"]


def _paired(mine: dict, theirs: dict, kind: str, metric: str) -> str:
    """``"; paired by seed ..."``: two rows' in-range ``metric`` compared seed by seed
    (:func:`benchmarks._protocol.paired_difference`), ``""`` with fewer than 2 common seeds."""
    d = P.paired_difference(*({"seeds": e["seeds"], "per_seed": e[kind]["in_range"][metric]["per_seed"]}
                              for e in (mine, theirs)))
    if d is None:
        return ""
    low, high = d["ci95"]
    return (f"; paired by seed, {d['mean']:+.3f} with a 95 % interval of {low:+.3f} to {high:+.3f} over "
            f"{len(d['differences'])} seeds, " + ("which orders them" if d["ordered"] else "which does not order them"))


def findings(summary: dict, noise: str = "shared", method: str = "ibaml") -> str:
    """The comparative sentences the docs make about ``method`` in the ``noise`` table, each with
    its margin, written from the numbers, whichever way they fall (the docs test requires the
    pages to hold exactly these sentences, so a rerun that changes an ordering fails it until
    the pages say so)."""
    rows = summary[noise]
    me, others = rows[method], {m: e for m, e in rows.items() if m != method}
    out = []
    for label, kind, metric in (("MSE", "raw", "mse"), ("raw NLL", "raw", "nll"), ("recalibrated NLL", "recalibrated", "nll")):
        best_other = min(others, key=lambda m: _mean(others[m], kind, "in_range", metric))
        mine, theirs = _mean(me, kind, "in_range", metric), _mean(others[best_other], kind, "in_range", metric)
        paired = _paired(me, others[best_other], kind, metric)
        if mine < theirs:
            out.append(f"{method}'s {label} is the lowest of the {len(rows)} rows: {mine:.3f} against the next, "
                       f"{best_other}, at {theirs:.3f} (a margin of {theirs - mine:.3f}{paired}).")
        else:
            out.append(f"{method}'s {label} is not the lowest: {mine:.3f} against {best_other}'s {theirs:.3f} "
                       f"(above it by {mine - theirs:.3f}{paired}).")
    raw, recal = _mean(me, "raw", "in_range", "coverage_90"), _mean(me, "recalibrated", "in_range", "coverage_90")
    def against_nominal(c: float) -> str:
        return "within 0.02 of 0.90" if abs(c - 0.9) <= 0.02 else "too wide" if c > 0.9 else "too narrow"
    out.append(f"{method}'s 90% intervals cover {raw:.3f} of the queries raw ({against_nominal(raw)}) and {recal:.3f} "
               f"recalibrated ({against_nominal(recal)}).")
    with_families = {m: e for m, e in rows.items() if "recalibrated_tails" in e}
    if method in with_families:
        for family in FAMILIES:
            nll = {m: _family(e, family)["in_range"]["nll"]["mean"] for m, e in with_families.items()}
            best_other = min((m for m in nll if m != method), key=nll.get)
            mine, theirs = nll[method], nll[best_other]
            order = (f"the lowest of the {len(nll)} rows: {mine:.3f} against the next, {best_other}, at {theirs:.3f} "
                     f"(a margin of {theirs - mine:.3f})" if mine < theirs else
                     f"not the lowest: {mine:.3f} against {best_other}'s {theirs:.3f} (above it by {mine - theirs:.3f})")
            cov = _family(with_families[method], family)["in_range"]["coverage_90"]["mean"]
            out.append(f"Recalibrated with a {FAMILY_NAMES[family]} (its shape fitted beside the factor on the same "
                       f"validation tasks, for every row), {method}'s NLL is {order}, and its 90% intervals cover "
                       f"{cov:.3f} of the queries ({against_nominal(cov)}).")
        out += chosen_findings(with_families, rows, method)
        val = {f: _family(with_families[method], f)["validation_nll"]["mean"] for f in ("gaussian", *FAMILIES)}
        best = min(val, key=val.get)
        out.append(f"Of the three recalibrations, the {FAMILY_NAMES[best]} has {method}'s lowest validation NLL "
                   f"({val[best]:.3f}; " + ", ".join(f"{FAMILY_NAMES[f]} {v:.3f}" for f, v in val.items() if f != best)
                   + ").")
    for full in (m for m in FULL_NETWORK if m in rows):
        e = rows[full]
        mse = {m: _mean(rows[m], "raw", "in_range", "mse") for m in ("maml", "anil") if m in rows}
        stationarity = ", ".join(f"{b} {v['mean']:.3g}" for b, v in e.get("inner_grad_norm_last", {}).items())
        out.append(f"Over all weights, {full} ({len(e['seeds'])} seed{'s' * (len(e['seeds']) > 1)}) reaches an MSE of {_mean(e, 'raw', 'in_range', 'mse'):.3f} "
                   f"(per seed " + " / ".join(f"{v:.3f}" for v in e["raw"]["in_range"]["mse"]["per_seed"]) + "; "
                   + ", ".join(f"{m} {v:.3f}" for m, v in mse.items())
                   + (f"), with ||∇G|| over the last tenth of meta-training at {stationarity}." if stationarity else ")."))
        if "maml" in rows:   # seed by seed against MAML, on the seeds both rows have
            theirs = dict(zip(rows["maml"]["seeds"], rows["maml"]["raw"]["in_range"]["mse"]["per_seed"]))
            margins = [theirs[s] - v for s, v in zip(e["seeds"], e["raw"]["in_range"]["mse"]["per_seed"]) if s in theirs]
            out.append(f"Seed by seed, {full}'s MSE is below maml's at {sum(m > 0 for m in margins)} of {len(margins)} "
                       f"seeds (maml's minus {full}'s: " + " / ".join(f"{m:.3f}" for m in margins) + ").")
    if "abml-all" in rows:   # the variational rows over every weight: implicit (iBaML) against explicit (ABML)
        theirs = rows["abml-all"]
        for full in (m for m in ("ibaml-all", "ibaml-hf") if m in rows):
            parts = []
            for label, kind, metric in (("raw NLL", "raw", "nll"), ("MSE", "raw", "mse")):
                mine, other = _mean(rows[full], kind, "in_range", metric), _mean(theirs, kind, "in_range", metric)
                parts.append(f"its {label} {mine:.3f} against {other:.3f} ({'below' if mine < other else 'above'} "
                             f"by {abs(mine - other):.3f})")
            out.append(f"Over all weights, {full} against abml-all (explicit, mean-field): " + ", ".join(parts) + ".")
    oor = {m: _mean(e, "recalibrated", "out_of_range", "coverage_90") for m, e in rows.items()}
    top = max(oor, key=oor.get)
    out.append(f"Out of range (x in [5, 10]) no row's recalibrated 90% interval covers more than {oor[top]:.3f} of the "
               f"queries (the highest, {top}); {method}'s covers {oor[method]:.3f}.")
    return "\n".join(f"- {line}" for line in out)


def chosen_findings(with_families: dict, rows: dict, method: str) -> list:
    """Two sentences on the recalibration chosen per run on validation (:func:`chosen_family`,
    the same rule for every row): ``method``'s NLL and 90% coverage under it against the other
    rows, and the results target read under it (``method``'s NLL the lowest, its 90% coverage
    within 0.88–0.92, its MSE at or below ANIL's and head iMAML's), met or not, part by part."""
    nll = {m: e["recalibrated_chosen"]["in_range"]["nll"]["mean"] for m, e in with_families.items()}
    best_other = min((m for m in nll if m != method), key=nll.get)
    mine, theirs = nll[method], nll[best_other]
    chosen = with_families[method]["recalibrated_chosen"]
    cov = chosen["in_range"]["coverage_90"]["mean"]
    lowest = mine < theirs
    paired = _paired(with_families[method], with_families[best_other], "recalibrated_chosen", "nll")
    order = (f"the lowest of the {len(nll)} rows: {mine:.3f} against the next, {best_other}, at {theirs:.3f} "
             f"(a margin of {theirs - mine:.3f}{paired})" if lowest else
             f"not the lowest: {mine:.3f} against {best_other}'s {theirs:.3f} (above it by {mine - theirs:.3f}{paired})")
    out = [f"With the recalibration each run chooses on its validation tasks (the family of lowest validation NLL, "
           f"for every row; {method}'s: " + " / ".join(FAMILY_NAMES[f] for f in chosen["family"])
           + f"), {method}'s NLL is {order}, and its 90% intervals cover {cov:.3f} of the queries."]
    mse = {m: _mean(rows[m], "raw", "in_range", "mse") for m in (method, "anil", "imaml") if m in rows}
    parts = [("its NLL the lowest", lowest), (f"its 90% coverage {cov:.3f} within 0.88–0.92", abs(cov - 0.9) <= 0.02)]
    parts += [(f"its MSE {mse[method]:.3f} at or below {m}'s {mse[m]:.3f}", mse[method] <= mse[m])
              for m in ("anil", "imaml") if m in mse and m != method]
    missed = [p for p, ok in parts if not ok]
    out.append(f"Under the recalibration chosen on validation the results target for {method} is "
               + ("met: " + "; ".join(p for p, _ in parts) if not missed else "not met: " + "; ".join(
                   f"{p} {'holds' if ok else 'does not hold'}" for p, ok in parts)) + ".")
    return out


#: the sentences of :func:`findings` the README keeps (by their opening words)
#: per noise model (the README shows the shared-noise table; of the per-task-noise one, the target's reading)
HEADLINE_FINDINGS = {"shared": ("ibaml's MSE", "With the recalibration each run", "Under the recalibration chosen",
                                "Over all weights", "Seed by seed", "Out of range"),
                     "conjugate": ("Under the recalibration chosen",)}


def headline_findings(text: str, noise: str = "shared") -> str:
    """The lines of :func:`findings`' ``text`` for the ``noise`` table that open with one of
    :data:`HEADLINE_FINDINGS`' for it."""
    return "\n".join(line for line in text.splitlines() if line[2:].startswith(HEADLINE_FINDINGS[noise]))


def table(args) -> dict:
    out = Path(args.out)
    summary = summarize(out)
    return P.write_table(out, "settings from selection.json (validation only); test streams evaluated once per "
                              "configuration; mean ± std over training seeds (ci95_over_tasks: the widest 95% interval "
                              "over evaluation tasks of one run)", summary,
                         markdown(summary) + "\n" + families_markdown(summary))


def main(argv=None):
    p = P.stage_parser(__doc__.split("\n\n")[0], "docs/results/sine/protocol", meta_iters=3000, eval_tasks=1000,
                       val_tasks=500)
    p.add_argument("--select-iters", type=int, default=1000)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return {"select": select, "final": final, "table": table}[args.stage](args)


if __name__ == "__main__":
    main()
