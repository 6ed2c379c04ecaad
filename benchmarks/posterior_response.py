"""Does the task posterior respond to data? Measured on meta-trained sine learners.

    python -m benchmarks.posterior_response runs/sine3000/ibaml runs/sine3000/abml --out docs/results/sine/posterior_response.json

Each folder is an ``examples/sine_regression.py`` run of a variational method (its
``<method>/last.pt``). The learner is rebuilt from the checkpoint's configuration, and for
support sizes ``K ∈ {1, 3, 10, 30}`` it adapts to ``--tasks`` fresh ``K``-shot tasks and reports

* the in-range epistemic predictive variance ``mean_x [v(x) − σ²]`` over query points
  ``x ∈ [−5, 5]``, ``v`` the posterior-predictive variance and ``σ²`` the learned noise (the
  task's ``σ_t² = r σ²`` for ``--noise conjugate``), and
* the weight-posterior variance relative to the prior's, ``mean_i s_i/σ_i²``, per network
  tensor the prior covers, and
* the query points' mean squared error and 90% coverage (a predictive fitted at one support
  size need not be calibrated at another).

With ``--noise conjugate`` the noise prior's scale and evidence weight are first fitted to
``--noise-fit-tasks`` held-out 10-shot tasks, as the example does before it evaluates
(:meth:`ibaml.MetaLearner.fit_noise_prior`, the same tasks), with the heavy-tailed predictive of
``--noise-fit-tails`` (default: a log-normal scale mixture); its "variance" ``v`` is then the
squared scale and its 90% interval ``mean ± z √v`` with that family's quantile ``z``. The posterior responds to
data when both fall with ``K``. At ``K = 10`` it also reports the
90% coverage, the root-mean-square error and the mean predictive scale (``√v``) of the
query points by the task's amplitude (``A ∈ [0.1, 1), [1, 2.5), [2.5, 5]``): the
predictive variance of a linear-Gaussian head does not depend on the observed ``y``, so it
cannot follow the amplitude, which scales the errors; the coverage averaged over tasks
mixes over-covered small-amplitude tasks with under-covered large ones.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import ibaml
from ibaml.calibration import central_quantile
from ibaml.core.nets import MLP
from ibaml.data.sine import SineTaskDistribution
from ibaml.experiments.cli import TAIL_CHOICES, tail_family
from ibaml.train.checkpoint import load_checkpoint

from . import _harness as H

SHOTS = (1, 3, 10, 30)
AMPLITUDE_BINS = ((0.1, 1.0), (1.0, 2.5), (2.5, 5.0))


def z90(learner) -> float:
    """The central 90% interval's half-width in scales: 1.645 for a Gaussian predictive, the
    heavy-tailed family's quantile where the likelihood has one (``likelihood.tails``)."""
    return float(central_quantile(torch.tensor([0.9]), getattr(learner.likelihood, "tails", None))[0])


def load_learner(folder: Path):
    """The learner of a finished single-method sine run, with its meta-trained state."""
    method = next(p.name for p in sorted(folder.iterdir()) if (p / "last.pt").is_file())
    state = load_checkpoint(folder / method / "last.pt", map_location="cpu")
    cfg = state["config"]
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(cfg["seed"])
    net = MLP(1, (40, 40), 1).to(dtype)
    if cfg.get("noise", "shared") == "conjugate":
        likelihood = ibaml.recipes.regression_likelihood(   # older runs learned a0
            "conjugate", cfg["noise_prior_count"], cfg.get("learn_noise_prior_count", True)).to(dtype)
    else:
        likelihood = ibaml.GaussianLikelihood(noise=1.0, learn_noise=True).to(dtype)
    learner = ibaml.build_learner(method, net, likelihood, inner_steps=cfg["inner_steps"],
                                  eval_inner_steps=cfg["eval_inner_steps"], cg_steps=cfg["cg_steps"], seed=cfg["seed"])
    learner.load_training_state(state["training"] if "training" in state else state["model"])   # older runs: "model"
    return method, learner, cfg


def response(learner, tasks: int, seed: int = 0) -> dict:
    prior = learner.prior
    prior_var = prior.variance().detach()
    segment = prior.spec.segment_ids()
    noise_var = float(learner.likelihood.noise.detach()) ** 2
    rows = {}
    for K in SHOTS:
        batch = SineTaskDistribution(shots=K, query=20).sample(tasks, torch.Generator().manual_seed(seed + K))
        posterior = learner.adapt(batch.support_x, batch.support_y)
        mean, var = learner.predict(posterior, batch.query_x, num_samples=200)
        task_noise_var = noise_var if posterior.noise_ratio is None else noise_var * posterior.noise_ratio[:, None, None]
        ratio = (posterior.variance() / prior_var).mean(0)
        error = (batch.query_y - mean).abs()
        rows[K] = {"epistemic_variance": float((var - task_noise_var).mean()),
                   "mse": float(error.pow(2).mean()), "coverage_90": float((error <= z90(learner) * var.sqrt()).double().mean()),
                   "variance_ratio": {n: float(ratio[segment == i].mean()) for i, n in enumerate(prior.names)}}
    return {"noise_variance": noise_var, "shots": rows,
            "epistemic_30_over_1": rows[30]["epistemic_variance"] / rows[1]["epistemic_variance"],
            "by_amplitude": by_amplitude(learner, tasks, seed)}


