"""Accuracy of meta-gradients on the sine MLP against a high-precision reference (float64).

Reference: the inner problem solved tightly (many inner steps, then Newton steps with
``newton_polish``) and ``H x = ∂_v F`` solved densely (``ibaml.core.linalg.Dense``), giving the
implicit-function-theorem gradient ``g* = ∂_θF − Bᵀ H⁻¹ ∂_vF`` at ``v*``. Error is
``‖g − g*‖ / ‖g*‖`` over all meta-parameters, median over tasks.

MAP parts (``isotropic``: iMAML's prior; ``diagonal``: iBaML's prior; SGD inner loop):

(a) implicit meta-gradient at the converged inner solution versus CG iterations;
(b) implicit (CG 20) and explicit unrolled meta-gradients versus inner steps K, both
    started at the prior mean.

Variational part (``variational``: iBaML's diagonal prior N(μ, diag σ²), mean-field
q = N(m, diag s), s = softplus(ρ), ``G = E_q NLL(S) + β KL(q ‖ p)`` with fixed draws
``eps_inner`` / ``eps_outer`` per task, Adam inner loop started at ``m = μ, s = σ²``):

(c) implicit (CG 5, 10, 20; prior-preconditioned, fixed iteration count) and explicit
    unrolled meta-gradients versus inner steps K. A small prior scale makes the inner
    problem strongly convex at the solution; the smallest eigenvalue of the dense Hessian
    in (m, ρ) there is reported per task.

    python -m benchmarks.hypergrad_accuracy --out runs/hypergrad_accuracy
    python -m benchmarks.hypergrad_accuracy --parts variational --out docs/results/hypergrad_accuracy
    python -m benchmarks.hypergrad_accuracy --quick
    python -m benchmarks.hypergrad_accuracy --plot-only docs/results/hypergrad_accuracy/hypergrad_accuracy.json

Writes ``DIR/hypergrad_accuracy.json`` and ``DIR/hypergrad_accuracy.png`` (:func:`plot`: the
median relative error versus K per part, versus CG iterations for the MAP parts, and the
median ‖∇G‖ at the K-th iterate) and prints markdown tables (median relative error over
tasks). ``--plot-only PATH`` redraws the figure from an existing JSON (a file, or the folder
holding ``hypergrad_accuracy.json``) without recomputing, beside it with the suffix ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import ibaml
import priors
from ibaml.core.implicit_function import implicit_gradient
from ibaml.core.inner_loop import InnerLoop, TaskProblem, newton_polish
from ibaml.core.linalg import CG, Dense
from ibaml.core.nets import MLP
from ibaml.core.optim import SGD, Adam
from ibaml.core.tree import FlatSpec
from ibaml.data.sine import SineTaskDistribution

from .claims import pyplot

DT = torch.float64
PARTS = ("isotropic", "diagonal", "variational")
VARIATIONAL_ESTIMATORS = ("implicit CG5", "implicit CG10", "implicit CG20", "explicit")
PRIORS = {"isotropic": lambda net, p: priors.IsotropicGaussian.from_module(net, precision=p, learn_precision=True),
          "diagonal": lambda net, p: priors.DiagonalGaussian.from_module(net, init_scale=p ** -0.5)}


def flat_grads(grads, names):
    return torch.cat([grads[k].reshape(-1) for k in names])


def relative_error(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def ift_gradient(problem, meta, task, v, solver):
    return implicit_gradient(lambda vv, m: problem.outer(vv, m, task), lambda vv, m: problem.inner(vv, m, task),
                             v, meta, solver=solver)


def run_prior(name, args, tasks):
    torch.manual_seed(args.seed)
    net = MLP(1, (args.width, args.width), 1, activation=torch.nn.Tanh).to(DT)
    model = ibaml.TaskModel(net, PRIORS[name](net, args.precision), ibaml.GaussianLikelihood(1.0).to(DT))
    meta = {k: p.detach() for k, p in model.meta_parameters().items()}
    names = sorted(meta)
    problem = lambda K: TaskProblem(model, ibaml.MAP(), InnerLoop(SGD(lr=args.lr), K))
    cg_rows, k_rows = [], []
    for i in range(tasks.num_tasks):
        task = {k: v[i] for k, v in tasks.as_dict().items()}
        G = lambda v, m: problem(0).inner(v, m, task)
        v, _ = problem(args.reference_steps).solve(meta, task)
        v = newton_polish(lambda vv: G(vv, meta), v, steps=8)
        stationarity = float(torch.linalg.vector_norm(torch.func.grad(G)(v, meta)["w"]))
        reference, _ = ift_gradient(problem(0), meta, task, v, Dense())
        ref = flat_grads(reference, names)
        for iters in args.cg_iters:
            g, result = ift_gradient(problem(0), meta, task, v, CG(max_iter=iters, tol=1e-30))
            cg_rows.append({"task": i, "cg_iters": iters, "rel_error": relative_error(flat_grads(g, names), ref),
                            "residual_norm": float(result.residual_norm)})
        for K in args.steps:
            for label, est in (("implicit CG20", ibaml.Implicit(CG(max_iter=20, tol=1e-30))), ("explicit", ibaml.Explicit())):
                start = time.perf_counter()
                out = est.task_gradient(problem(K), meta, task)
                k_rows.append({"task": i, "K": K, "estimator": label, "seconds": time.perf_counter() - start,
                               "rel_error": relative_error(flat_grads(out.grads, names), ref),
                               "inner_grad_norm": float(out.diagnostics["inner_grad_norm"])})
        print(f"{name} task {i}: reference stationarity |∇G| = {stationarity:.1e}", flush=True)
    return cg_rows, k_rows


def run_variational(args, tasks):
    """Sweep (c): the variational inner problem, rows per task and K."""
    torch.manual_seed(args.seed)
    width = args.width
    net = MLP(1, (width, width), 1, activation=torch.nn.Tanh).to(DT)
    prior = priors.DiagonalGaussian.from_module(net, init_scale=args.init_scale)
    model = ibaml.TaskModel(net, prior, ibaml.GaussianLikelihood(1.0).to(DT))
    meta = {k: p.detach() for k, p in model.meta_parameters().items()}
    names = sorted(meta)
    inference = ibaml.Variational(beta=args.kl_weight, num_samples=args.inner_samples,
                                  num_outer_samples=args.outer_samples)
    optimizer = {"adam": Adam, "sgd": SGD}[args.variational_optimizer](lr=args.variational_lr)
    problem = lambda K: TaskProblem(model, inference, InnerLoop(optimizer, K))
    estimators = {"implicit CG5": ibaml.Implicit(CG(max_iter=5, tol=1e-30)),
                  "implicit CG10": ibaml.Implicit(CG(max_iter=10, tol=1e-30)),
                  "implicit CG20": ibaml.Implicit(CG(max_iter=20, tol=1e-30)),
                  "explicit": ibaml.Explicit()}
    noise = torch.Generator().manual_seed(args.seed + 2)
    rows, reference_rows = [], []
    for i in range(tasks.num_tasks):
        task = {k: v[i] for k, v in tasks.as_dict().items()}
        task["eps_inner"] = torch.randn(args.inner_samples, prior.dim, generator=noise, dtype=DT)
        task["eps_outer"] = torch.randn(args.outer_samples, prior.dim, generator=noise, dtype=DT)
        G = lambda v, m: problem(0).inner(v, m, task)
        v, _ = problem(args.variational_reference_steps).solve(meta, task)
        v = newton_polish(lambda vv: G(vv, meta), v, steps=8)
        spec = FlatSpec.from_dict(v)
        stationarity = float(torch.linalg.vector_norm(spec.flatten(torch.func.grad(G)(v, meta))))
        hessian = torch.func.hessian(lambda z: G(spec.unflatten(z), meta))(spec.flatten(v))
        eig = torch.linalg.eigvalsh(hessian)
        variance_ratio = inference.variance(v) * model.prior_precision_diag(meta)  # s / σ²
        reference, _ = ift_gradient(problem(0), meta, task, v, Dense())
        ref = flat_grads(reference, names)
        reference_rows.append({"task": i, "grad_norm": stationarity, "min_hessian_eigenvalue": float(eig[0]),
                               "max_hessian_eigenvalue": float(eig[-1]),
                               "mean_shift": float(torch.linalg.vector_norm(v["mean"] - meta["prior.loc_unconstrained"])),
                               "variance_over_prior_variance": [float(variance_ratio.min()),
                                                                float(variance_ratio.max())]})
        for K in args.variational_steps:
            for label, est in estimators.items():
                start = time.perf_counter()
                out = est.task_gradient(problem(K), meta, task)
                row = {"task": i, "K": K, "estimator": label, "seconds": time.perf_counter() - start,
                       "rel_error": relative_error(flat_grads(out.grads, names), ref),
                       "inner_grad_norm": float(out.diagnostics["inner_grad_norm"])}
                if "residual_norm" in out.diagnostics:
                    row["residual_norm"] = float(out.diagnostics["residual_norm"])
                rows.append(row)
        print(f"variational task {i}: reference stationarity |∇G| = {stationarity:.1e}, "
              f"Hessian eigenvalues in [{float(eig[0]):.3g}, {float(eig[-1]):.3g}]", flush=True)
    config = {"network": f"MLP 1-{width}-{width}-1 (tanh)", "parameters": prior.dim,
              "prior": f"DiagonalGaussian(init_scale={args.init_scale})",
              "inference": (f"Variational(beta={args.kl_weight}, num_samples={args.inner_samples}, "
                            f"num_outer_samples={args.outer_samples})"),
              "inner_optimizer": f"{type(optimizer).__name__}(lr={args.variational_lr})",
              "reference": (f"{args.variational_reference_steps} inner steps, 8 Newton steps (newton_polish), "
                            "dense IFT solve (ibaml.core.linalg.Dense)"),
              "implicit": "ibaml.Implicit(CG(max_iter=n, tol=1e-30)), prior-preconditioned",
              "Ks": list(args.variational_steps)}
    return config, reference_rows, rows


def median(values):
    return float(torch.tensor(values, dtype=DT).median())


#: the line of each estimator, the same in every panel (the CG lines thinner as CG grows, so
#: that coinciding lines stay visible)
STYLES = {"implicit CG5": dict(color="tab:green", ls="-", marker="o", ms=9, lw=3.5),
          "implicit CG10": dict(color="tab:orange", ls="-", marker="s", ms=6, lw=2.2),
          "implicit CG20": dict(color="tab:blue", ls="-", marker="^", ms=4, lw=1.2),
          "explicit": dict(color="tab:red", ls="--", marker="D", ms=5, lw=1.5)}


def by_int_key(table):
    """``[(int(k), v)]`` sorted by ``k``: the tables' keys are ints in memory, strings in the JSON."""
    return sorted((int(k), v) for k, v in table.items())


