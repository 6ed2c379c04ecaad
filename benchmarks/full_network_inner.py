"""Can an inner solver reach a stationary point of iMAML's problem over every weight of Conv4?

    python -m benchmarks.full_network_inner --runs /work/runs/fn/maml1 --methods maml \\
        --out docs/results/image_benchmark/full_network_inner

The implicit meta-gradient ``dF/dθ = −(∂²_{vθ}G)ᵀ (∇²_vG)⁻¹ ∂_vF`` holds at a point where
``∇_vG = 0`` and ``G`` is twice differentiable. For each finished image run of ``--methods``
under ``--runs`` (its meta-trained parameters, loaded as
:func:`benchmarks.full_network_gradients.load_meta_parameters` loads them), the inner problem of
iMAML over every weight, ``G(v) = Σ NLL_support(v) + (λ/2)‖v − θ‖²`` at ``λ = --precision``, is
posed in each network of ``--networks`` (the run's weights in a Conv4 with that activation and
pooling: ``relu-max``, the literature's, or ``silu-avg`` and ``silu-softmax``, twice
differentiable, the latter with the smooth maximum of :func:`ibaml.core.nets.soft_max_pool2d`) on ``--tasks``
tasks of the run's training classes and sizes, in float64 so that rounding plays no part, and
solved from ``v = θ`` by

* ``--sgd-steps`` gradient steps of ``--lr`` (the ``"sgd"`` inner optimiser), and
* ``--hf-steps`` Hessian-free steps (the ``"hf"`` inner optimiser of ``imaml-hf``: Newton-CG with
  ``--hf-cg`` CG iterations, a line search and the adapted Levenberg–Marquardt damping),

recording ``G`` and ``‖∇G‖`` along each (:func:`solve`), the damping the Hessian-free solver
ends with (it grows where the quadratic model of ``G`` does not hold), and, at the point each
returns, the descent ratio ``(G(v) − G(v − t∇G)) / (t‖∇G‖²)`` for ``t`` in ``--ratio-steps``:
near 1 down to the step sizes the solver takes where ``G`` is smooth at that scale, far from it
where a step crosses the kinks of ReLU and max-pooling. Writes ``DIR/inner.json``, prints a
table (:func:`markdown`) and plots ``‖∇G‖`` against the step (``DIR/inner.png``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ibaml.core.optim import SGD
from ibaml.core.tree import tree_add, tree_detach, tree_norm
from ibaml.data.episodes import EpisodeSampler
from ibaml.recipes.image_presets import image_learner_from_config
from ibaml.recipes.recipe import hessian_free
from ibaml.train.checkpoint import load_checkpoint

from . import _protocol as P
from .full_network_gradients import load_meta_parameters
from .image_shift import find_runs, run_splits

#: the networks by name: (activation, pooling) of :class:`ibaml.core.nets.Conv4`
NETWORKS = {"relu-max": ("relu", "max"), "silu-avg": ("silu", "avg"), "silu-softmax": ("silu", "softmax")}


def solve(objective, v: dict, optimizer, steps: int, curvature=None) -> dict:
    """``steps`` steps of ``optimizer`` on ``objective`` from ``v``: the traces of ``G`` and
    ``‖∇G‖`` (``steps + 1`` values each, the start included), the point returned and, for an
    optimiser with adapted damping, the damping it ends with."""
    state, values, grad_norms = optimizer.init(v), [], []
    for step in range(steps + 1):
        gradient, value = torch.func.grad_and_value(objective)(v)
        values.append(float(value))
        grad_norms.append(float(tree_norm(gradient)))
        if step < steps:
            extra = {"curvature": curvature(v)} if curvature is not None else {}
            v, state = optimizer.step(objective, v, state, **extra)
    damping = state.get("prior_damping")
    return {"values": values, "grad_norms": grad_norms, "point": v,
            "final_damping": None if damping is None else float(damping)}


def descent_ratios(objective, v: dict, steps) -> dict:
    """``{t: (G(v) − G(v − t∇G)) / (t‖∇G‖²)}``: 1 as ``t → 0`` wherever ``G`` is differentiable;
    a twice-differentiable ``G`` with curvature ``h`` along ``∇G`` gives about ``1 − t·h/2``."""
    g, here = torch.func.grad_and_value(objective)(v)
    squared = float(tree_norm(g)) ** 2
    return {f"{t:g}": float(here - objective(tree_add(v, g, -t))) / (t * squared) for t in steps}


def measure(run: dict, network: str, args) -> dict:
    device = torch.device("cpu")
    checkpoint = load_checkpoint(run["checkpoint"], map_location="cpu")
    splits = run_splits(run["args"], device)
    activation, pool = NETWORKS[network]
    cfg = {**checkpoint["config"], "method": "imaml-gd", "precision": args.precision, "activation": activation,
           "pool": pool, "dtype": "float64"}
    learner = image_learner_from_config(cfg, splits["train"].image_shape, device)
    loaded = load_meta_parameters(learner, checkpoint["training"])
    mean, std = splits["train"].channel_stats()
    sampler = EpisodeSampler(splits["train"], int(cfg["ways"]), int(cfg["shots"]), int(cfg["query"]),
                             seed=args.stream, mean=mean, std=std, dtype=torch.float64)
    batch = learner.prepare(sampler.sample(args.tasks))
    problem, meta = learner.meta_problem.task_problem, learner.meta_params()
    precision = learner.meta_problem.model.prior_precision_diag(meta)
    curvature = lambda v: problem.method.curvature(v, precision)
    tasks = []
    for index in range(args.tasks):
        task = {k: x[index] for k, x in batch.items()}
        objective = lambda v, task=task: problem.inner(v, meta, task)
        start = tree_detach(problem.init(meta))
        solvers = {"sgd": solve(objective, start, SGD(lr=args.lr), args.sgd_steps),
                   "hf": solve(objective, start, hessian_free(cg_iters=args.hf_cg), args.hf_steps, curvature)}
        for result in solvers.values():
            result["descent_ratio"] = descent_ratios(objective, result.pop("point"), args.ratio_steps)
        tasks.append(solvers)
    return {"folder": run["folder"], "method": run["method"], "seed": int(cfg["seed"]), "network": network,
            "loaded": loaded, "tasks": tasks}


def _median(values) -> float:
    return statistics.median(values)


def markdown(results: list, settings: dict) -> str:
    """Per run and network: the median over tasks of ``‖∇G‖`` at the start and at the end of each
    solver, of the Hessian-free solver's final damping, and of the descent ratio at the point
    each returns, at the smallest and the largest ``t``."""
    t_small, t_large = (f"{t:g}" for t in (min(settings["ratio_steps"]), max(settings["ratio_steps"])))
    lines = [f"| run | seed | network | ‖∇G‖ at θ | after {settings['sgd_steps']} gradient steps "
             f"| after {settings['hf_steps']} Hessian-free steps | final damping μ (HF) "
             f"| descent ratio at t = {t_small} / {t_large} (gradient steps) | the same (HF) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        med = lambda solver, f: _median([f(t[solver]) for t in r["tasks"]])
        ratio = lambda solver: (f"{med(solver, lambda s: s['descent_ratio'][t_small]):.3f} / "
                                f"{med(solver, lambda s: s['descent_ratio'][t_large]):.3f}")
        lines.append(f"| {r['method']} | {r['seed']} | {r['network']} | {med('sgd', lambda s: s['grad_norms'][0]):.3g} "
                     f"| {med('sgd', lambda s: s['grad_norms'][-1]):.3g} | {med('hf', lambda s: s['grad_norms'][-1]):.3g} "
                     f"| {med('hf', lambda s: s['final_damping']):.3g} | {ratio('sgd')} | {ratio('hf')} |")
    return "\n".join(lines)


def figure(results: list, path: Path) -> None:
    """``‖∇G‖`` against the step, a panel per solver, a line per task, coloured by network."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {name: f"C{i}" for i, name in enumerate(NETWORKS)}
    for ax, (solver, label) in zip(axes, (("sgd", "gradient steps"), ("hf", "Hessian-free steps"))):
        for r in results:
            for i, task in enumerate(r["tasks"]):
                ax.semilogy(task[solver]["grad_norms"], color=colours[r["network"]], alpha=0.7,
                            label=f"{r['network']} (seed {r['seed']})" if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("‖∇G‖")
        ax.legend(fontsize=8)
    fig.suptitle("iMAML's inner problem over every weight of Conv4, at MAML's meta-trained parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, metavar="DIR", help="folder searched for finished image runs")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=("maml",), metavar="A,B")
    p.add_argument("--networks", type=lambda s: s.split(","), default=list(NETWORKS), metavar="A,B")
    p.add_argument("--precision", type=float, default=10.0, help="iMAML's λ on the summed support NLL")
    p.add_argument("--tasks", type=int, default=4, help="training tasks per run")
    p.add_argument("--stream", type=int, default=50_000, help="seed of the task stream")
    p.add_argument("--lr", type=float, default=0.002, help="the gradient steps' size")
    p.add_argument("--sgd-steps", type=int, default=300)
    p.add_argument("--hf-steps", type=int, default=15)
    p.add_argument("--hf-cg", type=int, default=10, help="CG iterations per Hessian-free step")
    p.add_argument("--ratio-steps", type=lambda s: [float(x) for x in s.split(",")], default=[1e-2, 1e-3, 1e-4, 1e-5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for inner.json and inner.png (default: print only)")
    args = p.parse_args(argv)
    unknown = [n for n in args.networks if n not in NETWORKS]
    if unknown:
        p.error(f"--networks {', '.join(unknown)}: choose from {', '.join(NETWORKS)}")
    torch.set_num_threads(args.threads)
    runs, _ = find_runs(Path(args.runs), args.methods)
    if not runs:
        raise SystemExit(f"no finished run of {', '.join(args.methods)} under {args.runs}")
    clock = time.perf_counter()
    results = [measure(r, network, args) for r in runs for network in args.networks]
    settings = {k: getattr(args, k) for k in ("precision", "tasks", "stream", "lr", "sgd_steps", "hf_steps", "hf_cg",
                                              "ratio_steps")}
    payload = {"what": "iMAML's inner problem over every weight (float64) at each run's meta-trained parameters, "
                       "solved by gradient steps and by Hessian-free steps: G and ‖∇G‖ along each, the final damping "
                       "of the Hessian-free solver, the descent ratio at the point each returns",
               "settings": settings, "torch": torch.__version__, "seconds": time.perf_counter() - clock,
               "runs": results}
    text = markdown(results, settings)
    if args.out:
        out = Path(args.out)
        P.write_json(out / "inner.json", P.rounded(payload, 6))
        figure(results, out / "inner.png")
    print(text)
    return payload


if __name__ == "__main__":
    main()
