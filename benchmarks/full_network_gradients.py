"""Is the implicit meta-gradient of a full-network image run the gradient of its query loss?

    python -m benchmarks.full_network_gradients --runs /work/runs/image_protocol/runs/1shot \\
        --out docs/results/image_benchmark/full_network_gradients

For every finished run of ``--methods`` under ``--runs`` (the image example's ``last.pt`` beside
its ``metrics.json``, as ``python -m benchmarks.image_protocol final --keep-runs`` keeps them),
rebuilt as :mod:`benchmarks.image_shift` rebuilds it, at two points — the meta-parameters it
started from (the configuration's seed, nothing loaded) and the meta-trained ones — and on
``--tasks`` tasks of its training classes (the run's way, shot and query sizes, stream
``--stream``), three per-task meta-gradients ``g_t`` of the query loss ``F(v_K(θ), θ)``:

* ``implicit``: the run's estimator as it meta-trained,
  ``g = ∂_θF − (∂²_{vθ}G)ᵀ (∇²_vG)⁻¹ ∂_vF`` at the returned ``v_K``, with its CG iterations;
* ``implicit CG N``: the same with ``--cg-steps`` iterations, so that the linear solve is not
  what differs;
* ``explicit``: backpropagation through the run's ``K`` inner steps (:class:`ibaml.core.hypergrad.Explicit`),
  the exact gradient of ``F(v_K(θ), θ)``.

The implicit formula is that gradient only where ``∇_vG(v_K) = 0``; the table gives, per run
and point, the median over tasks of ``‖∇_vG(v_K)‖``, of the cosine between each implicit
gradient and the explicit one, and of ``‖g_implicit − g_explicit‖ / ‖g_explicit‖``.

``--as METHOD`` measures each run's meta-parameters with another method's inner loop and
estimator over the same prior and inference (the run's configuration with ``method = METHOD``,
its meta-trained state loaded; at the initial point the same seed's initialisation): ABML's runs
over every weight measured as iBaML's (``--methods abml-all --as ibaml-all``) ask whether the
implicit gradient of the variational model points where the explicit one that meta-trained
those parameters does. The run's own meta-gradient is then a fourth, compared in the column
``cos(implicit, run's own)``. ``--inner-steps K1,K2`` and ``--set KEY=VALUE`` (a configuration option of the example, such as
``inner_optimizer=sgd``, ``inner_lr=0.002`` or ``precision=10``) measure with another number of
inner steps or another inner loop over the same meta-parameters, one record per ``K``, each
beside the run's own meta-gradient: whether a longer inner loop reaches a stationary point, and
whether the implicit gradient then is the gradient through its steps. A method
whose inner optimiser cannot be differentiated through has no explicit gradient and no
comparison with it (the error in ``"explicit_error"``, a dash in the table). Writes ``DIR/gradients.json``
and prints the table (:func:`markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from ibaml.core.hypergrad import Explicit
from ibaml.data.episodes import EpisodeSampler
from ibaml.recipes.image_presets import image_learner_from_config

from . import _protocol as P
from .image_shift import find_runs, rebuild

METHODS = ("imaml-gd", "imaml-hf")
#: the comparison of the measured implicit gradient with the run's own meta-gradient (``--as``)
OWN = "implicit vs run's own"
#: the explicit gradient against itself on other Monte Carlo draws (``--as``, variational methods)
OTHER_DRAWS = "explicit vs explicit, other draws"


def flat(grads: dict) -> torch.Tensor:
    """Per-task meta-gradients ``{name: [T, ...]}`` as one ``[T, P]`` matrix (names sorted)."""
    return torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in sorted(grads)], dim=1).double()


def compare(g: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per task: ``cos(g, ref)`` and ``‖g − ref‖ / ‖ref‖`` (rows of ``[T, P]`` matrices); and
    ``batch_cosine``, the cosine of the means over the tasks, the direction of a meta-batch of
    all of them."""
    cos = torch.nn.functional.cosine_similarity(g, reference, dim=1)
    rel = torch.linalg.vector_norm(g - reference, dim=1) / torch.linalg.vector_norm(reference, dim=1)
    batch = torch.nn.functional.cosine_similarity(g.mean(0), reference.mean(0), dim=0)
    return {"cosine": cos.tolist(), "relative_error": rel.tolist(), "batch_cosine": float(batch)}