def median_grad_norm(rows):
    """``[(K, median over tasks of ‖∇G‖ at the K-th iterate)]`` from k_rows (one value per task and K)."""
    per_task = {}
    for r in rows:
        if "inner_grad_norm" in r:
            per_task.setdefault(int(r["K"]), {})[r["task"]] = r["inner_grad_norm"]
    return [(K, median(list(v.values()))) for K, v in sorted(per_task.items())]


def plot(payload, path):
    """The figure of a payload (as returned by :func:`main` or read from its JSON), written to ``path``.

    One panel per part present: median relative error versus inner steps K, a line per estimator;
    for the MAP parts, one panel of the error versus CG iterations at the converged solution; one
    panel of the median ‖∇G‖ at the K-th iterate, a line per part. Log-log throughout.
    """
    cfg = payload["config"]
    parts = dict(payload.get("priors", {}))
    if "variational" in payload:
        parts["variational"] = payload["variational"]
    panels = [(name, "K") for name in parts]
    if any("median_by_cg_iters" in part for part in parts.values()):
        panels.append((None, "cg"))
    grad_norms = {name: median_grad_norm(part.get("k_rows", [])) for name, part in parts.items()}
    grad_norms = {name: points for name, points in grad_norms.items() if points}
    if grad_norms:
        panels.append((None, "grad"))
    cols = len(panels) if len(panels) <= 3 else math.ceil(len(panels) / 2)
    rows = math.ceil(len(panels) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (name, kind) in zip(axes, panels):
        if kind == "K":
            table = by_int_key(parts[name]["median_by_steps"])
            for est in table[0][1]:
                ax.plot([K for K, _ in table], [v[est] for _, v in table], label=est,
                        **STYLES.get(est, dict(marker="o")))
            if name == "variational":
                vcfg = parts[name]["config"]
                detail = f"{vcfg['prior']}, {vcfg['inner_optimizer']}\n{vcfg['inference']}"
            else:
                detail = f"MAP, prior precision {cfg['precision']:g}, SGD(lr={cfg['lr']:g})"
            ax.set(xlabel="inner steps K", ylabel="relative error ‖g − g*‖ / ‖g*‖",
                   title=f"{name}: error vs inner steps K\n({detail})")
        elif kind == "cg":
            linestyles = iter(("-", ":", "--", "-."))
            for prior, part in parts.items():
                if "median_by_cg_iters" in part:
                    table = by_int_key(part["median_by_cg_iters"])
                    ax.plot(*zip(*table), next(linestyles), marker="o", label=f"{prior} prior")
            ax.set(xlabel="CG iterations", ylabel="relative error ‖g − g*‖ / ‖g*‖",
                   title="MAP parts: error vs CG iterations\n(at the converged inner solution)")
        else:
            for part_name, points in grad_norms.items():
                ax.plot(*zip(*points), ":" if part_name == "diagonal" else "-", marker="s", label=part_name)
            ax.set(xlabel="inner steps K", ylabel=r"median $\|\nabla_v G(v_K)\|$ (inner objective)",
                   title="inner stationarity at the K-th iterate $v_K$ vs K")
        ax.set(xscale="log", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"meta-gradient accuracy against the dense implicit-function-theorem reference g* "
                 f"(median over {cfg['tasks']} tasks, MLP 1-{cfg['width']}-{cfg['width']}-1 tanh, float64)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_only(path):
    """Redraw the figure of an existing JSON (or the folder holding it); returns its payload."""
    path = Path(path)
    if path.is_dir():
        path = path / "hypergrad_accuracy.json"
    payload = json.loads(path.read_text())
    print(f"wrote {plot(payload, path.with_suffix('.png'))}")
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/hypergrad_accuracy")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the figure from an existing hypergrad_accuracy.json "
                   "(or its folder), beside it, without recomputing; the other options are ignored")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=40, help="hidden width of the 1-w-w-1 tanh MLP (every part)")
    p.add_argument("--precision", type=float, default=30.0, help="prior precision (diagonal: initial 1/σ²)")
    p.add_argument("--lr", type=float, default=0.002, help="inner SGD learning rate")
    p.add_argument("--reference-steps", type=int, default=3000)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="sweeps to run: the MAP priors (isotropic, diagonal) and the variational problem")
    var = p.add_argument_group("variational part")
    var.add_argument("--init-scale", type=float, default=0.1, help="prior standard deviation σ")
    var.add_argument("--kl-weight", type=float, default=1.0, help="β")
    var.add_argument("--inner-samples", type=int, default=1, help="fixed draws eps_inner in the inner objective")
    var.add_argument("--outer-samples", type=int, default=5, help="fixed draws eps_outer in the query predictive")
    var.add_argument("--variational-optimizer", choices=("adam", "sgd"), default="adam")
    var.add_argument("--variational-lr", type=float, default=0.01)
    var.add_argument("--variational-reference-steps", type=int, default=300,
                   help="inner steps before the Newton polish of the reference solution")
    p.add_argument("--quick", action="store_true", help="smoke run (width 10, 2 tasks, short sweeps)")
    args = p.parse_args(argv)
    if args.plot_only:
        return plot_only(args.plot_only)
    args.cg_iters = [1, 2, 5, 10, 20, 50]
    args.steps = [1, 2, 5, 10, 20, 50, 100, 200]
    args.variational_steps = [1, 2, 5, 10, 20, 50, 100, 200]
    if args.quick:
        args.tasks, args.width, args.reference_steps = 2, 10, 1000
        args.cg_iters, args.steps = [1, 5, 20], [1, 10, 50]
        args.variational_steps = [1, 10, 50]
    tasks = SineTaskDistribution(shots=10, query=10).sample(args.tasks, torch.Generator().manual_seed(args.seed + 1),
                                                            dtype=DT)
    start = time.perf_counter()
    payload = {"config": {k: v for k, v in vars(args).items()}, "torch": torch.__version__, "priors": {}}
    lines = []
    for name in (n for n in PRIORS if n in args.parts):
        cg_rows, k_rows = run_prior(name, args, tasks)
        cg_table = {it: median([r["rel_error"] for r in cg_rows if r["cg_iters"] == it]) for it in args.cg_iters}
        k_table = {K: {e: median([r["rel_error"] for r in k_rows if r["K"] == K and r["estimator"] == e])
                       for e in ("implicit CG20", "explicit")} for K in args.steps}
        payload["priors"][name] = {"cg_rows": cg_rows, "k_rows": k_rows, "median_by_cg_iters": cg_table,
                                   "median_by_steps": k_table}
        lines += [f"\n{name} prior — (a) versus CG iterations at the converged solution\n",
                  "| CG iterations | " + " | ".join(map(str, args.cg_iters)) + " |",
                  "|---|" + "---|" * len(args.cg_iters),
                  "| relative error | " + " | ".join(f"{cg_table[i]:.2e}" for i in args.cg_iters) + " |",
                  f"\n{name} prior — (b) versus inner steps K\n",
                  "| K | implicit CG20 | explicit |", "|---|---|---|"]
        lines += [f"| {K} | {k_table[K]['implicit CG20']:.2e} | {k_table[K]['explicit']:.2e} |" for K in args.steps]
    if "variational" in args.parts:
        part_start = time.perf_counter()
        config, reference_rows, rows = run_variational(args, tasks)
        table = {K: {e: median([r["rel_error"] for r in rows if r["K"] == K and r["estimator"] == e])
                     for e in VARIATIONAL_ESTIMATORS} for K in args.variational_steps}
        payload["variational"] = {"config": config, "reference": reference_rows, "k_rows": rows,
                                  "median_by_steps": table, "seconds": time.perf_counter() - part_start}
        min_eig = min(r["min_hessian_eigenvalue"] for r in reference_rows)
        lines += [f"\nvariational (iBaML's diagonal prior, {config['inference']}, {config['inner_optimizer']}, "
                  f"{config['network']}) — (c) versus inner steps K; smallest Hessian eigenvalue at the "
                  f"solutions {min_eig:.3g}\n",
                  "| K | " + " | ".join(VARIATIONAL_ESTIMATORS) + " |", "|---|" + "---|" * len(VARIATIONAL_ESTIMATORS)]
        lines += [f"| {K} | " + " | ".join(f"{table[K][e]:.2e}" for e in VARIATIONAL_ESTIMATORS) + " |"
                  for K in args.variational_steps]
    payload["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hypergrad_accuracy.json").write_text(json.dumps(payload, indent=2))
    plot(payload, out / "hypergrad_accuracy.png")
    print("\n".join(lines))
    print(f"\nwrote {out / 'hypergrad_accuracy.json'} and {out / 'hypergrad_accuracy.png'} "
          f"({payload['seconds']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
