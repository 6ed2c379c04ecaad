"""Several seeds of the image benchmark side by side: per method and number of shots, each
seed's test accuracy, per-task ECE and pooled ECE, their mean and standard deviation over the
seeds, and the image targets checked per seed and on the means.

    python -m benchmarks.image_seeds docs/results/image_benchmark/presets_table/* \\
        docs/results/image_benchmark/presets_table_seed1/* docs/results/image_benchmark/presets_table_seed2/* \\
        --out docs/results/image_benchmark/seeds.json

Each argument is a run folder of ``examples/miniimagenet.py`` (its ``metrics.json``); the
method, shots and seed are read from the run's configuration. The targets: iBaML's and
iMAML's accuracy each ≥ MAML's − 0.03; iBaML's ECE below MAML's and iMAML's (per task and
pooled); ABML's accuracy ≥ twice chance.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("accuracy", "ece", "ece_pooled", "nll")


def collect(paths):
    """``{(method, shots): {seed: {metric: mean}}}`` and the number of ways."""
    runs, ways = defaultdict(dict), set()
    for given in paths:
        path = Path(given) if Path(given).is_file() else Path(given) / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file")
        data = json.loads(path.read_text())
        cfg = data["config"]
        key, seed = (cfg["method"], int(cfg["shots"])), int(cfg["seed"])
        if seed in runs[key]:
            raise SystemExit(f"error: two runs of {key[0]} {key[1]}-shot with seed {seed} ({path})")
        runs[key][seed] = {m: data[m]["mean"] for m in METRICS} | {"logit_scale": data.get("logit_scale")}
        ways.add(int(cfg["ways"]))
    if len(ways) != 1:
        raise SystemExit(f"error: runs with different numbers of ways {sorted(ways)}")
    return runs, ways.pop()


def summarize(runs):
    """Mean and standard deviation over the seeds of each metric."""
    out = {}
    for key, seeds in runs.items():
        entry = {"seeds": sorted(seeds)}
        for m in METRICS:
            values = [seeds[s][m] for s in sorted(seeds)]
            entry[m] = {"per_seed": values, "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        out[key] = entry
    return out


def targets(runs, ways):
    """The image targets per shots, on each seed that iBaML, iMAML and MAML all ran and on the
    means over those seeds."""
    checks = []
    for shots in sorted({s for _, s in runs}):
        get = lambda method: runs.get((method, shots), {})  # noqa: E731
        common = sorted(set(get("ibaml")) & set(get("maml")) & set(get("imaml")))
        for label, value in [(f"seed {s}", lambda method, m, s=s: get(method)[s][m]) for s in common] + \
                [(f"mean over seeds {', '.join(map(str, common))}",
                  lambda method, m: statistics.fmean(get(method)[s][m] for s in common))] if common else []:
            for method in ("ibaml", "imaml"):
                checks.append({"shots": shots, "over": label, "target": f"{method} accuracy >= maml - 0.03",
                               "met": value(method, "accuracy") >= value("maml", "accuracy") - 0.03})
            for m in ("ece", "ece_pooled"):
                checks.append({"shots": shots, "over": label, "target": f"ibaml {m} below maml's and imaml's",
                               "met": value("ibaml", m) < min(value("maml", m), value("imaml", m))})
        for s, row in sorted(get("abml").items()):
            checks.append({"shots": shots, "over": f"seed {s}", "target": "abml accuracy >= twice chance",
                           "met": row["accuracy"] >= 2.0 / ways})
    return checks


def summary_markdown(payload) -> str:
    """The summary table of a payload: per method and shots, each seed's value, then the mean."""
    lines = ["| method | shots | seeds | accuracy | ECE per task | ECE pooled | NLL |", "|---|---|---|---|---|---|---|"]
    for e in sorted(payload["summary"], key=lambda e: (e["shots"], e["method"])):
        cells = [" / ".join(f"{v:.3f}" for v in e[m]["per_seed"]) + f" (mean {e[m]['mean']:.3f})" for m in METRICS]
        lines.append(f"| {e['method']} | {e['shots']} | {', '.join(map(str, e['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_markdown(payload) -> str:
    """The targets table of a payload: each check and whether it was met."""
    return "\n".join(["| shots | over | target | met |", "|---|---|---|---|"]
                     + [f"| {c['shots']} | {c['over']} | {c['target']} | {'yes' if c['met'] else 'no'} |"
                        for c in payload["targets"]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (or their metrics.json)")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    runs, ways = collect(args.runs)
    summary = summarize(runs)
    checks = targets(runs, ways)
    payload = {"ways": ways, "summary": [{"method": k[0], "shots": k[1], **v} for k, v in sorted(summary.items())],
               "targets": checks, "runs": {f"{k[0]}_{k[1]}shot": {str(s): r for s, r in v.items()}
                                           for k, v in sorted(runs.items())}}
    print(summary_markdown(payload) + "\n\n" + targets_markdown(payload))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return payload


if __name__ == "__main__":
    main()
