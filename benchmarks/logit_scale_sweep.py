"""Calibration of a finished image run re-scored at fixed logit scales.

    python -m benchmarks.logit_scale_sweep runs/img/ibaml_5shot runs/img/imaml_5shot --scales 3,3.5,4,4.5,5,6 \
        --out docs/results/image_benchmark/logit_scale_sweep.json

Each folder is an ``examples/miniimagenet.py`` run with its ``last.pt``. The learner is
rebuilt from the checkpoint's configuration (:func:`ibaml.recipes.image_presets.image_learner_from_config`;
the same data, fixture included), adapts once to
the run's test tasks (the example's seeds, so the same tasks and posterior draws as its
report) and its predictions ``(1/S) Σ_s softmax(τ f_s)`` are scored at each scale ``τ``: the
mean of the per-task ECEs, the ECE of all test points pooled (:func:`ibaml.calibration.pooled_ece`),
accuracy and mean confidence. A scale does not change what the network learned, so the sweep
separates the two readings of the ECE: the pooled one has a minimum near zero at the
calibrated scale, while the per-task mean keeps a floor set by the binomial noise of a few
points per bin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ibaml.calibration import CalibrationReport
from ibaml.data import EpisodeSampler
from ibaml.experiments.cli import add_image_data_options, load_image_data
from ibaml.recipes.image_presets import image_learner_from_config
from ibaml.train.checkpoint import load_checkpoint

from . import _harness as H

KEYS = ("accuracy", "ece", "ece_pooled", "confidence", "nll")


def data_options(config: dict) -> argparse.Namespace:
    """A run's configuration as the options of :func:`ibaml.experiments.cli.load_image_data`, the data
    options it does not hold at their defaults."""
    parser = argparse.ArgumentParser()
    add_image_data_options(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **config})


def test_outputs(folder: Path):
    """``(outputs [T, S, N, C], labels [T, N], learned τ, config)`` of the run's test tasks."""
    checkpoint = load_checkpoint(folder / "last.pt", map_location="cpu")
    config = checkpoint["config"]
    torch.set_num_threads(config.get("threads") or torch.get_num_threads())
    device, dtype = torch.device("cpu"), getattr(torch, config["dtype"])
    splits = load_image_data(data_options(config), device)
    sampler = EpisodeSampler.for_splits(splits, config["ways"], config["shots"], config["query"], seed=config["seed"],
                                        dtype=dtype)["test"]
    learner = image_learner_from_config(config, splits["train"].image_shape, device, dtype)
    learner.load_training_state(checkpoint["training"])
    outputs, labels = learner.task_outputs(sampler.sample, config["eval_tasks"], chunk=config["eval_chunk"],
                                           seed=20_000 + config["seed"], generators=(sampler.generator,))
    return outputs, labels, float(learner.likelihood.scale.detach()), config


def sweep(folder: Path, scales) -> dict:
    outputs, labels, learned, config = test_outputs(folder)
    rows = {}
    for tau in sorted(set(scales) | {learned}):
        report = CalibrationReport.from_logits(outputs, labels, tau)
        rows[f"{tau:.4g}"] = {k: report.metrics[k]["mean"] for k in KEYS}
    return {"method": config["method"], "shots": config["shots"], "learned_scale": learned, "scales": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="examples/miniimagenet.py run folders (with last.pt)")
    p.add_argument("--scales", default="2,3,4,5,6", help="comma-separated logit scales")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    try:
        scales = [float(t) for t in args.scales.split(",")]
    except ValueError:
        p.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
    if not all(t > 0 for t in scales):
        p.error(f"--scales must be positive, got {args.scales!r}")
    results = {}
    for folder in args.folders:
        if not (Path(folder) / "last.pt").is_file():
            raise SystemExit(f"error: {Path(folder) / 'last.pt'}: no such file")
        results[Path(folder).name] = res = sweep(Path(folder), scales)
        print(f"\n{Path(folder).name} ({res['method']}, {res['shots']}-shot), learned τ = {res['learned_scale']:.3f}")
        print("| τ | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 1))
        for tau, row in res["scales"].items():
            print(f"| {tau} | " + " | ".join(f"{row[k]:.4f}" for k in KEYS) + " |")
    if args.out:
        H.write_json_file(Path(args.out), results)
    return results


if __name__ == "__main__":
    main()
