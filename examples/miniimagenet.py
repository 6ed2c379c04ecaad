"""Few-shot image classification (miniImageNet or Omniglot): meta-train, validate, and test
accuracy and calibration.

    python examples/miniimagenet.py --data-root /data/miniimagenet --method ibaml --out runs/mini
    python examples/miniimagenet.py --fixture --meta-iters 20 --eval-tasks 20 --out runs/mini_smoke
    python examples/miniimagenet.py --fixture --fixture-kind strokes --image-size 32 --method maml --out runs/strokes
    python examples/miniimagenet.py --resume runs/mini          # continue from runs/mini/last.pt

Each meta-iteration samples ``--meta-batch`` N-way K-shot tasks (``--ways``, ``--shots``,
``--query`` images per class) from the training classes and takes one meta-step of the chosen
method with a Conv4 network (``--channels`` filters, batch norm with batch statistics) and a
softmax likelihood whose logit scale is a meta-parameter of the predictions
(``--logit-scale``, default :data:`ibaml.presets.LOGIT_SCALE`). Every
``--val-every`` iterations the learner adapts to ``--val-tasks`` fixed validation tasks; the
parameters with the best validation accuracy go to ``DIR/best.pt``. Every
``--checkpoint-every`` iterations (and at the last one) the whole training state goes to
``DIR/last.pt``: the learner's parameters, meta-optimiser and generator
(``MetaLearner.training_state``), the task sampler's generator, the step, the validation
history and the configuration. ``--resume DIR`` reads it and continues the same trajectory:
options not given take their saved values; options that shape the trajectory (method,
network, task sizes, seed, ...) must agree with the saved ones, while ``--meta-iters``, the
evaluation sizes, the data location and the checkpoint interval may change.

At the end the best-validation parameters (the final ones without validation) adapt to
``--eval-tasks`` test tasks, sampled and evaluated ``--eval-chunk`` tasks at a time so that
memory stays bounded, and the script writes ``DIR/metrics.json`` (accuracy, NLL, ECE, MCE,
Brier and mean confidence, each ``{"mean", "ci95"}`` over the test tasks, the ECE of all test
points pooled, and the learned logit scale; with ``--calibrate-scale``, the default, the same
metrics under ``"calibrated"`` at the logit scale fitted to the validation tasks), ``DIR/report.md`` and
``DIR/reliability.png``. Evaluation draws from its own seeds and leaves the training
generators untouched, so validating more or less often does not change the trajectory.

Data: ``--data-root`` holds miniImageNet in one of three layouts (``--format auto`` detects
it: ``mini-imagenet-cache-{train,validation,test}.pkl``; ``{train,val,test}.csv`` with
``images/``; ``{train,val,test}/<class>/*.jpg``) or, with ``--dataset omniglot``,
``images_background/`` and ``images_evaluation/``. ``--fixture`` writes a tiny synthetic dataset
in the chosen layout to a temporary folder and runs on it (a smoke test); ``--fixture
--fixture-kind strokes`` writes the procedural character benchmark instead (64 / 16 / 20
classes, hard enough to separate methods; see ``docs/results/image_benchmark/``). A missing,
unreadable or misshapen file stops the run with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch

import ibaml
from ibaml import presets, training
from ibaml.cli import check_ranges, given_options, merge_saved_options
from ibaml.calibration import CalibrationReport, fit_logit_scale
from ibaml.checkpoint import CheckpointError, load_checkpoint
from ibaml.data import (DatasetError, EpisodeSampler, load_miniimagenet_splits, load_omniglot,
                        write_miniimagenet_fixture, write_omniglot_fixture)
from ibaml.data.fixtures import write_stroke_fixture
from ibaml.data.miniimagenet import detect_format
from ibaml.data.omniglot import parse_split_sizes
from ibaml.nets import Conv4

METHODS = ("ibaml", "imaml", "abml", "maml", "fomaml")
NATIVE_SIZE = {"miniimagenet": 84, "omniglot": 28}
#: options that may differ between a run and its resumption (everything else must agree)
MAY_CHANGE = ("data_root", "format", "workers", "split_file", "meta_iters", "eval_tasks", "eval_chunk", "read_every",
              "val_every", "val_tasks", "checkpoint_every", "out", "resume", "no_progress", "threads",
              "calibrate_scale", "overwrite")
METRICS = ("accuracy", "nll", "ece", "ece_pooled", "mce", "brier", "confidence")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="miniimagenet", choices=tuple(NATIVE_SIZE))
    data.add_argument("--data-root", default=None, help="dataset folder (not needed with --fixture)")
    data.add_argument("--format", default="auto", choices=("auto", "pickle", "csv", "folder"),
                      help="miniImageNet file layout (default: detected)")
    data.add_argument("--fixture", action="store_true",
                      help="write a tiny synthetic dataset (in --format, pickle for auto) to a temporary folder and use it")
    data.add_argument("--fixture-kind", default="stripes", choices=("stripes", "strokes"),
                      help="miniImageNet --fixture: 'stripes' (tiny and easy, a smoke test) or 'strokes' (the "
                           "procedural few-shot benchmark of ibaml.data.fixtures.write_stroke_fixture: 64/16/20 "
                           "character classes, a Conv4 learns it slowly)")
    data.add_argument("--image-size", type=int, default=None,
                      help="resize images to this side once after loading (default: 84 miniImageNet, 28 Omniglot)")
    data.add_argument("--rotations", action=argparse.BooleanOptionalAction, default=True,
                      help="Omniglot: characters rotated by 90/180/270 degrees are new classes")
    data.add_argument("--split-sizes", default="1100,100",
                      help="Omniglot train,val characters (counts, or fractions such as 0.6,0.2); test is the rest")
    data.add_argument("--split-file", default=None, help="Omniglot class split file (default DATA_ROOT/ibaml_split.json)")
    data.add_argument("--workers", type=int, default=4, help="threads decoding image files")

    task = p.add_argument_group("tasks and method")
    task.add_argument("--ways", type=int, default=5)
    task.add_argument("--shots", type=int, default=5)
    task.add_argument("--query", type=int, default=15, help="query images per class")
    task.add_argument("--method", default="ibaml", choices=METHODS)
    task.add_argument("--channels", type=int, default=32, help="Conv4 filters per layer (32 or 64 in the literature)")
    task.add_argument("--inner-steps", type=int, default=None,
                      help="inner steps in meta-training (default: the method's preset, ibaml.presets.PRESETS)")
    task.add_argument("--eval-inner-steps", type=int, default=None,
                      help="inner steps when adapting to validation and test tasks (default: 2x for MAML/FOMAML, else the same)")
    task.add_argument("--inner-optimizer", default=None, choices=("sgd", "adam", "prior", "newton"),
                      help="inner optimiser (default: the preset's, SGD for maml/fomaml and NewtonCG for imaml/abml/ibaml)")
    task.add_argument("--inner-lr", type=float, default=None,
                      help="inner learning rate on the summed support NLL (default for SGD: MAML's step of 0.01 "
                           "(miniImageNet) or 0.4 (Omniglot) on the mean cross-entropy, divided by ways*shots; "
                           "for Adam: 0.01; NewtonCG takes none)")
    task.add_argument("--cg-steps", type=int, default=5, help="conjugate-gradient iterations (imaml, ibaml)")
    task.add_argument("--cg-damping", type=float, default=0.0)
    task.add_argument("--precision", type=float, default=None, help="iMAML's lambda (default: the classification preset's 30)")
    task.add_argument("--init-scale", type=float, default=None,
                      help="initial prior standard deviation for abml/ibaml (default: the classification preset's 0.01)")
    task.add_argument("--outer", choices=("predictive", "elbo"), default="predictive",
                      help="outer objective of abml/ibaml: the query predictive, or ABML's support-and-query ELBO")
    task.add_argument("--kl-weight", type=float, default=None, help="KL weight beta for abml/ibaml (default: the preset's)")
    task.add_argument("--predictive-samples", type=int, default=20, help="posterior draws per prediction (abml, ibaml)")
    task.add_argument("--outer-samples", type=int, default=None,
                      help="posterior draws in the meta-training predictive (abml, ibaml; default: the preset's)")

    train = p.add_argument_group("training and evaluation")
    train.add_argument("--meta-batch", type=int, default=2)
    train.add_argument("--meta-iters", type=int, default=40000)
    train.add_argument("--meta-lr", type=float, default=1e-3)
    train.add_argument("--prior-meta-lr", type=float, default=None,
                       help="meta learning rate of the prior's scales and precision (seen in log coordinates; "
                            "default: --meta-lr)")
    train.add_argument("--logit-scale", default=None, choices=("fixed", "learned", "predictive"),
                       help="the softmax's logit scale τ: 1 (fixed); a meta-parameter in the inner and outer "
                            "objectives (learned); or a meta-parameter of the predictions only, the task inferred "
                            "under the plain softmax (predictive; ibaml.CategoricalLikelihood(learn_scale=True, "
                            "scale_inner=False)). Default: the method's, ibaml.presets.LOGIT_SCALE")
    train.add_argument("--logit-scale-init", type=float, default=None,
                       help="initial logit scale τ (default: the method's preset, else 1)")
    train.add_argument("--logit-scale-meta-lr", type=float, default=None,
                       help="meta learning rate of a learned logit scale, seen in log coordinates (default: the "
                            "method's preset, else 1e-2)")
    train.add_argument("--calibrate-scale", action=argparse.BooleanOptionalAction, default=True,
                       help="also report the test metrics at the logit scale fitted to the validation tasks "
                            "(temperature scaling, ibaml.calibration.fit_logit_scale)")
    train.add_argument("--chunk-size", type=int, default=None, help="tasks per vmap chunk inside a batch (default: all)")
    train.add_argument("--val-every", type=int, default=500, help="validate every N meta-iterations (0: never)")
    train.add_argument("--val-tasks", type=int, default=100)
    train.add_argument("--eval-tasks", type=int, default=1000, help="test tasks")
    train.add_argument("--eval-chunk", type=int, default=25, help="tasks sampled and evaluated at a time")
    train.add_argument("--checkpoint-every", type=int, default=500,
                       help="write DIR/last.pt every N meta-iterations (0: only at the end, where it is always written)")
    train.add_argument("--read-every", type=int, default=0, metavar="N",
                       help="read the training statistics on the host every N meta-iterations (default: 1 on the "
                            "CPU, ibaml.training.GPU_READ_EVERY on a GPU, which then never waits between reads)")
    train.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the run saved in DIR/last.pt (a folder without one yet: start from scratch)")
    train.add_argument("--overwrite", action="store_true", help="replace the run that DIR already holds")
    train.add_argument("--device", default="cpu")
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the --resume folder, else runs/fewshot)")
    train.add_argument("--no-progress", action="store_true")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    check_ranges(p, args, minimum={
        **dict.fromkeys(("shots", "query", "channels", "cg_steps", "meta_batch", "meta_iters", "val_tasks",
                         "eval_tasks", "eval_chunk", "predictive_samples", "inner_steps", "eval_inner_steps",
                         "chunk_size", "threads", "outer_samples"), 1),
        **dict.fromkeys(("val_every", "checkpoint_every", "workers", "read_every"), 0), "ways": 2},
        positive=("inner_lr", "meta_lr", "precision", "init_scale", "kl_weight", "logit_scale_init",
                  "logit_scale_meta_lr"))
    if args.image_size is not None and args.image_size < 16:
        p.error(f"--image-size must be at least 16 (four 2x2 poolings in Conv4), got {args.image_size}")
    if args.fixture_kind != "stripes" and args.dataset != "miniimagenet":
        p.error(f"--fixture-kind {args.fixture_kind} is a miniImageNet layout; it does not apply to --dataset {args.dataset}")
    if not args.fixture and args.data_root is None:
        p.error("--data-root DIR is required (or --fixture for a synthetic smoke run)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} given but CUDA is not available on this machine")
    try:
        parse_split_sizes(args.split_sizes)
    except ValueError as exc:
        p.error(str(exc))


def parse_args(argv=None):
    """Parse ``argv``; with ``--resume DIR`` and a checkpoint ``DIR/last.pt``, merge the
    configuration saved there (a folder without one yet starts from scratch).
    Returns ``(args, checkpoint)`` where ``checkpoint`` is the loaded state or ``None``."""
    p = build_parser()
    args, checkpoint = p.parse_args(argv), None
    if args.resume is not None and (Path(args.resume) / training.LAST).is_file():
        given = given_options(p, argv)
        fixed = {k: v for k, v in given.items() if k not in MAY_CHANGE}
        checkpoint = load_checkpoint(Path(args.resume) / training.LAST, config=fixed, map_location="cpu")
        args = merge_saved_options(args, checkpoint.get("config", {}), given)
    if args.out is None:
        args.out = args.resume if args.resume is not None else "runs/fewshot"
    check_args(p, args)
    continues = args.resume is not None and Path(args.resume).resolve() == Path(args.out).resolve()
    if not (continues or args.overwrite) and training.holds_run(args.out):
        p.error(f"{args.out} already holds a run: continue it with --resume {args.out} or replace it with --overwrite")
    return args, checkpoint


def config_of(args) -> dict:
    """The run's configuration as stored in checkpoints and metrics (all options but ``resume``)."""
    return {k: v for k, v in vars(args).items() if k != "resume"}


