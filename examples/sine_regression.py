"""Few-shot sine-wave regression: meta-train, adapt, and report accuracy and calibration.

    python examples/sine_regression.py --method ibaml --meta-iters 300 --out runs/sine
    python examples/sine_regression.py --compare maml,imaml,ibaml --out runs/sine_compare

Each run meta-trains on tasks y = A sin(x − φ) (A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]),
then adapts to ``--eval-tasks`` fresh tasks from their K-shot support sets and
evaluates the posterior predictive on their query sets, in range (x in [−5, 5]) and out
of range (x in [5, 10]). It writes ``DIR/metrics.json``, ``DIR/report.md`` and PNG figures
(predictive bands, calibration curve) and prints a table.

Checkpoints and resuming::

    python examples/sine_regression.py --method imaml --checkpoint-every 50 --out runs/sine
    python examples/sine_regression.py --method imaml --checkpoint-every 50 --resume runs/sine

``DIR/<method>/last.pt`` (written atomically every ``--checkpoint-every`` meta-iterations and
always at the end of training) holds the learner (network, prior, likelihood), the
meta-optimiser, the step, every random state (task sampler, learner, torch) and the
configuration. ``--resume DIR`` continues each method from its own ``DIR/<method>/last.pt``
on exactly the trajectory of an uninterrupted run; a finished method is evaluated, not
retrained; a checkpoint from another configuration is refused with one line naming the
differing settings.

Data-parallel meta-training (each process solves a share of every meta-batch)::

    torchrun --nproc_per_node 2 examples/sine_regression.py --method imaml --threads 1 --out runs/sine_ddp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch
from tqdm.auto import tqdm

import ibaml
from ibaml import distributed
from ibaml.calibration import CalibrationReport, compare_markdown, plot_predictive_grid
from ibaml.checkpoint import (CheckpointError, load_checkpoint, remove_stale_temporaries, restore_rng_state,
                              rng_state, save_checkpoint)
from ibaml.data.sine import SineTaskDistribution
from ibaml.learner import NonFiniteError
from ibaml.models import MLP

ALL_METHODS = ibaml.METHODS + ("dkt",)
HIDDEN = (40, 40)
CHECKPOINT = "last.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ibaml", choices=ALL_METHODS)
    p.add_argument("--compare", default=None, help="comma-separated methods to run side by side (overrides --method)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--query", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=None,
                   help="inner steps in meta-training (default: the method's preset, ibaml.presets.PRESETS)")
    p.add_argument("--eval-inner-steps", type=int, default=None, help="inner steps at evaluation (default: 2x inner steps for MAML/FOMAML, else the same)")
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--noise", default=None, choices=("shared", "conjugate", "task", "task-scaled"),
                   help="observation noise (default: the method's, ibaml.presets.REGRESSION_NOISE): one learned "
                        "scale for all tasks (shared); a noise variance per task "
                        "inferred in closed form under a conjugate inverse-gamma prior, the Normal-inverse-gamma "
                        "model (conjugate: ibaml.ConjugateNoiseGaussianLikelihood); a log noise scale per task, "
                        "a parameter of the network's head inferred with its weights (task: "
                        "ibaml.TaskNoiseGaussianLikelihood with MLP(..., noise_head=True)); or the same with the "
                        "mean in units of the noise (task-scaled: scale_mean=True)")
    p.add_argument("--noise-prior-count", type=float, default=1.0,
                   help="--noise conjugate: the initial pseudo-count a0 of the inverse-gamma prior (meta-learned)")
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
    p.add_argument("--nonfinite", default="skip", choices=ibaml.learner.NONFINITE_POLICIES,
                   help="a task with a non-finite inner solution, CG residual or meta-gradient: skip it and count it "
                        "(default), or stop with an error")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also write OUT/<method>/last.pt every N meta-iterations (it is always written at the end)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue each method from DIR/<method>/last.pt (a finished method is not retrained)")
    p.add_argument("--train-only", action="store_true", help="meta-train and write checkpoints; skip the evaluation")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel meta-training under torchrun (implied when WORLD_SIZE is set)")
    args = p.parse_args(argv)
    methods = args.compare.split(",") if args.compare else [args.method]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    for name in ("shots", "query", "meta_iters", "meta_batch", "eval_tasks", "cg_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be 0 (only at the end) or positive, got {args.checkpoint_every}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available on this machine")
    if args.distributed and not distributed.launched_with_torchrun():
        p.error("--distributed needs the torchrun environment: torchrun --nproc_per_node N examples/sine_regression.py ...")
    args.distributed = distributed.launched_with_torchrun()
    if args.distributed and "dkt" in methods:
        p.error("--distributed supports the meta-learners, not dkt")
    if args.distributed and args.meta_batch < int(os.environ["WORLD_SIZE"]):
        p.error(f"--meta-batch {args.meta_batch} is smaller than the {os.environ['WORLD_SIZE']} processes")
    if args.resume is not None:
        folder = Path(args.resume)
        if not folder.is_dir():
            p.error(f"--resume {args.resume}: no such folder")
        if not any((folder / m / CHECKPOINT).is_file() for m in methods):
            p.error(f"--resume {args.resume}: no checkpoint there for {', '.join(methods)} "
                    f"(expected {folder / methods[0] / CHECKPOINT})")
    if args.out is None:
        args.out = args.resume or "runs/sine"
    args.methods = methods
    return args


def inner_steps(method: str, args):
    """Inner steps in meta-training and at evaluation (defaults: :data:`ibaml.presets.PRESETS`;
    MAML and FOMAML, which stop early by design, adapt for twice as long at evaluation)."""
    steps = args.inner_steps or ibaml.presets.PRESETS[method]["inner_steps"]
    eval_steps = args.eval_inner_steps or (2 * steps if method in ("maml", "fomaml") else steps)
    return steps, eval_steps


def noise_model(method: str, args) -> str:
    """``--noise``, or the method's default (:data:`ibaml.presets.REGRESSION_NOISE`)."""
    return args.noise or ibaml.presets.REGRESSION_NOISE.get(method, "shared")


