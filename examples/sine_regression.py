"""Few-shot sine-wave regression: meta-train, adapt, and report accuracy and calibration.

    python examples/sine_regression.py --method ibaml --meta-iters 300 --out runs/sine
    python examples/sine_regression.py --compare maml,imaml,ibaml --out runs/sine_compare

Tasks are y = A sin(x − φ) (ibaml.data.SineTaskDistribution). Each method is meta-trained by
ibaml.train.training.fit (checkpoints in DIR/<method>/last.pt; --resume DIR continues the same
trajectory), adapted to --eval-tasks fresh tasks and evaluated in range (x in [−5, 5]) and out
of range (x in [5, 10]): DIR/metrics.json, DIR/report.md, figures, a table.

Splits: meta-training, validation and test tasks come from separate random streams (seeds
S, 30000 + S and 10000 + S / 20000 + S for --seed S). Every method is reported raw and
"recalibrated": one factor on its predictive variance fitted to --recalibration-tasks
validation tasks (ibaml.calibration.fit_variance_scale), the same post-hoc step for all.
--eval-split val evaluates on further validation streams (40000 + S / 50000 + S) instead
of the test ones, for choosing settings; metrics.json records which split each number is from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import ibaml
from ibaml import recipes
from ibaml.calibration import CalibrationReport, compare_markdown, plot_predictive_grid, recalibrated_metrics
from ibaml.data.sine import SineTaskDistribution
from ibaml.experiments.cli import TAIL_CHOICES, add_run_options, check_ranges, check_run_options, exit_on, tail_family
from ibaml.recipes import presets
from ibaml.recipes.sine_presets import (RUN_OPTIONS, predictive_mean_var, sine_learner_from_config, sine_run_config,
                                        sine_run_defaults)
from ibaml.train import distributed, training
from ibaml.train.checkpoint import CheckpointError
from ibaml.train.nonfinite import check_finite_predictions

ALL_METHODS = ibaml.METHODS + tuple(presets.RECIPES) + ("dkt",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ibaml", choices=ALL_METHODS)
    p.add_argument("--compare", default=None, help="comma-separated methods to run side by side (overrides --method)")
    p.add_argument("--shots", type=int)
    p.add_argument("--query", type=int)
    p.add_argument("--train-shots", default=None, metavar="LOW,HIGH",
                   help="meta-train on support sizes drawn uniformly from LOW..HIGH per meta-batch "
                        "(default: --shots); evaluation stays at --shots")
    p.add_argument("--random-features", type=int, default=0, metavar="R",
                   help="R random Fourier features of the last hidden layer under the head (0: none), "
                        "ibaml.core.nets.RandomFourierFeatures")
    p.add_argument("--noise-init", type=float, default=None, help="the likelihood's initial noise (default 1)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps in meta-training (default: the preset's)")
    p.add_argument("--eval-inner-steps", type=int, default=None, help="inner steps at evaluation (default: the preset's)")
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--inner-support-size", type=int, default=None, metavar="N0", help="scale the inner objective by "
                   "N0/N on supports of N > N0 points, so a gradient step does not grow with N (ibaml.MetaLearner)")
    p.add_argument("--inner-optimizer", default=None, choices=("sgd", "adam", "prior", "newton", "hf"),
                   help="inner optimiser (default: the preset's; hf: Newton-CG with a line search, iMAML-HF)")
    p.add_argument("--prior", default=None, choices=("head", "all"),
                   help="the prior over the last layer or over every weight (default: the method's, "
                        "ibaml.recipes.presets; the recipes imaml-gd, imaml-hf, ibaml-all, ibaml-hf, abml-all are over every weight)")
    p.add_argument("--precision", type=float, default=None, help="iMAML's lambda (default: the preset's)")
    p.add_argument("--kl-weight", type=float, default=None, help="KL weight beta for abml/ibaml (default: the preset's; on the head, "
                   "ibaml.recipes.sine_presets.SINE_KL_WEIGHT's per noise model)")
    p.add_argument("--outer", choices=("predictive", "elbo", "expected"), default=None,
                   help="outer objective of abml/ibaml: the query predictive density (default), ABML's "
                        "support-and-query ELBO, or the query NLL expected under the posterior")
    p.add_argument("--noise", default=None, choices=recipes.NOISE_MODELS,
                   help="observation noise (default: the method's, ibaml.recipes.regression_likelihood)")
    p.add_argument("--noise-prior-count", type=float, default=None,
                   help="--noise conjugate: the inverse-gamma prior's pseudo-count a0 (default: the method's)")
    p.add_argument("--learn-noise-prior-count", choices=("yes", "no"), default=None,
                   help="--noise conjugate: meta-learn a0 from its initial value (default: the method's)")
    p.add_argument("--noise-fit-tasks", type=int, default=0, metavar="N",
                   help="--noise conjugate: fit the noise prior to N validation tasks after meta-training (0: don't)")
    p.add_argument("--recalibration-tasks", type=int, default=500, metavar="N",
                   help="validation tasks to which the variance factor of the recalibrated metrics is fitted")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="evaluate on the test streams, or on validation streams (to choose settings)")
    p.add_argument("--noise-fit-tails", default="lognormal", choices=TAIL_CHOICES,
                   help="the predictive's family fitted with --noise-fit-tasks (none: the Gaussian)")
    p.add_argument("--eval-tasks", type=int, default=1000)
    p.add_argument("--train-only", action="store_true", help="meta-train and write checkpoints; skip the evaluation")
    defaults = sine_run_defaults()        # sine_run_config's defaults, held there only
    add_run_options(p, meta_iters=300, meta_batch=defaults["meta_batch"], nonfinite=True, distributed=True)
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    args.methods = args.compare.split(",") if args.compare else [args.method]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if args.train_shots is not None:
        try:
            low, high = (int(v) for v in args.train_shots.split(","))
        except ValueError:
            p.error(f"--train-shots: expected LOW,HIGH (two integers), got {args.train_shots!r}")
        if not 1 <= low <= high:
            p.error(f"--train-shots: expected 1 <= LOW <= HIGH, got {args.train_shots!r}")
        args.train_shots = (low, high)
    check_ranges(p, args, minimum={**dict.fromkeys(("shots", "query", "eval_tasks", "inner_steps",
                                                    "eval_inner_steps", "recalibration_tasks", "inner_support_size"), 1),
                                                 "noise_fit_tasks": 0, "random_features": 0},
                 positive=("inner_lr", "noise_prior_count", "precision", "kl_weight", "noise_init"))
    check_run_options(p, args, "runs/sine", runs=args.methods)
    if args.distributed and "dkt" in args.methods:
        p.error("--distributed supports the meta-learners, not dkt")
    return args


def run_config(method: str, args) -> dict:
    """The settings that fix a method's meta-training trajectory; a checkpoint must match them all."""
    learn = None if args.learn_noise_prior_count is None else args.learn_noise_prior_count == "yes"
    return sine_run_config(method, **{k: getattr(args, k) for k in RUN_OPTIONS}, learn_noise_prior_count=learn)


