"""Where one task's implicit meta-gradient spends its memory, phase by phase.

    python -m benchmarks.memory_profile --device cpu --out docs/results/cpu/memory_profile

One task of the Conv4 workload (``_harness``: Conv4-``hidden`` on ``image_size``² images,
5-way 1-shot, MAP with iMAML's isotropic prior over every weight, ``K`` SGD inner steps, CG)
and the peak memory above the allocation before each call (``_harness.peak_memory``) of:

* ``inner solve``: the ``K`` inner steps on the support set, without a graph;
* ``query pass``: ``F(v*, θ)`` and its gradients ``(∂_v F, ∂_θ F)`` on the query set;
* ``implicit solve``: CG on ``H x = ∂_v F`` (Hessian-vector products on the support set) and ``Bᵀ x``;
* ``task gradient``: the estimator's whole per-task meta-gradient (all of the above);

and the query pass again with the first ``n`` query images only, ``n`` in ``--query-sizes``,
to show how it grows with the query set. Writes ``memory_profile.json`` and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ibaml.core.implicit_function import implicit_vjp_at_solution

from . import _harness as H


def profile(learner, task, device, query_sizes) -> tuple:
    """Peak bytes of each phase of one task's implicit meta-gradient, and of the query pass
    with the first ``n`` query images for each ``n`` in ``query_sizes``."""
    problem, meta = learner.problem, learner.meta_params()
    v_star, _ = problem.solve(meta, task, differentiable=False, diagnose=False)
    outer_grads = torch.func.grad_and_value(problem.outer, argnums=(0, 1))
    grad_v = outer_grads(v_star, meta, task)[0][0]
    estimator = learner.estimator
    phases = {
        "inner solve": lambda: problem.solve(meta, task, differentiable=False, diagnose=False),
        "query pass": lambda: outer_grads(v_star, meta, task),
        "implicit solve": lambda: implicit_vjp_at_solution(lambda v, m: problem.inner(v, m, task), v_star, meta,
                                                           grad_v, solver=estimator.solver),
        "task gradient": lambda: estimator.task_gradient(problem, meta, task),
    }
    for n in query_sizes:
        sub = dict(task, query_x=task["query_x"][:n], query_y=task["query_y"][:n])
        phases[n] = lambda sub=sub: outer_grads(v_star, meta, sub)
    out = {}
    for name, fn in phases.items():
        fn()   # warm-up
        out[name] = H.peak_memory(fn, device)
    sweep = {n: out.pop(n) for n in query_sizes}
    return out, sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(p, "runs/bench/memory_profile")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--query-sizes", default="15,30,45,75", help="query images of the query-pass sweep")
    args = p.parse_args(argv)
    device, dtype = H.setup(args)
    if args.quick:
        args.hidden, args.image_size, args.query_sizes = 8, 16, "15,75"
    learner = H.build_learner("conv4", "implicit", args.inner_steps, args.cg_steps, device, dtype,
                              hidden=args.hidden, image_size=args.image_size)
    batch = H.make_batch("conv4", 1, dtype, device, image_size=args.image_size)
    task = {k: v[0] for k, v in H.prepare(learner, batch).items()}
    phases, sweep = profile(learner, task, device, [int(n) for n in args.query_sizes.split(",")])
    payload = {**H.environment(device), "memory_method": H.memory_method(device), "config": vars(args),
               "task": {"ways": 5, "shots": 1, "query_images": int(task["query_x"].shape[0]),
                        "support_images": int(task["support_x"].shape[0])},
               "phases_bytes": phases, "query_pass_bytes_by_query_images": sweep}
    path = H.write_json(Path(args.out), "memory_profile.json", payload)
    fmt = lambda b: "—" if b is None else f"{b / H.GB:.3f}"
    print(H.markdown(["phase (one task)", "peak GB"], [(k, fmt(v)) for k, v in phases.items()]))
    print()
    print(H.markdown(["query images", "query pass peak GB"], [(n, fmt(v)) for n, v in sweep.items()]))
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
