"""Three claims about implicit meta-gradients, measured on sine regression.

* ``memory``: peak memory and time per meta-iteration versus the number of inner steps
  ``K ∈ {1, 5, 10, 20, 50, 100}`` for the explicit (unrolled) and implicit (CG 5)
  estimators, MAP and variational inference, on the sine MLP 1-40-40-1 with meta-batch 25.
  Claim: explicit memory grows linearly in ``K``, implicit memory is flat.
* ``accuracy``: relative error ``‖g − g*‖ / ‖g*‖`` of one task's meta-gradient versus
  ``K ∈ {1, …, 500}`` for explicit, implicit (CG 5, 10, 20) and lazy (leap 1) estimators,
  in float64, MAP with an isotropic Gaussian prior of precision ``λ = 30`` (the inner
  problem is strongly convex: the Hessian's smallest eigenvalue at the solution is
  reported) and an SGD inner loop (lr 0.002), on a tanh MLP 1-20-20-1 (smooth, so that the
  stationary point is well defined), 8 tasks. The reference ``g*`` is the implicit-function-theorem gradient at the exact inner
  solution: ``v*`` from many SGD steps polished by Newton steps
  (:func:`ibaml.core.inner_loop.newton_polish`), then ``∂_θF − Bᵀ H⁻¹ ∂_vF`` with a dense solve.
  Claim: the implicit error is small where the explicit one is not.
* ``horizon``: final 10-shot MSE, time and peak memory per meta-iteration versus the number
  of inner SGD steps ``K``: exact unrolled MAML's K-curve (``K ∈ {1, 5, 20, 50}``, the
  control) and, on the same axes, the estimators that do not backpropagate through the K
  steps: lazy (``K ∈ {5, 20, 50}``), iMAML and iBaML with a prior over every weight
  (:func:`horizon_learner`). The inner step (SGD 10⁻³ on the summed NLL, the observation
  noise fixed at 1) is small enough that five steps under-adapt, so a longer horizon has
  something to give. Default budget: 2000 meta-iterations of 10 tasks, meta learning rate
  10⁻³, 3 seeds, 200 evaluation tasks (evaluated with the training ``K``). ``--runs
  method:K,...`` selects runs (to split them over processes) and ``--merge DIR ...`` joins
  the ``horizon.json`` of such parts into one table and figure.
* ``recipes``: peak memory and time per meta-iteration versus ``K ∈ {5, 10, 20, 50, 100}``
  for the library's sine recipes over every weight, as the example builds them
  (:func:`ibaml.recipes.sine_presets.sine_learner_from_config` with ``inner_steps = K``, the
  shared learned noise, meta-batch 25): MAML and ABML over all weights (explicit, the control)
  beside iMAML-GD, iMAML-HF, iBaML over all weights and iBaML-HF (implicit, CG 20), with
  each method's peak at ``K`` as a multiple of its peak at 5: the peak of its tensors (the
  claim's measure) and of the process's resident set beside it. Claim: the implicit recipes'
  tensor memory does not grow with ``K`` (at ``K = 100`` at most 1.1 times that at ``K = 5``),
  so they can take as many inner steps as solving the problem needs.

    python -m benchmarks.claims                          # all three (the horizon alone: about 2 CPU-hours)
    python -m benchmarks.claims --claim memory --device cuda
    python -m benchmarks.claims --claim recipes --out docs/results/claims
    python -m benchmarks.claims --quick                  # a smoke run (a minute or two)

Each claim writes ``DIR/<claim>.json`` and ``DIR/<claim>.png`` (``--out``, default
``runs/claims``) and prints a markdown table.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the
meta-iteration. On the CPU (where ``tracemalloc`` does not see torch's allocations), the
growth of the peak resident set size ``ru_maxrss`` of a fresh child process, one per
configuration, measured from after a warm-up meta-iteration on one task with one step; for
``recipes`` also the tensors' own peak, which the resident set blurs by a few MiB: the CPU
allocator's live bytes through one more meta-iteration under ``torch.profiler``
(``profile_memory=True``; :func:`benchmarks._harness.cpu_tensor_peak`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import ibaml
import priors
from ibaml.core.hypergrad import Explicit, Implicit, Lazy
from ibaml.core.implicit_function import implicit_gradient
from ibaml.core.inference import MAP, Variational
from ibaml.core.inner_loop import InnerLoop, TaskProblem, newton_polish
from ibaml.core.linalg import CG, Dense
from ibaml.core.optim import SGD
from ibaml.core.task_model import TaskModel

from . import _harness

CLAIMS = ("memory", "accuracy", "horizon", "recipes")
TASK_KEYS = ("support_x", "support_y", "query_x", "query_y")


# ----------------------------------------------------------------------------- helpers
def sine_tasks(shots=10, query=10):
    from ibaml.data.sine import SineTaskDistribution

    return SineTaskDistribution(shots=shots, query=query)


def mlp(hidden, activation=torch.nn.ReLU):
    from ibaml.core.nets import MLP

    return MLP(1, tuple(hidden), 1, activation=activation)


def as_dict(batch):
    return dict(batch) if isinstance(batch, dict) else {k: getattr(batch, k) for k in TASK_KEYS}


def write(out_dir: Path, name: str, payload: dict, fig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out_dir / f"{name}.json")
    fig.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- memory
def memory_learner(estimator: str, method: str, K: int, device, dtype):
    torch.manual_seed(0)
    net = mlp((40, 40)).to(device=device, dtype=dtype)
    likelihood = ibaml.GaussianLikelihood(1.0, learn_noise=True).to(device=device, dtype=dtype)
    if method == "map":
        prior = priors.IsotropicGaussian.from_module(net, precision=100.0, learn_precision=True)
        inference = MAP()
    else:
        prior = priors.DiagonalGaussian.from_module(net, init_scale=0.1)
        inference = Variational(beta=1.0)
    est = Explicit() if estimator == "explicit" else Implicit(solver=CG(max_iter=5, tol=1e-10))
    return ibaml.MetaLearner(net, prior, likelihood, method=inference, estimator=est, inner_optimizer=SGD(lr=0.005),
                             inner_steps=K, nonfinite="skip")


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_worker(cfg: dict) -> dict:
    """One configuration: peak memory of the first meta-iteration, median time of the rest, and
    with ``cfg["tensor_peak"]`` the peak of its tensors (``tensor_peak_mb``:
    :func:`benchmarks._harness.cpu_tensor_peak` on the CPU)."""
    torch.set_num_threads(cfg["threads"])
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tasks, gen = sine_tasks(), torch.Generator().manual_seed(0)
    batch = tasks.sample(cfg["meta_batch"], gen, dtype=dtype).to(device)
    warm = tasks.sample(1, gen, dtype=dtype).to(device)
    if cfg.get("kind") == "horizon":
        make = lambda K: horizon_learner(cfg["method"], K, seed=0, device=device, dtype=dtype, **cfg["build"])
    elif cfg.get("kind") == "recipe":
        make = lambda K: recipe_learner(cfg["method"], K, cfg["meta_batch"], device, dtype)
    else:
        make = lambda K: memory_learner(cfg["estimator"], cfg["method"], K, device, dtype)
    make(1).meta_step(warm)  # kernels, allocator
    learner = make(cfg["K"])
    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    elif _harness.cpu_peak_supported():
        # reset the kernel's high-water mark to the current resident set, so that peaks reached
        # before the meta-iteration (imports, warm-up) do not hide its own
        base = _harness.reset_cpu_peak()
    else:
        base = peak_rss_bytes()
    start = time.perf_counter()
    learner.meta_step(batch)
    sync()
    times = [time.perf_counter() - start]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = (_harness.cpu_peak_bytes() if _harness.cpu_peak_supported() else peak_rss_bytes()) - base
    for _ in range(cfg["repeats"] - 1):
        start = time.perf_counter()
        learner.meta_step(batch)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    result = {"peak_mb": peak / 2 ** 20, "seconds": times[len(times) // 2], "skipped_tasks": learner.skipped_tasks}
    if cfg.get("tensor_peak"):
        # the tensors' own peak: on CUDA the allocator's count above, on the CPU one more
        # meta-iteration under the profiler's allocation record
        tensor_peak = peak if cuda else _harness.cpu_tensor_peak(lambda: learner.meta_step(batch))
        result["tensor_peak_mb"] = tensor_peak / 2 ** 20
    return result


def run_memory_config(cfg: dict) -> dict:
    if cfg["device"].startswith("cuda"):
        return memory_worker(cfg)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.claims", "--memory-worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed for {cfg}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_claim(args, out_dir: Path) -> dict:
    Ks = [1, 20] if args.quick else [1, 5, 10, 20, 50, 100]
    meta_batch = 10 if args.quick else args.meta_batch
    repeats = 1 if args.quick else 3
    rows = []
    for method in ("map", "variational"):
        for estimator in ("explicit", "implicit"):
            for K in Ks:
                cfg = dict(estimator=estimator, method=method, K=K, meta_batch=meta_batch, device=args.device,
                           dtype="float32", threads=args.threads, repeats=repeats)
                res = run_memory_config(cfg)
                rows.append(dict(estimator=estimator, method=method, K=K, **res))
                log(f"memory {estimator:8s} {method:11s} K={K:3d}: {res['peak_mb']:8.1f} MB {res['seconds']:.3f} s")
    measure = _memory_measure(args.device)
    summary = {}
    for method in ("map", "variational"):
        for estimator in ("explicit", "implicit"):
            pts = [(r["K"], r["peak_mb"]) for r in rows if r["method"] == method and r["estimator"] == estimator]
            slope = _slope(pts)
            summary[f"{estimator}-{method}"] = {"mb_per_step": slope, "peak_mb_at_max_K": pts[-1][1],
                                                "peak_mb_at_K1": pts[0][1]}
    table = memory_table(rows, Ks)
    payload = dict(claim="memory", memory_measure=measure, device=args.device,
                   config=dict(network="MLP 1-40-40-1", meta_batch=meta_batch, shots=10, query=10, dtype="float32",
                               inner_optimizer="SGD(lr=0.005)", implicit_solver="CG(max_iter=5)",
                               priors={"map": "IsotropicGaussian(precision=100)",
                                       "variational": "DiagonalGaussian(init_scale=0.1)"},
                               Ks=Ks, repeats=repeats, threads=args.threads, quick=args.quick),
                   rows=rows, summary=summary, table=table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, style in (("map", "-"), ("variational", "--")):
        for estimator, color in (("explicit", "C3"), ("implicit", "C0")):
            sel = [r for r in rows if r["method"] == method and r["estimator"] == estimator]
            label = f"{estimator} ({method})"
            axes[0].plot([r["K"] for r in sel], [r["peak_mb"] for r in sel], style, color=color, marker="o", label=label)
            axes[1].plot([r["K"] for r in sel], [r["seconds"] for r in sel], style, color=color, marker="o", label=label)
    axes[0].set(xlabel="inner steps K", ylabel="peak memory growth (MiB)", title="memory per meta-iteration")
    axes[1].set(xlabel="inner steps K", ylabel="seconds", title="time per meta-iteration")
    axes[0].legend(fontsize=8)
    write(out_dir, "memory", payload, fig)
    print(table)
    return payload


def _slope(points):
    """Least-squares slope of y on x."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0


