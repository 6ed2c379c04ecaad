"""What makes the variational (and implicit MAP) meta-learners learn: a sweep of the inner
problem's knobs on 10-shot sine regression.

    python -m benchmarks.variational_study --iters 1000 --seeds 0 --out docs/results/variational_study

Every row meta-trains a 1-40-40-1 MLP for ``--iters`` meta-iterations of 25 tasks (meta
learning rate 1e-3, learned observation noise starting at 1) and evaluates ``--eval-tasks``
fresh tasks: MSE, NLL and 90% coverage of the posterior predictive, the stationarity of the
returned inner solutions (``||∇_b G||`` per block, mean over the last 10% of meta-steps) and
the time per meta-iteration (all rows of one run share the machine, so compare times within
a run). The rows go from the earlier presets (a prior over every weight, Adam, σ = 0.1 or
λ = 100) through the directions that were tried to the present presets (a prior over the
linear head solved by Newton steps; for the variational methods the linearised expectation).
``--rows`` selects rows by name. Writes ``study.json`` and ``study.png``, prints a table.

``--problem image`` sweeps the same directions on the procedural letter-image benchmark
(:func:`ibaml.data.fixtures.write_stroke_fixture`, 84×84 files in the miniImageNet pickle
layout resized to 32×32, Conv4-32, 5-way ``--shots``-shot, 15 queries, meta-batch 4): each
row is one run of ``examples/miniimagenet.py`` (a subprocess, :func:`benchmarks._protocol.run_example`)
with the options in :data:`IMAGE_ROWS` (the prior's scale σ and KL weight β, iMAML's λ, the
inner solve, the outer objective, the logit scale fixed at 1 or meta-learned on the
predictions), in ``OUT/image/<row>/seed<s>``; the rows'
``metrics.json`` are gathered into ``image_study.json`` and ``image_study.png`` and printed as
the table of ``benchmarks/image_table.py``::

    python -m benchmarks.variational_study --problem image --iters 300 --eval-tasks 200 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import ibaml
from ibaml.core.nets import MLP
from ibaml.data.sine import SineTaskDistribution

from . import _protocol as P
from . import image_table

ROWS = {
    # the earlier presets: a prior over all weights, Adam, 20 steps
    "imaml all λ=100 adam": ("imaml", dict(include="all", precision=100.0, inner_optimizer="adam", inner_steps=20)),
    "ibaml all σ=0.1 β=1 adam": ("ibaml", dict(include="all", init_scale=0.1, kl_weight=1.0, inner_optimizer="adam",
                                                inner_steps=20)),
    # the published directions on the whole network: small σ, down-weighted KL (λ_eff = β/σ² = 10)
    "ibaml all σ=0.01 β=1e-3 adam": ("ibaml", dict(include="all", init_scale=0.01, kl_weight=1e-3,
                                                    inner_optimizer="adam", inner_steps=20)),
    "ibaml all σ=0.01 β=1e-3 prior-precond.": ("ibaml", dict(include="all", init_scale=0.01, kl_weight=1e-3,
                                                              inner_optimizer="prior", inner_steps=20)),
    # a prior over the head, Monte Carlo expectation
    "ibaml head 4 draws newton": ("ibaml", dict(expectation="sampled", num_samples=4, antithetic=False,
                                                 newton_prior_damping=0.3, inner_steps=6)),
    "ibaml head 8 antithetic newton": ("ibaml", dict(expectation="sampled", num_samples=8, antithetic=True,
                                                      newton_prior_damping=0.3, inner_steps=6)),
    # the presets
    "imaml head (preset)": ("imaml", dict()),
    "imaml head 10 steps": ("imaml", dict(inner_steps=10)),
    "ibaml head linearized (preset)": ("ibaml", dict()),
    "maml (preset)": ("maml", dict()),
    # the KL weight of the variational presets: β < 1 tempers the posterior (its variances in the
    # directions the data constrain scale with β), which moves the predictive's coverage
    "ibaml head linearized β=0.3": ("ibaml", dict(kl_weight=0.3)),
    "ibaml head linearized β=0.1": ("ibaml", dict(kl_weight=0.1)),
    "ibaml head linearized outer=elbo": ("ibaml", dict(outer="elbo")),
    "abml head (preset)": ("abml", dict()),
    "abml head β=0.3": ("abml", dict(kl_weight=0.3)),
    "abml head β=0.1": ("abml", dict(kl_weight=0.1)),
}


FIXED = ["--logit-scale", "fixed"]
#: the image rows: ``examples/miniimagenet.py`` options on top of :data:`IMAGE_BASE` (σ = init
#: scale, β = KL weight, λ = β/σ² the pull on the posterior mean; "τ fixed": the logit scale held at 1)
IMAGE_ROWS = {
    "ibaml σ=1 β=1, τ fixed": ["--method", "ibaml", "--init-scale", "1", "--kl-weight", "1"] + FIXED,
    "ibaml σ=0.1 β=1, τ fixed": ["--method", "ibaml", "--init-scale", "0.1", "--kl-weight", "1"] + FIXED,
    "ibaml σ=0.01 β=3e-3 (λ=30), τ fixed": ["--method", "ibaml", "--init-scale", "0.01", "--kl-weight", "0.003"] + FIXED,
    "ibaml σ=0.01 β=1e-3 (λ=10), τ fixed": ["--method", "ibaml", "--init-scale", "0.01", "--kl-weight", "0.001"] + FIXED,
    "ibaml σ=0.01 β=3e-4 (λ=3), τ fixed": ["--method", "ibaml", "--init-scale", "0.01", "--kl-weight", "0.0003"] + FIXED,
    "ibaml σ=0.01 β=3e-4 (λ=3), 20 Newton steps, CG 10, τ fixed":
        ["--method", "ibaml", "--init-scale", "0.01", "--kl-weight", "0.0003", "--inner-steps", "20",
         "--cg-steps", "10"] + FIXED,
    "abml σ=0.01 β=3e-3 (λ=30), τ fixed": ["--method", "abml", "--init-scale", "0.01", "--kl-weight", "0.003"] + FIXED,
    "imaml λ=1, τ fixed": ["--method", "imaml", "--precision", "1"] + FIXED,
    "imaml λ=30, τ fixed": ["--method", "imaml", "--precision", "30"] + FIXED,
    "imaml λ=100, τ fixed": ["--method", "imaml", "--precision", "100"] + FIXED,
    "maml, τ fixed": ["--method", "maml"] + FIXED,
    "ibaml preset, ABML's outer objective": ["--method", "ibaml", "--outer", "elbo"],
    "ibaml preset": ["--method", "ibaml"],
    "imaml preset": ["--method", "imaml"],
    "abml preset": ["--method", "abml"],
    "maml preset": ["--method", "maml"],
}
IMAGE_BASE = ["--fixture", "--fixture-kind", "strokes", "--format", "pickle", "--ways", "5", "--query", "15",
              "--channels", "32", "--image-size", "32", "--meta-batch", "4", "--val-every", "0", "--no-progress",
              "--overwrite"]


def image_study(names, seeds, args, out: Path) -> dict:
    """Run the image rows ``names`` at ``seeds``; returns ``{"<row>, seed <s>": metrics}``."""
    runs = {}
    for name in names:
        for seed in seeds:
            folder = out / "image" / name.replace(" ", "_").replace("/", "-") / f"seed{seed}"
            argv = IMAGE_BASE + IMAGE_ROWS[name] + ["--shots", str(args.shots), "--meta-iters", str(args.iters),
                                                   "--eval-tasks", str(args.eval_tasks), "--seed", str(seed),
                                                   "--threads", str(args.threads)]
            metrics = P.run_example("miniimagenet.py", folder, argv, keep=folder, force=True)
            runs[f"{name}, seed {seed}"] = metrics
            print(f"{name:52s} seed {seed}: accuracy {metrics['accuracy']['mean']:.3f}  "
                  f"NLL {metrics['nll']['mean']:.3f}  ECE {metrics['ece']['mean']:.3f}", flush=True)
            (out / "image_study.json").write_text(json.dumps(dict(iters=args.iters, shots=args.shots, rows=runs),
                                                             indent=2))
    print("\n" + image_table.markdown(runs))
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(runs) + 1))
    ax.barh(list(runs), [m["accuracy"]["mean"] for m in runs.values()],
            xerr=[m["accuracy"]["ci95"] for m in runs.values()], color="tab:green")
    ax.axvline(1 / 5, color="gray", linestyle=":", label="chance")
    ax.set_xlabel(f"5-way {args.shots}-shot test accuracy after {args.iters} meta-iterations")
    ax.legend(fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "image_study.png", dpi=110)
    plt.close(fig)
    return runs


def run_row(name, method, options, args, seed):
    torch.manual_seed(seed)
    net = MLP(1, (40, 40), 1)
    likelihood = ibaml.GaussianLikelihood(noise=1.0, learn_noise=True)
    eval_steps = 2 * ibaml.recipes.presets.PRESETS["maml"]["inner_steps"] if method == "maml" else None
    learner = ibaml.build_learner(method, net, likelihood, meta_lr=1e-3, seed=seed, nonfinite="skip",
                                  eval_inner_steps=eval_steps, **options)
    tasks = SineTaskDistribution(shots=10, query=10)
    gen = torch.Generator().manual_seed(seed)
    # the stationarity of the inner solutions, ||∇_b G|| per block, over the last tenth of the run
    stationarity = ibaml.train.training.TailMeans("inner_grad_norm.", after=args.iters - max(1, args.iters // 10))
    losses = []
    start = time.perf_counter()
    for it in range(args.iters):
        stats = learner.meta_step(tasks.sample(25, gen))
        losses.append(stats["loss"])
        stationarity(it + 1, {k: float(v) for k, v in stats.items()})
    ms = 1000 * (time.perf_counter() - start) / args.iters
    report = learner.evaluate(tasks.sample(args.eval_tasks, torch.Generator().manual_seed(10_000 + seed)))
    metrics = {k: report.metrics[k] for k in ("mse", "nll", "coverage_50", "coverage_90", "coverage_95")}
    return dict(method=method, options=options, seed=seed, ms_per_meta_iter=ms, metrics=metrics,
                stationarity=stationarity.means(),
                noise=float(learner.likelihood.noise.detach()), skipped=int(learner.skipped_tasks),
                loss_curve=losses[:: max(1, args.iters // 50)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", choices=("sine", "image"), default="sine")
    p.add_argument("--shots", type=int, default=1, help="image: shots per class")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--eval-tasks", type=int, default=500)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--rows", default=None,
                   help="row names separated by ';' (or by ',' where no name holds one; default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/variational_study")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = IMAGE_ROWS if args.problem == "image" else ROWS
    if args.rows is None:
        names = list(rows)
    elif args.rows in rows:
        names = [args.rows]
    else:
        names = [r.strip() for r in args.rows.split(";" if ";" in args.rows else ",")]
    unknown = [n for n in names if n not in rows]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows are {list(rows)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.problem == "image":
        return image_study(names, seeds, args, out)
    results = []
    for name in names:
        method, options = ROWS[name]
        for seed in seeds:
            row = dict(name=name, **run_row(name, method, options, args, seed))
            results.append(row)
            m = row["metrics"]
            print(f"{name:42s} seed {seed}: MSE {m['mse']['mean']:.3f}  NLL {m['nll']['mean']:.3f}  "
                  f"cov90 {m['coverage_90']['mean']:.3f}  {row['ms_per_meta_iter']:.0f} ms  "
                  f"stationarity {', '.join(f'{b} {v:.2g}' for b, v in row['stationarity'].items())}", flush=True)
            (out / "study.json").write_text(json.dumps(dict(iters=args.iters, eval_tasks=args.eval_tasks,
                                                            torch=torch.__version__, rows=results), indent=2))
    lines = ["| row | MSE | NLL | 90% coverage | ||∇G|| per block | ms / meta-iter |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        lines.append(f"| {r['name']} (seed {r['seed']}) | {m['mse']['mean']:.3f} ± {m['mse']['ci95']:.3f} | "
                     f"{m['nll']['mean']:.3f} | {m['coverage_90']['mean']:.3f} | "
                     f"{', '.join(f'{b} {v:.2g}' for b, v in r['stationarity'].items())} | {r['ms_per_meta_iter']:.0f} |")
    print("\n" + "\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(results) + 1))
    labels = [f"{r['name']} (s{r['seed']})" for r in results]
    ax.barh(labels, [min(r["metrics"]["mse"]["mean"], 5.0) for r in results],
            xerr=[r["metrics"]["mse"]["ci95"] for r in results], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel(f"10-shot sine MSE after {args.iters} meta-iterations (log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    return results


if __name__ == "__main__":
    main()