# ---------------------------------------------------------------------------------- data
def write_fixture(args, root: Path) -> Path:
    """A tiny dataset in the layout asked for, with enough classes and images for the task sizes."""
    per_class = max(5, args.shots + args.query)
    if args.dataset == "omniglot":
        need = math.ceil(args.ways / 4) if args.rotations else args.ways
        chars = max(12, 4 * need)
        return write_omniglot_fixture(root, n_alphabets=2, chars_per_alphabet=math.ceil(chars / 2),
                                      images_per_char=per_class, seed=args.seed)
    fmt = "pickle" if args.format == "auto" else args.format
    if args.fixture_kind == "strokes":
        return write_stroke_fixture(root, fmt, images_per_class=max(30, per_class), seed=args.seed)
    classes = (max(6, 2 * args.ways), max(3, args.ways), max(3, args.ways))
    return write_miniimagenet_fixture(root, fmt, classes, per_class, seed=args.seed)


def load_data(args, device) -> dict:
    """``{"train", "val", "test"}`` → :class:`ibaml.data.ImageClassDataset` (uint8, on ``device``)."""
    with tempfile.TemporaryDirectory(prefix="ibaml-fixture-") as tmp:
        root = write_fixture(args, Path(tmp)) if args.fixture else Path(args.data_root)
        if args.dataset == "omniglot":
            sizes = (0.5, 0.25) if args.fixture else parse_split_sizes(args.split_sizes)
            size = args.image_size or NATIVE_SIZE["omniglot"]
            splits = {s: load_omniglot(root, s, rotations=args.rotations, image_size=size, split_file=args.split_file,
                                       split_sizes=sizes, seed=args.seed, device=device, num_workers=args.workers)
                      for s in ("train", "val", "test")}
        else:
            fmt = detect_format(root) if args.format == "auto" else args.format
            splits = load_miniimagenet_splits(root, format=fmt, device=device, num_workers=args.workers)
            if args.image_size:
                splits = {s: d.resized(args.image_size) for s, d in splits.items()}
    return splits