def memory_table(rows, Ks):
    cols = [(e, m) for m in ("map", "variational") for e in ("explicit", "implicit")]
    lines = ["| K | " + " | ".join(f"{e} {m}: MiB / s" for e, m in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for K in Ks:
        cells = []
        for e, m in cols:
            r = next(r for r in rows if r["K"] == K and r["estimator"] == e and r["method"] == m)
            cells.append(f"{r['peak_mb']:.1f} / {r['seconds']:.3f}")
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- accuracy
def accuracy_claim(args, out_dir: Path) -> dict:
    dtype = torch.float64
    Ks = [1, 10, 100] if args.quick else [1, 5, 10, 20, 50, 100, 200, 500]
    num_tasks = 3 if args.quick else args.accuracy_tasks
    hidden = (args.accuracy_width, args.accuracy_width)
    torch.manual_seed(args.seed)
    # tanh: the inner objective is smooth, so its stationary point (and the IFT gradient there) is
    # well defined and Newton's method converges to it; with ReLU's kinks the polished point oscillates
    net = mlp(hidden, activation=torch.nn.Tanh).to(dtype=dtype)
    prior = priors.IsotropicGaussian.from_module(net, precision=args.precision, learn_precision=True)
    model = TaskModel(net, prior, ibaml.GaussianLikelihood(1.0, learn_noise=True).to(dtype=dtype))
    meta = {k: p.detach() for k, p in model.meta_parameters().items()}
    names = sorted(meta)
    flat = lambda g: torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], -1)  # [T, P]
    task = as_dict(sine_tasks().sample(num_tasks, torch.Generator().manual_seed(args.seed + 1), dtype=dtype))
    lr = args.accuracy_lr
    problem = lambda K: TaskProblem(model, MAP(), InnerLoop(SGD(lr=lr), K))

    # reference: exact inner solution, dense IFT solve
    ref_rows, stationarity = [], []
    for i in range(num_tasks):
        t = {k: v[i] for k, v in task.items()}
        G = lambda v, m, t=t: problem(0).inner(v, m, t)
        v, _ = problem(args.reference_steps).solve(meta, t)
        v = newton_polish(lambda v: G(v, meta), v, steps=8)
        gnorm = float(torch.linalg.vector_norm(torch.func.grad(G)(v, meta)["w"]))
        hess_min = float(torch.linalg.eigvalsh(torch.func.hessian(lambda w: G({"w": w}, meta))(v["w"]))[0])
        grads, _ = implicit_gradient(lambda v, m, t=t: problem(0).outer(v, m, t), G, v, meta, solver=Dense())
        ref_rows.append({k: grads[k] for k in names})
        stationarity.append({"grad_norm": gnorm, "min_hessian_eigenvalue": hess_min})
    reference = flat({k: torch.stack([r[k] for r in ref_rows]) for k in names})  # [T, P]

    estimators = {"explicit": Explicit(), "implicit CG5": Implicit(solver=CG(max_iter=5, tol=1e-14)),
                  "implicit CG10": Implicit(solver=CG(max_iter=10, tol=1e-14)),
                  "implicit CG20": Implicit(solver=CG(max_iter=20, tol=1e-14)), "lazy": Lazy(leap=1.0)}
    rows = []
    for K in Ks:
        for name, est in estimators.items():
            learner = ibaml.MetaLearner(model.net, model.prior, model.likelihood, method=MAP(), estimator=est,
                                        inner_optimizer=SGD(lr=lr), inner_steps=K, task_batching="vmap")
            start = time.perf_counter()
            out = learner.task_gradients(task, meta)
            seconds = time.perf_counter() - start
            err = torch.linalg.vector_norm(flat(out.grads) - reference, dim=-1) / torch.linalg.vector_norm(reference, dim=-1)
            rows.append(dict(estimator=name, K=K, rel_error_median=float(err.median()), rel_error_mean=float(err.mean()),
                             rel_error_max=float(err.max()), seconds=seconds))
            log(f"accuracy {name:14s} K={K:4d}: median rel. error {float(err.median()):.3e}")
    table = accuracy_table(rows, Ks, list(estimators))
    payload = dict(claim="accuracy",
                   reference=("IFT gradient at v* from SGD then 8 Newton steps (newton_polish), "
                              "H x = dF/dv solved densely (ibaml.core.linalg.Dense)"),
                   config=dict(network=f"MLP 1-{hidden[0]}-{hidden[1]}-1 (tanh)", dtype="float64", inference="MAP",
                               prior=f"IsotropicGaussian(precision={args.precision}, learnable)",
                               inner_optimizer=f"SGD(lr={lr})", reference_sgd_steps=args.reference_steps,
                               lazy="Lazy(leap=1.0, teacher_lr=inner lr)", shots=10, query=10, tasks=num_tasks,
                               Ks=Ks, quick=args.quick, meta_parameters=names),
                   reference_stationarity=stationarity, rows=rows, table=table)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in estimators:
        sel = [r for r in rows if r["estimator"] == name]
        ax.plot([r["K"] for r in sel], [r["rel_error_median"] for r in sel], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="inner steps K", ylabel="relative error (median over tasks)",
           title=f"meta-gradient error vs exact IFT (λ={args.precision:g}, SGD lr={lr:g})")
    ax.legend(fontsize=8)
    write(out_dir, "accuracy", payload, fig)
    print(table)
    return payload


