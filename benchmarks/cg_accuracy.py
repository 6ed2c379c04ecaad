"""How exact the presets' implicit meta-gradient is along a training run: conjugate gradient
against the dense implicit solve.

Each preset with an implicit meta-gradient is meta-trained as the examples train it (float32):

* sine (``examples/sine_regression.py``): ``imaml`` and ``ibaml``, ``MLP(1, (40, 40), 1)``, the
  method's likelihood (:func:`ibaml.recipes.regression_likelihood`), 10 shots, 10 queries,
  meta-batch 25 (``abml`` differentiates through its inner loop: no linear system to solve);
* images (``examples/miniimagenet.py`` on the stroke fixture,
  :func:`ibaml.data.fixtures.write_stroke_fixture`, at 32×32): ``imaml`` and ``ibaml`` at 1 and
  5 shots, 5 ways, 15 queries, Conv4-32, meta-batch 4.

At each recorded step a float64 copy of the learner takes a fixed evaluation batch (sine 25
tasks, images 4), solves each task's inner problem once with the preset's inner loop, and at
that solution computes the implicit meta-gradient ``∂_θF − Bᵀ x`` with ``H x = ∂_vF`` solved
densely (:class:`ibaml.core.linalg.Dense`) and by the preset's CG (:class:`ibaml.core.linalg.CG`,
preconditioned by the prior precision) at each iteration count of ``--cg-iters``. Recorded:
the relative error of the mean meta-gradient over the batch ``‖ḡ_CG − ḡ‖ / ‖ḡ‖``, the worst
per-task relative error, and CG's residual ``‖r‖ / ‖∂_vF‖`` (median and largest over tasks).
The float64 copy keeps float32 rounding (about 10⁻⁶ here) out of the comparison.

With ``--timing`` the meta-iteration time (float32, the training dtype) of every CG count is
measured side by side on the trained learner (interleaved rounds, median).

    python -m benchmarks.cg_accuracy --timing --out docs/results/cg_accuracy
    python -m benchmarks.cg_accuracy --quick
    python -m benchmarks.cg_accuracy --plot-only docs/results/cg_accuracy/cg_accuracy.json

One process per preset, on a machine with several cores, then one JSON (the committed run):

    python -m benchmarks.cg_accuracy --parts sine --presets sine/imaml --timing --out runs/cg/sine_imaml
    python -m benchmarks.cg_accuracy --parts image --presets image/ibaml-1shot --out runs/cg/image_ibaml_1shot
    ...
    python -m benchmarks.cg_accuracy --merge runs/cg/*/cg_accuracy.json --out docs/results/cg_accuracy

Writes ``DIR/cg_accuracy.json`` (after every recorded point, so that a run stopped early keeps
what it measured; such a preset is marked ``"partial"``) and ``DIR/cg_accuracy.png`` (the errors
at the presets' CG count against the training step, one line per preset, CG 5 dotted, the bound
drawn) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

import ibaml
from ibaml import recipes
from ibaml.core.implicit_function import implicit_vjp_at_solution
from ibaml.core.linalg import CG, Dense
from ibaml.core.nets import MLP, Conv4
from ibaml.data.sine import SineTaskDistribution
from ibaml.recipes import image_presets

from . import _harness as H
from .claims import pyplot

BOUND = 1e-3
DT = torch.float64
SINE = ("imaml", "ibaml")
IMAGE = (("imaml", 1), ("ibaml", 1), ("imaml", 5), ("ibaml", 5))
SINE_STEPS = (0, 100, 300, 1000, 3000)
IMAGE_STEPS = (0, 50, 150, 300)
CG_ITERS = (5, 10, 20, 30, 50)
WAYS, QUERY, IMAGE_SIZE, CHANNELS = 5, 15, 32, 32


# ---------------------------------------------------------------------------------------------- presets
def sine_preset(method: str, seed: int = 0, cg_steps=None):
    """``(learner, sample)``: the learner of ``examples/sine_regression.py`` and its task sampler."""
    noise = recipes.REGRESSION_NOISE.get(method, "shared")
    count, learn = recipes.noise_prior_count(method) if noise == "conjugate" else (1.0, True)
    torch.manual_seed(seed)
    likelihood = recipes.regression_likelihood(noise, count, learn)
    net = MLP(1, (40, 40), 1, noise_head=noise.startswith("task"))
    given = {} if cg_steps is None else {"cg_steps": cg_steps}
    learner = ibaml.build_learner(method, net, likelihood, meta_lr=1e-3, seed=seed, **given)
    tasks, gen = SineTaskDistribution(shots=10, query=10), torch.Generator().manual_seed(seed)
    return learner, lambda n=25: tasks.sample(n, gen)


def image_preset(method: str, shots: int, splits, seed: int = 0, cg_steps=None, query: int = QUERY):
    """``(learner, sample)``: the learner of ``examples/miniimagenet.py`` (Conv4-32, 5 ways) and
    its training-split episode sampler."""
    samplers = ibaml.data.EpisodeSampler.for_splits(splits, WAYS, shots, query, seed=seed)
    torch.manual_seed(seed)
    net = Conv4(in_channels=3, hidden=CHANNELS, out_dim=WAYS, image_size=IMAGE_SIZE)
    learner = image_presets.image_learner(method, net, dataset="miniimagenet", ways=WAYS, shots=shots,
                                          cg_steps=cg_steps, meta_lr=1e-3, seed=seed, nonfinite="skip")   # None: the preset's
    return learner, lambda n=4: samplers["train"].sample(n)


def stroke_splits(root: Path, quick: bool = False):
    """The stroke fixture at 32×32 (``quick``: 5 classes of 4 images per split)."""
    small = dict(n_classes_per_split=(5, 5, 5), images_per_class=4) if quick else {}
    ibaml.data.fixtures.write_stroke_fixture(root, **small)
    return ibaml.data.load_splits(root, image_size=IMAGE_SIZE)


# ---------------------------------------------------------------------------------------------- measurement
def implicit_gradients(learner, task, solvers):
    """Per solver ``{"grads": {name: [T, ...]}, "residual": [T], "b_norm": [T]}``: each task's
    inner problem solved once by the learner's inner loop, the implicit meta-gradient at that
    solution with each solver (as :class:`ibaml.Implicit` computes it)."""
    problem, meta, est = learner.problem, learner.meta_params(), learner.estimator

    def per_task(t):
        v, _ = problem.solve(meta, t, differentiable=False, diagnose=False)
        gv, gm = torch.func.grad(problem.outer, argnums=(0, 1))(v, meta, t)
        precond = problem.preconditioner(v, meta) if est.precondition else None
        b_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gv.values()]))
        out = {}
        for name, solver in solvers.items():
            res = implicit_vjp_at_solution(lambda vv, m: problem.inner(vv, m, t), v, meta, gv, solver=solver,
                                           preconditioner=precond, hvp_mode=est.hvp_mode, at_solution=False)
            out[name] = ({k: gm[k] + res.meta_cotangent[k] for k in gm}, res.solve.residual_norm, b_norm)
        return out
    return learner.meta_problem.map_tasks(per_task, task)


def flat(grads, task_index=None):
    pick = (lambda g: g.mean(0)) if task_index is None else (lambda g: g[task_index])
    return torch.cat([pick(grads[k]).reshape(-1) for k in sorted(grads)])


def relative(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def measure(learner, batch, cg_iters) -> dict:
    """Errors of CG at each count in ``cg_iters`` against the dense solve, on a float64 copy."""
    twin = copy.deepcopy(learner).to(DT)
    task = twin.prepare(batch)
    est = twin.estimator
    solvers = {"dense": Dense(damping=est.solver.damping)}
    solvers.update({k: dataclasses.replace(est.solver, max_iter=k) for k in cg_iters})
    out = implicit_gradients(twin, task, solvers)
    ref, _, b_norm = out["dense"]
    T = task["support_x"].shape[0]
    mean_ref = flat(ref)
    rows = {}
    for k in cg_iters:
        grads, residual, _ = out[k]
        per = [relative(flat(grads, t), flat(ref, t)) for t in range(T)]
        rel_res = residual / b_norm
        rows[str(k)] = {"mean_rel_error": relative(flat(grads), mean_ref), "max_task_rel_error": max(per),
                        "median_task_rel_error": float(torch.tensor(per).median()),
                        "rel_residual_median": float(rel_res.median()), "rel_residual_max": float(rel_res.max())}
    return rows


def time_cg(learner, sample, cg_iters, repeats: int, budget_s: float) -> dict:
    """Median seconds per meta-iteration (float32) at each CG count, interleaved; the learners
    are copies, so ``learner`` does not move."""
    batch = sample()
    fns = {}
    for k in cg_iters:
        twin = copy.deepcopy(learner)
        twin.estimator = dataclasses.replace(twin.estimator, solver=dataclasses.replace(twin.estimator.solver,
                                                                                        max_iter=k))
        task = twin.prepare(batch)
        fns[str(k)] = (lambda tw, tk: lambda: tw.meta_step(tk, validate=False, check=False))(twin, task)
    times = H.time_interleaved(fns, torch.device("cpu"), repeats=repeats, warmup=1, budget_s=budget_s)
    return {k: H.median(v) for k, v in times.items()}


def run_preset(label, learner, sample, steps, cg_iters, eval_batch, timing=None, log=print, partial=None) -> dict:
    """Train ``learner`` with its preset, measuring at each step of ``steps`` (``partial(result)``
    after each point: the result so far)."""
    points, done, start = [], 0, time.perf_counter()
    for step in steps:
        while done < step:
            learner.meta_step(sample())
            done += 1
        rows = measure(learner, eval_batch, cg_iters)
        points.append({"step": step, "cg": rows})
        if partial:
            partial({"preset": label, "default_cg_iters": learner.estimator.solver.max_iter, "partial": True,
                     "train_seconds": time.perf_counter() - start, "points": points})
        log(f"{label} step {step} ({time.perf_counter() - start:.0f} s): " + ", ".join(
            f"CG{k} {r['mean_rel_error']:.1e}/{r['max_task_rel_error']:.1e}" for k, r in rows.items()))
    default = learner.estimator.solver.max_iter
    result = {"preset": label, "default_cg_iters": default, "train_seconds": time.perf_counter() - start,
              "points": points}
    if timing:
        result["seconds_per_meta_iter"] = time_cg(learner, sample, cg_iters, *timing)
        log(f"{label} seconds per meta-iteration: {result['seconds_per_meta_iter']}")
    return result


# ---------------------------------------------------------------------------------------------- report
def worst(result, k=None):
    k = str(k or result["default_cg_iters"])
    return (max(p["cg"][k]["mean_rel_error"] for p in result["points"]),
            max(p["cg"][k]["max_task_rel_error"] for p in result["points"]))


def table(results, cg_iters) -> str:
    headers = ["preset", "step"] + [f"CG{k} mean / worst task" for k in cg_iters]
    rows = []
    for r in results:
        for p in r["points"]:
            rows.append([r["preset"], p["step"]] + [f"{p['cg'][str(k)]['mean_rel_error']:.1e} / "
                                                   f"{p['cg'][str(k)]['max_task_rel_error']:.1e}" for k in cg_iters])
    return H.markdown(headers, rows)


def plot(payload, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "mean_rel_error", "mean meta-gradient"),
                           (axes[1], "max_task_rel_error", "worst task")):
        for r in payload["results"]:
            k = str(r["default_cg_iters"])
            xs = [max(p["step"], 1) for p in r["points"]]
            line, = ax.plot(xs, [p["cg"][k][key] for p in r["points"]], marker="o", label=f"{r['preset']} (CG{k})")
            if "5" in r["points"][0]["cg"] and k != "5":   # the former default, for comparison
                ax.plot(xs, [p["cg"]["5"][key] for p in r["points"]], linestyle=":", color=line.get_color())
        ax.plot([], [], "k:", label="dotted: CG5")
        ax.axhline(payload["bound"], color="k", linestyle="--", linewidth=1, label="bound 10⁻³")
        ax.set(xscale="log", yscale="log", xlabel="meta-iteration (0 drawn at 1)", title=f"CG vs dense: {title}")
    axes[0].set_ylabel("relative error")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def summarize(results) -> list:
    return [{"preset": r["preset"], "cg_iters": r["default_cg_iters"], "steps": [p["step"] for p in r["points"]],
             "worst_mean_rel_error": worst(r)[0], "worst_task_rel_error": worst(r)[1],
             "holds": worst(r)[1] <= BOUND, "stopped_early": bool(r.get("partial"))} for r in results]


def merge(paths, out: Path) -> dict:
    """One payload from the runs at ``paths``: their results in order (of a preset in several,
    the one with the most recorded points), the first's settings."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    best = {}
    for r in (r for run in runs for r in run["results"]):
        if r["preset"] not in best or len(r["points"]) > len(best[r["preset"]]["points"]):
            best[r["preset"]] = r
    results = list(best.values())
    payload = {**runs[0], "merged_from": len(runs),
               "sine_steps": sorted({s for run in runs for s in run.get("sine_steps", [])}),
               "results": results, "summary": summarize(results)}
    path = H.write_json(out, "cg_accuracy.json", payload)
    plot(payload, out / "cg_accuracy.png")
    print(table(results, payload["cg_iters"]))
    print(f"wrote {path}")
    return payload


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/cg_accuracy", help="output directory")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--parts", default="sine,image", help="comma-separated: sine, image")
    p.add_argument("--sine-steps", default=",".join(map(str, SINE_STEPS)))
    p.add_argument("--image-steps", default=",".join(map(str, IMAGE_STEPS)))
    p.add_argument("--cg-iters", default=",".join(map(str, CG_ITERS)), help="CG iterations compared")
    p.add_argument("--cg-steps", type=int, default=None, help="CG iterations of training (default: the preset's)")
    p.add_argument("--timing", action="store_true", help="also time a meta-iteration at each CG count")
    p.add_argument("--presets", default=None, help="comma-separated labels to run (e.g. sine/ibaml,image/imaml-1shot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-only", default=None, metavar="PATH", help="redraw the figure from a JSON")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="put the results of several runs (e.g. one process per preset) into one JSON in --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.plot_only:
        path = Path(args.plot_only)
        path = path / "cg_accuracy.json" if path.is_dir() else path
        print(plot(json.loads(path.read_text()), path.with_suffix(".png")))
        return {}
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    ints = lambda s: tuple(int(x) for x in s.split(","))
    sine_steps, image_steps, cg_iters = ints(args.sine_steps), ints(args.image_steps), ints(args.cg_iters)
    if args.quick:
        sine_steps, image_steps, cg_iters = (0, 1), (0, 1), (5, 20)
    timing = (2, 5.0) if args.quick else (10, 60.0)
    wanted = None if args.presets is None else set(args.presets.split(","))
    results, out = [], Path(args.out)

    def save(current=None):   # after every point, so that a long run keeps what it has measured
        done = results + ([current] if current else [])
        payload = {**H.environment(torch.device("cpu")), "bound": BOUND, "measure_dtype": "float64",
                   "train_dtype": "float32", "cg_iters": list(cg_iters), "quick": args.quick,
                   "sine_steps": list(sine_steps), "image_steps": list(image_steps), "results": done,
                   "summary": summarize(done)}
        return payload, H.write_json(out, "cg_accuracy.json", payload)
    if "sine" in parts:
        for method in SINE:
            label = f"sine/{method}"
            if wanted and label not in wanted:
                continue
            learner, sample = sine_preset(method, args.seed, args.cg_steps)
            eval_batch = SineTaskDistribution(shots=10, query=10).sample(
                4 if args.quick else 25, torch.Generator().manual_seed(10_000 + args.seed))
            results.append(run_preset(label, learner, sample, sine_steps, cg_iters, eval_batch,
                                      timing if args.timing else None, partial=save))
            save()
    if "image" in parts:
        with tempfile.TemporaryDirectory() as root:
            splits = stroke_splits(Path(root) / "strokes", args.quick)
            query = 2 if args.quick else QUERY
            for method, shots in IMAGE:
                label = f"image/{method}-{shots}shot"
                if wanted and label not in wanted:
                    continue
                if args.quick and (method, shots) != ("imaml", 1):
                    continue
                learner, sample = image_preset(method, shots, splits, args.seed, args.cg_steps, query)
                eval_batch = ibaml.data.EpisodeSampler.for_splits(splits, WAYS, shots, query,
                                                                  seed=10_000 + args.seed)["train"].sample(
                    1 if args.quick else 4)
                results.append(run_preset(label, learner, sample, image_steps, cg_iters, eval_batch,
                                          timing if args.timing else None, partial=save))
                save()
    payload, path = save()
    plot(payload, out / "cg_accuracy.png")
    print(table(results, cg_iters))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