# ---------------------------------------------------------------------------------- model
def inner_steps(args) -> int:
    return presets.inner_steps(args.method, args.inner_steps)[0]


def make_learner(args, image_shape, device, dtype) -> ibaml.MetaLearner:
    C, H, _ = image_shape
    torch.manual_seed(args.seed)
    net = Conv4(in_channels=C, hidden=args.channels, out_dim=args.ways, image_size=H).to(device=device, dtype=dtype)
    extra = {k: getattr(args, k) for k in ("precision", "init_scale", "kl_weight") if getattr(args, k) is not None}
    if args.outer_samples is not None:
        extra["num_outer_samples"] = args.outer_samples
    steps, eval_steps = presets.inner_steps(args.method, args.inner_steps, args.eval_inner_steps)
    scale = presets.logit_scale(args.method, args.logit_scale, args.logit_scale_init, args.logit_scale_meta_lr)
    likelihood = presets.categorical_likelihood(scale).to(device=device, dtype=dtype)
    overrides = presets.logit_scale_overrides(scale)
    if args.prior_meta_lr is not None:
        overrides[r"prior\.(scale|precision)"] = args.prior_meta_lr
    return ibaml.build_learner(args.method, net, likelihood, inner_steps=steps, eval_inner_steps=eval_steps,
                               inner_optimizer=args.inner_optimizer,
                               inner_lr=args.inner_lr or presets.image_inner_lr(args.method, args.dataset, args.ways,
                                                                                args.shots, args.inner_optimizer),
                               cg_steps=args.cg_steps,
                               cg_damping=args.cg_damping, meta_lr=args.meta_lr, chunk_size=args.chunk_size,
                               meta_lr_overrides=overrides or None,
                               num_predictive_samples=args.predictive_samples, num_classes=args.ways, seed=args.seed,
                               nonfinite="skip", outer=args.outer, **extra)


