"""Few-shot image classification (miniImageNet or Omniglot): meta-train, validate, and test
accuracy and calibration.

    python examples/miniimagenet.py --data-root /data/miniimagenet --method ibaml --out runs/mini
    python examples/miniimagenet.py --fixture --meta-iters 20 --eval-tasks 20 --out runs/mini_smoke
    python examples/miniimagenet.py --resume runs/mini          # continue from runs/mini/last.pt

A Conv4 network is meta-trained on N-way K-shot tasks (ibaml.train.training.fit), validated every
--val-every meta-iterations (best parameters in DIR/best.pt, training state in DIR/last.pt) and
tested: DIR/metrics.json, DIR/report.md, DIR/reliability.png. docs/guide/data.md describes the
data layouts and the fixtures (--data-seed draws a fixture apart from the training's --seed),
docs/guide/runs.md the outputs and resuming. Settings are chosen with --eval-split val (tasks of
the validation classes), never on the test classes; metrics.json records which split each
number comes from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ibaml.calibration import CalibrationReport, fit_logit_scale
from ibaml.data import DatasetError, EpisodeSampler
from ibaml.experiments.cli import (IMAGE_DATA_MAY_CHANGE, RUN_MAY_CHANGE, add_image_data_options, add_run_options, check_ranges,
                                   check_image_data_options, check_run_options, exit_on, load_image_data, parse_resumable)
from ibaml.recipes.image_presets import image_learner_from_config
from ibaml.recipes.presets import RECIPES
from ibaml.train import training
from ibaml.train.checkpoint import CheckpointError

METHODS = ("ibaml", "imaml", "abml", "maml", "anil", "fomaml")
#: options that may differ between a run and its resumption (everything else must agree): what
#: is evaluated after meta-training, never the trajectory (a run meta-trained to choose settings on
#: the validation classes is evaluated on the test classes with ``--eval-split test --resume DIR``)
MAY_CHANGE = ("eval_split", "eval_tasks", "eval_chunk", "val_every", "val_tasks", "calibrate_scale") + IMAGE_DATA_MAY_CHANGE + RUN_MAY_CHANGE
#: what metrics.json records of the meta-training, which a resumed run that trains no step keeps
TRAINED = ("ms_per_meta_iter", "last_loss", "inner_grad_norm", "inner_grad_norm_trace")
METRICS = ("accuracy", "nll", "ece", "ece_pooled", "ece_floor", "ece_pooled_floor", "mce", "brier", "confidence")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_data_options(p.add_argument_group("data"))
    task = p.add_argument_group("tasks and method")
    task.add_argument("--ways", type=int, default=5)
    task.add_argument("--shots", type=int, default=5)
    task.add_argument("--query", type=int, default=15, help="query images per class")
    task.add_argument("--method", default="ibaml", choices=METHODS + tuple(RECIPES))
    task.add_argument("--prior", default=None, choices=("head", "all"),
                      help="the prior over the last layer or over every weight (default: the method's; the "
                           "recipes imaml-gd, imaml-hf, ibaml-all, abml-all are over every weight)")
    task.add_argument("--channels", type=int, default=32, help="Conv4 filters per layer (32 or 64 in the literature)")
    task.add_argument("--activation", choices=("relu", "silu"), default="relu",
                      help="Conv4's activation (silu with --pool softmax, avg or stride: a network twice "
                           "differentiable in its weights, for a prior over every weight)")
    task.add_argument("--pool", choices=("max", "avg", "stride", "softmax"), default="max",
                      help="how Conv4 halves the side: 2x2 max, average or soft-max (a smooth maximum) pooling, "
                           "or a stride-2 convolution")
    task.add_argument("--inner-steps", type=int, default=None, help="inner steps in meta-training (default: the preset's)")
    task.add_argument("--eval-inner-steps", type=int, default=None,
                      help="inner steps when adapting to validation and test tasks (default: the preset's)")
    task.add_argument("--inner-optimizer", default=None, choices=("sgd", "adam", "prior", "newton", "hf"),
                      help="inner optimiser (default: the preset's, SGD for maml/fomaml, NewtonCG for the others)")
    task.add_argument("--inner-lr", type=float, default=None,
                      help="inner learning rate on the summed support NLL (default: ibaml.recipes.image_presets.image_inner_lr)")
    task.add_argument("--inner-support-size", type=int, default=None, metavar="N0", help="scale the inner objective "
                      "by N0/N on supports of N > N0 images, so a gradient step does not grow with N (ibaml.MetaLearner)")
    task.add_argument("--precision", type=float, default=None, help="iMAML's lambda (default: the preset's)")
    task.add_argument("--init-scale", type=float, default=None,
                      help="initial prior standard deviation for abml/ibaml (default: the preset's)")
    task.add_argument("--outer", choices=("predictive", "elbo", "expected"), default="predictive",
                      help="outer objective of abml/ibaml: the query predictive, ABML's support-and-query ELBO, "
                           "or the query NLL expected under the posterior")
    task.add_argument("--kl-weight", type=float, default=None, help="KL weight beta for abml/ibaml (default: the preset's)")
    task.add_argument("--predictive-samples", type=int, default=20, help="posterior draws per prediction (abml, ibaml)")
    task.add_argument("--outer-samples", type=int, default=None,
                      help="posterior draws in the meta-training predictive (abml, ibaml; default: the preset's)")

    train = p.add_argument_group("training and evaluation")
    train.add_argument("--prior-meta-lr", type=float, default=None,
                       help="meta learning rate of the prior's scales and precision, in log coordinates")
    train.add_argument("--logit-scale", default=None, choices=("fixed", "learned", "predictive"),
                       help="the softmax's logit scale: 1 (fixed), a meta-parameter (learned), or a meta-parameter "
                            "of the predictions only (predictive); default: ibaml.recipes.image_presets.LOGIT_SCALE")
    train.add_argument("--logit-scale-init", type=float, default=None, help="initial logit scale (default: the preset's)")
    train.add_argument("--logit-scale-meta-lr", type=float, default=None,
                       help="meta learning rate of a learned logit scale, in log coordinates (default: the preset's)")
    train.add_argument("--calibrate-scale", action=argparse.BooleanOptionalAction, default=True,
                       help="also report the test metrics at the logit scale fitted to the validation tasks")
    train.add_argument("--chunk-size", type=int, default=None, help="tasks per vmap chunk inside a batch (default: all)")
    train.add_argument("--val-every", type=int, default=500, help="validate every N meta-iterations (0: never)")
    train.add_argument("--val-tasks", type=int, default=100)
    train.add_argument("--eval-tasks", type=int, default=1000, help="test tasks")
    train.add_argument("--eval-split", choices=("test", "val"), default="test",
                       help="evaluate on the test classes, or on the validation classes (to choose settings)")
    train.add_argument("--eval-chunk", type=int, default=25, help="tasks sampled and evaluated at a time")
    add_run_options(train, meta_iters=40000, meta_batch=2, checkpoint_every=500)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    check_ranges(p, args, minimum={
        **dict.fromkeys(("shots", "query", "channels", "val_tasks", "eval_tasks", "eval_chunk", "predictive_samples",
                         "inner_steps", "eval_inner_steps", "chunk_size", "outer_samples", "inner_support_size"), 1),
        "val_every": 0, "ways": 2},
        positive=("inner_lr", "precision", "init_scale", "kl_weight", "logit_scale_init", "logit_scale_meta_lr"))
    if args.image_size is not None and args.image_size < 16:
        p.error(f"--image-size must be at least 16 (four 2x2 poolings in Conv4), got {args.image_size}")
    check_image_data_options(p, args)
    check_run_options(p, args, "runs/fewshot")


def parse_args(argv=None):
    """``(args, checkpoint)``: ``argv`` parsed, merged with the configuration saved in
    ``DIR/last.pt`` under ``--resume DIR`` (``checkpoint``: that state, else ``None``)."""
    p = build_parser()
    args, checkpoint = parse_resumable(p, argv, MAY_CHANGE)
    check_args(p, args)
    return args, checkpoint


def write_report(out: Path, args, learner, report: CalibrationReport, result: dict) -> None:
    report.plot_reliability_diagram().savefig(out / "reliability.png", dpi=110, bbox_inches="tight")
    evaluated = result["evaluated"]
    which = f"the {'best validation' if evaluated['checkpoint'] == 'best' else 'final'} parameters (step {evaluated['step']})"
    history = "\n".join(f"| {h['step']} | {h['accuracy']['mean']:.4f} ± {h['accuracy']['ci95']:.4f} | "
                        f"{h['nll']['mean']:.4f} |" for h in result["validation"])
    text = (f"# {args.dataset}: {args.ways}-way {args.shots}-shot, {args.method}\n\n"
            f"Conv4 with {args.channels} channels, {learner.inner_loop.steps} inner steps, {args.cg_steps} CG iterations, "
            f"meta-batch {args.meta_batch}, {args.meta_iters} meta-iterations, seed {args.seed}, device {args.device}, "
            f"torch {torch.__version__}.\n\n"
            f"## Test: {args.eval_tasks} tasks, {args.query} queries per class (mean ± 95% CI over tasks)\n\n"
            f"Evaluated with {which}.\n\n{report.to_markdown()}\n\n![reliability diagram](reliability.png)\n")
    if "calibrated" in result:
        fit = result["calibrated"]
        text += (f"\n## At the logit scale fitted to the validation tasks (temperature scaling)\n\n"
                 f"τ = {fit['logit_scale']:.3f} (learned: {result['logit_scale']:.3f}): "
                 + ", ".join(f"{k} {fit[k]['mean']:.4f} ± {fit[k]['ci95']:.4f}" for k in METRICS) + "\n")
    if history:
        text += f"\n## Validation ({args.val_tasks} tasks)\n\n| step | accuracy | NLL |\n|---|---|---|\n{history}\n"
    (out / "report.md").write_text(text)


def main(argv=None) -> dict:
    """Run the example; returns the dict written to ``DIR/metrics.json``."""
    args, _ = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, progress, out = torch.device(args.device), getattr(torch, args.dtype), not args.no_progress, Path(args.out)
    splits = load_image_data(args, device)
    samplers = EpisodeSampler.for_splits(splits, args.ways, args.shots, args.query, seed=args.seed, dtype=dtype)
    config = {k: v for k, v in vars(args).items() if k != "resume"}
    learner = image_learner_from_config(config, splits["train"].image_shape, device, dtype)

    def outputs_of(split: str, num_tasks: int, seed: int):
        return learner.task_outputs(samplers[split].sample, num_tasks, chunk=args.eval_chunk, seed=seed,
                                    generators=(samplers[split].generator,), progress=progress,
                                    desc=f"{args.method}, {split}")

    def learned_scale() -> float:
        return float(learner.likelihood.scale.detach())

    def validate(step: int) -> dict:
        report = CalibrationReport.from_logits(*outputs_of("val", args.val_tasks, 10_000 + args.seed), learned_scale())
        return {k: report.metrics[k] for k in METRICS}

    # the stationarity of the inner solutions, ||∇_b G|| per block, over the last tenth of the run
    stationarity = training.TailMeans("inner_grad_norm.", after=args.meta_iters - max(1, args.meta_iters // 10))
    along = training.WindowMeans("inner_grad_norm.", every=max(1, args.meta_iters // 10))
    run = training.fit(learner, lambda: samplers["train"].sample(args.meta_batch), args.meta_iters, folder=out,
                       config=config, must_match=[k for k in config if k not in MAY_CHANGE],
                       checkpoint_every=args.checkpoint_every, resume=args.resume or False, overwrite=args.overwrite,
                       validate=validate, validate_every=args.val_every, select_best=lambda e: e["accuracy"]["mean"],
                       on_step=lambda step, stats: (stationarity(step, stats), along(step, stats)), rng={"sampler": samplers["train"]}, progress=progress,
                       read_every=training.default_read_every(learner, device, args.read_every),
                       desc=f"{args.method} {args.dataset}")
    evaluated = ("test", 20_000) if args.eval_split == "test" else ("val", 30_000)   # selection: other val tasks
    outputs, labels = outputs_of(evaluated[0], args.eval_tasks, evaluated[1] + args.seed)
    report = CalibrationReport.from_logits(outputs, labels, learned_scale(), name=f"{args.method}, {args.eval_split}")
    result = {k: report.metrics[k] for k in METRICS}
    if args.calibrate_scale:   # temperature scaling: the scale that fits the validation tasks best
        fitted = fit_logit_scale(*outputs_of("val", args.val_tasks, 10_000 + args.seed))
        calibrated = CalibrationReport.from_logits(outputs, labels, fitted)
        result["calibrated"] = {"logit_scale": fitted, **{k: calibrated.metrics[k] for k in METRICS}}
    result.update({
        "evaluated": run.evaluated, "validation": run.history, "num_test_tasks": args.eval_tasks,
        "splits": {"meta_training": "train classes", "validation": f"val classes, task seed {10_000 + args.seed} "
                   f"({args.val_tasks} tasks: model selection, temperature scaling)", "evaluated": f"{evaluated[0]} "
                   f"classes, task seed {evaluated[1] + args.seed} ({args.eval_tasks} tasks)"},
        "train_seconds": run.seconds,
        "ms_per_meta_iter": 1000 * run.run_seconds / run.steps_run if run.steps_run else None,
        "skipped_tasks": int(learner.skipped_tasks), "last_loss": run.stats.get("loss"),
        "inner_grad_norm": stationarity.means(), "inner_grad_norm_trace": along.trace(), "logit_scale": learned_scale(),
        "classes": {s: splits[s].num_classes for s in splits}, "image_shape": list(splits["train"].image_shape),
        "config": config, "torch": torch.__version__,
    })
    if run.steps_run == 0 and (out / "metrics.json").is_file():   # a finished run evaluated again: its training as recorded
        trained = json.loads((out / "metrics.json").read_text())
        result.update({k: trained[k] for k in TRAINED if k in trained})
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    write_report(out, args, learner, report, result)
    print(f"\n{report.to_markdown()}\n\nwrote {out / 'metrics.json'}, {out / 'report.md'} and {out / 'reliability.png'}")
    return result


def cli(argv=None) -> dict:
    """:func:`main` with dataset and checkpoint problems reported as one line on stderr (exit status 2)."""
    with exit_on(DatasetError, CheckpointError):
        return main(argv)


if __name__ == "__main__":
    cli()
