"""Time and peak memory per meta-iteration versus inner steps K.

Compares explicit (unrolled) and implicit (CG) meta-gradients, each computed with
``torch.func.vmap`` over the tasks of a meta-batch and with a Python loop over tasks,
on the sine MLP (1-40-40-1) and on Conv4 (5-way 1-shot, 15 query, 84×84 inputs).

    python benchmarks/scaling.py --device cuda --out runs/scaling
    python benchmarks/scaling.py --quick            # a CPU smoke run

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the growth of the
process's peak resident set size, measured in a fresh child process per configuration.
Writes ``DIR/scaling.json`` and ``DIR/scaling.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

import ibaml
import priors


def sine_batch(T, gen, dtype, device, shots=10, query=10):
    amp = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * math.pi
    x = torch.rand(T, shots + query, 1, generator=gen, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x - phase)
    batch = {"support_x": x[:, :shots], "support_y": y[:, :shots], "query_x": x[:, shots:], "query_y": y[:, shots:]}
    return {k: v.to(device) for k, v in batch.items()}


def image_batch(T, gen, dtype, device, ways=5, shots=1, query=15, size=84):
    def part(n):
        x = torch.randn(T, ways * n, 3, size, size, generator=gen, dtype=dtype)
        y = torch.arange(ways).repeat_interleave(n).expand(T, -1).clone()
        return x, y

    sx, sy = part(shots)
    qx, qy = part(query)
    return {k: v.to(device) for k, v in dict(support_x=sx, support_y=sy, query_x=qx, query_y=qy).items()}


def build(workload, estimator_name, K, cg_steps, device, dtype):
    torch.manual_seed(0)
    if workload == "sine":
        from ibaml.models import MLP

        net = MLP(1, (40, 40), 1)
        likelihood = ibaml.GaussianLikelihood(1.0, learn_noise=True)
        num_classes = None
    else:
        from ibaml.models import Conv4

        net = Conv4(in_channels=3, hidden=64, out_dim=5, image_size=84)
        likelihood = ibaml.CategoricalLikelihood()
        num_classes = 5
    net = net.to(device=device, dtype=dtype)
    likelihood = likelihood.to(device=device, dtype=dtype)
    prior = priors.IsotropicGaussian.from_module(net, precision=100.0)
    estimator = ibaml.Explicit() if estimator_name == "explicit" else ibaml.Implicit(ibaml.linalg.CG(max_iter=cg_steps))
    return ibaml.MetaLearner(net, prior, likelihood, method="map", estimator=estimator,
                             inner_optimizer=ibaml.optim.SGD(lr=0.001), inner_steps=K, num_classes=num_classes)


def meta_iteration(learner, batch, mode):
    """One meta-gradient: vmapped over tasks, or a Python loop over tasks."""
    if mode == "vmap":
        return learner.meta_gradient(batch)[1]
    task = learner._prepare(batch)
    meta = learner.meta_params()
    T = task["support_x"].shape[0]
    total = None
    for t in range(T):
        out = learner.estimator.task_gradient(learner.problem, meta, {k: v[t] for k, v in task.items()})
        total = out.grads if total is None else {k: total[k] + out.grads[k] for k in total}
    return {k: v / T for k, v in total.items()}


def measure(config):
    """Runs in a child process on the CPU (fresh peak RSS) or in-process on CUDA."""
    workload, estimator_name, mode, K, T, cg_steps, device, dtype_name, repeats = config
    device = torch.device(device)
    dtype = getattr(torch, dtype_name)
    learner = build(workload, estimator_name, K, cg_steps, device, dtype)
    gen = torch.Generator().manual_seed(0)
    make = sine_batch if workload == "sine" else image_batch
    batch = make(T, gen, dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    meta_iteration(learner, batch, mode)  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        meta_iteration(learner, batch, mode)
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    return {"workload": workload, "estimator": estimator_name, "mode": mode, "K": K, "meta_batch": T,
            "ms": 1000 * times[len(times) // 2], "peak_bytes": int(peak), "tasks_per_s": T / times[len(times) // 2]}


def _child(config, queue):
    queue.put(measure(config))


def run_config(config):
    if config[6].startswith("cuda"):
        return measure(config)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(config, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["workload"], r["estimator"], r["mode"], r["meta_batch"]) for r in results})
    for key in keys:
        rows = sorted((r for r in results if (r["workload"], r["estimator"], r["mode"], r["meta_batch"]) == key),
                      key=lambda r: r["K"])
        label = f"{key[0]} {key[1]} {key[2]} T={key[3]}"
        axes[0].plot([r["K"] for r in rows], [r["ms"] for r in rows], marker="o", label=label)
        axes[1].plot([r["K"] for r in rows], [r["peak_bytes"] / 2 ** 20 for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("time per meta-iteration (ms)", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("inner steps K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--workloads", default="sine,conv4")
    p.add_argument("--steps", default="1,5,10,20,50,100")
    p.add_argument("--meta-batches", default="4,32")
    p.add_argument("--modes", default="vmap,loop")
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="sine only, K in {1, 5, 20}, meta-batch 8")
    p.add_argument("--out", default="runs/scaling")
    args = p.parse_args(argv)
    if args.quick:
        args.workloads, args.steps, args.meta_batches, args.repeats = "sine", "1,5,20", "8", 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for workload in args.workloads.split(","):
        batches = [25] if workload == "sine" and not args.quick else [int(t) for t in args.meta_batches.split(",")]
        for T in batches:
            for mode in args.modes.split(","):
                for estimator in ("explicit", "implicit"):
                    for K in (int(k) for k in args.steps.split(",")):
                        config = (workload, estimator, mode, K, T, args.cg_steps, args.device, args.dtype, args.repeats)
                        r = run_config(config)
                        results.append(r)
                        print(f"{workload:6s} {estimator:8s} {mode:4s} T={T:3d} K={K:4d} {r['ms']:9.1f} ms "
                              f"{r['peak_bytes'] / 2 ** 20:9.1f} MiB", flush=True)
    ratio = {}
    for r in results:
        if r["mode"] == "vmap":
            twin = [q for q in results if q["mode"] == "loop" and
                    (q["workload"], q["estimator"], q["K"], q["meta_batch"]) ==
                    (r["workload"], r["estimator"], r["K"], r["meta_batch"])]
            if twin:
                ratio[f"{r['workload']}/{r['estimator']}/T={r['meta_batch']}/K={r['K']}"] = twin[0]["ms"] / r["ms"]
    payload = {"device": str(args.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "memory_method": "cuda.max_memory_allocated" if args.device.startswith("cuda")
               else "peak resident set size of a fresh child process (interpreter and torch included)", "results": results, "loop_over_vmap_time_ratio": ratio}
    (out / "scaling.json").write_text(json.dumps(payload, indent=2))
    plot(results, out / "scaling.png")
    print("\n| workload | estimator | mode | T | K | ms / meta-iter | peak MiB |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['estimator']} | {r['mode']} | {r['meta_batch']} | {r['K']} | {r['ms']:.1f} | "
              f"{r['peak_bytes'] / 2 ** 20:.1f} |")
    print("\nloop / vmap time ratio:", json.dumps({k: round(v, 2) for k, v in ratio.items()}))
    return payload


if __name__ == "__main__":
    main()
