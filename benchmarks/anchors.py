"""ibaml beside two public meta-learning libraries on the same workload, in one run.

Workloads (as in ``benchmarks/scaling.py``): ``conv4``, Conv4 with ``hidden`` channels on
5-way 1-shot episodes with 15 query images per class (``image_size``², random pixels), loss
the cross-entropy; ``sine``, the MLP(1, 40, 40, 1) on 10-shot sine tasks with 10 query points,
loss the Gaussian NLL at unit noise, ``½(f − y)²`` up to a constant. Meta-batch ``T``; MAP
inner problem ``G(w, θ) = Σ_support loss(f(x; w), y) + (λ/2)‖w − θ‖²`` (λ = 100, every
network weight adapted), ``K`` SGD steps with learning rate 1e-3 from ``w = θ`` (``K`` from
the list ``--inner-steps``); outer loss the mean query loss; the meta-update is Adam on θ.

* **implicit** (iMAML): ibaml's :class:`ibaml.Implicit` (CG, ``cg`` iterations), vmapped
  over tasks and looped, against TorchOpt's ``torchopt.diff.implicit.custom_root`` with
  ``torchopt.linear_solve.solve_cg(maxiter=cg)`` (tolerance 0, so that it runs all ``cg``
  iterations), one task at a time (its solver is not batched over tasks);
* **explicit** (MAML with the same proximal term): ibaml's :class:`ibaml.Explicit`,
  vmapped and looped, against ``higher.innerloop_ctx`` (``copy_initial_weights=False``)
  with a differentiable ``torch.optim.SGD``, one task at a time.

Every implementation starts from the same θ. Before timing, one meta-gradient of each is
compared with ibaml's (relative error and cosine similarity) on exactly the configuration
that is timed: the same mathematics must give the same numbers, otherwise a timing
comparison means nothing. Where the inner Hessian at ``w_K`` is indefinite, ibaml's CG stops
at the first direction of non-positive curvature and TorchOpt's carries on, so the solves
can differ there by design; the check reports whether ibaml's CG ran all its iterations
(the system was positive definite along the way). ``--check-damping δ`` adds ``δI`` to both
solves of the check only (TorchOpt's ``ridge``), which is then no longer the timed
configuration. Then all
meta-iterations are timed in turn (``benchmarks/_harness.py``), and the ratio of each
library's time and peak memory to ibaml's is reported. A library that cannot be imported
is skipped with the reason; ibaml alone is then timed.

The JSON's ``table`` (printed too) puts, for each estimator and ``K``, ibaml looped (one
task at a time, as the other libraries run) and ibaml vmapped (all ``T`` tasks at once),
each with its time and peak memory, beside TorchOpt or higher, with the other library's
time and memory over each of ibaml's: the vmapped ibaml is faster on small networks because
it batches the tasks, and it holds every task's intermediates at once, so its peak is the
larger. Peak memory is the median of ``--memory-repeats`` calls.

    pip install torchopt==0.7.3 higher==0.2.1           # optional; torchopt needs optree, graphviz
    python -m benchmarks.anchors --device cuda --out runs/anchors
    python -m benchmarks.anchors --device cpu --workload sine --meta-batch 25 --inner-steps 5,10,20 --out runs/anchors_sine
    python -m benchmarks.anchors --quick

Writes ``DIR/anchors.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch.func import functional_call

from . import _harness as H

PRECISION = 100.0
INNER_LR = 1e-3


def try_import(name: str):
    """``(module, None)`` or ``(None, reason)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name), None
    except Exception as err:  # an installed library can fail at import time on a newer torch
        return None, f"{name} is not importable: {type(err).__name__}: {err}"


