"""Few-shot sine-wave regression: meta-train, adapt, and report accuracy and calibration.

    python examples/sine_regression.py --method ibaml --meta-iters 300 --out runs/sine
    python examples/sine_regression.py --compare maml,imaml,ibaml --out runs/sine_compare

Tasks are y = A sin(x − φ) (A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]). Each method is
meta-trained (:func:`ibaml.training.fit`; a conjugate task noise then has its prior's scale and
evidence weight, and the spread of a log-normal scale mixture as its predictive, fitted to
``--noise-fit-tasks`` held-out tasks, :func:`ibaml.training.fit_noise_prior`),
adapted to ``--eval-tasks`` fresh tasks from their
K-shot support sets and evaluated on their query sets in range (x in [−5, 5]) and out of range
(x in [5, 10]). It writes ``DIR/metrics.json``, ``DIR/report.md``, PNG figures (predictive
bands, calibration curve) and prints a table.

``DIR/<method>/last.pt`` (atomic, every ``--checkpoint-every`` meta-iterations and at the end)
holds everything to continue: ``--resume DIR`` continues each method on exactly the trajectory
of an uninterrupted run (a finished one is evaluated, not retrained; one without a checkpoint
yet starts from scratch). A folder that already holds a run needs ``--resume`` or ``--overwrite``.
Data-parallel: ``torchrun --nproc_per_node 2 examples/sine_regression.py --method imaml --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch

import ibaml
from ibaml import distributed, presets, training
from ibaml.baselines.dkt import DeepKernelGP
from ibaml.calibration import CalibrationReport, compare_markdown, plot_predictive_grid
from ibaml.checkpoint import CheckpointError
from ibaml.calibration.tails import describe
from ibaml.cli import TAIL_CHOICES, check_ranges, tail_family
from ibaml.data.sine import SineTaskDistribution
from ibaml.nets import MLP

ALL_METHODS = ibaml.METHODS + ("dkt",)
HIDDEN = (40, 40)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ibaml", choices=ALL_METHODS)
    p.add_argument("--compare", default=None, help="comma-separated methods to run side by side (overrides --method)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--query", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps in meta-training (default: the preset's)")
    p.add_argument("--eval-inner-steps", type=int, default=None,
                   help="inner steps at evaluation (default: ibaml.presets.EVAL_STEPS_FACTOR × inner steps)")
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--noise", default=None, choices=presets.NOISE_MODELS,
                   help="observation noise (default: the method's, ibaml.presets.REGRESSION_NOISE; see "
                        "ibaml.presets.regression_likelihood)")
    p.add_argument("--noise-prior-count", type=float, default=None,
                   help="--noise conjugate: the pseudo-count a0 of the inverse-gamma prior (default: the "
                        "method's, ibaml.presets.NOISE_PRIOR_COUNT)")
    p.add_argument("--learn-noise-prior-count", choices=("yes", "no"), default=None,
                   help="--noise conjugate: meta-learn a0 from its initial value (default: the method's)")
    p.add_argument("--noise-fit-tasks", type=int, default=500, metavar="N",
                   help="--noise conjugate: after meta-training, fit the noise prior's scale and evidence weight to "
                        "N held-out tasks (ibaml.training.fit_noise_prior; 0: keep the meta-trained ones)")
    p.add_argument("--noise-fit-tails", default="lognormal", choices=TAIL_CHOICES,
                   help="with --noise-fit-tasks: the predictive's family, its shape fitted too: a log-normal scale "
                        "mixture (default), a Student-t, or the Gaussian (none)")
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--cg-damping", type=float, default=0.0)
    p.add_argument("--meta-iters", type=int, default=300)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--meta-lr", type=float, default=1e-3, help="meta learning rate")
    p.add_argument("--eval-tasks", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output folder (default: the --resume folder, else runs/sine)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nonfinite", default="skip", choices=training.NONFINITE_POLICIES,
                   help="a task with a non-finite inner solution, CG residual or meta-gradient: skip it and count it "
                        "(default), or stop with an error")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also write OUT/<method>/last.pt every N meta-iterations (it is always written at the end)")
    p.add_argument("--read-every", type=int, default=0, metavar="N",
                   help="read the training statistics on the host every N meta-iterations (default: 1 on the CPU, "
                        "ibaml.training.GPU_READ_EVERY on a GPU, which then never waits between reads)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue each method from DIR/<method>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the runs that OUT already holds")
    p.add_argument("--train-only", action="store_true", help="meta-train and write checkpoints; skip the evaluation")
    p.add_argument("--distributed", action="store_true", help="data-parallel meta-training under torchrun")
    args = p.parse_args(argv)
    args.methods = args.compare.split(",") if args.compare else [args.method]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    check_ranges(p, args, minimum={**dict.fromkeys(("shots", "query", "meta_iters", "meta_batch", "eval_tasks",
                                                    "cg_steps", "inner_steps", "eval_inner_steps", "threads"), 1),
                                   "noise_fit_tasks": 0, "checkpoint_every": 0, "read_every": 0},
                 positive=("inner_lr", "meta_lr", "noise_prior_count"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available on this machine")
    if args.distributed and not distributed.launched_with_torchrun():
        p.error("--distributed needs the torchrun environment: torchrun --nproc_per_node N examples/sine_regression.py ...")
    args.distributed = distributed.launched_with_torchrun()
    if args.distributed and "dkt" in args.methods:
        p.error("--distributed supports the meta-learners, not dkt")
    if args.distributed and args.meta_batch < int(os.environ["WORLD_SIZE"]):
        p.error(f"--meta-batch {args.meta_batch} is smaller than the {os.environ['WORLD_SIZE']} processes")
    args.out = args.out or args.resume or "runs/sine"
    continues = args.resume is not None and Path(args.resume).resolve() == Path(args.out).resolve()
    held = [m for m in args.methods if training.holds_run(Path(args.out) / m)]
    if held and not (continues or args.overwrite):
        p.error(f"{args.out} already holds a run of {', '.join(held)}: continue it with --resume {args.out} "
                f"or replace it with --overwrite")
    return args


def run_config(method: str, args) -> dict:
    """The settings that fix a method's meta-training trajectory; a checkpoint must match them all."""
    common = {"method": method, "shots": args.shots, "query": args.query, "meta_batch": args.meta_batch,
              "dtype": args.dtype, "seed": args.seed}
    if method == "dkt":
        return dict(common, network=f"DeepKernelGP(in_dim=1, hidden={HIDDEN})")
    steps, eval_steps = presets.inner_steps(method, args.inner_steps, args.eval_inner_steps)
    noise = args.noise or presets.REGRESSION_NOISE.get(method, "shared")
    network = f"MLP(1, {HIDDEN}, 1, noise_head=True)" if noise.startswith("task") else f"MLP(1, {HIDDEN}, 1)"
    if noise == "conjugate":
        learn = None if args.learn_noise_prior_count is None else args.learn_noise_prior_count == "yes"
        common["noise_prior_count"], common["learn_noise_prior_count"] = presets.noise_prior_count(
            method, args.noise_prior_count, learn)
    return dict(common, network=network, noise=noise, inner_steps=steps, eval_inner_steps=eval_steps,
                inner_lr=args.inner_lr, cg_steps=args.cg_steps, cg_damping=args.cg_damping,
                meta_lr=args.meta_lr, nonfinite=args.nonfinite)


