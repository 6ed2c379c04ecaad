"""Ray Train starts the process group; ibaml uses it (``owns_group=False``), leaves it to Ray,
and reports checkpoints through ``fit``'s ``on_checkpoint`` (the script of docs/guide/distributed.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''import contextlib, json, sys
from pathlib import Path
import torch
import ray, ray.train
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
import ibaml
from ibaml.data import SineTaskDistribution
from ibaml.train import distributed, training


def train_loop(config):
    torch.set_num_threads(1)
    with distributed.data_parallel("cpu") as ctx:       # Ray's group: used, and left to Ray at the end
        torch.manual_seed(0)
        net = ibaml.core.nets.MLP(1, (16,), 1)
        learner = ibaml.build_learner("imaml", net, ibaml.GaussianLikelihood(1.0), inner_steps=2,
                                      process_group=ctx.group)
        tasks, gen = SineTaskDistribution(shots=5, query=5), torch.Generator().manual_seed(0)
        folder = Path(config["out"]) / f"rank{ctx.rank}"
        resume = ray.train.get_checkpoint()

        def report(step, path, metrics):                # every worker reports; rank 0 attaches the checkpoint
            ray.train.report({"step": step, "loss": float(metrics["loss"])},
                             checkpoint=Checkpoint.from_directory(str(path.parent)) if path else None)

        with (resume.as_directory() if resume else contextlib.nullcontext()) as source:
            fit = training.fit(learner, lambda: tasks.sample(4, gen), config["steps"], folder=folder,
                               resume=source or False, overwrite=True, checkpoint_every=2, rng={"tasks": gen},
                               on_checkpoint=report, progress=False, is_main=ctx.is_main)
        (folder.parent / f"params{ctx.rank}.json").write_text(json.dumps({"world": ctx.world_size,
            "owns": ctx.owns_group, "step": fit.step, "p": [float(v.sum()) for v in learner.meta_params().values()]}))


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    trainer = TorchTrainer(train_loop, train_loop_config={"out": str(out), "steps": 4},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(name="ibaml", storage_path=str(out / "ray")))
    result = trainer.fit()
    print("metrics:", result.metrics, "checkpoint:", result.checkpoint)
    print([json.loads((out / f"params{r}.json").read_text()) for r in range(2)])
'''


def test_ray_train_runs_ibaml_in_the_group_it_started(tmp_path):
    pytest.importorskip("ray.train.torch", reason="Ray is the optional 'sweep' extra (pip install -e '.[sweep]')")
    script = tmp_path / "train_ray.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    ranks = [json.loads((tmp_path / "out" / f"params{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["world"] == 2 and ranks[0]["owns"] is False and ranks[0]["step"] == 4
    assert "metrics: {'step': 4," in proc.stdout and "checkpoint: Checkpoint(" in proc.stdout
