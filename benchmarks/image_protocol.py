"""The stroke benchmark under the results protocol: settings chosen on validation classes only,
every method with the same logit-scale recipe and the same temperature scaling, several
training seeds on one dataset (``--data-seed``), at least 600 test tasks, the test classes
evaluated once per final configuration.

    python -m benchmarks.image_protocol select --shots 1 --out docs/results/image_benchmark/protocol
    python -m benchmarks.image_protocol final --shots 1 --out docs/results/image_benchmark/protocol
    python -m benchmarks.image_protocol table --out docs/results/image_benchmark/protocol
    python -m benchmarks.image_protocol pages --out docs/results/image_benchmark/protocol

``select`` runs ``examples/miniimagenet.py`` (stroke fixture, Conv4-32 at 32×32, 5-way) with
``--eval-split val`` (tasks of the validation classes, apart from those of temperature
scaling) for every value of each method's grid (:data:`GRID`) at seed 0, and keeps the value
with the highest validation accuracy: ``DIR/selection_<K>shot.json``. ``final`` runs every
method of :data:`METHODS` at each seed with the selected values on the test classes:
``DIR/runs/<K>shot/seed<S>/<method>``. ``table`` gathers them: per shots and method, the mean
and standard deviation over seeds of accuracy, NLL, per-task and pooled ECE, raw (the learned
logit scale) and temperature-scaled (the scale fitted to validation tasks), with the test set's
size: ``DIR/table.json`` and ``DIR/table.md``; ``pages`` writes the README's and
``docs/results/images.md``'s tables and sentences from them (:data:`PAGES`). Runs go ``--jobs`` at a time, as threads of this
process or, with ``--engine ray`` (``--address`` for a cluster), as Ray Tune trials
(``benchmarks/_protocol.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ibaml.recipes.image_presets import LOGIT_SCALE

from . import _protocol as P

METHODS = ("maml", "anil", "imaml", "ibaml", "abml")
#: the papers' methods, a prior over every weight (``ibaml.recipes.presets.RECIPES``), at their published
#: settings (``ibaml.recipes.presets.FULL_NETWORK``: λ = 2 and 20 Adam steps for iMAML-GD, 10 Hessian-free
#: steps for iMAML-HF, σ = 0.01 and β = 2·10⁻⁴ with 4 antithetic draws for iBaML), iMAML-GD's
#: optimiser, step, λ and CG iterations chosen on validation, iMAML-HF's CG iterations and iBaML's
#: CG iterations, optimiser and step too (:data:`GRID`; ``select --methods imaml-gd``): run by
#: ``final --methods``, gathered in a table of their own beside MAML
FULL_NETWORK_METHODS = ("imaml-gd", "imaml-hf", "ibaml-all", "abml-all")
#: per method, the stages of its selection on validation: ``(option, values, held)``, the option
#: varied, the values tried and the options held fixed in every run of the stage (:data:`BEST`:
#: the method's most accurate setting of the stages before); the method takes the most accurate
#: setting over all its stages. Every head method's last stage is the meta learning rate of the
#: logit scale (:data:`LOGIT_SCALE_META_LRS`; the recipe's 3·10⁻², ``ibaml.recipes.image_presets.LOGIT_SCALE``,
#: is its earlier stages' runs), the one choice of the likelihood every row shares. ANIL's step as multiples of MAML's
#: (``ibaml.recipes.image_presets.image_inner_lr``: 0.01 on the mean support cross-entropy).
#: iMAML-GD over every weight: Adam's step at the preset's λ = 2, then λ at Adam's 10⁻², then
#: plain gradient descent (the paper's solver) at λ = 10 on the summed NLL (the paper's λ = 2 on
#: the mean of a 1-shot 5-way support) with MAML's step times 1, 5 and 10 (the paper's 0.1 on the
#: mean loss): a fixed Adam step cannot settle (each weight oscillates by about the step, so ‖∇G‖
#: stays near λ·lr·√P), and gradient descent with the paper's step does not settle either. Then
#: the CG iterations of the implicit gradient (1 and 5, the paper's, against the earlier stages'
#: 20): where the inner problem is not solved, ``∇²G`` at the returned point can be near-singular
#: or indefinite and a closer solve amplifies those directions; then the step and λ again at the
#: best of these. iMAML-HF and iBaML over every weight: one CG iteration, iMAML-GD's choice, at
#: their published settings (the run that shows they learn with it); then, for iBaML, iMAML-GD's
#: chosen inner solver in place of Adam (gradient descent, 2.5 × MAML's step on the summed NLL).
BEST = "best of the earlier stages"
#: the logit scale's meta learning rates tried: around the recipe's 3·10⁻² (a stage of every head method)
LOGIT_SCALE_META_LRS = (1e-2, 3e-2, 1e-1)


def _logit_stage(method: str) -> tuple:
    """The logit-scale stage of a method with earlier stages: the rates other than its recipe's
    (``LOGIT_SCALE[method]["meta_lr"]``, which the earlier stages' runs used), at their best setting."""
    return ("--logit-scale-meta-lr",
            lambda ways, shots: [v for v in LOGIT_SCALE_META_LRS if v != LOGIT_SCALE[method]["meta_lr"]], BEST)


GRID = {
    "maml": [("--logit-scale-meta-lr", lambda ways, shots: list(LOGIT_SCALE_META_LRS), {})],
    "anil": [("--inner-lr", lambda ways, shots: [m * 0.01 / (ways * shots) for m in (1, 3, 10)], {}),
             _logit_stage("anil")],
    "imaml": [("--precision", lambda ways, shots: [3.0, 10.0, 30.0, 100.0], {}), _logit_stage("imaml")],
    "ibaml": [("--kl-weight", lambda ways, shots: [1e-3, 3e-3, 1e-2], {}), _logit_stage("ibaml")],
    "abml": [("--logit-scale-meta-lr", lambda ways, shots: list(LOGIT_SCALE_META_LRS), {})],
    "imaml-gd": [("--inner-lr", lambda ways, shots: [1e-3, 3e-3, 1e-2], {}),
                 ("--precision", lambda ways, shots: [2.0, 10.0], {"--inner-lr": 1e-2}),
                 ("--inner-lr", lambda ways, shots: [m * 0.01 / (ways * shots) for m in (1, 5, 10)],
                  {"--inner-optimizer": "sgd", "--precision": 10.0}),
                 ("--cg-steps", lambda ways, shots: [1, 5], BEST),
                 ("--inner-lr", lambda ways, shots: [m * 0.01 / (ways * shots) for m in (2.5, 10)], BEST),
                 ("--precision", lambda ways, shots: [3.0, 30.0], BEST)],
    "imaml-hf": [("--cg-steps", lambda ways, shots: [1], {})],
    "ibaml-all": [("--cg-steps", lambda ways, shots: [1], {}),
                  ("--inner-lr", lambda ways, shots: [2.5 * 0.01 / (ways * shots)],
                   {"--inner-optimizer": "sgd", "--cg-steps": 1})],
}
DESCRIBE = {
    "maml": "all weights, 10 SGD steps (5 in meta-training), explicit",
    "anil": "the head, 10 SGD steps (5 in meta-training), explicit",
    "imaml": "the head (softmax, isotropic prior), Newton steps, implicit",
    "ibaml": "the head (softmax, mean-field, diagonal prior), Newton steps, implicit",
    "abml": "the head (mean-field), proximal steps, explicit",
    "imaml-gd": "all weights (isotropic prior), 20 first-order steps (optimiser, step, λ and CG iterations from the "
                "selection), implicit",
    "imaml-hf": "all weights (isotropic prior, λ = 2), 10 Hessian-free steps with a line search, implicit (CG "
                "iterations from the selection)",
    "ibaml-all": "all weights (mean-field, diagonal prior), 20 first-order steps on 4 antithetic draws (optimiser, "
                 "step and CG iterations from the selection), implicit",
    "abml-all": "all weights (mean-field), 10 SGD steps on 4 antithetic draws, explicit",
}
METRICS = ("accuracy", "nll", "ece", "ece_pooled")
#: the ECE a calibrated predictive with each run's confidences shows on its test set
#: (:func:`ibaml.calibration.ece_floor`), per task and pooled, and the ECE above it: the
#: miscalibration the finite test set does not explain (``"<ece>_excess"``, per seed)
FLOORS = {"ece": "ece_floor", "ece_pooled": "ece_pooled_floor"}


def data_options(args, shots: int) -> list:
    return ["--fixture", "--fixture-kind", "strokes", "--image-size", "32", "--channels", "32", "--ways", args.ways,
            "--shots", shots, "--meta-iters", args.meta_iters, "--meta-batch", 4, "--val-every", 0,
            "--val-tasks", args.val_tasks, "--data-seed", args.data_seed]


def _setting(options: dict) -> str:
    """``{"--inner-lr": 0.01, "--inner-optimizer": "sgd"}`` → ``"--inner-lr 0.01 --inner-optimizer sgd"``."""
    return " ".join(f"{k} {P.option_value(v)}" for k, v in options.items())


def select(args) -> dict:
    out = Path(args.out)
    methods = [m for m in GRID if not args.methods or m in args.methods]
    tried = {}
    for stage in range(max((len(GRID[m]) for m in methods), default=0)):
        jobs, keys = [], []
        for method in (m for m in methods if stage < len(GRID[m])):
            option, values, held = GRID[method][stage]
            best = held == BEST
            if best:
                held = P.row_options(max(tried[method], key=lambda r: r["accuracy"]))
            for value in values(args.ways, args.shots):
                held_now = {k: v for k, v in held.items() if k != option}
                settings = {**held_now, option: value} if best else {option: value, **held_now}
                jobs.append((out / "select" / f"{args.shots}shot" / f"{method}_{P.settings_label(settings)}",
                             ["--method", method, *[x for kv in settings.items() for x in kv], "--eval-split", "val",
                              "--eval-tasks", args.val_eval_tasks, "--seed", 0, *data_options(args, args.shots)]))
                keys.append((method, settings))
        runs = P.run_all("miniimagenet.py", jobs, args.jobs, engine=args.engine, address=args.address)
        for (method, settings), m in zip(keys, runs):
            tried.setdefault(method, []).append({**settings, "split": "validation classes",
                                                 "accuracy": m["accuracy"]["mean"], "nll": m["nll"]["mean"],
                                                 "ece_pooled": m["ece_pooled"]["mean"]})
    chosen = {m: P.row_options(max(rows, key=lambda r: r["accuracy"])) for m, rows in tried.items()}
    path = out / f"selection_{args.shots}shot.json"
    before = json.loads(path.read_text()) if args.methods and path.is_file() else {}
    if "tried" not in before:   # nothing chosen at these shots yet, or only values carried from other shots
        before = {"tried": {}, "chosen": {}}
    payload = {"criterion": f"highest accuracy on {args.val_eval_tasks} tasks of the validation classes, seed 0, "
                            f"data seed {args.data_seed}, {args.meta_iters} meta-iterations",
               "shots": args.shots, "tried": {**before["tried"], **tried}, "chosen": {**before["chosen"], **chosen}}
    P.write_json(path, payload)
    for method, rows in tried.items():
        print(f"{method}: " + ", ".join(f"{P.settings_label(P.row_options(r))}: acc {r['accuracy']:.3f}" for r in rows)
              + f" -> {chosen[method]}")
    return payload


def transferred(selection: dict, ways: int, shots: int) -> dict:
    """The values chosen at ``selection["shots"]`` shots used at ``shots``: ANIL's step scaled as
    MAML's is (a step on the summed NLL, ``∝ 1/(ways·shots)``), the others as they are.

    >>> transferred({"shots": 1, "chosen": {"anil": {"--inner-lr": 0.006}, "imaml": {"--precision": 10.0}}}, 5, 5)
    {'anil': {'--inner-lr': 0.0012}, 'imaml': {'--precision': 10.0}}
    """
    ratio = selection["shots"] / shots
    scaled = lambda m, c: m == "anil" or c.get("--inner-optimizer") == "sgd"   # SGD's step on the summed NLL
    return {m: {o: (round(v * ratio, 12) if o == "--inner-lr" and scaled(m, c) else v) for o, v in c.items()}
            for m, c in selection["chosen"].items()}


def final(args) -> dict:
    out = Path(args.out)
    path = out / f"selection_{args.shots}shot.json"
    if args.selection_from and not path.is_file():   # settings chosen on validation at another size
        source = json.loads((out / f"selection_{args.selection_from}shot.json").read_text())
        P.write_json(path, {"criterion": f"{source['criterion']}, at {source['shots']} shots; carried to "
                                         f"{args.shots} shots (ANIL's step scaled by {source['shots']}/{args.shots})",
                            "shots": args.shots, "selected_at_shots": source["shots"],
                            "chosen": transferred(source, args.ways, args.shots)})
    chosen = json.loads(path.read_text())["chosen"]
    # the test split named: a kept run evaluated again (--reevaluate) takes its saved options otherwise
    jobs = [(out / "runs" / f"{args.shots}shot" / f"seed{seed}" / method,
             ["--method", method, *[x for ov in chosen.get(method, {}).items() for x in ov],
              "--eval-split", "test", "--eval-tasks", args.eval_tasks, "--seed", seed, *data_options(args, args.shots)])
            for seed in args.seeds for method in (m for m in args.methods or METHODS if m in METHODS + FULL_NETWORK_METHODS)]
    P.run_all("miniimagenet.py", jobs, args.jobs, keep_root=args.keep_runs, out=out, reevaluate=args.reevaluate,
              engine=args.engine, address=args.address)
    return table(args)


def summarize(out: Path) -> dict:
    summary = {}
    for shots_dir in sorted((out / "runs").glob("*shot")):
        for method in METHODS + FULL_NETWORK_METHODS:
            runs = sorted(shots_dir.glob(f"seed*/{method}/metrics.json"))
            if not runs:
                continue
            data = [json.loads(r.read_text()) for r in runs]
            entry = {"adapts": DESCRIBE[method], "seeds": [d["config"]["seed"] for d in data],
                     "test_tasks": data[0]["num_test_tasks"], "test_classes": data[0]["classes"]["test"],
                     "config": {k: data[0]["config"].get(k) for k in ("inner_lr", "precision", "kl_weight",
                                                                      "cg_steps", "meta_iters", "data_seed")},
                     "inner_grad_norm": [d["inner_grad_norm"] for d in data]}
            for kind in ("raw", "calibrated"):
                blocks = [d if kind == "raw" else d["calibrated"] for d in data]
                entry[kind] = {k: dict(P.seed_stats([b[k]["mean"] for b in blocks]),
                                       ci95_over_tasks=max(b[k]["ci95"] for b in blocks)) for k in METRICS}
                for metric, floor in FLOORS.items():
                    if all(floor in b for b in blocks):
                        entry[kind][floor] = P.seed_stats([b[floor]["mean"] for b in blocks])
                        entry[kind][f"{metric}_excess"] = P.seed_stats([b[metric]["mean"] - b[floor]["mean"]
                                                                        for b in blocks])
            summary.setdefault(shots_dir.name, {})[method] = entry
    return summary


def markdown(summary: dict, describe: bool = True, methods=METHODS) -> str:
    """One table per number of shots: mean ± std over the seeds of the accuracy (which temperature
    scaling does not change) and of NLL, per-task ECE and pooled ECE, raw and temperature-scaled
    ("T-scaled"), the rows of ``methods`` that were run (the head methods and their controls by
    default; :data:`FULL_NETWORK_METHODS` with MAML for the full-network table);
    ``describe=False`` leaves out the column that says what each row adapts."""
    summary = {shots: {m: rows[m] for m in methods if m in rows} for shots, rows in summary.items()}
    summary = {shots: rows for shots, rows in summary.items() if rows}
    lines = []
    cols = [("accuracy", "raw", "accuracy")] + [(f"{k} {name}", kind, k) for k in METRICS[1:]
                                                for kind, name in (("raw", "raw"), ("calibrated", "T-scaled"))]
    for shots, rows in summary.items():
        head = ["method"] + (["adapts"] if describe else []) + ["seeds"] + [c[0] for c in cols]
        lines += [f"### 5-way {_shots(shots)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, e in rows.items():
            cells = [f"{e[kind][k]['mean']:.3f} ± {e[kind][k]['std']:.3f}" for _, kind, k in cols]
            lines.append("| " + " | ".join([method] + ([e["adapts"]] if describe else []) + [str(len(e["seeds"]))]
                                           + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def excess_markdown(summary: dict, methods=METHODS) -> str:
    """Per number of shots, the rows of ``methods`` whose runs hold the ECE floors: per-task and
    pooled ECE minus the floor of a calibrated predictive with the same confidences, raw and
    temperature-scaled, mean ± std over seeds, with the floor's mean in brackets."""
    lines = []
    cols = [(f"{label} {name}", kind, metric) for metric, label in (("ece", "per-task ECE − floor"),
                                                                   ("ece_pooled", "pooled ECE − floor"))
            for kind, name in (("raw", "raw"), ("calibrated", "T-scaled"))]
    for shots, rows in summary.items():
        rows = {m: rows[m] for m in methods if m in rows and "ece_excess" in rows[m]["raw"]}
        if not rows:
            continue
        lines += [f"### 5-way {_shots(shots)}: ECE above its floor", "",
                  "| method | accuracy | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
        for method, e in rows.items():
            cells = [f"{e[kind][metric + '_excess']['mean']:.4f} ± {e[kind][metric + '_excess']['std']:.4f} "
                     f"({e[kind][FLOORS[metric]]['mean']:.4f})" for _, kind, metric in cols]
            lines.append(f"| {method} | {e['raw']['accuracy']['mean']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _shots_in_words(folder: str) -> str:
    """``"1shot"`` → ``"1 shot"``, ``"5shot"`` → ``"5 shots"``."""
    k = folder[:-len("shot")]
    return f"{k} shot" + ("" if k == "1" else "s")


def _shots(folder: str) -> str:
    """``"1shot"`` → ``"1-shot"``."""
    return folder.replace("shot", "-shot")


def _lowest(rows: dict, method: str, kind: str, metric: str, label: str) -> str:
    """Whether ``method``'s ``metric`` (``kind``: raw or calibrated) is the lowest of ``rows``, and
    whether the training seeds order it and the nearest other row (:func:`_paired`)."""
    mine = rows[method][kind][metric]["mean"]
    others = {m: e[kind][metric]["mean"] for m, e in rows.items() if m != method}
    best = min(others, key=others.get)
    if mine < others[best]:
        return (f"{method}'s {label} is the lowest of the {len(rows)} rows: {mine:.4f} against the next, {best}, "
                f"at {others[best]:.4f}" + _paired(rows, method, best, kind, metric) + ".")
    return (f"{method}'s {label} is not the lowest: {mine:.4f} against {best}'s {others[best]:.4f}"
            + _paired(rows, method, best, kind, metric) + ".")


def _paired(rows: dict, method: str, other: str, kind: str, metric: str) -> str:
    """``"; paired by seed, ... "`` (:func:`benchmarks._protocol.paired_difference`): the mean
    difference of ``method``'s ``metric`` and ``other``'s over the seeds both rows have, its 95 %
    interval, and whether the seeds order the two (if not, about how many seeds would); ``""``
    with fewer than 2 common seeds."""
    d = P.paired_difference(*({"seeds": rows[m]["seeds"], "per_seed": rows[m][kind][metric]["per_seed"]}
                              for m in (method, other)))
    if d is None:
        return ""
    low, high = d["ci95"]
    verdict = ("the seeds order them" if d["ordered"] else
               "the seeds do not order them" + (f"; about {d['seeds_to_order']} seeds would at this spread"
                                                if d["seeds_to_order"] else ""))
    return (f"; paired by seed, {method}'s minus {other}'s is {d['mean']:+.4f} (95 % interval {low:+.4f} to "
            f"{high:+.4f} over {len(d['differences'])} seeds: {verdict})")


def findings(summary: dict) -> str:
    """The comparative sentences the docs make about the image protocol's table, per number of
    shots, written from the numbers whichever way they fall, each with its margin: iBaML's
    accuracy against the better of MAML and ANIL (the target: at most 2 points below), its
    pooled and per-task ECE raw and temperature-scaled against every row (the target: the
    lowest), and iMAML's accuracy against ANIL's (the target: at most 1 point below)."""
    out = []
    for folder, rows in summary.items():
        rows = {m: e for m, e in rows.items() if m in METHODS}   # the head table's rows
        shots = _shots_in_words(folder)
        if not {"maml", "anil", "imaml", "ibaml"} <= set(rows):
            continue
        acc = {m: e["raw"]["accuracy"]["mean"] for m, e in rows.items()}
        ref = max(("maml", "anil"), key=acc.get)
        gap = acc["ibaml"] - acc[ref]
        out.append(f"At {shots}, ibaml's accuracy is {acc['ibaml']:.3f} against {ref}'s {acc[ref]:.3f} (the better of "
                   f"maml and anil): {abs(gap) * 100:.1f} points {'above' if gap >= 0 else 'below'}, "
                   f"{'within' if gap >= -0.02 else 'outside'} the 2-point margin.")
        for kind, name in (("raw", "raw"), ("calibrated", "temperature-scaled")):
            for metric, label in (("ece_pooled", "pooled ECE"), ("ece", "per-task ECE")):
                out.append(f"At {shots}, " + _lowest(rows, "ibaml", kind, metric, f"{name} {label}"))
        gap = acc["imaml"] - acc["anil"]
        out.append(f"At {shots}, imaml's accuracy is {acc['imaml']:.3f} against anil's {acc['anil']:.3f}: "
                   f"{abs(gap) * 100:.1f} points {'above' if gap >= 0 else 'below'}, "
                   f"{'within' if gap >= -0.01 else 'outside'} the 1-point margin.")
    return "\n".join(f"- {line}" for line in out)


def floor_findings(summary: dict) -> str:
    """Per number of shots where every head row holds the ECE floors: whether iBaML's per-task
    and pooled ECE above its floor (:data:`FLOORS`), raw and temperature-scaled, is the lowest
    of the rows, with the margin; and how far each row's per-task ECE is its floor (the share of
    the floor in the mean over rows)."""
    out = []
    for folder, rows in summary.items():
        rows = {m: e for m, e in rows.items() if m in METHODS}
        if "ibaml" not in rows or not all("ece_excess" in e[k] for e in rows.values() for k in ("raw", "calibrated")):
            continue
        shots = _shots_in_words(folder)
        for kind, name in (("raw", "raw"), ("calibrated", "temperature-scaled")):
            for metric, label in (("ece_pooled", "pooled ECE"), ("ece", "per-task ECE")):
                out.append(f"At {shots}, " + _lowest(rows, "ibaml", kind, f"{metric}_excess",
                                                     f"{name} {label} above its floor"))
        share = [e[k]["ece_floor"]["mean"] / e[k]["ece"]["mean"] for e in rows.values() for k in ("raw", "calibrated")]
        out.append(f"At {shots}, the floor is {min(share) * 100:.0f}–{max(share) * 100:.0f} % of every row's per-task "
                   f"ECE, raw and temperature-scaled.")
    return "\n".join(f"- {line}" for line in out)


def selection_markdown(selection: dict, method: str) -> str:
    """The settings ``method`` tried on validation (``selection["tried"][method]``), one row each
    with its accuracy, NLL and pooled ECE on the validation classes, the chosen one marked."""
    chosen = selection["chosen"][method]
    lines = ["| setting | accuracy | nll | ece_pooled |", "|---|---|---|---|"]
    for row in selection["tried"][method]:
        options = P.row_options(row)
        mark = " (chosen)" if options == chosen else ""
        lines.append(f"| {_setting(options)}{mark} | {row['accuracy']:.3f} "
                     f"| {row['nll']:.3f} | {row['ece_pooled']:.3f} |")
    return "\n".join(lines)


def choices_markdown(selection: dict, methods=("maml", "anil", "imaml", "ibaml", "abml")) -> str:
    """One row per method of ``methods`` in ``selection``: every value it tried on validation
    with the validation accuracy (four digits, so that near ties show) and pooled ECE, and the
    value kept (the most accurate)."""
    lines = ["| method | tried: validation accuracy (pooled ECE) | chosen |", "|---|---|---|"]
    for method in (m for m in methods if m in selection["tried"]):
        tried = "; ".join(f"{_setting(P.row_options(r))}: {r['accuracy']:.4f} ({r['ece_pooled']:.3f})"
                          for r in selection["tried"][method])
        lines.append(f"| {method} | {tried} | {_setting(selection['chosen'][method])} |")
    return "\n".join(lines)


def full_network_markdown(summary: dict) -> str:
    """The full-network rows beside MAML's, at the numbers of shots where any was run."""
    summary = {shots: rows for shots, rows in summary.items() if any(m in rows for m in FULL_NETWORK_METHODS)}
    return markdown(summary, methods=("maml",) + FULL_NETWORK_METHODS)


def full_network_findings(summary: dict) -> str:
    """The sentences on the full-network rows, per number of shots where they were run, written
    from the numbers whichever way they fall, each with its margin: iMAML-HF's accuracy against
    MAML's (target: at or above), iMAML-GD's (target: at most 2 points below), iBaML's over every
    weight (target: at most 3 points below MAML's and at or above ABML's over every weight, where
    that was run) and its pooled ECE, raw and temperature-scaled, against MAML's and the
    full-network iMAML rows' (target: below each), the accuracies against MAML's paired by
    training seed (:func:`_paired`), with the inner problem's stationarity beside
    (the mean over seeds of ‖∇G‖ at the returned point, per block)."""
    out = []
    for folder, rows in summary.items():
        shots = _shots_in_words(folder)
        if "maml" not in rows:
            continue
        acc = {m: e["raw"]["accuracy"]["mean"] for m, e in rows.items()}
        for method, margin in (("imaml-hf", 0.0), ("imaml-gd", 0.02), ("ibaml-all", 0.03)):
            if method not in rows:
                continue
            gap = acc[method] - acc["maml"]
            target = "at or above" if margin == 0 else f"within {margin * 100:.0f} points of"
            out.append(f"At {shots}, {method}'s accuracy is {acc[method]:.3f} against maml's {acc['maml']:.3f}: "
                       f"{abs(gap) * 100:.1f} points {'above' if gap >= 0 else 'below'} "
                       f"({'meets' if gap >= -margin - 1e-12 else 'misses'} the target: {target} maml's)"
                       + _paired(rows, method, "maml", "raw", "accuracy")
                       + f"; ‖∇G‖ at the returned point {_grad_norms(rows[method])}.")
        if "ibaml-all" in rows and "abml-all" in rows:
            out.append(_against_abml(shots, rows["ibaml-all"], rows["abml-all"]))
        if "ibaml-all" in rows:
            for kind, name in (("raw", "raw"), ("calibrated", "temperature-scaled")):
                mine = rows["ibaml-all"][kind]["ece_pooled"]["mean"]
                others = {m: rows[m][kind]["ece_pooled"]["mean"] for m in ("maml", "imaml-gd", "imaml-hf") if m in rows}
                above = [m for m, v in others.items() if v <= mine]
                out.append(f"At {shots}, ibaml-all's {name} pooled ECE is {mine:.4f} against "
                           + ", ".join(f"{m}'s {v:.4f}" for m, v in others.items())
                           + (": below each." if not above else f": not below {', '.join(above)}'s."))
    return "\n".join(f"- {line}" for line in out)


def _against_abml(shots: str, mine: dict, theirs: dict) -> str:
    """iBaML's accuracy over every weight against ABML's (target: at or above), on the training
    seeds both rows have (the means over them; the seeds named where the rows' seeds differ)."""
    common = [s for s in mine["seeds"] if s in theirs["seeds"]]
    pick = lambda e: [v for s, v in zip(e["seeds"], e["raw"]["accuracy"]["per_seed"]) if s in common]
    a, b = (sum(pick(e)) / len(common) for e in (mine, theirs))
    on = "" if mine["seeds"] == theirs["seeds"] else f" on the seeds both rows have ({', '.join(map(str, common))})"
    return (f"At {shots}, ibaml-all's accuracy{on} is {a:.3f} against abml-all's {b:.3f}: {abs(a - b) * 100:.1f} points "
            f"{'above' if a >= b else 'below'} ({'meets' if a >= b else 'misses'} the target: at or above abml-all's); "
            f"‖∇G‖ of abml-all at its returned point {_grad_norms(theirs)}.")


def _grad_norms(entry: dict) -> str:
    """``entry``'s ‖∇G‖ per block, the mean over its seeds (``"w 1.23"`` or ``"mean 4.3, rho 0.01"``)."""
    blocks = entry["inner_grad_norm"][0].keys()
    return ", ".join(f"{b} {sum(n[b] for n in entry['inner_grad_norm']) / len(entry['inner_grad_norm']):.3g}"
                     for b in blocks)


def table(args) -> dict:
    out = Path(args.out)
    summary = summarize(out)
    text = markdown(summary)
    if any("ece_excess" in e["raw"] for rows in summary.values() for e in rows.values()):
        text += "\n## ECE above the floor of a calibrated predictive\n\n" + excess_markdown(summary)
    if any(m in rows for rows in summary.values() for m in FULL_NETWORK_METHODS):
        text += "\n## A prior over every weight\n\n" + full_network_markdown(summary)
    return P.write_table(out, "settings from selection_<K>shot.json (validation classes only; a full-network "
                              "method without a selection at its published settings); test classes evaluated once per "
                              "configuration; mean ± std over training seeds on one generated dataset", summary, text)


#: the pages whose generated blocks :func:`pages` writes: ``(file, marker)``, the block between
#: ``<!-- marker -->`` and ``<!-- /marker -->``
PAGES = (("README.md", "image-protocol"), ("docs/results/images.md", "image-protocol-table"),
         ("docs/results/images.md", "image-protocol-floor"), ("docs/results/images.md", "imaml-gd-selection"),
         ("docs/results/images.md", "image-protocol-full-network"), ("docs/results/images.md", "full-network-selection"))


def page_blocks(summary: dict, selection_1shot: dict) -> dict:
    """``{marker: text}``: every block of :data:`PAGES`, written from the protocol's ``table.json``
    summary and its 1-shot selection (the settings iMAML-GD, iMAML-HF and iBaML over every weight
    tried on validation)."""
    return {"image-protocol": markdown(summary, describe=False) + "\n\n" + findings(summary),
            "image-protocol-table": markdown(summary) + "\n\n" + findings(summary),
            "image-protocol-floor": excess_markdown(summary) + "\n\n" + floor_findings(summary),
            "imaml-gd-selection": selection_markdown(selection_1shot, "imaml-gd"),
            "image-protocol-full-network": full_network_markdown(summary) + "\n\n" + full_network_findings(summary),
            "full-network-selection": choices_markdown(selection_1shot, methods=("imaml-hf", "ibaml-all"))}


def replace_block(text: str, marker: str, body: str) -> str:
    """``text`` with the lines between ``<!-- marker -->`` and ``<!-- /marker -->`` replaced by ``body``.

    >>> replace_block("a\\n<!-- m -->\\nold\\n<!-- /m -->\\nb", "m", "new")
    'a\\n<!-- m -->\\nnew\\n<!-- /m -->\\nb'
    """
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        raise ValueError(f"the page has no block <!-- {marker} -->")
    head, rest = text.split(start, 1)
    return head + start + body.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]


def pages(args) -> dict:
    """Rewrite the generated blocks of the README and of ``docs/results/images.md`` from
    ``DIR/table.json`` and ``DIR/selection_1shot.json`` (run ``table`` first)."""
    out = Path(args.out)
    summary = json.loads((out / "table.json").read_text())["tables"]
    blocks = page_blocks(summary, json.loads((out / "selection_1shot.json").read_text()))
    for page in dict.fromkeys(page for page, _ in PAGES):
        text = Path(page).read_text()
        for marker in (m for p, m in PAGES if p == page):
            text = replace_block(text, marker, blocks[marker])
        Path(page).write_text(text)
        print(f"wrote the generated blocks of {page}")
    return blocks


#: the stages of :func:`main`
STAGES = {"select": select, "final": final, "table": table, "pages": pages}


def main(argv=None):
    p = P.stage_parser(__doc__.split("\n\n")[0], "docs/results/image_benchmark/protocol",
                       tuple(STAGES), meta_iters=300,
                       eval_tasks=600, val_tasks=100)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--val-eval-tasks", type=int, default=300, help="validation tasks that choose a setting")
    p.add_argument("--selection-from", type=int, default=None, metavar="SHOTS",
                   help="final: without a selection at --shots, use the one made on validation at SHOTS shots")
    args = p.parse_args(argv)
    return STAGES[args.stage](args)


if __name__ == "__main__":
    main()
