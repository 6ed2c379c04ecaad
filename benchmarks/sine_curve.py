"""The sine example's meta-training, watched: validation error along the run and by amplitude.

    python -m benchmarks.sine_curve --method ibaml --seed 2 --out docs/results/sine/curves/ibaml_seed2.json

Builds the learner exactly as ``examples/sine_regression.py`` does for ``--method`` and
``--seed`` (:func:`ibaml.recipes.sine_presets.sine_run_config` at the example's defaults, its task
stream), meta-trains it for ``--meta-iters`` steps and every ``--every`` steps evaluates it on ``--val-tasks`` in-range tasks drawn from the example's
evaluation seed (``10 000 + seed``): MSE, NLL and 90% coverage along the run. At the end, the
MSE of those tasks by amplitude (bins of width 1 over ``A ∈ [0.1, 5]``) and the ten worst
tasks with their amplitudes. ``--cosine`` decays every meta learning rate along a half cosine
to 0 at the last step (the example keeps it constant); ``--likelihood-meta-lr`` gives the
likelihood's parameters (the noise prior) their own rate. Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ibaml.data.sine import SineTaskDistribution
from ibaml.recipes.sine_presets import sine_learner_from_config, sine_run_config
from ibaml.train import training
from ibaml.train.learner import meta_param_groups


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ibaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default=None, help="the example's --noise (default: the method's)")
    p.add_argument("--meta-iters", type=int, default=3000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--val-tasks", type=int, default=500)
    p.add_argument("--cosine", action="store_true", help="half-cosine decay of the meta learning rates")
    p.add_argument("--likelihood-meta-lr", type=float, default=None,
                   help="meta learning rate of the likelihood's parameters (default: the example's for all)")
    p.add_argument("--param-lr", action="append", default=[], metavar="REGEX=LR",
                   help="meta learning rate of the meta-parameters whose name matches REGEX (0 holds them at "
                        "their initial value), e.g. 'prior_count$=0'; repeatable, matched before --likelihood-meta-lr")
    p.add_argument("--noise-prior-count", type=float, default=None, help="the example's --noise-prior-count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = sine_run_config(args.method, seed=args.seed, noise=args.noise, noise_prior_count=args.noise_prior_count)
    model = sine_learner_from_config(cfg, device=torch.device("cpu"), dtype=torch.float32)
    rates = {}
    for spec in args.param_lr:
        pattern, _, rate = spec.rpartition("=")
        if not pattern:
            p.error(f"--param-lr {spec!r}: expected REGEX=LR")
        rates[pattern] = float(rate)
    if args.likelihood_meta_lr is not None:
        rates.setdefault(r"^likelihood\.", args.likelihood_meta_lr)
    if rates:   # the same Adam with the matching parameters in their own groups
        groups = meta_param_groups(model.model.meta_parameters(), rates)
        model.meta_optimizer = torch.optim.Adam(groups, lr=cfg["meta_lr"])
    tasks = SineTaskDistribution(shots=cfg["shots"], query=cfg["query"])
    gen = torch.Generator().manual_seed(args.seed)
    val = tasks.sample(args.val_tasks, torch.Generator().manual_seed(10_000 + args.seed))
    history = []

    def validate(step):
        metrics = model.evaluate(val, name="validation").metrics
        entry = {"step": step, "mse": metrics["mse"]["mean"], "nll": metrics["nll"]["mean"],
                 "coverage_90": metrics["coverage_90"]["mean"]}
        history.append(entry)
        return entry

    base = [g["lr"] for g in model.meta_optimizer.param_groups]

    def on_step(step, stats):
        if args.cosine:
            factor = 0.5 * (1 + math.cos(math.pi * min(step, args.meta_iters) / args.meta_iters))
            for group, lr in zip(model.meta_optimizer.param_groups, base):
                group["lr"] = lr * factor

    start = time.perf_counter()
    training.fit(model, lambda: tasks.sample(cfg["meta_batch"], gen), args.meta_iters, validate=validate,
                 validate_every=args.every, on_step=on_step, progress=False)
    mean, _ = model.predict(model.adapt(val.support_x, val.support_y), val.query_x)
    task_mse = ((mean[..., 0] - val.query_y[..., 0]) ** 2).mean(-1)
    amplitude = val.info["amplitude"].reshape(-1)
    by_amplitude = {}
    for lo in range(5):
        sel = (amplitude >= lo) & (amplitude < lo + 1)
        by_amplitude[f"{lo}-{lo + 1}"] = {"mse": float(task_mse[sel].mean()) if sel.any() else None,
                                          "tasks": int(sel.sum())}
    worst = torch.argsort(task_mse, descending=True)[:10]
    payload = {"config": vars(args), "history": history, "seconds": time.perf_counter() - start,
               "mse_by_amplitude": by_amplitude,
               "worst_tasks": [{"mse": float(task_mse[i]), "amplitude": float(amplitude[i])} for i in worst]}
    likelihood = model.likelihood
    if hasattr(likelihood, "prior_count"):
        payload["noise_prior"] = {name: float(getattr(likelihood, attr).detach()) for name, attr in (
            ("count", "prior_count"), ("scale", "prior_noise"), ("evidence_scale", "evidence_scale"))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print("| step | MSE | NLL | 90% coverage |\n|---|---|---|---|")
    for e in history:
        print(f"| {e['step']} | {e['mse']:.4f} | {e['nll']:.3f} | {e['coverage_90']:.3f} |")
    print("\n| amplitude | MSE | tasks |\n|---|---|---|")
    for k, v in by_amplitude.items():
        print(f"| {k} | {'—' if v['mse'] is None else format(v['mse'], '.4f')} | {v['tasks']} |")
    print(f"\nwrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