def run_config(method: str, args) -> dict:
    """The settings that fix a method's meta-training trajectory; a checkpoint must match them all."""
    common = {"method": method, "shots": args.shots, "query": args.query, "meta_batch": args.meta_batch,
              "dtype": args.dtype, "seed": args.seed}
    if method == "dkt":
        return dict(common, network=f"DeepKernelGP(in_dim=1, hidden={HIDDEN})")
    steps, eval_steps = inner_steps(method, args)
    noise = noise_model(method, args)
    network = f"MLP(1, {HIDDEN}, 1, noise_head=True)" if noise.startswith("task") else f"MLP(1, {HIDDEN}, 1)"
    if noise == "conjugate":
        common["noise_prior_count"] = args.noise_prior_count
    return dict(common, network=network, noise=noise, inner_steps=steps, eval_inner_steps=eval_steps,
                inner_lr=args.inner_lr, cg_steps=args.cg_steps, cg_damping=args.cg_damping,
                meta_lr=args.meta_lr, nonfinite=args.nonfinite)


def make_learner(method: str, args, device, dtype, process_group=None):
    torch.manual_seed(args.seed)
    cfg = run_config(method, args)
    noise = cfg["noise"]
    if noise.startswith("task"):
        likelihood = ibaml.TaskNoiseGaussianLikelihood(noise=1.0, scale_mean=noise == "task-scaled")
    elif noise == "conjugate":
        likelihood = ibaml.ConjugateNoiseGaussianLikelihood(noise=1.0, prior_count=args.noise_prior_count)
    else:
        likelihood = ibaml.GaussianLikelihood(noise=1.0, learn_noise=True)
    likelihood = likelihood.to(device=device, dtype=dtype)
    net = MLP(1, HIDDEN, 1, noise_head=noise.startswith("task")).to(device=device, dtype=dtype)
    return ibaml.build_learner(method, net, likelihood, inner_steps=cfg["inner_steps"],
                               eval_inner_steps=cfg["eval_inner_steps"], inner_lr=args.inner_lr, cg_steps=args.cg_steps,
                               cg_damping=args.cg_damping, meta_lr=cfg["meta_lr"], seed=args.seed,
                               nonfinite=args.nonfinite, process_group=process_group)


def make_model(method, args, device, dtype, ctx):
    """``(model, step, get_state, set_state)``: the model, one meta-update on a batch, and its
    training state (parameters, meta-optimiser, learner generator) as a dict of tensors."""
    if method == "dkt":
        from ibaml.baselines.dkt import DeepKernelGP

        torch.manual_seed(args.seed)
        model = DeepKernelGP(in_dim=1, hidden=HIDDEN).to(device=device, dtype=dtype)

        def set_state(state):
            model.load_state_dict(state["model"])
            model.optimizer.load_state_dict(state["optimizer"])

        return (model, lambda batch: {"loss": model.meta_step(batch)},
                lambda: {"model": model.state_dict(), "optimizer": model.optimizer.state_dict()}, set_state)
    model = make_learner(method, args, device, dtype, process_group=ctx.group if ctx else None)
    return model, model.meta_step, model.training_state, model.load_training_state