def gradients_at(learner, batch, cg_steps: int, other_draws=None, own=None) -> dict:
    """The three meta-gradients of the module docstring at ``learner``'s meta-parameters, all
    with the same Monte Carlo draws (``batch`` prepared by the learner once, its draws fixed:
    a variational method's meta-gradient is otherwise a different random vector at each call).
    ``other_draws``: the same tasks with other draws (prepared), on which the explicit gradient
    is taken again (``"explicit vs explicit, other draws"``): how far two draws of the exact
    gradient are apart, the scale against which the estimators' disagreement is read. ``own``:
    the run's learner, whose meta-gradient on the same draws the implicit one is compared with
    (:data:`OWN`, ``--as``)."""
    batch = learner.prepare(batch)
    recipe = learner.estimator
    tight = dataclasses.replace(recipe, solver=dataclasses.replace(recipe.solver, max_iter=cg_steps))
    out, flats = {}, {}
    for name, estimator in (("implicit", recipe), (f"implicit CG {cg_steps}", tight), ("explicit", Explicit())):
        learner.estimator = estimator
        try:
            result = learner.task_gradients(batch)
        except Exception as error:     # noqa: BLE001 - recorded: a solver that cannot be unrolled
            out[f"{name}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            continue
        finally:
            learner.estimator = recipe
        flats[name] = flat(result.grads)
        if name == "implicit":
            out["inner_grad_norm"] = result.diagnostics["inner_grad_norm"].tolist()
            out["query_loss"] = result.loss.tolist()
        out[f"{name}_norm"] = torch.linalg.vector_norm(flats[name], dim=1).tolist()
    if "explicit" in flats:
        for name in (n for n in flats if n != "explicit"):
            out[f"{name} vs explicit"] = compare(flats[name], flats["explicit"])
    tight_name = f"implicit CG {cg_steps}"
    if tight_name in flats:
        out[f"implicit vs {tight_name}"] = compare(flats["implicit"], flats[tight_name])
    if other_draws is not None and "explicit" in flats:
        learner.estimator = Explicit()
        try:
            out[OTHER_DRAWS] = compare(flats["explicit"], flat(learner.task_gradients(other_draws).grads))
        finally:
            learner.estimator = recipe
    if own is not None and "implicit" in flats:
        out[OWN] = compare(flats["implicit"], flat(own.task_gradients(batch).grads))
    return out


def option_value(text: str):
    """``"10"`` → 10, ``"0.002"`` → 0.002, ``"sgd"`` → ``"sgd"``: a ``--set`` value as the example's option."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def overrides_of(args, steps: Optional[int]) -> dict:
    """The measured configuration's options other than the run's: ``--set``'s, and ``steps`` inner
    steps in meta-training and evaluation alike."""
    given = dict(args.set or {})
    if steps is not None:
        given.update(inner_steps=steps, eval_inner_steps=steps)
    return given


def load_meta_parameters(learner, training: dict) -> dict:
    """Load a run of another method into ``learner``: every meta-parameter of ``learner`` from the
    run's state (one it lacks raises: the measurement would be at an initialisation, not at the
    run's parameters), the buffers that the run lacks kept at ``learner``'s values (MAML's state
    has no prior precision; iMAML's is its recipe's λ), and the run's random generator. Returns ``{"kept": [buffers kept],
    "ignored": [the run's entries the learner has no place for]}``."""
    parameters = {name for name, _ in learner.named_parameters()}
    missing, unexpected = learner.load_state_dict(training["learner"], strict=False)
    absent = sorted(set(missing) & parameters)
    if absent:
        raise ValueError(f"the run's state has no {', '.join(absent)}: measure it as a method with the same "
                         "meta-parameters")
    learner.generator.set_state(training["generator"])
    return {"kept": sorted(missing), "ignored": sorted(unexpected)}


def measure(run: dict, args, steps: Optional[int] = None) -> dict:
    device = torch.device("cpu")
    learner, splits, checkpoint = rebuild(run, device)
    cfg = checkpoint["config"]
    dtype = getattr(torch, cfg["dtype"])
    mean, std = splits["train"].channel_stats()
    sampler = EpisodeSampler(splits["train"], int(cfg["ways"]), int(cfg["shots"]), int(cfg["query"]),
                             seed=args.stream, mean=mean, std=std, dtype=dtype)
    batch = sampler.sample(args.tasks)
    shape = splits["train"].image_shape
    points = {"initial": image_learner_from_config(cfg, shape, device), "meta-trained": learner}
    overrides = overrides_of(args, steps)
    measured_cfg = {**cfg, **({} if args.as_method is None else {"method": args.as_method}), **overrides}
    rebuilt = args.as_method is not None or bool(overrides)
    measured, loaded = dict(points), None
    if rebuilt:
        measured = {name: image_learner_from_config(measured_cfg, shape, device) for name in points}
        try:
            measured["meta-trained"].load_training_state(checkpoint["training"])
        except RuntimeError:     # another method's state: its meta-parameters, the measured method's buffers
            loaded = load_meta_parameters(measured["meta-trained"], checkpoint["training"])
    fixed = {name: measured[name].prepare(batch) for name in points}     # one set of draws per point
    drawn = any(k.startswith("eps_") for k in fixed["initial"])
    other = {name: measured[name].prepare(batch) if drawn and rebuilt else None for name in points}
    results = {name: gradients_at(measured[name], fixed[name], args.cg_steps, other[name],
                                  own=points[name] if rebuilt else None) for name in points}
    return {"folder": run["folder"], "method": run["method"], "measured_as": measured_cfg["method"],
            "seed": int(cfg["seed"]), "checkpoint_step": int(checkpoint["step"]),
            "inner_steps": measured["meta-trained"].inner_loop.steps, **({"overrides": overrides} if overrides else {}),
            **({"loaded_from_another_method": loaded} if loaded else {}),
            "config": {k: measured_cfg.get(k) for k in ("inner_optimizer", "inner_lr", "precision", "cg_steps",
                                                        "cg_damping", "shots", "ways", "query", "channels",
                                                        "image_size", "dtype")},
            "tasks": args.tasks, "stream": args.stream, "classes": "training classes of the run's dataset",
            "points": results}


def markdown(results: list, cg_steps: int) -> str:
    """Per run (by method and seed) and point: the medians over tasks of ‖∇G‖ and of each
    comparison; runs measured as another method (``--as``) in :func:`as_markdown`'s layout."""
    if any(r.get("measured_as", r["method"]) != r["method"] or r.get("overrides") for r in results):
        return as_markdown(results, cg_steps)
    tight = f"implicit CG {cg_steps}"
    lines = [f"| method | seed | point | ‖∇G‖ at v_K | cos(implicit, explicit) | rel. error (implicit) "
             f"| cos({tight}, explicit) | cos(implicit, {tight}) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        for point, m in r["points"].items():
            cell = _cell(m)
            lines.append(f"| {r['method']} | {r['seed']} | {point} | {statistics.median(m['inner_grad_norm']):.3g} "
                         f"| {cell('implicit vs explicit')} | {cell('implicit vs explicit', 'relative_error')} "
                         f"| {cell(tight + ' vs explicit')} | {cell('implicit vs ' + tight)} |")
    return "\n".join(lines)


def as_markdown(results: list, cg_steps: int) -> str:
    """Runs measured as another method: per run and point the median ‖∇G‖ and, for each
    comparison, the median cosine over the tasks and the cosine of the batch's means
    ("task / batch"), the implicit gradient against the explicit one, the tighter solve and the
    run's own, and the explicit gradient against itself on other draws."""
    tight = f"implicit CG {cg_steps}"
    swept = any(r.get("overrides") for r in results)   # measured with other options: say which, and K
    lines = [f"| measured as | at the meta-parameters of | seed | point |{' options | K |' if swept else ''} "
             f"‖∇G‖ at v_K | cos(implicit, explicit) "
             f"| cos(implicit, {tight}) | cos(implicit, run's own) | cos(explicit, explicit on other draws) |",
             "|---|---|---|---|" + ("---|---|" if swept else "") + "---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["method"], r["seed"], r["inner_steps"])):
        options = ", ".join(f"{k} {v}" for k, v in r.get("overrides", {}).items() if not k.endswith("inner_steps"))
        for point, m in r["points"].items():
            cell = _cell(m)
            pair = lambda key: f"{cell(key)} / {cell(key, 'batch_cosine')}"
            lines.append(f"| {r['measured_as']} | {r['method']} | {r['seed']} | {point} "
                         + (f"| {options or '–'} | {r['inner_steps']} " if swept else "")
                         + f"| {statistics.median(m['inner_grad_norm']):.3g} | {pair('implicit vs explicit')} "
                         f"| {pair('implicit vs ' + tight)} | {pair(OWN)} | {pair(OTHER_DRAWS)} |")
    return "\n".join(lines)


def _cell(m: dict):
    """The cell of comparison ``key``'s ``field`` in a point's results: the median over the
    tasks of a per-task list, a number as it is, a dash where it was not measured."""
    def cell(key, field="cosine"):
        if key not in m or field not in m[key]:
            return "–"
        value = m[key][field]
        return f"{statistics.median(value) if isinstance(value, list) else value:.3f}"
    return cell


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, metavar="DIR", help="folder searched for finished image runs")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS, metavar="A,B")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="only the runs of these training seeds")
    p.add_argument("--tasks", type=int, default=8, help="training tasks per run")
    p.add_argument("--stream", type=int, default=50_000, help="seed of the task stream")
    p.add_argument("--cg-steps", type=int, default=50, help="CG iterations of the tighter implicit solve")
    p.add_argument("--as", dest="as_method", default=None, metavar="METHOD",
                   help="measure the runs' meta-parameters with this method's inner loop and estimator "
                        "(same prior and inference), beside the run's own meta-gradient")
    p.add_argument("--inner-steps", type=lambda s: [int(x) for x in s.split(",")], default=None, metavar="K1,K2",
                   help="measure with each of these numbers of inner steps (default: the run's own)")
    p.add_argument("--set", type=lambda s: (s.split("=", 1)[0], option_value(s.split("=", 1)[1])), action="append",
                   default=None, metavar="KEY=VALUE", help="measure with this configuration option of the example "
                                                           "changed (repeat for several)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for gradients.json (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, _ = find_runs(Path(args.runs), args.methods)
    runs = [r for r in runs if args.seeds is None or int(r["args"]["seed"]) in args.seeds]
    if not runs:
        raise SystemExit(f"no finished run of {', '.join(args.methods)} under {args.runs}")
    clock = time.perf_counter()
    results = [measure(r, args, steps) for r in runs for steps in (args.inner_steps or [None])]
    payload = {"what": "per-task meta-gradients of the query loss: the run's implicit estimator, the same with "
                       f"{args.cg_steps} CG iterations, and backpropagation through the run's inner steps"
                       + ("" if args.as_method is None else
                          f" (the runs' meta-parameters measured as {args.as_method}, beside the run's own)"),
               "settings": {k: getattr(args, k) for k in ("tasks", "stream", "cg_steps")
                            } | ({} if args.as_method is None else {"as": args.as_method})
                            | ({} if not args.set else {"set": dict(args.set)})
                            | ({} if not args.inner_steps else {"inner_steps": args.inner_steps}),
               "torch": torch.__version__, "seconds": time.perf_counter() - clock, "runs": results}
    text = markdown(results, args.cg_steps)
    if args.out:
        P.write_json(Path(args.out) / "gradients.json", P.rounded(payload, 6))
    print(text)
    return payload


if __name__ == "__main__":
    main()