class Anchor:
    """A library's meta-iteration on its own copy of the network (same initial θ)."""

    def __init__(self, learner, task, meta_lr: float, workload: str = "conv4"):
        self.workload = workload
        self.net = copy.deepcopy(learner.model.net)
        self.names = learner.prior.names
        self.params = dict(self.net.named_parameters())
        self.task = task
        self.T = task["support_x"].shape[0]
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=meta_lr)

    def accumulate(self) -> None:
        """Add the mean meta-gradient over the tasks to the parameters' ``.grad``."""
        raise NotImplementedError

    def meta_gradient(self) -> torch.Tensor:
        """The flat meta-gradient ``[D]`` (in the prior's order), parameters unchanged."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulate()
        flat = torch.cat([self.params[n].grad.reshape(-1) for n in self.names])
        self.optimizer.zero_grad(set_to_none=True)
        return flat

    def iteration(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulate()
        self.optimizer.step()


def task_loss(workload: str, out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """The workload's loss, summed or averaged over the points: the cross-entropy (``conv4``)
    or the Gaussian NLL at unit noise without its constant, ``½(f − y)²`` (``sine``)."""
    if workload == "sine":
        return Fn.mse_loss(out, y, reduction=reduction) * 0.5
    return Fn.cross_entropy(out, y, reduction=reduction)


def inner_objective(net, names, w, theta, x, y, workload="conv4"):
    """``Σ loss(f(x; w), y) + (λ/2)‖w − θ‖²`` for tuples ``w``, ``θ`` in ``names`` order."""
    out = functional_call(net, dict(zip(names, w)), (x,))
    proximal = sum(((a - b) ** 2).sum() for a, b in zip(w, theta))
    return task_loss(workload, out, y, "sum") + 0.5 * PRECISION * proximal


class TorchOptImplicit(Anchor):
    """iMAML through ``torchopt.diff.implicit.custom_root``: the optimality condition is
    ``∇_w G(w, θ) = 0``; the decorated solver runs ``K`` SGD steps without a graph."""

    def __init__(self, learner, task, meta_lr, K: int, cg: int, ridge: float = 0.0, workload: str = "conv4"):
        super().__init__(learner, task, meta_lr, workload)
        from torchopt.diff.implicit import custom_root
        from torchopt.linear_solve import solve_cg

        net, names = self.net, self.names

        def optimality(w, theta, x, y):
            return torch.func.grad(lambda ww: inner_objective(net, names, ww, theta, x, y, workload))(w)

        linear_solver = solve_cg(maxiter=cg, rtol=0.0, atol=0.0, **({"ridge": ridge} if ridge else {}))

        @custom_root(optimality, argnums=1, solve=linear_solver)
        def solve(w, theta, x, y):
            theta = tuple(t.detach() for t in theta)
            w = tuple(t.detach() for t in w)
            grad = torch.func.grad(lambda ww: inner_objective(net, names, ww, theta, x, y, workload))
            for _ in range(K):
                w = tuple(a - INNER_LR * g for a, g in zip(w, grad(w)))
            return w

        self.solve = solve

    def accumulate(self):
        theta = tuple(self.params[n] for n in self.names)
        t = self.task
        for i in range(self.T):
            w = self.solve(tuple(p.detach() for p in theta), theta, t["support_x"][i], t["support_y"][i])
            out = functional_call(self.net, dict(zip(self.names, w)), (t["query_x"][i],))
            (task_loss(self.workload, out, t["query_y"][i], "mean") / self.T).backward()


class HigherExplicit(Anchor):
    """MAML (with the proximal term) through ``higher.innerloop_ctx``: ``K`` differentiable
    SGD steps on the patched network, backpropagated to the initial weights θ."""

    def __init__(self, learner, task, meta_lr, K: int, workload: str = "conv4"):
        super().__init__(learner, task, meta_lr, workload)
        self.K = K
        self.inner_optimizer = torch.optim.SGD(self.net.parameters(), lr=INNER_LR)

    def accumulate(self):
        import higher

        t = self.task
        theta = [self.params[n] for n in self.names]
        for i in range(self.T):
            with higher.innerloop_ctx(self.net, self.inner_optimizer, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(self.K):
                    fast = dict(zip((n for n, _ in self.net.named_parameters()), fnet.parameters()))
                    w = [fast[n] for n in self.names]
                    proximal = sum(((a - b) ** 2).sum() for a, b in zip(w, theta))
                    loss = task_loss(self.workload, fnet(t["support_x"][i]), t["support_y"][i], "sum")
                    diffopt.step(loss + 0.5 * PRECISION * proximal)
                (task_loss(self.workload, fnet(t["query_x"][i]), t["query_y"][i], "mean") / self.T).backward()


def _loc_key(learner) -> str:
    (key,) = [k for k in learner.meta_params() if k.startswith("prior.loc")]
    return key


def check_implicit(learner, batch, K: int, cg: int, damping: float, workload: str = "conv4") -> dict:
    """ibaml's and TorchOpt's implicit meta-gradients (on the system damped by ``damping``,
    0 for the timed configuration), side by side."""
    task = H.prepare(learner, batch)
    out = learner.task_gradients(task)
    ours = out.grads[_loc_key(learner)].mean(0)
    theirs = TorchOptImplicit(learner, task, 1e-3, K, cg, ridge=damping, workload=workload).meta_gradient()
    iterations = out.diagnostics["solver_iterations"]
    return {**agreement(ours, theirs), "damping": damping, "ibaml_cg_iterations": iterations.tolist(),
            "all_cg_iterations_ran": bool((iterations == cg).all())}


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    ref, oth = reference.double(), other.double()
    return {"relative_error": float((oth - ref).norm() / ref.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(ref, oth, dim=0))}


def run_one(args, K: int, device, dtype, batch) -> tuple:
    """Rows, ratios and gradient checks of every implementation at ``K`` inner steps."""
    T, cg, workload = args.meta_batch, args.cg_steps, args.workload
    torchopt, _ = try_import("torchopt")
    higher, _ = try_import("higher")
    fns, rows, checks = {}, [], {}
    build = lambda estimator, damping=0.0: H.build_learner(  # noqa: E731
        workload, estimator, K, cg, device, dtype, hidden=args.hidden, image_size=args.image_size,
        chunk_size=args.chunk_size, precision=PRECISION, inner_lr=INNER_LR, cg_damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt calls functorch.vjp, deprecated in torch 2
        if torchopt is not None:
            checks["torchopt vs ibaml implicit"] = check_implicit(build("implicit", args.check_damping), batch, K, cg,
                                                                 args.check_damping, workload)
        for estimator in ("implicit", "explicit"):
            learner = build(estimator)
            learner.meta_optimizer.param_groups[0]["lr"] = args.meta_lr
            task = H.prepare(learner, batch)
            for mode in ("vmap", "loop"):
                fns[f"ibaml {estimator} {mode}"] = H.meta_iteration(learner, task, mode)
            if estimator == "implicit" and torchopt is not None:
                fns["torchopt implicit loop"] = TorchOptImplicit(learner, task, args.meta_lr, K, cg,
                                                                 workload=workload).iteration
            if estimator == "explicit" and higher is not None:
                impl = HigherExplicit(learner, task, args.meta_lr, K, workload)
                ours = H.meta_gradient_fn(learner, "vmap")(learner.meta_params(), task)[_loc_key(learner)]
                checks["higher vs ibaml explicit"] = agreement(ours, impl.meta_gradient())
                fns["higher explicit loop"] = impl.iteration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        peaks = {name: _median_peak(fn, device, args.memory_repeats) for name, fn in fns.items()}
        times = H.time_interleaved(fns, device, args.repeats, warmup=0)
    for name, ts in times.items():
        ms = 1000 * H.median(ts)
        rows.append({"implementation": name, "inner_steps": K, "ms": ms, "ms_all": [1000 * t for t in ts],
                     "tasks_per_s": T / (ms / 1000), "peak_bytes": peaks[name]})
    by_name = {r["implementation"]: r for r in rows}
    ratios = {}
    pairs = [("torchopt implicit loop", "ibaml implicit vmap"), ("torchopt implicit loop", "ibaml implicit loop"),
             ("higher explicit loop", "ibaml explicit vmap"), ("higher explicit loop", "ibaml explicit loop"),
             ("ibaml explicit vmap", "ibaml implicit vmap")]
    for slower, ours in pairs:
        if slower not in by_name:
            continue
        entry = {"inner_steps": K, "time": by_name[slower]["ms"] / by_name[ours]["ms"]}
        if by_name[slower]["peak_bytes"] and by_name[ours]["peak_bytes"]:
            entry["peak_memory"] = by_name[slower]["peak_bytes"] / by_name[ours]["peak_bytes"]
        ratios[f"{slower} / {ours}, K={K}"] = entry
    return rows, ratios, {f"{k}, K={K}": v for k, v in checks.items()}


def _median_peak(fn, device, repeats: int):
    peaks = [H.peak_memory(fn, device) for _ in range(max(1, repeats))]
    return None if any(p is None for p in peaks) else int(H.median(peaks))


LIBRARY_ROWS = {"implicit": "torchopt implicit loop", "explicit": "higher explicit loop"}


def comparison_table(rows) -> list:
    """One entry per estimator and ``K``: ibaml looped and vmapped, each with its time and
    peak memory, beside the other library (TorchOpt for implicit, higher for explicit) and
    the other library's time and memory over each of ibaml's."""
    by_name = {(r["implementation"], r["inner_steps"]): r for r in rows}
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    table = []
    for K in sorted({r["inner_steps"] for r in rows}):
        for estimator, library in LIBRARY_ROWS.items():
            loop, vmap = by_name.get((f"ibaml {estimator} loop", K)), by_name.get((f"ibaml {estimator} vmap", K))
            other = by_name.get((library, K))
            if loop is None or vmap is None:
                continue
            entry = {"estimator": estimator, "inner_steps": K,
                     "ibaml_loop": {"ms": loop["ms"], "peak_bytes": loop["peak_bytes"]},
                     "ibaml_vmap": {"ms": vmap["ms"], "peak_bytes": vmap["peak_bytes"]},
                     "other": None}
            if other is not None:
                entry["other"] = {"implementation": library, "ms": other["ms"], "peak_bytes": other["peak_bytes"],
                                  "time_over_ibaml_loop": ratio(other["ms"], loop["ms"]),
                                  "time_over_ibaml_vmap": ratio(other["ms"], vmap["ms"]),
                                  "memory_over_ibaml_loop": ratio(other["peak_bytes"], loop["peak_bytes"]),
                                  "memory_over_ibaml_vmap": ratio(other["peak_bytes"], vmap["peak_bytes"])}
            table.append(entry)
    return table


def table_markdown(table) -> str:
    mib = lambda b: "—" if b is None else f"{b / 2 ** 20:.2f}"  # noqa: E731
    num = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    lines = []
    for e in table:
        o = e["other"] or {}
        lines.append([e["estimator"], e["inner_steps"], f"{e['ibaml_loop']['ms']:.1f}",
                      mib(e["ibaml_loop"]["peak_bytes"]), f"{e['ibaml_vmap']['ms']:.1f}",
                      mib(e["ibaml_vmap"]["peak_bytes"]), o.get("implementation", "—"), num(o.get("ms"), ".1f"),
                      mib(o.get("peak_bytes")),
                      f"{num(o.get('time_over_ibaml_loop'), '.2f')} / {num(o.get('time_over_ibaml_vmap'), '.2f')}",
                      f"{num(o.get('memory_over_ibaml_loop'), '.3f')} / "
                      f"{num(o.get('memory_over_ibaml_vmap'), '.3f')}"])
    return H.markdown(["estimator", "K", "ibaml loop ms", "ibaml loop peak MiB", "ibaml vmap ms",
                       "ibaml vmap peak MiB", "other library", "its ms", "its peak MiB",
                       "its time / ibaml loop / vmap", "its memory / ibaml loop / vmap"], lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, "runs/anchors")
    p.add_argument("--workload", default="conv4", choices=("conv4", "sine"))
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--inner-steps", default="10", help="comma-separated K values")
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--memory-repeats", type=int, default=3, help="peak-memory calls per implementation (their "
                   "median is reported)")
    p.add_argument("--check-damping", type=float, default=0.0,
                   help="CG damping added to both solves of the implicit agreement check only (default 0: the timed "
                        "configuration)")
    args = p.parse_args(argv)
    steps = [int(k) for k in str(args.inner_steps).split(",")]
    if args.quick:
        args.meta_batch, steps, args.hidden, args.image_size, args.repeats = 2, [2], 4, 16, 1
    device, dtype = H.setup(args)
    batch = H.make_batch(args.workload, args.meta_batch, dtype, device, image_size=args.image_size)
    libraries = {}
    for name in ("torchopt", "higher"):
        module, why = try_import(name)
        libraries[name] = {"available": module is not None,
                           "version": getattr(module, "__version__", None) if module else None, "reason": why}
        if why:
            print(f"skipping {name}: {why}")
    rows, ratios, checks = [], {}, {}
    for K in steps:
        r, q, c = run_one(args, K, device, dtype, batch)
        rows += r
        ratios.update(q)
        checks.update(c)
    network = "MLP(1, 40, 40, 1)" if args.workload == "sine" else f"Conv4-{args.hidden}"
    shape = ({"shots": 10, "query": 10} if args.workload == "sine"
             else {"image_size": args.image_size, "ways": 5, "shots": 1, "query": 15})
    payload = {**H.environment(device), "memory_method": H.memory_method(device),
               "workload": {"name": args.workload, "network": network, **shape, "meta_batch": args.meta_batch,
                            "inner_steps": steps, "cg_steps": args.cg_steps, "precision": PRECISION,
                            "inner_lr": INNER_LR, "check_damping": args.check_damping},
               "libraries": libraries, "gradient_agreement": checks, "results": rows, "ratios": ratios,
               "table": comparison_table(rows)}
    H.write_json(Path(args.out), "anchors.json", payload)
    fmt = lambda v: "—" if v is None else f"{v / 2 ** 20:.1f}"  # noqa: E731
    print(H.markdown(["implementation", "K", "ms / meta-iter", "tasks/s", "peak MiB"],
                     [[r["implementation"], r["inner_steps"], f"{r['ms']:.1f}", f"{r['tasks_per_s']:.2f}",
                       fmt(r["peak_bytes"])] for r in rows]))
    if ratios:
        print()
        print(H.markdown(["slower / faster", "time ratio", "memory ratio"],
                         [[k, f"{v['time']:.2f}", f"{v['peak_memory']:.2f}" if "peak_memory" in v else "—"]
                          for k, v in ratios.items()]))
    print()
    print(table_markdown(payload["table"]))
    for k, v in checks.items():
        extra = f", damping {v['damping']:g}, ibaml CG ran all iterations: {v['all_cg_iterations_ran']}" \
            if "damping" in v else ""
        print(f"{k}: relative error {v['relative_error']:.2e}, cosine {v['cosine']:.6f}{extra}")
    return payload


if __name__ == "__main__":
    main()
