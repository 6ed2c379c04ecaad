"""Where a meta-trained sine model's error sits: by the query's input, inside or outside the
span of the task's support inputs, by its distance to the nearest support input, and how far
the learned features can bend there.

    python -m benchmarks.sine_error_map RUN [RUN ...] --out docs/results/sine/error_map/NAME.json

Each ``RUN`` is a folder holding a sine run's ``last.pt`` (``examples/sine_regression.py
--out``, ``benchmarks.sine_protocol --keep-runs``); the model is rebuilt from the checkpoint's
configuration (:func:`ibaml.recipes.sine_presets.sine_learner_from_config`) and adapted to
``--tasks`` tasks of the run's first validation stream (seed ``40 000 + S`` for a run of seed
``S``, as ``examples/sine_regression.py --eval-split val``: never the test streams). Per run:

- the squared error of the predictive mean per query, averaged over the queries of each bin of
  ``x`` (:data:`X_BINS`), of the distance to the nearest support input (:data:`DISTANCE_BINS`),
  and inside against outside ``[min, max]`` of the task's support inputs (outside, the model
  extrapolates from the support however much of ``[−5, 5]`` that leaves), with each bin's share
  of the summed error;
- the features' room to bend per ``x`` bin: the share of the last hidden layer's variation over
  the bin that an affine function of ``x`` leaves unexplained (``1 − R²`` of a least-squares
  fit of every feature on ``[x, 1]`` over 200 points). A Gaussian head's posterior mean is a
  linear function of the features, so where this share is near 0 the predictive mean can only
  continue a straight line from the nearest support input.

Writes the JSON and a figure beside it (the same name, ``.png``: the MSE by input and by
distance to the support, a line per run) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ibaml.data.sine import SineTaskDistribution
from ibaml.recipes.sine_presets import predictive_mean_var, sine_learner_from_config
from ibaml.train.checkpoint import load_checkpoint

#: bins of the query input over the sine range [−5, 5]
X_BINS = tuple((-5.0 + 2 * k, -3.0 + 2 * k) for k in range(5))
#: bins of the distance from a query to the nearest support input
DISTANCE_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, float("inf")))
#: the validation stream of ``examples/sine_regression.py --eval-split val``
VALIDATION_STREAM = 40_000


def binned(errors: torch.Tensor, key: torch.Tensor, bins) -> dict:
    """Mean squared error and share of the summed error of the queries whose ``key`` falls in
    each ``[low, high)`` of ``bins``.

    >>> binned(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([0.1, 0.2, 1.5]), ((0.0, 1.0), (1.0, 2.0)))
    {'[0, 1)': {'mse': 2.0, 'share': 0.5, 'queries': 2}, '[1, 2)': {'mse': 4.0, 'share': 0.5, 'queries': 1}}
    """
    total = float(errors.sum())
    out = {}
    for low, high in bins:
        sel = (key >= low) & (key < high)
        n = int(sel.sum())
        out[f"[{low:g}, {high:g})"] = {"mse": float(errors[sel].mean()) if n else None,
                                       "share": float(errors[sel].sum()) / total if total > 0 else None, "queries": n}
    return out


def non_affine_share(features: torch.Tensor, x: torch.Tensor) -> float:
    """``1 − R²`` of a least-squares fit of the features ``[N, F]`` on ``[x, 1]`` (``x [N]``),
    pooled over the features: how much of their variation an affine function of ``x`` misses.

    >>> x = torch.linspace(0, 1, 50)
    >>> round(non_affine_share(torch.stack([2 * x + 1, -x], 1), x), 6), round(non_affine_share(x[:, None] ** 2, x), 3)
    (0.0, 0.065)
    """
    design = torch.stack([x, torch.ones_like(x)], 1)
    coef = torch.linalg.lstsq(design, features).solution
    residual = (features - design @ coef).pow(2).sum()
    spread = (features - features.mean(0)).pow(2).sum()
    return float(residual / spread) if spread > 0 else 0.0


def error_map(folder: Path, num_tasks: int) -> dict:
    """The error map of the run in ``folder`` on ``num_tasks`` validation tasks (the module docstring)."""
    state = load_checkpoint(folder / "last.pt")
    config = state["config"]
    model = sine_learner_from_config(config, device=torch.device("cpu"), dtype=torch.float32)
    model.load_training_state(state["training"])
    tasks = SineTaskDistribution(shots=config["shots"], query=config["query"])
    batch = tasks.sample(num_tasks, torch.Generator().manual_seed(VALIDATION_STREAM + config["seed"]))
    with torch.no_grad():
        mean, _ = predictive_mean_var(model, batch.support_x, batch.support_y, batch.query_x)
    errors = (mean - batch.query_y[..., 0]) ** 2                                      # [T, Q]
    qx, sx = batch.query_x[..., 0], batch.support_x[..., 0]                           # [T, Q], [T, K]
    distance = (qx[:, :, None] - sx[:, None, :]).abs().min(-1).values
    outside = (qx < sx.min(-1, keepdim=True).values) | (qx > sx.max(-1, keepdim=True).values)
    flat = errors.reshape(-1)
    span = binned(flat, outside.reshape(-1).float(), ((0.0, 0.5), (0.5, 1.5)))
    payload = {"run": str(folder), "config": config, "method": config["method"], "noise": config.get("noise"),
               "seed": config["seed"],
               "tasks": num_tasks, "stream_seed": VALIDATION_STREAM + config["seed"], "mse": float(flat.mean()),
               "by_x": binned(flat, qx.reshape(-1), X_BINS),
               "by_distance": binned(flat, distance.reshape(-1), DISTANCE_BINS),
               "inside_support_span": span["[0, 0.5)"], "outside_support_span": span["[0.5, 1.5)"]}
    net = next((m for m in model.modules() if hasattr(m, "embed") and m is not model), None)
    if net is not None:
        shares = {}
        for low, high in X_BINS:
            grid = torch.linspace(low, high, 200)
            with torch.no_grad():
                features = net.embed(grid[:, None])
            shares[f"[{low:g}, {high:g})"] = non_affine_share(features, grid)
        payload["features_non_affine_share"] = shares
    return payload


def run_label(m: dict) -> str:
    """``"ibaml seed 2"``, with the options that set the run apart from the example's defaults
    (a meta step other than 10⁻³, an outer objective, a KL weight)."""
    config = m["config"]
    return (f"{m['method']} seed {m['seed']}"
            + (f", meta-lr {config['meta_lr']:g}" if config.get("meta_lr", 1e-3) != 1e-3 else "")
            + (f", outer {config['outer']}" if "outer" in config else "")
            + (f", β {config['kl_weight']:g}" if config.get("kl_weight") is not None else ""))


def markdown(maps: list) -> str:
    """One row per run: its MSE, the error outside its support's span, and per ``x`` bin the
    MSE (the features' non-affine share in brackets)."""
    head = ["run", "MSE", "outside the support's span: MSE (share of error, of queries)"]
    head += [f"x∈{b}: MSE (non-affine)" for b in maps[0]["by_x"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in maps:
        out = m["outside_support_span"]
        total = out["queries"] + m["inside_support_span"]["queries"]
        cells = [run_label(m) + f" ({m['noise']} noise)", f"{m['mse']:.4f}",
                 f"{out['mse']:.4f} ({out['share']:.2f}, {out['queries'] / total:.2f})"]
        for b, v in m["by_x"].items():
            bend = m.get("features_non_affine_share", {}).get(b)
            cells.append(f"{v['mse']:.4f}" + ("" if bend is None else f" ({bend:.3f})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(maps: list, path: Path) -> Path:
    """Two panels, a line per run: the MSE per bin of the query's input, and per bin of its
    distance to the nearest support input (log scale), to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.tab20(range(20))
    for k, m in enumerate(maps):
        label = run_label(m)   # the example's defaults solid, other options dotted, other methods dashed
        style = dict(linestyle="--" if m["method"] != maps[0]["method"] else ":" if "," in label else "-",
                     color=colors[k % 20])
        for ax, key in zip(axes, ("by_x", "by_distance")):
            bins = [b for b, v in m[key].items() if v["mse"] is not None]
            ax.plot(range(len(bins)), [m[key][b]["mse"] for b in bins], marker="o", label=label, **style)
            ax.set_xticks(range(len(bins)), bins, fontsize=8)
    axes[0].set(xlabel="query input x", ylabel="MSE", yscale="log", title="error by input")
    axes[1].set(xlabel="distance to the nearest support input", yscale="log", title="error by distance")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding last.pt")
    p.add_argument("--tasks", type=int, default=1000, help="validation tasks per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    maps = [error_map(Path(r), args.tasks) for r in args.runs]
    payload = {"command": "python -m benchmarks.sine_error_map " + " ".join(sys.argv[1:] if argv is None else argv),
               "runs": maps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    figure = plot(maps, Path(args.out).with_suffix(".png"))
    print(markdown(maps))
    print(f"\nwrote {args.out} and {figure}")
    return payload


if __name__ == "__main__":
    main()