def resume_state(method, args, cfg):
    """The checkpoint ``--resume DIR/<method>/last.pt`` (checked against ``cfg``), or ``None``."""
    if args.resume is None or not (Path(args.resume) / method / CHECKPOINT).is_file():
        return None
    path = Path(args.resume) / method / CHECKPOINT
    state = load_checkpoint(path, config=cfg, keys=list(cfg), map_location="cpu")
    if not 0 <= state.get("step", -1) <= args.meta_iters:
        raise CheckpointError(f"{path}: checkpoint at step {state.get('step')!r}, beyond --meta-iters {args.meta_iters}")
    return state


def train(method, args, device, dtype, tasks, method_dir, ctx=None):
    """Meta-train ``method`` for ``--meta-iters`` steps from scratch or from its checkpoint.
    Returns ``(model, training seconds, last stats)``; rank 0 writes ``method_dir/last.pt``."""
    is_main = ctx is None or ctx.is_main
    cfg = run_config(method, args)
    gen = torch.Generator().manual_seed(args.seed)
    model, step, get_state, set_state = make_model(method, args, device, dtype, ctx)
    path = method_dir / CHECKPOINT
    start, seconds = 0, 0.0
    state = resume_state(method, args, cfg)
    if state is not None:
        try:
            set_state(state["model"])
        except (RuntimeError, KeyError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{Path(args.resume) / method / CHECKPOINT}: does not fit this model ({first})") from None
        restore_rng_state(state["rng"], tasks=gen)
        start, seconds = int(state["step"]), float(state["train_seconds"])
        if is_main:
            done = "finished, not retrained" if start == args.meta_iters else "resuming"
            print(f"{method}: checkpoint at step {start} of {args.meta_iters} ({done})", flush=True)
    if is_main:
        method_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)

    def save(done: int):
        if is_main:
            save_checkpoint(path, {"config": cfg, "step": done, "train_seconds": seconds, "model": get_state(),
                                   "rng": rng_state(tasks=gen)})

    bar = tqdm(range(start, args.meta_iters), desc=method, disable=args.no_progress or not is_main, file=sys.stdout,
               mininterval=1.0, initial=start, total=args.meta_iters)
    stats = {}
    clock = time.perf_counter()
    for it in bar:
        stats = step(tasks.sample(args.meta_batch, gen, dtype=dtype).to(device))
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        done = it + 1
        if done == args.meta_iters or (args.checkpoint_every and done % args.checkpoint_every == 0):
            seconds += time.perf_counter() - clock
            save(done)
            clock = time.perf_counter()
    return model, seconds, stats


def evaluate(method, model, batch, name):
    if method == "dkt":
        mean, var = model.predict(batch.support_x, batch.support_y, batch.query_x)
        y = batch.query_y.reshape(mean.shape)
        return CalibrationReport.regression(mean, var, y, name=name), (mean, var)
    report = model.evaluate(batch, name=name)
    return report, None


