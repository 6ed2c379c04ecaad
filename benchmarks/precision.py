"""Accuracy (and time) of the meta-gradient under mixed precision.

For each workload (``sine``, ``conv4``; see ``benchmarks/_harness.py``) and estimator, the
mean meta-gradient over a meta-batch is computed

* in float32 (the reference ``g₃₂``),
* in float32 under ``torch.autocast`` with bfloat16 and with float16 (the inner loop,
  the Hessian-vector products of CG and the outer gradient all run under autocast;
  parameters, meta-gradients and CG's vectors stay float32 where autocast leaves them),
* in float64 (to show float32's own error),

from the same θ and the same tasks, and the relative error ``‖g − g₃₂‖ / ‖g₃₂‖`` is
reported against the bound 1e-2, with the cosine similarity, the error against float64,
the mean number of CG iterations that ran (CG stops on a direction of non-positive
curvature, so a precision that changes the curvature it sees changes the iteration count),
the error per network tensor against float64 (where the error sits; in Conv4 the
convolution biases come before batch normalisation, so their exact meta-gradient is zero
and whatever they get is rounding noise) and the median time per meta-gradient. A precision the device does not support is
recorded with the error it raised.

    python -m benchmarks.precision --device cuda
    python -m benchmarks.precision --quick

Writes ``DIR/precision.json`` (with a ``summary``: one entry per workload, estimator and
autocast dtype) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from . import _harness as H

BOUND = 1e-2
PRECISIONS = ("float32", "bfloat16", "float16", "float64")


def meta_gradient(learner, task, autocast_dtype=None):
    """``(flat mean meta-gradient, CG iterations per task or None)`` in one vmapped call
    (tensors: no host synchronisation, so that it can be timed)."""
    device_type = task["support_x"].device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        out = learner.task_gradients(task)
    flat = torch.cat([out.grads[k].mean(0).reshape(-1).float() for k in sorted(out.grads)])
    return flat, out.diagnostics.get("solver_iterations")


def mean_iterations(iters):
    return None if iters is None else float(iters.float().mean())


def relative(a, ref):
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def layout(learner):
    """``[(name, size)]`` of the flat meta-gradient: each meta-parameter, with the prior's
    location split into the network tensors it covers (``net.<name>``)."""
    meta = learner.meta_params()
    out = []
    for key in sorted(meta):
        if key.startswith("prior.loc"):
            out += [(f"net.{n}", k) for n, k in zip(learner.prior.spec.names, learner.prior.spec.numels)]
        else:
            out.append((key, meta[key].numel()))
    return out


def per_tensor(g, ref, parts):
    """Per tensor: ``‖g − ref‖``, ``‖ref‖`` and their ratio (``None`` where ``ref`` is zero)."""
    out, start = {}, 0
    for name, size in parts:
        a, b = g[start:start + size].double(), ref[start:start + size].double()
        err, norm = float((a - b).norm()), float(b.norm())
        out[name] = {"error_norm": err, "reference_norm": norm, "relative_error": err / norm if norm > 0 else None}
        start += size
    return out


def run(workload, estimator, args, device):
    common = dict(hidden=args.hidden, image_size=args.image_size, chunk_size=args.chunk_size)
    batch32 = H.make_batch(workload, args.meta_batch, torch.float32, device, image_size=args.image_size)
    learner32 = H.build_learner(workload, estimator, args.inner_steps, args.cg_steps, device, torch.float32, **common)
    learner64 = H.build_learner(workload, estimator, args.inner_steps, args.cg_steps, device, torch.float64, **common)
    task32 = H.prepare(learner32, batch32)
    task64 = H.prepare(learner64, batch32)  # the same numbers, cast
    ref, ref_iters = meta_gradient(learner32, task32)
    g64, iters64 = meta_gradient(learner64, task64)
    rows = [{"workload": workload, "estimator": estimator, "precision": "float32", "relative_error": 0.0,
             "cosine": 1.0, "relative_error_vs_float64": relative(ref, g64),
             "cg_iterations": mean_iterations(ref_iters)},
            {"workload": workload, "estimator": estimator, "precision": "float64", "relative_error": relative(g64, ref),
             "cosine": float(torch.nn.functional.cosine_similarity(g64.float(), ref, dim=0)),
             "relative_error_vs_float64": 0.0, "cg_iterations": mean_iterations(iters64)}]
    parts = layout(learner32)
    rows[0]["per_tensor_vs_float64"] = per_tensor(ref, g64, parts)
    fns = {"float32": lambda: meta_gradient(learner32, task32), "float64": lambda: meta_gradient(learner64, task64)}
    for name in ("bfloat16", "float16"):
        dtype = getattr(torch, name)
        row = {"workload": workload, "estimator": estimator, "precision": f"autocast {name}"}
        try:
            g, iters = meta_gradient(learner32, task32, dtype)
        except Exception as err:  # an autocast dtype the device or an operation does not support
            rows.append({**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            continue
        finite = bool(torch.isfinite(g).all())
        rows.append({**row, "relative_error": relative(g, ref) if finite else None, "finite": finite,
                     "cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0)) if finite else None,
                     "relative_error_vs_float64": relative(g, g64) if finite else None,
                     "cg_iterations": mean_iterations(iters),
                     "per_tensor_vs_float64": per_tensor(g, g64, parts) if finite else None})
        fns[f"autocast {name}"] = lambda d=dtype: meta_gradient(learner32, task32, d)
    times = H.time_interleaved(fns, device, args.repeats, warmup=1) if args.repeats > 0 else {}
    for r in rows:
        if r["precision"] in times:
            r["ms"] = 1000 * H.median(times[r["precision"]])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, "runs/precision")
    p.add_argument("--workloads", default="sine,conv4")
    p.add_argument("--estimators", default="implicit,explicit")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (0: accuracy only)")
    args = p.parse_args(argv)
    if args.quick:
        args.meta_batch, args.inner_steps, args.hidden, args.image_size, args.repeats = 2, 3, 4, 16, 1
        args.estimators = "implicit"
    device, _ = H.setup(args)
    rows = []
    for workload in args.workloads.split(","):
        for estimator in args.estimators.split(","):
            rows += run(workload, estimator, args, device)
    summary = []
    for r in rows:
        if r["precision"].startswith("autocast"):
            summary.append(H.target(f"{r['workload']}/{r['estimator']}/{r['precision']}",
                                    f"{r['workload']} {r['estimator']}, {r['precision']}: relative error of the "
                                    "meta-gradient vs float32", BOUND, r.get("relative_error"), "lower", device.type,
                                    device, note=r.get("error", "")))
    payload = {**H.environment(device), "config": {k: v for k, v in vars(args).items() if k != "out"},
               "bound": BOUND, "results": rows, "summary": summary}
    H.write_json(Path(args.out), "precision.json", payload)
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    print(H.markdown(["workload", "estimator", "precision", "rel. error vs fp32", "cosine", "rel. error vs fp64",
                      "CG iterations", "ms"],
                     [[r["workload"], r["estimator"], r["precision"],
                       r.get("error") or fmt(r.get("relative_error"), ".2e"), fmt(r.get("cosine"), ".6f"),
                       fmt(r.get("relative_error_vs_float64"), ".2e"), fmt(r.get("cg_iterations"), ".2f"),
                       fmt(r.get("ms"), ".1f")] for r in rows]))
    print()
    print(H.summary_table(summary))
    return payload


if __name__ == "__main__":
    main()