def make_model(method: str, cfg: dict, args, device, dtype, group=None):
    """The method's learner (or the deep-kernel GP), built from its run configuration and seed."""
    return sine_learner_from_config(cfg, device=device, dtype=dtype, process_group=group)


def outputs(method, model, batch):
    """Predictive mean, variance and targets ``[T, N]`` at ``batch``'s query points."""
    mean, var = predictive_mean_var(model, batch.support_x, batch.support_y, batch.query_x)
    check_finite_predictions(f"{method}, {batch.support_x.shape[1]}-shot tasks", mean, var)
    return mean, var, batch.query_y.reshape(mean.shape)


def evaluation_seeds(args):
    """The seeds of the evaluated task streams, ``(in range, out of range)``: test or validation."""
    first = (10_000 if args.eval_split == "test" else 40_000) + args.seed
    return first, first + 10_000


def splits(args) -> dict:
    """Which random stream of tasks each number comes from."""
    inside, outside = evaluation_seeds(args)
    return {"meta_training": f"stream seed {args.seed}", "validation": f"stream seed {30_000 + args.seed}: "
            f"{args.recalibration_tasks} tasks for the variance factor, {args.noise_fit_tasks} for the noise prior",
            "evaluated": f"{args.eval_split}: stream seeds {inside} (in range), {outside} (out of range)"}


