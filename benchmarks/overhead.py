"""Overhead of an implicit meta-iteration over its unit work, timed in the same run.

An implicit (iMAML) meta-iteration on a meta-batch of ``T`` tasks with ``K`` inner steps
and ``cg`` conjugate-gradient iterations is, at its core,

* ``K`` batched inner gradients ``vmap(∇_v G)`` (the SGD inner loop),
* ``cg`` batched Hessian-vector products ``vmap(u ↦ ∇²_vv G · u)`` (CG),
* one batched outer gradient ``vmap(∇_{v,θ} F)``.

Each unit is timed alone, vmapped over the same tasks with the same shapes, at the inner
solution. The CG products are timed as the estimator computes them: the gradient graph of
``∇_v G`` at ``v*`` built once (``vjp``), then ``cg`` reverse-over-reverse products through
it, each applied to the previous (normalised) product.
The meta-iteration is timed two ways in the same rounds (all functions run in turn, see
``benchmarks/_harness.py``):

* ``meta_step``: :meth:`ibaml.MetaLearner.meta_step` on the batch, as a user calls it
  (input validation, non-finite check and statistics included);
* ``meta_iteration``: ``meta_step(task, validate=False, check=False)`` on the prepared
  batch (no host read: the non-finite policy by masks).

``overhead = meta_step / (K·grad + cg·HVP + outer)``; the target is ≤ 1.5 on a GPU
(docs/results/speed_memory.md). The work the implicit estimator does beyond these units is
timed too and reported beside them: the gradient at the solution that gives the
diagnostics, and the cross product ``Bᵀx``. The number of compute operators one meta-iteration dispatches
(``operators_per_meta_iteration``; a lower bound on kernel launches on a GPU) is counted
as well: it does not depend on the machine's load.

    python -m benchmarks.overhead --device cuda
    python -m benchmarks.overhead --workload conv4 --meta-batch 32 --device cuda
    python -m benchmarks.overhead --quick

Writes ``DIR/overhead.json`` (with a ``summary``) and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ibaml.core.tree import FlatSpec

from . import _harness as H


def unit_functions(learner, task, K: int, cg: int):
    """The unit work and the extras, each a no-argument function vmapped over the tasks."""
    problem = learner.problem
    meta = learner.meta_params()
    vmap = lambda f: torch.func.vmap(f, chunk_size=learner.chunk_size)  # noqa: E731
    v_star = vmap(lambda t: problem.solve(meta, t)[0])(task)

    def grad_v(v, m, t):
        return torch.func.grad(lambda vv: problem.inner(vv, m, t))(v)

    def cg_products(v, u, t):
        """One gradient graph at ``v``, then ``cg`` products ``u ← H u / ||H u||`` through it."""
        spec = FlatSpec.from_dict(v)
        flat = lambda z: spec.flatten(grad_v(spec.unflatten(z), meta, t))  # noqa: E731
        _, pullback = torch.func.vjp(flat, spec.flatten(v))
        for _ in range(cg):
            u = pullback(u)[0]
            u = u / torch.linalg.vector_norm(u)
        return u

    def cross(v, u, t):
        spec = FlatSpec.from_dict(v)
        _, pullback = torch.func.vjp(lambda m: spec.flatten(grad_v(v, m, t)), meta)
        return pullback(u)[0]

    inner_grad = vmap(lambda v, t: grad_v(v, meta, t))
    batched_cg_products = vmap(cg_products)
    outer_grad = vmap(lambda v, t: torch.func.grad(problem.outer, argnums=(0, 1))(v, meta, t))
    batched_cross = vmap(cross)
    u = torch.ones_like(FlatSpec.from_dict({k: x[0] for k, x in v_star.items()}).flatten(
        {k: x[0] for k, x in v_star.items()})).expand(task["support_x"].shape[0], -1).contiguous()

    def repeat(fn, n):
        def run():
            for _ in range(n):
                fn()
        return run

    units = {
        "inner_gradients": repeat(lambda: inner_grad(v_star, task), K),
        "cg_hvps": lambda: batched_cg_products(v_star, u, task),
        "outer_gradient": lambda: outer_grad(v_star, task),
    }
    extras = {
        "gradient_at_solution": lambda: inner_grad(v_star, task),
        "cross_vjp": lambda: batched_cross(v_star, u, task),
    }
    return units, extras


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, "runs/overhead")
    p.add_argument("--workload", default="sine", choices=H.WORKLOADS)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64, help="Conv4 channels")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.inner_steps = 2, 1, 3
        args.hidden, args.image_size = 4, 16
    device, dtype = H.setup(args)
    T, K, cg = args.meta_batch, args.inner_steps, args.cg_steps
    learner = H.build_learner(args.workload, "implicit", K, cg, device, dtype, hidden=args.hidden,
                              image_size=args.image_size, chunk_size=args.chunk_size)
    batch = H.make_batch(args.workload, T, dtype, device, image_size=args.image_size)
    task = H.prepare(learner, batch)
    units, extras = unit_functions(learner, task, K, cg)
    fns = {**units, **extras, "meta_iteration": H.meta_iteration(learner, task, "vmap"),
           "meta_step": lambda: learner.meta_step(batch)}
    times = H.time_interleaved(fns, device, args.repeats, warmup=args.warmup)
    operators = H.count_operators(fns["meta_iteration"])
    ms = {name: 1000 * H.median(ts) for name, ts in times.items()}
    units_total = sum(ms[k] for k in units)
    extras_total = sum(ms[k] for k in extras)
    result = {**H.environment(device), "workload": args.workload, "meta_batch": T, "inner_steps": K, "cg_steps": cg,
              "repeats": args.repeats, "ms": ms, "ms_units_total": units_total, "ms_extras_total": extras_total,
              "overhead_ratio": ms["meta_step"] / units_total,
              "overhead_ratio_meta_iteration": ms["meta_iteration"] / units_total,
              "overhead_ratio_with_extras": ms["meta_step"] / (units_total + extras_total),
              "operators_per_meta_iteration": operators}
    result["summary"] = [H.target("overhead_ratio", f"{args.workload} T={T}, K={K}, CG {cg}: meta_step / "
                                  "(K grads + CG HVPs + outer grad)", 1.5, result["overhead_ratio"], "lower",
                                  "cuda", device)]
    H.write_json(Path(args.out), "overhead.json", result)
    rows = [[f"{name} ({kind})", f"{ms[name]:.2f}"] for kind, group in (("unit", units), ("extra", extras))
            for name in group]
    rows += [["units total", f"{units_total:.2f}"], ["extras total", f"{extras_total:.2f}"],
             ["meta_iteration (meta_step without host reads)", f"{ms['meta_iteration']:.2f}"],
             ["meta_step (MetaLearner.meta_step)", f"{ms['meta_step']:.2f}"],
             ["overhead: meta_step / units", f"{result['overhead_ratio']:.2f}"],
             ["meta_iteration / units", f"{result['overhead_ratio_meta_iteration']:.2f}"],
             ["meta_step / (units + extras)", f"{result['overhead_ratio_with_extras']:.2f}"],
             ["compute operators per meta_iteration", operators["compute"]]]
    print(H.markdown(["part", "ms"], rows))
    print()
    print(H.summary_table(result["summary"]))
    return result


if __name__ == "__main__":
    main()
