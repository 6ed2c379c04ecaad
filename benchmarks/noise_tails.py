"""Why the conjugate task noise's predictive needs heavy tails: the query errors of a
meta-trained sine run, standardised, and the Gaussian and Student-t fits of its noise prior.

    python -m benchmarks.noise_tails runs/sine3000/ibaml --out docs/results/sine/noise_tails_ibaml.json

The folder is an ``examples/sine_regression.py`` run of a method with ``--noise conjugate``
(``<method>/last.pt``; the learner is rebuilt as in ``benchmarks/posterior_response.py``). It
adapts to the example's held-out fit tasks (seed ``30 000 + seed``, ``--fit-tasks``) and its
evaluation tasks (seed ``10 000 + seed``, ``--eval-tasks``) with the meta-trained noise prior,
then fits the noise ratio ``r_t = c₁ + c₂ D_t`` to the fit tasks' query errors

* with a Gaussian predictive (:func:`ibaml.calibration.fit_linear_noise_ratio`) and
* with a Student-t predictive, its degrees of freedom fitted too
  (:func:`ibaml.calibration.fit_linear_noise_ratio_student_t`), and
* with a log-normal scale mixture, ``e ~ N(0, r_t v e^{2τu})``, ``u ~ N(0, 1)``: each task's
  scale uncertain by a factor ``e^{±τ}`` around ``√(r_t v)``, ``τ`` fitted too
  (:func:`ibaml.calibration.fit_linear_noise_ratio_lognormal`, the example's default),

and reports each fit's 50% / 90% / 95% coverage, pooled calibration error and NLL on the fit
tasks (in sample) and on the evaluation tasks. Under the Gaussian fit it also describes the
standardised errors ``z = e / √(r_t v)`` of the evaluation tasks: their pooled kurtosis (3 for
a Gaussian), the kurtosis within tasks (each task divided by its own root-mean-square
``z``), quantiles over tasks of the per-task mean ``z²``, and the correlation of its logarithm
with what the support set shows (the evidence ``D_t``, the mean squared support target) and
with the task's amplitude.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ibaml
from ibaml.calibration import (CalibrationReport, LogNormalScale, StudentTTails, fit_linear_noise_ratio,
                               fit_linear_noise_ratio_lognormal, fit_linear_noise_ratio_student_t)
from ibaml.data.sine import SineTaskDistribution

from . import _harness as H
from .posterior_response import load_learner

LEVELS = ("coverage_50", "coverage_90", "coverage_95")


def pieces(learner, batch) -> dict:
    """Query errors ``e``, unit variances ``v = var / r``, evidence ``D`` ``[T]`` and the support facts."""
    posterior = learner.adapt(batch.support_x, batch.support_y)
    mean, var = learner.predict(posterior, batch.query_x)
    ratio = posterior.noise_ratio.detach().double()
    n = batch.support_y[0].numel()
    flat = lambda t: t.detach().double().reshape(t.shape[0], -1)   # noqa: E731
    return {"e": flat(batch.query_y) - flat(mean), "v": flat(var) / ratio[:, None],
            "D": learner.likelihood.evidence(ratio, n).clamp(min=0).detach(),
            "support_y2": flat(batch.support_y).pow(2).mean(1), "amplitude": batch.info["amplitude"].double().reshape(-1)}


def report(p: dict, c1: float, c2: float, tails=None) -> dict:
    scale2 = (c1 + c2 * p["D"])[:, None] * p["v"]
    metrics = CalibrationReport.regression(torch.zeros_like(p["e"]), scale2, p["e"], tails=tails).metrics
    return {k: metrics[k]["mean"] for k in LEVELS + ("calibration_error", "nll", "crps")}


def correlation(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def describe(p: dict, c1: float, c2: float) -> dict:
    z = p["e"] / ((c1 + c2 * p["D"])[:, None] * p["v"]).sqrt()
    per_task = z.pow(2).mean(1)
    within = z / per_task.sqrt()[:, None]
    q = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=per_task.dtype)
    log_task = per_task.log()
    return {"kurtosis_pooled": float(z.pow(4).mean() / z.pow(2).mean() ** 2),
            "kurtosis_within_tasks": float(within.pow(4).mean()),
            "per_task_mean_z2_quantiles": dict(zip(("10%", "50%", "90%", "99%"), torch.quantile(per_task, q).tolist())),
            "corr_log_mean_z2_with": {"log_evidence": correlation(log_task, p["D"].clamp(min=1e-12).log()),
                                      "log_support_y2": correlation(log_task, p["support_y2"].log()),
                                      "log_amplitude": correlation(log_task, p["amplitude"].log())}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--fit-tasks", type=int, default=500)
    ap.add_argument("--eval-tasks", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for folder in args.folders:
        method, learner, cfg = load_learner(Path(folder))
        if not isinstance(learner.likelihood, ibaml.ConjugateNoiseGaussianLikelihood):
            raise SystemExit(f"error: {folder}: {method} does not infer its noise per task (--noise conjugate)")
        tasks = SineTaskDistribution(shots=cfg["shots"], query=cfg["query"])
        dtype = getattr(torch, cfg["dtype"])
        with torch.no_grad():
            fit = pieces(learner, tasks.sample(args.fit_tasks, torch.Generator().manual_seed(30_000 + cfg["seed"]), dtype=dtype))
            test = pieces(learner, tasks.sample(args.eval_tasks, torch.Generator().manual_seed(10_000 + cfg["seed"]), dtype=dtype))
        gauss = fit_linear_noise_ratio(fit["D"], fit["e"] ** 2, fit["v"], (1e-3, 1e-2))
        c1, c2, nu = fit_linear_noise_ratio_student_t(fit["D"], fit["e"] ** 2, fit["v"], gauss)
        l1, l2, tau = fit_linear_noise_ratio_lognormal(fit["D"], fit["e"] ** 2, fit["v"], gauss)
        results[f"{method} ({folder})"] = {
            "gaussian": {"c": list(gauss), "fit_tasks": report(fit, *gauss), "eval_tasks": report(test, *gauss)},
            "student_t": {"c": [c1, c2], "df": nu, "fit_tasks": report(fit, c1, c2, StudentTTails(nu)),
                          "eval_tasks": report(test, c1, c2, StudentTTails(nu))},
            "lognormal_scale": {"c": [l1, l2], "tau": tau, "fit_tasks": report(fit, l1, l2, LogNormalScale(tau)),
                                "eval_tasks": report(test, l1, l2, LogNormalScale(tau))},
            "standardised_errors_gaussian_fit": describe(test, *gauss), "config": cfg}
    print("| run | predictive | tasks | 50% | 90% | 95% | calibration error | NLL |\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for kind in ("gaussian", "student_t", "lognormal_scale"):
            label = {"gaussian": "Gaussian", "student_t": f"Student-t, ν = {r[kind].get('df', 0):.2f}",
                     "lognormal_scale": f"log-normal scale, τ = {r[kind].get('tau', 0):.2f}"}[kind]
            for where in ("fit_tasks", "eval_tasks"):
                m = r[kind][where]
                print(f"| {name} | {label} | {where.split('_')[0]} | " + " | ".join(f"{m[k]:.3f}" for k in LEVELS)
                      + f" | {m['calibration_error']:.4f} | {m['nll']:.3f} |")
        d = r["standardised_errors_gaussian_fit"]
        print(f"\n{name}: kurtosis pooled {d['kurtosis_pooled']:.1f}, within tasks {d['kurtosis_within_tasks']:.2f}; "
              f"per-task mean z² quantiles {', '.join(f'{k} {v:.3f}' for k, v in d['per_task_mean_z2_quantiles'].items())}; "
              f"correlation of its log with {', '.join(f'{k} {v:+.2f}' for k, v in d['corr_log_mean_z2_with'].items())}\n")
    if args.out:
        H.write_json_file(Path(args.out), results)
    return results


if __name__ == "__main__":
    main()