def plot_examples(method, model, batch, path, n=6):
    n = min(n, batch.support_x.shape[0])   # fewer evaluation tasks than panels
    x_grid = torch.linspace(-5, 10, 200, dtype=batch.support_x.dtype, device=batch.support_x.device)
    grid = x_grid.view(1, -1, 1).expand(n, -1, -1)
    sx, sy = batch.support_x[:n], batch.support_y[:n]
    if method == "dkt":
        mean, var = model.predict(sx, sy, grid)
    else:
        posterior = model.adapt(sx, sy)
        mean, var = model.predict(posterior, grid)
        mean, var = mean[..., 0], var[..., 0]
    amp, phase = batch.info["amplitude"][:n].reshape(n, 1), batch.info["phase"][:n].reshape(n, 1)
    y_true = amp * torch.sin(x_grid.view(1, -1) - phase)
    fig = plot_predictive_grid(sx[..., 0].cpu(), sy[..., 0].cpu(), x_grid.cpu(), mean.cpu(), var.cpu(),
                               x_true=x_grid.cpu(), y_true=y_true.cpu(), title=f"{method}: 90% predictive bands")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def run_method(method, args, device, dtype, out_dir, ctx=None):
    tasks = SineTaskDistribution(shots=args.shots, query=args.query)
    method_dir = out_dir / method
    model, seconds, last = train(method, args, device, dtype, tasks, method_dir, ctx)
    result = {"train_seconds": seconds, "ms_per_meta_iter": 1000 * seconds / args.meta_iters}
    if method != "dkt":
        result["skipped_tasks"] = int(model.skipped_tasks)
    if args.train_only or not (ctx is None or ctx.is_main):
        return result, None, None
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    in_range = tasks.sample(args.eval_tasks, eval_gen, dtype=dtype).to(device)
    out_tasks = SineTaskDistribution(shots=args.shots, query=args.query, query_x_range=(5.0, 10.0))
    out_range = out_tasks.sample(args.eval_tasks, torch.Generator().manual_seed(20_000 + args.seed), dtype=dtype).to(device)
    report_in, _ = evaluate(method, model, in_range, f"{method} (x in [-5, 5])")
    report_out, _ = evaluate(method, model, out_range, f"{method} (x in [5, 10])")
    method_dir.mkdir(parents=True, exist_ok=True)
    plot_examples(method, model, in_range, method_dir / "predictive_bands.png")
    fig = report_in.plot_calibration_curve()
    fig.savefig(method_dir / "calibration_curve.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    result = dict(report_in.metrics, out_of_range=dict(report_out.metrics), **result)
    if method != "dkt" and hasattr(model.likelihood, "noise") and not hasattr(model.likelihood, "noise_ratio"):
        # one noise scale shared by all tasks
        result["noise_std"] = float(model.likelihood.noise.detach())
    if method != "dkt" and hasattr(model.likelihood, "prior_count"):   # the conjugate task noise's prior
        result["noise_prior"] = {"count": float(model.likelihood.prior_count.detach()),
                                 "scale": float(model.likelihood.prior_noise.detach()),
                                 "evidence_scale": float(model.likelihood.evidence_scale.detach())}
    (method_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result, report_in, report_out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ctx = distributed.init_from_env(device) if args.distributed else None
    if ctx is not None:
        device = ctx.device
    try:
        return run(args, device, ctx)
    finally:
        if ctx is not None:
            distributed.dist.barrier(ctx.group)
            distributed.dist.destroy_process_group()


def run(args, device, ctx=None):
    dtype = getattr(torch, args.dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, reports_in, reports_out = {}, {}, {}
    for method in args.methods:
        results[method], reports_in[method], reports_out[method] = run_method(method, args, device, dtype, out_dir, ctx)
    if ctx is not None and not ctx.is_main:
        return None
    metrics = results[args.methods[0]] if len(args.methods) == 1 else results
    config = {k: v for k, v in vars(args).items() if k != "methods"}
    payload = dict(metrics) if len(args.methods) == 1 else {"methods": results}
    payload["config"] = config
    payload["world_size"] = ctx.world_size if ctx else 1
    payload["torch"] = torch.__version__
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    skipped = ", ".join(f"{m} {results[m]['skipped_tasks']}" for m in args.methods if "skipped_tasks" in results[m])
    if args.train_only:
        print(f"non-finite tasks skipped in meta-training: {skipped or 'none'}")
        print(f"wrote {out_dir / 'metrics.json'} and checkpoints {out_dir}/<method>/{CHECKPOINT}")
        return payload
    keys = ["mse", "nll", "coverage_90", "calibration_error", "crps"]
    table_in = compare_markdown(reports_in, keys=keys)
    table_out = compare_markdown(reports_out, keys=keys)
    timing = "\n".join(f"| {m} | {results[m]['ms_per_meta_iter']:.1f} |" for m in args.methods)
    report = (f"# Sine regression, {args.shots}-shot\n\n"
              f"{args.meta_iters} meta-iterations, meta-batch {args.meta_batch}, {args.eval_tasks} evaluation tasks "
              f"(mean ± 95% CI over tasks), device {args.device}, torch {torch.__version__}.\n\n"
              f"## In range (query x in [-5, 5])\n\n{table_in}\n\n"
              f"## Out of range (query x in [5, 10])\n\n{table_out}\n\n"
              f"## Time\n\n| method | ms / meta-iteration |\n|---|---|\n{timing}\n\n"
              + "".join(f"![{m}]({m}/predictive_bands.png)\n" for m in args.methods))
    (out_dir / "report.md").write_text(report)
    print(f"\nIn range (query x in [-5, 5]):\n{table_in}\n\nOut of range (query x in [5, 10]):\n{table_out}\n")
    if skipped:
        print(f"non-finite tasks skipped in meta-training: {skipped}")
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.md'}")
    return payload


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, NonFiniteError) as e:
        sys.exit(f"error: {e}")