def save_figures(method, model, batch, report_in, folder: Path, n: int = 6) -> None:
    """Predictive bands of the first ``n`` tasks of ``batch`` over x in [-5, 10], and the calibration curve."""
    x = torch.linspace(-5, 10, 200, dtype=batch.support_x.dtype, device=batch.support_x.device)
    sx, sy = batch.support_x[:n], batch.support_y[:n]
    mean, var = predictive_mean_var(model, sx, sy, x.view(1, -1, 1).expand(len(sx), -1, -1))
    bands = plot_predictive_grid(sx[..., 0], sy[..., 0], x, mean, var, x_true=x, y_true=SineTaskDistribution.curve(
        batch.info, x)[:n], title=f"{method}: 90% predictive bands", tails=getattr(model.likelihood, "tails", None))
    bands.savefig(folder / "predictive_bands.png", dpi=110, bbox_inches="tight")
    report_in.plot_calibration_curve().savefig(folder / "calibration_curve.png", dpi=110, bbox_inches="tight")


def training_tasks(tasks: SineTaskDistribution, args, gen: torch.Generator) -> SineTaskDistribution:
    """The next meta-batch's task distribution: ``tasks``, or with ``--train-shots LOW,HIGH``
    its support size drawn uniformly from ``LOW..HIGH`` (from the stream's generator)."""
    if args.train_shots is None:
        return tasks
    low, high = args.train_shots
    return dataclasses.replace(tasks, shots=int(torch.randint(low, high + 1, (1,), generator=gen)))