def refit_per_shots(learner, tasks: int, fit_tasks: int, tails, query: int, seed: int = 0) -> dict:
    """For each support size ``K``: the noise prior (and tails) refitted to ``fit_tasks`` held-out
    ``K``-shot tasks (seed ``30 000 + K``) on a copy of the learner, then the MSE and 90% coverage
    of the same evaluation tasks as :func:`response` (does fitting at the support size you test
    at calibrate there?)."""
    rows = {}
    for K in SHOTS:
        model = copy.deepcopy(learner)
        held_out = SineTaskDistribution(shots=K, query=query).sample(fit_tasks, torch.Generator().manual_seed(30_000 + K))
        fitted = model.fit_noise_prior(held_out, chunk=250, tails=tails)
        batch = SineTaskDistribution(shots=K, query=20).sample(tasks, torch.Generator().manual_seed(seed + K))
        mean, var = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x)
        error = (batch.query_y - mean).abs()
        rows[K] = {"mse": float(error.pow(2).mean()), "coverage_90": float((error <= z90(model) * var.sqrt()).double().mean()),
                   "noise_prior_fit": fitted}
    return rows


def by_amplitude(learner, tasks: int, seed: int = 0, shots: int = 10) -> dict:
    """90% coverage, RMSE and mean predictive std of ``shots``-shot tasks' query points, by amplitude bin."""
    batch = SineTaskDistribution(shots=shots, query=20).sample(tasks, torch.Generator().manual_seed(seed + 100))
    mean, var = learner.predict(learner.adapt(batch.support_x, batch.support_y), batch.query_x)
    error, std = (batch.query_y - mean).abs().flatten(1), var.sqrt().flatten(1)   # [T, Q]
    amplitude = batch.info["amplitude"]
    rows = {}
    for lo, hi in AMPLITUDE_BINS:
        inside = (amplitude >= lo) & (amplitude < hi) if hi < AMPLITUDE_BINS[-1][1] else (amplitude >= lo)
        e, sd = error[inside], std[inside]
        rows[f"{lo}-{hi}"] = {"tasks": int(inside.sum()), "coverage_90": float((e <= z90(learner) * sd).double().mean()),
                              "rmse": float(e.pow(2).mean().sqrt()), "mean_std": float(sd.mean())}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--noise-fit-tasks", type=int, default=500,
                   help="conjugate noise: fit its prior to N held-out tasks first, as the example does (0: no fit)")
    p.add_argument("--noise-fit-tails", default="lognormal", choices=TAIL_CHOICES,
                   help="with --noise-fit-tasks: the predictive's family, as in the example (default: lognormal)")
    p.add_argument("--refit-per-shots", action="store_true",
                   help="also refit the noise prior at each support size K on K-shot held-out tasks and report "
                        "the coverage there (refit_per_shots in the JSON)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for folder in args.folders:
        method, learner, cfg = load_learner(Path(folder))
        conjugate, fitted, tails = isinstance(learner.likelihood, ibaml.ConjugateNoiseGaussianLikelihood), None, tail_family(args.noise_fit_tails)
        if args.noise_fit_tasks and conjugate:
            held_out = SineTaskDistribution(shots=cfg["shots"], query=cfg["query"]).sample(
                args.noise_fit_tasks, torch.Generator().manual_seed(30_000 + cfg["seed"]), dtype=getattr(torch, cfg["dtype"]))
            fitted = learner.fit_noise_prior(held_out, chunk=250, tails=tails)
        refit = (refit_per_shots(learner, args.tasks, args.noise_fit_tasks or 500, tails, cfg["query"])
                 if args.refit_per_shots and conjugate else None)
        results[method] = dict(response(learner, args.tasks), config=cfg, noise_prior_fit=fitted)
        if refit is not None:
            results[method]["refit_per_shots"] = refit
            print("\n| K | 90% coverage, the noise prior refitted at K | MSE |\n|---|---|---|")
            for K, row in refit.items():
                print(f"| {K} | {row['coverage_90']:.3f} | {row['mse']:.3f} |")
        r = results[method]
        print(f"\n{method} (σ² = {r['noise_variance']:.4f}); epistemic variance at 30 shots / at 1 shot = "
              f"{r['epistemic_30_over_1']:.3f}")
        names = list(r["shots"][SHOTS[0]]["variance_ratio"])
        print("| K | MSE | 90% coverage | epistemic v − σ² | " + " | ".join(f"s/σ², {n}" for n in names) + " |")
        print("|---|---|---|---|" + "---|" * len(names))
        for K, row in r["shots"].items():
            print(f"| {K} | {row['mse']:.3f} | {row['coverage_90']:.3f} | {row['epistemic_variance']:.4f} | "
                  + " | ".join(f"{row['variance_ratio'][n]:.3f}" for n in names) + " |")
        print("\n| amplitude | tasks | 90% coverage | RMSE | mean predictive scale √v |\n|---|---|---|---|---|")
        for name, row in r["by_amplitude"].items():
            print(f"| {name} | {row['tasks']} | {row['coverage_90']:.3f} | {row['rmse']:.3f} | {row['mean_std']:.3f} |")
    if args.out:
        H.write_json_file(Path(args.out), results)
    return results


if __name__ == "__main__":
    main()