def accuracy_table(rows, Ks, names):
    lines = ["| K | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for K in Ks:
        cells = [f"{next(r for r in rows if r['K'] == K and r['estimator'] == n)['rel_error_median']:.2e}"
                 for n in names]
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- horizon
#: (method, K): exact unrolled MAML's K-curve first (the control), then the estimators that do
#: not backpropagate through the K steps
HORIZON_RUNS = [("maml", 1), ("maml", 5), ("maml", 20), ("maml", 50), ("lazy", 5), ("lazy", 20), ("lazy", 50),
                ("imaml", 5), ("imaml", 20), ("imaml", 50), ("ibaml", 5), ("ibaml", 20), ("ibaml", 50)]
QUICK_HORIZON_RUNS = [("maml", 1), ("maml", 5), ("lazy", 5), ("imaml", 5), ("ibaml", 5)]


def horizon_learner(method: str, K: int, lr: float, meta_lr: float, precision: float, seed: int, device, dtype):
    """A horizon learner: MLP 1-40-40-1, the observation noise fixed at σ = 1 (so the inner
    step does not change scale as a learned noise would), ``K`` SGD steps of size ``lr`` on
    the summed support NLL from the meta-learned start, the meta-parameters at ``meta_lr``.
    iMAML: a prior ``N(μ, λ⁻¹I)`` over every weight; iBaML: ``N(μ, diag σ²)`` over every
    weight with σ = 0.1 and the KL weighted ``β = λσ²`` (the same pull on the mean), two
    antithetic draws; both with the implicit gradient (CG 5)."""
    torch.manual_seed(seed)
    net = mlp((40, 40)).to(device=device, dtype=dtype)
    likelihood = ibaml.GaussianLikelihood(1.0, learn_noise=False).to(device=device, dtype=dtype)
    options = dict(inner_steps=K, inner_optimizer="sgd", inner_lr=lr, include="all", meta_lr=meta_lr, seed=seed,
                   nonfinite="skip")
    if method == "imaml":
        options.update(precision=precision)
    elif method == "ibaml":
        scale = 0.1
        options.update(init_scale=scale, kl_weight=precision * scale ** 2, num_samples=2, antithetic=True)
    return ibaml.build_learner(method, net, likelihood, **options)


def horizon_claim(args, out_dir: Path) -> dict:
    dtype = torch.float32
    device = torch.device(args.device)
    meta_iters = 3 if args.quick else args.meta_iters
    eval_tasks = 20 if args.quick else args.eval_tasks
    meta_batch = 4 if args.quick else args.horizon_meta_batch
    seeds = [args.seed] if args.quick else list(range(args.seed, args.seed + args.seeds))
    runs = QUICK_HORIZON_RUNS if args.quick else HORIZON_RUNS
    if args.runs:
        runs = [(m.strip(), int(k)) for m, k in (pair.split(":") for pair in args.runs.split(","))]
    tasks = sine_tasks(10, 10)
    test = tasks.sample(eval_tasks, torch.Generator().manual_seed(10_000), dtype=dtype).to(device)
    hyper = dict(lr=args.horizon_lr, meta_lr=args.meta_lr, precision=args.horizon_precision)
    rows = []
    for method, K in runs:
        per_seed = []
        for seed in seeds:
            learner = horizon_learner(method, K, seed=seed, device=device, dtype=dtype, **hyper)
            before = learner.evaluate(test).metrics["mse"]["mean"] if seed == seeds[0] else None
            gen = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            for _ in range(meta_iters):
                learner.meta_step(tasks.sample(meta_batch, gen, dtype=dtype).to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            metrics = learner.evaluate(test).metrics
            per_seed.append(dict(seed=seed, mse=metrics["mse"]["mean"], mse_ci95=metrics["mse"]["ci95"],
                                 nll=metrics["nll"]["mean"], seconds=seconds,
                                 ms_per_meta_iter=1000 * seconds / meta_iters, skipped_tasks=learner.skipped_tasks))
            if before is not None:
                per_seed[-1]["mse_before_meta_training"] = before
            log(f"horizon {method:6s} K={K:3d} seed={seed}: mse {per_seed[-1]['mse']:.3f} "
                f"({per_seed[-1]['ms_per_meta_iter']:.0f} ms / meta-iteration)")
        mses = torch.tensor([r["mse"] for r in per_seed], dtype=torch.float64)
        memory = run_memory_config(dict(kind="horizon", method=method, K=K, meta_batch=meta_batch, device=args.device,
                                        dtype="float32", threads=args.threads, repeats=1, build=hyper))
        rows.append(dict(method=method, K=K, mse=float(mses.mean()),
                         mse_seed_std=float(mses.std()) if len(per_seed) > 1 else 0.0,
                         nll=sum(r["nll"] for r in per_seed) / len(per_seed),
                         ms_per_meta_iter=sum(r["ms_per_meta_iter"] for r in per_seed) / len(per_seed),
                         peak_mb=memory["peak_mb"], mse_before_meta_training=per_seed[0]["mse_before_meta_training"],
                         seeds=per_seed))
    config = dict(network="MLP 1-40-40-1", shots=10, query=10, meta_batch=meta_batch, meta_iterations=meta_iters,
                  meta_lr=args.meta_lr, seeds=seeds, eval_tasks=eval_tasks, noise="fixed at 1",
                  inner_optimizer=f"SGD(lr={args.horizon_lr}) on the summed NLL", eval_inner_steps="same as training K",
                  precision=args.horizon_precision, learners="benchmarks/claims.py horizon_learner",
                  threads=args.threads, quick=args.quick)
    return horizon_outputs(rows, config, args, out_dir)


def horizon_outputs(rows, payload_config, args, out_dir: Path) -> dict:
    """Write ``horizon.json`` and ``horizon.png`` for ``rows``; print the table."""
    table = horizon_table(rows)
    payload = dict(claim="horizon", device=args.device, config=payload_config,
                   metric_note="mse / nll: mean over seeds of the per-task mean over the evaluation tasks; "
                               "mse_seed_std: standard deviation over seeds; peak_mb: peak resident-set growth of "
                               "one meta-iteration in a fresh process (as the memory claim)",
                   rows=rows, table=table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"maml": "C3", "lazy": "C2", "imaml": "C0", "ibaml": "C1"}
    for method, color in colors.items():
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["K"])
        if not sel:
            continue
        Ks = [r["K"] for r in sel]
        axes[0].errorbar(Ks, [r["mse"] for r in sel], yerr=[r["mse_seed_std"] for r in sel], color=color,
                         marker="o", capsize=3, label=method + (" (exact unrolled)" if method == "maml" else ""))
        axes[1].plot(Ks, [r["peak_mb"] for r in sel], color=color, marker="o", label=method)
        axes[2].plot(Ks, [r["ms_per_meta_iter"] for r in sel], color=color, marker="o", label=method)
    iters = payload_config["meta_iterations"]
    axes[0].set(xscale="log", yscale="log", xlabel="inner steps K", ylabel="10-shot MSE (± std over seeds)",
                title=f"accuracy after {iters} meta-iterations")
    axes[1].set(xscale="log", xlabel="inner steps K", ylabel="MiB", title="peak memory of a meta-iteration")
    axes[2].set(xscale="log", xlabel="inner steps K", ylabel="ms", title="time per meta-iteration")
    axes[0].legend(fontsize=8)
    write(out_dir, "horizon", payload, fig)
    print(table)
    return payload


def merge_horizon(args, out_dir: Path) -> dict:
    """One horizon table and figure from the ``horizon.json`` of runs split with ``--runs``."""
    parts = [json.loads((Path(d) / "horizon.json").read_text()) for d in args.merge]
    configs = [p["config"] for p in parts]
    if any(c != configs[0] for c in configs[1:]):
        raise SystemExit("error: --merge: the parts were run with different configurations")
    order = {run: i for i, run in enumerate(HORIZON_RUNS)}
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: order.get((r["method"], r["K"]), len(order)))
    return horizon_outputs(rows, configs[0], args, out_dir)