def run_method(method, args, device, dtype, out_dir: Path, ctx=None):
    """Meta-train (or resume) and evaluate one method: ``(metrics, report in range, out of range)``."""
    tasks, cfg, folder = SineTaskDistribution(shots=args.shots, query=args.query), run_config(method, args), out_dir / method
    model = make_model(method, cfg, args, device, dtype, ctx.group if ctx else None)
    gen = torch.Generator().manual_seed(args.seed)
    stationarity = training.WindowMeans("inner_grad_norm.", every=max(1, args.meta_iters // 10))
    fit = training.fit(model, lambda: training_tasks(tasks, args, gen).sample(args.meta_batch, gen, dtype=dtype).to(device),
                       args.meta_iters,
                       folder=folder, config=cfg, checkpoint_every=args.checkpoint_every,
                       resume=Path(args.resume) / method if args.resume else False, overwrite=args.overwrite,
                       rng={"tasks": gen}, progress=not args.no_progress, desc=method,
                       read_every=training.default_read_every(model, device, args.read_every),
                       is_main=ctx is None or ctx.is_main, on_step=stationarity)
    result = {"train_seconds": fit.seconds, "ms_per_meta_iter": 1000 * fit.seconds / args.meta_iters}
    if method != "dkt":   # ||∇_b G|| per block of the inner solutions, averaged over tenths of the run
        result.update(skipped_tasks=int(model.skipped_tasks), inner_grad_norm=stationarity.trace())
    if args.train_only or not (ctx is None or ctx.is_main):
        return result, None, None
    val = tasks.sample(max(args.noise_fit_tasks, args.recalibration_tasks), torch.Generator().manual_seed(
        30_000 + args.seed), dtype=dtype).to(device)
    if method != "dkt" and args.noise_fit_tasks and isinstance(model.likelihood, ibaml.ConjugateNoiseGaussianLikelihood):
        result["noise_prior_fit"] = model.fit_noise_prior(val, args.noise_fit_tasks, chunk=250,
                                                          tails=tail_family(args.noise_fit_tails))
    inside, outside = evaluation_seeds(args)
    in_range = tasks.sample(args.eval_tasks, torch.Generator().manual_seed(inside), dtype=dtype).to(device)
    out_range = tasks.out_of_range().sample(args.eval_tasks, torch.Generator().manual_seed(outside),
                                            dtype=dtype).to(device)
    tails = getattr(getattr(model, "likelihood", None), "tails", None)
    held_out = outputs(method, model, val[:args.recalibration_tasks])
    evaluated = {"in_range": outputs(method, model, in_range), "out_of_range": outputs(method, model, out_range)}
    report_in, report_out = (CalibrationReport.regression(mu, var, y, name=f"{method} ({where})", tails=tails)
                             for where, (mu, var, y) in zip(("x in [-5, 5]", "x in [5, 10]"), evaluated.values()))
    save_figures(method, model, in_range, report_in, folder)
    result = dict(report_in.metrics, out_of_range=dict(report_out.metrics), **result, splits=splits(args),
                  recalibrated=recalibrated_metrics(held_out, evaluated, tails=tails))
    if tails is None:   # the same post-hoc step with a heavy-tailed family's shape fitted beside the factor
        result["recalibrated_tails"] = {f: recalibrated_metrics(held_out, evaluated, f) for f in ("student_t", "lognormal")}
    if method != "dkt":   # the learned noise: a shared σ, or the conjugate task noise's prior
        result.update(model.likelihood.summary())
    (folder / "metrics.json").write_text(json.dumps(result, indent=2))
    return result, report_in, report_out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, out = getattr(torch, args.dtype), Path(args.out)
    with distributed.data_parallel(torch.device(args.device), enabled=args.distributed) as ctx:
        device = ctx.device if ctx else torch.device(args.device)
        runs = {m: run_method(m, args, device, dtype, out, ctx) for m in args.methods}
    if ctx is not None and not ctx.is_main:
        return None
    results = {m: r[0] for m, r in runs.items()}
    payload = dict(results[args.methods[0]]) if len(args.methods) == 1 else {"methods": results}
    payload.update(config={k: v for k, v in vars(args).items() if k != "methods"},
                   world_size=ctx.world_size if ctx else 1, torch=torch.__version__)
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    skipped = ", ".join(f"{m} {r['skipped_tasks']}" for m, r in results.items() if "skipped_tasks" in r)
    if args.train_only:
        print(f"non-finite tasks skipped in meta-training: {skipped or 'none'}\nwrote {out / 'metrics.json'} "
              f"and checkpoints {out}/<method>/last.pt")
        return payload
    keys = ["mse", "nll", "coverage_90", "calibration_error", "crps"]
    table_in = compare_markdown({m: r[1] for m, r in runs.items()}, keys=keys)
    table_out = compare_markdown({m: r[2] for m, r in runs.items()}, keys=keys)
    timing = "\n".join(f"| {m} | {r['ms_per_meta_iter']:.1f} |" for m, r in results.items())
    (out / "report.md").write_text(
        f"# Sine regression, {args.shots}-shot\n\n{args.meta_iters} meta-iterations, meta-batch {args.meta_batch}, "
        f"{args.eval_tasks} evaluation tasks (mean ± 95% CI over tasks), device {args.device}, torch "
        f"{torch.__version__}.\n\n## In range (query x in [-5, 5])\n\n{table_in}\n\n## Out of range (query x in "
        f"[5, 10])\n\n{table_out}\n\n## Time\n\n| method | ms / meta-iteration |\n|---|---|\n{timing}\n\n"
        + "".join(f"![{m}]({m}/predictive_bands.png)\n" for m in args.methods))
    print(f"\nIn range (query x in [-5, 5]):\n{table_in}\n\nOut of range (query x in [5, 10]):\n{table_out}\n")
    if skipped:
        print(f"non-finite tasks skipped in meta-training: {skipped}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return payload


if __name__ == "__main__":
    with exit_on(CheckpointError, ibaml.NonFiniteError):
        main()
