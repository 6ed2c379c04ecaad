"""Cost of a meta-iteration per method at equal inner steps, side by side in one process.

    python -m benchmarks.method_cost --out docs/results/cpu/method_cost
    python -m benchmarks.method_cost --methods imaml,ibaml,abml,maml --steps 2,10 --repeats 30

Each method is built as ``examples/sine_regression.py`` builds it (``ibaml.build_learner``
with the method's preset and its regression noise, ``ibaml.recipes.REGRESSION_NOISE``: iBaML
and ABML with the per-task conjugate noise), on 10-shot sine with 10 query points, meta-batch
25, MLP 1-40-40-1. Only the number of inner steps is set, the same for every method in a
column (``--steps``); a column ``preset`` uses each method's own. A meta-iteration is
``MetaLearner.meta_step`` on a batch already on the device, without host reads
(``validate=False, check=False``): every method's calls run in turn, ``--repeats`` rounds after
a warm-up, and the median is reported, so a change in the machine's load hits all alike.

The JSON holds the medians, every method's ratio to iMAML's at the same inner steps, and a
``summary`` with the target "iBaML's meta-iteration at most 3× iMAML's at equal inner steps".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ibaml
from ibaml import recipes
from ibaml.core.nets import MLP
from ibaml.data.sine import SineTaskDistribution
from ibaml.recipes import presets

from . import _harness as H

HIDDEN = (40, 40)
TARGET_RATIO = 3.0


def sine_learner(method: str, steps, device, dtype, seed: int = 0) -> ibaml.MetaLearner:
    """``method``'s learner as the sine example builds it, with ``steps`` inner steps (``None``:
    the preset's)."""
    torch.manual_seed(seed)
    noise = recipes.REGRESSION_NOISE.get(method, "shared")
    count, learn = recipes.noise_prior_count(method) if noise == "conjugate" else (1.0, True)
    likelihood = recipes.regression_likelihood(noise, count, learn).to(device=device, dtype=dtype)
    net = MLP(1, HIDDEN, 1).to(device=device, dtype=dtype)
    return ibaml.build_learner(method, net, likelihood, inner_steps=steps, seed=seed)


def measure(methods, steps_list, meta_batch: int, repeats: int, device, dtype, seed: int = 0) -> list:
    """Rows ``{method, steps, inner_steps, ms}``: for each entry of ``steps_list`` (an int or
    ``None`` for the presets), every method's median meta-iteration, timed in turn."""
    batch = SineTaskDistribution(shots=10, query=10).sample(meta_batch, torch.Generator().manual_seed(seed),
                                                            dtype=dtype).to(device)
    rows = []
    for steps in steps_list:
        learners = {m: sine_learner(m, steps, device, dtype, seed) for m in methods}
        fns = {m: (lambda l=l: l.meta_step(batch, validate=False, check=False)) for m, l in learners.items()}
        times = H.time_interleaved(fns, device, repeats=repeats, warmup=2)
        for m, l in learners.items():
            rows.append(dict(method=m, steps="preset" if steps is None else steps, inner_steps=l.inner_loop.steps,
                             ms=1000 * H.median(times[m]), ms_all=[1000 * t for t in times[m]]))
    for r in rows:
        base = next((b for b in rows if b["method"] == "imaml" and b["steps"] == r["steps"]), None)
        r["ratio_to_imaml"] = r["ms"] / base["ms"] if base else None
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, out="runs/method_cost")
    p.add_argument("--methods", default="imaml,ibaml,abml,maml",
                   help="methods or full-network recipes (imaml-hf, ...), comma-separated")
    p.add_argument("--steps", default="preset,2,10", help="comma-separated inner steps; 'preset' for each method's")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    device, dtype = H.setup(args)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if (m not in presets.METHODS and m not in presets.RECIPES) or m == "dkt"]
    if unknown:
        p.error(f"--methods: unknown or not a meta-learner: {', '.join(unknown)}")
    steps_list = [None if s.strip() == "preset" else int(s) for s in args.steps.split(",")]
    repeats = 2 if args.quick else args.repeats
    meta_batch = 4 if args.quick else args.meta_batch
    rows = measure(methods, steps_list, meta_batch, repeats, device, dtype)

    equal = [r for r in rows if r["method"] == "ibaml" and r["steps"] != "preset" and r["ratio_to_imaml"]]
    worst = max((r["ratio_to_imaml"] for r in equal), default=None)
    summary = [H.target("ibaml_over_imaml", "iBaML / iMAML meta-iteration at equal inner steps (the largest)",
                        TARGET_RATIO, worst, "lower", device.type, device)]
    table = H.markdown(["method", "inner steps", "ms / meta-iter", "× iMAML at the same steps"],
                       [[r["method"], f"{r['inner_steps']}" + (" (preset)" if r["steps"] == "preset" else ""),
                         f"{r['ms']:.1f}", "—" if r["ratio_to_imaml"] is None else f"{r['ratio_to_imaml']:.2f}"]
                        for r in rows])
    payload = dict(benchmark="method_cost", environment=H.environment(device), workload="sine, 10-shot, 10 query",
                   meta_batch=meta_batch, repeats=repeats, methods=methods, rows=rows, table=table, summary=summary)
    H.write_json(Path(args.out), "method_cost.json", payload)
    print(table)
    print()
    print(H.summary_table(summary))
    return payload


if __name__ == "__main__":
    main()