def report_at(outputs, labels, scale: float, name: str = "") -> CalibrationReport:
    """The classification report of the predictions at logit scale ``τ``: class probabilities
    ``(1/S) Σ_s softmax(τ f_s)`` ``[T, N, C]``, as ``MetaLearner.predict`` computes them."""
    return CalibrationReport.classification(torch.softmax(scale * outputs, dim=-1).mean(1), labels, name=name)


def learned_scale(learner: ibaml.MetaLearner) -> float:
    return float(learner.likelihood.scale.detach())


# ---------------------------------------------------------------------------------- run
def write_report(out: Path, args, report: CalibrationReport, result: dict) -> None:
    import matplotlib.pyplot as plt

    fig = report.plot_reliability_diagram()
    fig.savefig(out / "reliability.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    evaluated = result["evaluated"]
    which = (f"the best validation parameters (step {evaluated['step']})" if evaluated["checkpoint"] == "best"
             else f"the final parameters (step {evaluated['step']})")
    history = "\n".join(f"| {h['step']} | {h['accuracy']['mean']:.4f} ± {h['accuracy']['ci95']:.4f} | "
                        f"{h['nll']['mean']:.4f} |" for h in result["validation"])
    text = (f"# {args.dataset}: {args.ways}-way {args.shots}-shot, {args.method}\n\n"
            f"Conv4 with {args.channels} channels, {inner_steps(args)} inner steps, {args.cg_steps} CG iterations, "
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
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    progress, out = not args.no_progress, Path(args.out)
    splits = load_data(args, device)
    mean, std = splits["train"].channel_stats()
    samplers = {s: EpisodeSampler(splits[s], args.ways, args.shots, args.query, seed=args.seed, mean=mean, std=std,
                                  dtype=dtype) for s in ("train", "val", "test")}
    learner = make_learner(args, splits["train"].image_shape, device, dtype)
    config = config_of(args)

    def outputs_of(split: str, num_tasks: int, seed: int):
        return training.task_outputs(learner, samplers[split].sample, num_tasks, chunk=args.eval_chunk, seed=seed,
                                     generators=(samplers[split].generator,), progress=progress,
                                     desc=f"{args.method}, {split}")

    def validate(step: int) -> dict:
        report = report_at(*outputs_of("val", args.val_tasks, 10_000 + args.seed), learned_scale(learner))
        return {k: report.metrics[k] for k in METRICS}

    # stationarity of the inner solutions, ||∇_b G|| per block, summed over the last tenth of the run
    tail_start, stationarity = args.meta_iters - max(1, args.meta_iters // 10), {}

    def on_step(step: int, stats: dict) -> None:
        if step > tail_start:
            for key, value in stats.items():
                if key.startswith("inner_grad_norm."):
                    stationarity[key.split(".", 1)[1]] = stationarity.get(key.split(".", 1)[1], 0.0) + value

    run = training.fit(learner, lambda: samplers["train"].sample(args.meta_batch), args.meta_iters, folder=out,
                       config=config, must_match=[k for k in config if k not in MAY_CHANGE],
                       checkpoint_every=args.checkpoint_every, resume=args.resume or False, overwrite=args.overwrite,
                       validate=validate, validate_every=args.val_every, select_best=lambda e: e["accuracy"]["mean"],
                       on_step=on_step, rng={"sampler": samplers["train"]}, progress=progress,
                       read_every=training.default_read_every(learner, device, args.read_every),
                       desc=f"{args.method} {args.dataset}")
    outputs, labels = outputs_of("test", args.eval_tasks, 20_000 + args.seed)
    report = report_at(outputs, labels, learned_scale(learner), name=f"{args.method}, test")
    result = {k: report.metrics[k] for k in METRICS}
    if args.calibrate_scale:   # temperature scaling: the scale that fits the validation tasks best
        fitted = fit_logit_scale(*outputs_of("val", args.val_tasks, 10_000 + args.seed))
        calibrated = report_at(outputs, labels, fitted)
        result["calibrated"] = {"logit_scale": fitted, **{k: calibrated.metrics[k] for k in METRICS}}
    tail_steps = min(args.meta_iters - tail_start, run.steps_run)
    result.update({
        "evaluated": run.evaluated, "validation": run.history, "num_test_tasks": args.eval_tasks,
        "train_seconds": run.seconds,
        "ms_per_meta_iter": 1000 * run.run_seconds / run.steps_run if run.steps_run else None,
        "skipped_tasks": int(learner.skipped_tasks), "last_loss": run.stats.get("loss"),
        "inner_grad_norm": {block: float(total) / tail_steps for block, total in stationarity.items()},
        "logit_scale": learned_scale(learner),
        "classes": {s: splits[s].num_classes for s in splits}, "image_shape": list(splits["train"].image_shape),
        "config": config, "torch": torch.__version__,
    })
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    write_report(out, args, report, result)
    print(f"\n{report.to_markdown()}\n\nwrote {out / 'metrics.json'}, {out / 'report.md'} and {out / 'reliability.png'}")
    return result


def cli(argv=None) -> dict:
    """:func:`main` with dataset and checkpoint problems reported as one line on stderr (exit status 2)."""
    try:
        return main(argv)
    except (DatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
