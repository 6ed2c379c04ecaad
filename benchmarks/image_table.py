"""The README's image-classification table from the ``metrics.json`` files of
``examples/miniimagenet.py`` runs (one folder per run).

    python -m benchmarks.image_table runs/img/maml_1shot runs/img/ibaml_1shot ... --out docs/results/image_benchmark/table.json
    python -m benchmarks.image_table docs/results/image_benchmark/final/*/metrics.json

Each run's ``metrics.json`` is read; the table lists, per run, the method, shots, the inner
problem's knobs that were set (``precision``, ``init_scale``, ``kl_weight``, inner optimiser
and steps, a meta learning rate other than 10⁻³; ``preset`` where the method's defaults were used), test accuracy, NLL, ECE and
Brier score (mean ± 95% CI over the test tasks), the ECE of all test points pooled (bootstrap CI
over tasks), the same NLL and pooled ECE at the logit scale fitted to the validation tasks
(``calibrated``, temperature scaling; ``—`` for runs that did not record them) and the time per
meta-iteration. ``--out`` writes the rows (metrics and configuration) as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("accuracy", "nll", "ece", "ece_pooled", "brier", "confidence")
CALIBRATED = ("nll", "ece_pooled")
KNOBS = ("precision", "init_scale", "kl_weight", "inner_optimizer", "inner_steps", "inner_lr", "prior_meta_lr")
DEFAULT_META_LR = 1e-3


def collect(paths):
    """``{run name: metrics}`` from the runs' ``metrics.json`` (a folder or the file itself)."""
    rows = {}
    for given in paths:
        path = Path(given) if Path(given).is_file() else Path(given) / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file")
        rows[path.parent.name] = json.loads(path.read_text())
    return rows


def knobs(config, learned_scale=None) -> str:
    """The inner-problem options a run set, ``preset`` if none; a learned logit scale as
    ``τ MODE from INIT at META_LR → FINAL``."""
    set_ = [f"{k}={config[k]}" for k in KNOBS if config.get(k) is not None]
    if config.get("meta_lr", DEFAULT_META_LR) != DEFAULT_META_LR:
        set_.append(f"meta_lr={config['meta_lr']}")
    mode = config.get("logit_scale")
    if mode not in (None, "fixed") or (mode is None and learned_scale not in (None, 1.0)):
        # runs older than these options used τ = 1 and 10⁻²; None means the method's preset
        init, lr = config.get("logit_scale_init", 1.0), config.get("logit_scale_meta_lr", 0.01)
        set_.append(f"τ {mode or 'preset'} from {init or 'preset'} at {lr or 'preset'} → {learned_scale:.2f}")
    return ", ".join(set_) or "preset"


def cell(metric) -> str:
    """``mean ± ci95``; ``—`` for a metric the run did not record (``confidence`` in older runs)."""
    return "—" if metric is None else f"{metric['mean']:.3f} ± {metric['ci95']:.3f}"


def markdown(rows) -> str:
    head = (["run", "method", "shots", "inner problem"] + list(METRICS) + ["validation τ"]
            + [f"{k} at validation τ" for k in CALIBRATED] + ["s / meta-iter"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        c = m["config"]
        values = [name, c["method"], str(c["shots"]), knobs(c, m.get("logit_scale"))] + [cell(m.get(k)) for k in METRICS]
        fit = m.get("calibrated", {})
        values += [f"{fit['logit_scale']:.2f}" if fit else "—"] + [cell(fit.get(k)) for k in CALIBRATED]
        lines.append("| " + " | ".join(values + [f"{m['ms_per_meta_iter'] / 1000:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders or their metrics.json files")
    p.add_argument("--out", default=None, help="write the collected rows as JSON")
    args = p.parse_args(argv)
    rows = collect(args.runs)
    print(markdown(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
