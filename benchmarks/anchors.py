"""ibaml beside two public meta-learning libraries on the same Conv4 workload, in one run.

Workload (as in ``benchmarks/scaling.py``): Conv4 with ``hidden`` channels on 5-way 1-shot
episodes with 15 query images per class (``image_size``², random pixels), meta-batch ``T``;
MAP inner problem ``G(w, θ) = Σ_support CE(f(x; w), y) + (λ/2)‖w − θ‖²`` (λ = 100, every
network weight adapted), ``K`` SGD steps with learning rate 1e-3 from ``w = θ``; outer loss
the mean query cross-entropy; the meta-update is Adam on θ.

* **implicit** (iMAML): ibaml's :class:`ibaml.Implicit` (CG, ``cg`` iterations), vmapped
  over tasks and looped, against TorchOpt's ``torchopt.diff.implicit.custom_root`` with
  ``torchopt.linear_solve.solve_cg(maxiter=cg)`` (tolerance 0, so that it runs all ``cg``
  iterations), one task at a time (its solver is not batched over tasks);
* **explicit** (MAML with the same proximal term): ibaml's :class:`ibaml.Explicit`,
  vmapped and looped, against ``higher.innerloop_ctx`` (``copy_initial_weights=False``)
  with a differentiable ``torch.optim.SGD``, one task at a time.

Every implementation starts from the same θ. Before timing, one meta-gradient of each is
compared with ibaml's (relative error and cosine similarity): the same mathematics must
give the same numbers, otherwise a timing comparison means nothing. The implicit check
solves the damped system ``(H + δI) x = ∂_v F`` on both sides (``--check-damping δ``,
TorchOpt's ``ridge``): on this network the inner Hessian at ``w_K`` can be indefinite,
where ibaml's CG stops at the first direction of non-positive curvature and TorchOpt's
carries on, so the undamped solves differ by design; the check reports whether ibaml's CG
ran all its iterations (the damped system was positive definite along the way). Then all
meta-iterations are timed in turn (``benchmarks/_harness.py``), and the ratio of each
library's time and peak memory to ibaml's is reported. A library that cannot be imported
is skipped with the reason; ibaml alone is then timed.

    pip install torchopt==0.7.3 higher==0.2.1           # optional; torchopt needs optree, graphviz
    python benchmarks/anchors.py --device cuda --out runs/anchors
    python benchmarks/anchors.py --quick

Writes ``DIR/anchors.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

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

    def __init__(self, learner, task, meta_lr: float):
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


def inner_objective(net, names, w, theta, x, y):
    """``Σ CE(f(x; w), y) + (λ/2)‖w − θ‖²`` for tuples ``w``, ``θ`` in ``names`` order."""
    logits = functional_call(net, dict(zip(names, w)), (x,))
    proximal = sum(((a - b) ** 2).sum() for a, b in zip(w, theta))
    return Fn.cross_entropy(logits, y, reduction="sum") + 0.5 * PRECISION * proximal


class TorchOptImplicit(Anchor):
    """iMAML through ``torchopt.diff.implicit.custom_root``: the optimality condition is
    ``∇_w G(w, θ) = 0``; the decorated solver runs ``K`` SGD steps without a graph."""

    def __init__(self, learner, task, meta_lr, K: int, cg: int, ridge: float = 0.0):
        super().__init__(learner, task, meta_lr)
        from torchopt.diff.implicit import custom_root
        from torchopt.linear_solve import solve_cg

        net, names = self.net, self.names

        def optimality(w, theta, x, y):
            return torch.func.grad(lambda ww: inner_objective(net, names, ww, theta, x, y))(w)

        linear_solver = solve_cg(maxiter=cg, rtol=0.0, atol=0.0, **({"ridge": ridge} if ridge else {}))

        @custom_root(optimality, argnums=1, solve=linear_solver)
        def solve(w, theta, x, y):
            theta = tuple(t.detach() for t in theta)
            w = tuple(t.detach() for t in w)
            grad = torch.func.grad(lambda ww: inner_objective(net, names, ww, theta, x, y))
            for _ in range(K):
                w = tuple(a - INNER_LR * g for a, g in zip(w, grad(w)))
            return w

        self.solve = solve

    def accumulate(self):
        theta = tuple(self.params[n] for n in self.names)
        t = self.task
        for i in range(self.T):
            w = self.solve(tuple(p.detach() for p in theta), theta, t["support_x"][i], t["support_y"][i])
            logits = functional_call(self.net, dict(zip(self.names, w)), (t["query_x"][i],))
            (Fn.cross_entropy(logits, t["query_y"][i]) / self.T).backward()


class HigherExplicit(Anchor):
    """MAML (with the proximal term) through ``higher.innerloop_ctx``: ``K`` differentiable
    SGD steps on the patched network, backpropagated to the initial weights θ."""

    def __init__(self, learner, task, meta_lr, K: int):
        super().__init__(learner, task, meta_lr)
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
                    loss = Fn.cross_entropy(fnet(t["support_x"][i]), t["support_y"][i], reduction="sum")
                    diffopt.step(loss + 0.5 * PRECISION * proximal)
                (Fn.cross_entropy(fnet(t["query_x"][i]), t["query_y"][i]) / self.T).backward()


def _loc_key(learner) -> str:
    (key,) = [k for k in learner.meta_params() if k.startswith("prior.loc")]
    return key


def check_implicit(learner, batch, K: int, cg: int, damping: float) -> dict:
    """ibaml's and TorchOpt's implicit meta-gradients on the damped system, side by side."""
    task = H.prepare(learner, batch)
    meta = learner.meta_params()
    out = torch.func.vmap(lambda t: learner.estimator.task_gradient(learner.problem, meta, t))(task)
    ours = out.grads[_loc_key(learner)].mean(0)
    theirs = TorchOptImplicit(learner, task, 1e-3, K, cg, ridge=damping).meta_gradient()
    iterations = out.diagnostics["solver_iterations"]
    return {**agreement(ours, theirs), "damping": damping, "ibaml_cg_iterations": iterations.tolist(),
            "all_cg_iterations_ran": bool((iterations == cg).all())}


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    ref, oth = reference.double(), other.double()
    return {"relative_error": float((oth - ref).norm() / ref.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(ref, oth, dim=0))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, "runs/anchors")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--check-damping", type=float, default=1000.0, help="CG damping of the implicit agreement check")
    args = p.parse_args(argv)
    if args.quick:
        args.meta_batch, args.inner_steps, args.hidden, args.image_size, args.repeats = 2, 2, 4, 16, 1
    device, dtype = H.setup(args)
    T, K, cg = args.meta_batch, args.inner_steps, args.cg_steps
    batch = H.make_batch("conv4", T, dtype, device, image_size=args.image_size)
    libraries = {}
    torchopt, why_torchopt = try_import("torchopt")
    higher, why_higher = try_import("higher")
    for name, module, why in (("torchopt", torchopt, why_torchopt), ("higher", higher, why_higher)):
        libraries[name] = {"available": module is not None,
                           "version": getattr(module, "__version__", None) if module else None, "reason": why}
        if why:
            print(f"skipping {name}: {why}")

    fns, rows, checks = {}, [], {}
    build = lambda estimator, damping=0.0: H.build_learner(  # noqa: E731
        "conv4", estimator, K, cg, device, dtype, hidden=args.hidden, image_size=args.image_size,
        chunk_size=args.chunk_size, precision=PRECISION, inner_lr=INNER_LR, cg_damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt calls functorch.vjp, deprecated in torch 2
        if torchopt is not None:
            checks["torchopt vs ibaml implicit"] = check_implicit(build("implicit", args.check_damping), batch, K, cg,
                                                                 args.check_damping)
        for estimator in ("implicit", "explicit"):
            learner = build(estimator)
            learner.meta_optimizer.param_groups[0]["lr"] = args.meta_lr
            task = H.prepare(learner, batch)
            for mode in ("vmap", "loop"):
                fns[f"ibaml {estimator} {mode}"] = H.meta_iteration(learner, task, mode)
            if estimator == "implicit" and torchopt is not None:
                fns["torchopt implicit loop"] = TorchOptImplicit(learner, task, args.meta_lr, K, cg).iteration
            if estimator == "explicit" and higher is not None:
                impl = HigherExplicit(learner, task, args.meta_lr, K)
                ours = H.batched_meta_gradient(learner)(learner.meta_params(), task)[_loc_key(learner)]
                checks["higher vs ibaml explicit"] = agreement(ours, impl.meta_gradient())
                fns["higher explicit loop"] = impl.iteration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        peaks = {name: H.peak_memory(fn, device) for name, fn in fns.items()}
        times = H.time_interleaved(fns, device, args.repeats, warmup=0)
    for name, ts in times.items():
        ms = 1000 * H.median(ts)
        rows.append({"implementation": name, "ms": ms, "ms_all": [1000 * t for t in ts], "tasks_per_s": T / (ms / 1000),
                     "peak_bytes": peaks[name]})
    by_name = {r["implementation"]: r for r in rows}
    ratios = {}
    for anchor, ours in (("torchopt implicit loop", "ibaml implicit"), ("higher explicit loop", "ibaml explicit")):
        if anchor not in by_name:
            continue
        for mode in ("vmap", "loop"):
            mine = by_name[f"{ours} {mode}"]
            entry = {"time": by_name[anchor]["ms"] / mine["ms"]}
            if by_name[anchor]["peak_bytes"] and mine["peak_bytes"]:
                entry["peak_memory"] = by_name[anchor]["peak_bytes"] / mine["peak_bytes"]
            ratios[f"{anchor} / {ours} {mode}"] = entry
    payload = {**H.environment(device), "memory_method": H.memory_method(device),
               "workload": {"network": f"Conv4-{args.hidden}", "image_size": args.image_size, "ways": 5, "shots": 1,
                            "query": 15, "meta_batch": T, "inner_steps": K, "cg_steps": cg, "precision": PRECISION,
                            "inner_lr": INNER_LR},
               "libraries": libraries, "gradient_agreement": checks, "results": rows, "ratios": ratios}
    H.write_json(Path(args.out), "anchors.json", payload)
    fmt = lambda v: "—" if v is None else f"{v / 2 ** 20:.1f}"  # noqa: E731
    print(H.markdown(["implementation", "ms / meta-iter", "tasks/s", "peak MiB"],
                     [[r["implementation"], f"{r['ms']:.1f}", f"{r['tasks_per_s']:.2f}", fmt(r["peak_bytes"])]
                      for r in rows]))
    if ratios:
        print()
        print(H.markdown(["library / ibaml", "time ratio", "memory ratio"],
                         [[k, f"{v['time']:.2f}", f"{v['peak_memory']:.2f}" if "peak_memory" in v else "—"]
                          for k, v in ratios.items()]))
    for k, v in checks.items():
        extra = f", damping {v['damping']:g}, ibaml CG ran all iterations: {v['all_cg_iterations_ran']}" \
            if "damping" in v else ""
        print(f"{k}: relative error {v['relative_error']:.2e}, cosine {v['cosine']:.6f}{extra}")
    return payload


if __name__ == "__main__":
    main()