def make_model(method: str, cfg: dict, args, device, dtype, group=None):
    """The method's learner (or the deep-kernel GP), built from the seed."""
    torch.manual_seed(args.seed)
    if method == "dkt":
        return DeepKernelGP(in_dim=1, hidden=HIDDEN).to(device=device, dtype=dtype)
    likelihood = presets.regression_likelihood(cfg["noise"], cfg.get("noise_prior_count", 1.0),
                                               cfg.get("learn_noise_prior_count", True)).to(device=device, dtype=dtype)
    net = MLP(1, HIDDEN, 1, noise_head=cfg["noise"].startswith("task")).to(device=device, dtype=dtype)
    return ibaml.build_learner(method, net, likelihood, inner_steps=cfg["inner_steps"],
                               eval_inner_steps=cfg["eval_inner_steps"], inner_lr=args.inner_lr, cg_steps=args.cg_steps,
                               cg_damping=args.cg_damping, meta_lr=cfg["meta_lr"], seed=args.seed,
                               nonfinite=args.nonfinite, process_group=group)


def predictive(method, model, support_x, support_y, query_x):
    """Predictive mean and variance ``[T, N]`` at ``query_x [T, N, 1]``."""
    if method == "dkt":
        return model.predict(support_x, support_y, query_x)
    mean, var = model.predict(model.adapt(support_x, support_y), query_x)
    return mean[..., 0], var[..., 0]


def report(method, model, batch, name) -> CalibrationReport:
    if method != "dkt":
        return model.evaluate(batch, name=name)
    mean, var = predictive(method, model, batch.support_x, batch.support_y, batch.query_x)
    return CalibrationReport.regression(mean, var, batch.query_y.reshape(mean.shape), name=name)


