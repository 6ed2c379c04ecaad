"""The README's sine-regression table from the ``metrics.json`` files of
``examples/sine_regression.py`` runs (one folder per method, or one ``--compare`` folder).

    python -m benchmarks.sine_table runs/sine_full/maml runs/sine_full/ibaml ... --out docs/results/sine/table.json
    python -m benchmarks.sine_table docs/results/sine/3000/*.json

Each folder's ``metrics.json`` (or each given JSON file) is read (a single-method run: the method's metrics at the top
level; a ``--compare`` run: ``{"methods": {name: metrics}}``); the table lists, per method,
in-range MSE, NLL, 90% coverage, calibration error and CRPS, the out-of-range MSE, NLL and
90% coverage (mean ± 95% CI over the evaluation tasks) and the training time per
meta-iteration. ``--out`` writes the collected metrics and the configurations as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ibaml

from . import _harness as H

IN_RANGE = ("mse", "nll", "coverage_90", "calibration_error", "crps")
OUT_RANGE = ("mse", "nll", "coverage_90")


def collect(folders):
    """``{method: (metrics, config)}`` from the folders' ``metrics.json``."""
    rows = {}
    for folder in folders:
        path = Path(folder) if Path(folder).is_file() else Path(folder) / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file")
        data = json.loads(path.read_text())
        config = data.get("config", {})
        found = data["methods"].items() if "methods" in data else [(config.get("method") or Path(folder).stem, data)]
        for name, metrics in found:
            rows[_label(name, config, rows)] = (metrics, config)
    return rows


#: options that tell apart runs of one method (the first run of a method is named by the method alone)
DISTINCT = ("meta_iters", "inner_lr", "inner_steps", "noise")


def _label(name: str, config: dict, rows: dict) -> str:
    """``name``, or for a further run of the method the options in which it differs from the
    first (``"ibaml, 5000 iterations"``, ``"maml, inner_lr=0.001, inner_steps=10"``)."""
    if name not in rows:
        return name

    def value(cfg, k):   # an option left at the method's default is "preset" (the noise: the preset's name)
        if k == "noise" and cfg.get(k) is None:
            return ibaml.recipes.REGRESSION_NOISE.get(name, "shared")
        return "preset" if cfg.get(k) is None else cfg.get(k)

    first = rows[name][1]
    parts = [f"{value(config, k)} iterations" if k == "meta_iters" else f"{k}={value(config, k)}"
             for k in DISTINCT if value(config, k) != value(first, k)]
    label = ", ".join([name] + parts)
    return label if label not in rows else f"{label}, run {sum(r.startswith(name) for r in rows) + 1}"


def cell(metric) -> str:
    if isinstance(metric, dict):
        return f"{metric['mean']:.3f} ± {metric['ci95']:.3f}"
    return f"{metric:.3f}"


def markdown(rows) -> str:
    head = ["method"] + list(IN_RANGE) + [f"{k}, x∈[5,10]" for k in OUT_RANGE] + ["ms / meta-iter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (m, _) in rows.items():
        values = [cell(m[k]) for k in IN_RANGE] + [cell(m["out_of_range"][k]) for k in OUT_RANGE]
        lines.append("| " + " | ".join([name] + values + [f"{m['ms_per_meta_iter']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--out", default=None, help="write the collected metrics as JSON")
    args = p.parse_args(argv)
    rows = collect(args.folders)
    table = markdown(rows)
    print(table)
    if args.out:
        H.write_json_file(Path(args.out), {name: {"metrics": m, "config": c} for name, (m, c) in rows.items()})
    return rows


if __name__ == "__main__":
    main()
