"""Overhead of an implicit meta-iteration over its unit work, timed in the same run.

A meta-iteration of the implicit estimator on a meta-batch of T tasks does

* K batched inner gradients ``vmap(∇_v G)``,
* ``cg`` batched Hessian-vector products (plus the one cross VJP ``Bᵀx``),
* one batched outer gradient ``vmap(∇_{v,θ} F)``.

This script times each of these alone (vmapped over the same tasks, same shapes) and
the full ``MetaLearner.meta_step``, and reports ``overhead = meta_step / Σ units``.

    python benchmarks/overhead.py --device cuda
    python benchmarks/overhead.py --quick

Writes ``DIR/overhead.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import ibaml
import priors
from ibaml.tree import FlatSpec


def timeit(fn, sync, repeats):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/overhead")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 3
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1)).to(device=device, dtype=dtype)
    likelihood = ibaml.GaussianLikelihood(1.0, learn_noise=True).to(device=device, dtype=dtype)
    learner = ibaml.MetaLearner(net, priors.IsotropicGaussian.from_module(net, precision=100.0), likelihood,
                                method="map", estimator=ibaml.Implicit(ibaml.linalg.CG(max_iter=args.cg_steps)),
                                inner_optimizer=ibaml.optim.SGD(lr=0.001), inner_steps=args.inner_steps)
    gen = torch.Generator().manual_seed(0)
    T = args.meta_batch
    amp = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * math.pi
    x = torch.rand(T, 20, 1, generator=gen, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x - phase)
    batch = {k: v.to(device) for k, v in
             dict(support_x=x[:, :10], support_y=y[:, :10], query_x=x[:, 10:], query_y=y[:, 10:]).items()}
    task = learner._prepare(batch)
    meta = learner.meta_params()
    problem = learner.problem
    v0 = torch.func.vmap(lambda t: problem.init(meta))(task)

    inner_grad = torch.func.vmap(lambda v, t: torch.func.grad(lambda vv: problem.inner(vv, meta, t))(v))
    outer_grad = torch.func.vmap(lambda v, t: torch.func.grad(problem.outer, argnums=(0, 1))(v, meta, t))

    def hvps(v, t):
        spec = FlatSpec.from_dict(v)
        flat = spec.flatten(v)
        grad_flat = lambda z: spec.flatten(torch.func.grad(lambda vv: problem.inner(vv, meta, t))(spec.unflatten(z)))
        _, vjp = torch.func.vjp(grad_flat, flat)
        u = torch.ones_like(flat)
        for _ in range(args.cg_steps + 1):  # CG iterations plus the final residual
            u = vjp(u)[0]
        _, cross = torch.func.vjp(lambda m: spec.flatten(torch.func.grad(lambda vv: problem.inner(vv, m, t))(v)), meta)
        return cross(u)

    t_grads = timeit(lambda: [inner_grad(v0, task) for _ in range(args.inner_steps + 1)], sync, args.repeats)
    t_hvps = timeit(lambda: torch.func.vmap(hvps)(v0, task), sync, args.repeats)
    t_outer = timeit(lambda: outer_grad(v0, task), sync, args.repeats)
    t_step = timeit(lambda: learner.meta_step(batch), sync, args.repeats)
    units = t_grads + t_hvps + t_outer
    result = {"device": str(device), "torch": torch.__version__, "meta_batch": T, "inner_steps": args.inner_steps,
              "cg_steps": args.cg_steps, "ms_inner_gradients": 1000 * t_grads, "ms_hvps_and_cross": 1000 * t_hvps,
              "ms_outer_gradient": 1000 * t_outer, "ms_units_total": 1000 * units, "ms_meta_step": 1000 * t_step,
              "overhead_ratio": t_step / units}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    print("| part | ms |\n|---|---|")
    for key in ("ms_inner_gradients", "ms_hvps_and_cross", "ms_outer_gradient", "ms_units_total", "ms_meta_step"):
        print(f"| {key[3:]} | {result[key]:.2f} |")
    print(f"| overhead ratio | {result['overhead_ratio']:.2f} |")
    return result


if __name__ == "__main__":
    main()