def save_figures(method, model, batch, report_in, folder: Path, n: int = 6) -> None:
    n = min(n, batch.num_tasks)
    x = torch.linspace(-5, 10, 200, dtype=batch.support_x.dtype, device=batch.support_x.device)
    sx, sy = batch.support_x[:n], batch.support_y[:n]
    mean, var = predictive(method, model, sx, sy, x.view(1, -1, 1).expand(n, -1, -1))
    y_true = batch.info["amplitude"][:n].reshape(n, 1) * torch.sin(x.view(1, -1) - batch.info["phase"][:n].reshape(n, 1))
    for fig, name in ((plot_predictive_grid(sx[..., 0].cpu(), sy[..., 0].cpu(), x.cpu(), mean.cpu(), var.cpu(),
                                            x_true=x.cpu(), y_true=y_true.cpu(),
                                            title=f"{method}: 90% predictive bands",
                                            tails=getattr(getattr(model, "likelihood", None), "tails", None)),
                       "predictive_bands.png"),
                      (report_in.plot_calibration_curve(), "calibration_curve.png")):
        fig.savefig(folder / name, dpi=110, bbox_inches="tight")
        plt.close(fig)


def run_method(method, args, device, dtype, out_dir: Path, ctx=None):
    """Meta-train (or resume) and evaluate one method: ``(metrics, report in range, out of range)``."""
    tasks, cfg, folder = SineTaskDistribution(shots=args.shots, query=args.query), run_config(method, args), out_dir / method
    model = make_model(method, cfg, args, device, dtype, ctx.group if ctx else None)
    gen = torch.Generator().manual_seed(args.seed)
    fit = training.fit(model, lambda: tasks.sample(args.meta_batch, gen, dtype=dtype).to(device), args.meta_iters,
                       folder=folder, config=cfg, checkpoint_every=args.checkpoint_every,
                       resume=Path(args.resume) / method if args.resume else False, overwrite=args.overwrite,
                       rng={"tasks": gen}, progress=not args.no_progress, desc=method,
                       read_every=training.default_read_every(model, device, args.read_every),
                       is_main=ctx is None or ctx.is_main)
    result = {"train_seconds": fit.seconds, "ms_per_meta_iter": 1000 * fit.seconds / args.meta_iters}
    if method != "dkt":
        result["skipped_tasks"] = int(model.skipped_tasks)
    if args.train_only or not (ctx is None or ctx.is_main):
        return result, None, None
    if method != "dkt" and args.noise_fit_tasks and hasattr(model.likelihood, "fit_prior_noise"):
        held_out = tasks.sample(args.noise_fit_tasks, torch.Generator().manual_seed(30_000 + args.seed), dtype=dtype)
        result["noise_prior_fit"] = training.fit_noise_prior(model, held_out.to(device), chunk=250,
                                                             tails=tail_family(args.noise_fit_tails))
    in_range = tasks.sample(args.eval_tasks, torch.Generator().manual_seed(10_000 + args.seed), dtype=dtype).to(device)
    out_range = tasks.out_of_range().sample(args.eval_tasks, torch.Generator().manual_seed(20_000 + args.seed),
                                            dtype=dtype).to(device)
    report_in = report(method, model, in_range, f"{method} (x in [-5, 5])")
    report_out = report(method, model, out_range, f"{method} (x in [5, 10])")
    save_figures(method, model, in_range, report_in, folder)
    result = dict(report_in.metrics, out_of_range=dict(report_out.metrics), **result)
    likelihood = getattr(model, "likelihood", None) if method != "dkt" else None
    if hasattr(likelihood, "noise") and not hasattr(likelihood, "noise_ratio"):   # one noise shared by all tasks
        result["noise_std"] = float(likelihood.noise.detach())
    if hasattr(likelihood, "prior_count"):   # the conjugate task noise's prior
        result["noise_prior"] = {"count": float(likelihood.prior_count.detach()),
                                 "scale": float(likelihood.prior_noise.detach()),
                                 "evidence_scale": float(likelihood.evidence_scale.detach()),
                                 "tails": describe(likelihood.tails)}
    (folder / "metrics.json").write_text(json.dumps(result, indent=2))
    return result, report_in, report_out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = distributed.init_from_env(torch.device(args.device)) if args.distributed else None
    device, dtype, out = (ctx.device if ctx else torch.device(args.device)), getattr(torch, args.dtype), Path(args.out)
    try:
        runs = {m: run_method(m, args, device, dtype, out, ctx) for m in args.methods}
    finally:
        if ctx is not None:
            distributed.dist.barrier(ctx.group)
            distributed.dist.destroy_process_group()
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
    try:
        main()
    except (CheckpointError, training.NonFiniteError) as e:
        sys.exit(f"error: {e}")