def horizon_table(rows):
    lines = ["| method | K | MSE (± std over seeds) | MSE before meta-training | NLL | ms / meta-iter | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['K']} | {r['mse']:.3f} ± {r['mse_seed_std']:.3f} | "
                     f"{r['mse_before_meta_training']:.3f} | {r['nll']:.3f} | {r['ms_per_meta_iter']:.0f} | "
                     f"{r['peak_mb']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- recipes
#: the sine recipes over every weight: explicit controls first, then the implicit ones
RECIPE_METHODS = ("maml", "abml-all", "imaml-gd", "imaml-hf", "ibaml-all", "ibaml-hf")
RECIPE_KS = (5, 10, 20, 50, 100)
#: the implicit recipes' memory at the largest K over that at the smallest: the claim's bound
FLAT_MEMORY_BOUND = 1.1


def recipe_learner(method: str, K: int, meta_batch: int, device, dtype):
    """The sine example's learner for ``method`` with ``K`` inner steps in meta-training and
    evaluation (the shared learned noise; the recipe's other settings as the example's
    defaults)."""
    from ibaml.recipes.sine_presets import sine_learner_from_config, sine_run_config

    config = sine_run_config(method, noise="shared", inner_steps=K, eval_inner_steps=K, meta_batch=meta_batch,
                             dtype=str(dtype).removeprefix("torch."))
    return sine_learner_from_config(config, device=device, dtype=dtype)


def recipes_claim(args, out_dir: Path) -> dict:
    """Peak memory and time of one meta-iteration of each sine recipe over every weight against
    ``K`` (:data:`RECIPE_KS`), each in ``--memory-trials`` fresh processes (as the memory claim;
    the median peak and time, every trial's peak in ``peak_mb_trials``: the resident set moves by
    a few MiB between identical processes): ``recipes.json``, ``recipes.png``, a table."""
    Ks = (5, 20) if args.quick else RECIPE_KS
    methods = ("maml", "imaml-hf") if args.quick else RECIPE_METHODS
    meta_batch = 5 if args.quick else args.meta_batch
    repeats = 1 if args.quick else 2
    trials = 1 if args.quick else args.memory_trials
    rows = []
    for method in methods:
        for K in Ks:
            cfg = dict(kind="recipe", method=method, K=K, meta_batch=meta_batch, device=args.device, dtype="float32",
                       threads=args.threads, repeats=repeats, tensor_peak=True)
            res = [run_memory_config(cfg) for _ in range(trials)]
            median = lambda key: sorted(r[key] for r in res)[len(res) // 2]
            rows.append(dict(method=method, K=K, tensor_peak_mb=median("tensor_peak_mb"), peak_mb=median("peak_mb"),
                             seconds=median("seconds"), tensor_peak_mb_trials=[r["tensor_peak_mb"] for r in res],
                             peak_mb_trials=[r["peak_mb"] for r in res], skipped_tasks=res[0]["skipped_tasks"]))
            log(f"recipes {method:9s} K={K:3d}: tensors {rows[-1]['tensor_peak_mb']:8.3f} MB, resident set "
                f"{rows[-1]['peak_mb']:8.1f} MB (trials {sorted(rows[-1]['peak_mb_trials'])}) {rows[-1]['seconds']:.3f} s")
    summary = recipe_summary(rows)
    table = recipe_table(rows, summary)
    payload = dict(claim="recipes", device=args.device, torch=torch.__version__,
                   tensor_memory_measure=_memory_measure(args.device, tensors=True),
                   memory_measure=_memory_measure(args.device),
                   config=dict(network="MLP 1-40-40-1", meta_batch=meta_batch, shots=10, query=10, dtype="float32",
                               noise="shared", learners="benchmarks/claims.py recipe_learner "
                               "(ibaml.recipes.sine_presets.sine_learner_from_config, inner_steps = eval_inner_steps = K)",
                               Ks=list(Ks), repeats=repeats, memory_trials=trials, threads=args.threads,
                               quick=args.quick,
                               flat_memory_bound=FLAT_MEMORY_BOUND),
                   rows=rows, summary=summary, table=table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, method in enumerate(methods):
        sel = [r for r in rows if r["method"] == method]
        style = "--" if method in EXPLICIT_RECIPES else "-"
        for ax, key in zip(axes, ("tensor_peak_mb", "peak_mb", "seconds")):
            ax.plot([r["K"] for r in sel], [r[key] for r in sel], style, color=f"C{i}", marker="o", label=method)
    axes[0].set(xscale="log", yscale="log", xlabel="inner steps K", ylabel="peak of the tensors (MiB)",
                title="tensor memory of a meta-iteration")
    axes[1].set(xscale="log", yscale="log", xlabel="inner steps K", ylabel="peak resident set growth (MiB)",
                title="process memory of a meta-iteration")
    axes[2].set(xscale="log", yscale="log", xlabel="inner steps K", ylabel="seconds",
                title="time of a meta-iteration")
    axes[0].legend(fontsize=8)
    write(out_dir, "recipes", payload, fig)
    print(table)
    return payload


#: the recipes that backpropagate through their inner steps
EXPLICIT_RECIPES = ("maml", "abml-all")


def recipe_summary(rows) -> dict:
    """Per method: the peak of its tensors and of the process's resident set at the smallest
    and the largest ``K``, their ratios ``peak(K_max) / peak(K_min)``, the least-squares slopes
    on ``K``, and (implicit recipes) whether the tensors' ratio is within
    :data:`FLAT_MEMORY_BOUND` (``flat``): the claim is about the memory the method's tensors
    need; the resident set adds the allocator's caching and Python's objects, which move by a
    few MiB between identical processes."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["K"])
        first, last = sel[0], sel[-1]
        entry = {"K_min": first["K"], "K_max": last["K"],
                 "estimator": "explicit" if method in EXPLICIT_RECIPES else "implicit"}
        for prefix, key in (("tensor_", "tensor_peak_mb"), ("", "peak_mb")):
            ratio = last[key] / first[key] if first[key] > 0 else float("inf")
            entry.update({f"{key}_at_K_min": first[key], f"{key}_at_K_max": last[key], f"{prefix}peak_ratio": ratio,
                          f"{prefix}mb_per_step": _slope([(r["K"], r[key]) for r in sel]),
                          f"{prefix}trials_at_K_min": _span(first, key), f"{prefix}trials_at_K_max": _span(last, key)})
        if method not in EXPLICIT_RECIPES:
            entry["flat"] = entry["tensor_peak_ratio"] <= FLAT_MEMORY_BOUND
        summary[method] = entry
    return summary


def _span(row, key: str) -> list:
    """``[min, max]`` of a configuration's ``key`` (a peak) over its trials."""
    trials = row.get(f"{key}_trials", [row[key]])
    return [min(trials), max(trials)]


def recipe_table(rows, summary) -> str:
    Ks = sorted({r["K"] for r in rows})
    lines = ["| method | estimator | " + " | ".join(f"K={K}: tensors MiB / process MiB / s" for K in Ks)
             + " | tensors at max K ÷ at min K | process at max K ÷ at min K |",
             "|---|---|" + "---:|" * (len(Ks) + 2)]
    for method, entry in summary.items():
        cells = []
        for K in Ks:
            r = next((r for r in rows if r["method"] == method and r["K"] == K), None)
            cells.append("" if r is None else f"{r['tensor_peak_mb']:.2f} / {r['peak_mb']:.1f} / {r['seconds']:.2f}")
        lines.append(f"| {method} | {entry['estimator']} | " + " | ".join(cells)
                     + f" | {entry['tensor_peak_ratio']:.3f} | {entry['peak_ratio']:.3f} |")
    return "\n".join(lines)


def recipe_findings(summary: dict) -> str:
    """One line per recipe: the peak of its tensors at the smallest and the largest ``K`` and
    their ratio, for the implicit recipes whether that is flat (within
    :data:`FLAT_MEMORY_BOUND`), and the process's resident set beside it."""
    lines = []
    for method, e in summary.items():
        (a, b), (c, d) = e["trials_at_K_min"], e["trials_at_K_max"]
        head = (f"- {method} ({e['estimator']}): tensors {e['tensor_peak_mb_at_K_min']:.2f} MiB at K = {e['K_min']}, "
                f"{e['tensor_peak_mb_at_K_max']:.2f} MiB at K = {e['K_max']}, {e['tensor_peak_ratio']:.3f}×, "
                f"{e['tensor_mb_per_step']:.3f} MiB per step")
        if "flat" in e:
            verdict = "flat, held" if e["flat"] else "not flat, not held"
            head += f": {verdict} (bound {FLAT_MEMORY_BOUND}×)"
        head += (f"; process {e['peak_mb_at_K_min']:.1f} MiB (trials {a:.1f}–{b:.1f}), then {e['peak_mb_at_K_max']:.1f} "
                 f"MiB (trials {c:.1f}–{d:.1f}), {e['peak_ratio']:.3f}×")
        lines.append(head + ".")
    return "\n".join(lines)


def _memory_measure(device: str, tensors: bool = False) -> str:
    """What a peak means: on CUDA the allocator's count either way; on the CPU the resident set,
    or with ``tensors`` the allocator's live bytes (:func:`benchmarks._harness.cpu_tensor_peak`)."""
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated above the allocation before the meta-iteration"
    if tensors:
        return ("peak of the CPU allocator's live bytes above those before a meta-iteration (one more "
                "meta-iteration after the timed ones, its allocations and frees from torch.profiler with "
                "profile_memory=True: benchmarks/_harness.py cpu_tensor_peak)")
    return ("growth of peak resident set size (resource.getrusage ru_maxrss) of a fresh subprocess per "
            "configuration, from after a warm-up "
            "meta-iteration (1 task, 1 inner step) to after the first full meta-iteration")


# ----------------------------------------------------------------------------- main
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--claim", choices=CLAIMS + ("all",), default="all")
    p.add_argument("--out", default="runs/claims")
    p.add_argument("--quick", action="store_true", help="a smoke run of every claim (a minute or two)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--precision", type=float, default=30.0, help="accuracy: prior precision λ")
    p.add_argument("--accuracy-lr", type=float, default=0.002, help="accuracy: inner SGD learning rate")
    p.add_argument("--accuracy-width", type=int, default=20, help="accuracy: hidden width of the MLP")
    p.add_argument("--accuracy-tasks", type=int, default=8)
    p.add_argument("--reference-steps", type=int, default=3000, help="accuracy: SGD steps before Newton polishing")
    p.add_argument("--meta-iters", type=int, default=2000, help="horizon: meta-iterations per run")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="horizon: meta learning rate")
    p.add_argument("--eval-tasks", type=int, default=200, help="horizon: evaluation tasks")
    p.add_argument("--seeds", type=int, default=3, help="horizon: number of seeds")
    p.add_argument("--horizon-meta-batch", type=int, default=10, help="horizon: tasks per meta-iteration")
    p.add_argument("--horizon-lr", type=float, default=1e-3, help="horizon: inner SGD step on the summed NLL")
    p.add_argument("--horizon-precision", type=float, default=1.0,
                   help="horizon: iMAML's λ (and iBaML's β/σ²) over every weight")
    p.add_argument("--runs", default=None, help="horizon: comma-separated method:K pairs (default: all)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="horizon: join the horizon.json of runs split with --runs into --out")
    p.add_argument("--memory-trials", type=int, default=3,
                   help="recipes: fresh processes per configuration (the median peak is reported)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("threads", "meta_batch", "memory_trials", "accuracy_width", "accuracy_tasks", "reference_steps", "meta_iters",
                 "eval_tasks", "seeds", "horizon_meta_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("precision", "accuracy_lr", "meta_lr", "horizon_lr", "horizon_precision"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available on this machine")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return None
    out_dir = Path(args.out)
    if args.merge:
        return {"horizon": merge_horizon(args, out_dir)}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    claims = CLAIMS if args.claim == "all" else (args.claim,)
    results = {}
    try:
        for claim in claims:
            start = time.perf_counter()
            run = {"memory": memory_claim, "accuracy": accuracy_claim, "horizon": horizon_claim,
                   "recipes": recipes_claim}[claim]
            results[claim] = run(args, out_dir)
            log(f"{claim}: {time.perf_counter() - start:.0f} s")
    finally:
        torch.set_num_threads(threads)
    return results


if __name__ == "__main__":
    main()
