"""Data-parallel jobs that end together and resume anywhere: several gloo processes started as
torchrun, srun or another launcher would start them (plain subprocesses with the launcher's
environment variables), each checked for its exit status, its output and what it wrote.

* a rank that raises makes every rank exit non-zero promptly, naming the first error;
* a resume where only rank 0 can read the checkpoint folder continues every rank at the same
  step with identical parameters, and ``select_best`` restores identical parameters everywhere;
* a process group started by someone else is used and left alone;
* ``srun`` with several tasks and no torchrun maps SLURM's variables to ranks.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ibaml.train import distributed
from ibaml.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
               "TORCHELASTIC_RUN_ID")

# the part every job script starts with: a tiny float64 sine learner, one thread
PREAMBLE = """
import os, sys
from pathlib import Path
import torch
import ibaml
from ibaml.data import SineTaskDistribution
from ibaml.train import distributed, training
torch.set_num_threads(1)
out = Path(sys.argv[1])
TASKS = SineTaskDistribution(shots=5, query=5)

def learner(group=None):
    torch.manual_seed(0)
    net = ibaml.core.nets.MLP(1, (8,), 1).double()
    return ibaml.build_learner("imaml", net, ibaml.GaussianLikelihood(1.0).double(), inner_steps=2, meta_lr=1e-2,
                               process_group=group)

def sampler(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (lambda: TASKS.sample(4, gen, dtype=torch.float64)), gen
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This environment without any launcher's variables, one thread, ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def torchrun_env(rank: int, world: int, port: int) -> dict:
    return clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port))


def launch(args, envs, timeout: float):
    """Start one process per environment in ``envs``, wait at most ``timeout`` seconds for all of
    them (a process still running then is killed), and return ``[(returncode, stdout, stderr,
    seconds)]`` in rank order."""
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable] + list(args), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env in envs]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += "\n[killed: still running after the timeout]"
        results.append((p.returncode, out, err, time.monotonic() - start))
    return results


def run_job(tmp_path, body: str, envs, timeout: float = 120):
    script = tmp_path / "job.py"
    script.write_text(PREAMBLE + textwrap.dedent(body))
    return launch([str(script), str(tmp_path)], envs, timeout)


# ---------------------------------------------------------------------------------------------
# a failing rank ends the job


FAILING = """
with distributed.data_parallel("cpu") as ctx:
    model, (sample, _) = learner(ctx.group), sampler()
    for step in range(10_000):   # far longer than the test waits: only the failure ends it
        if ctx.rank == 1 and step == 2:
            raise ValueError("episode file tasks_07.npz is truncated")
        model.meta_step(sample())
"""


def test_a_failing_rank_stops_every_rank_within_a_minute(tmp_path):
    port = free_port()
    results = run_job(tmp_path, FAILING, [torchrun_env(r, 3, port) for r in range(3)], timeout=60)
    for rank, (code, _, err, seconds) in enumerate(results):
        assert code not in (0, None) and "[killed" not in err, (rank, code, err[-3000:])
        assert seconds < 60, (rank, seconds)
        # every rank names the first failure: rank 1 raised it, the others stopped because of it
        assert "ValueError: episode file tasks_07.npz is truncated" in err, (rank, err[-3000:])
        if rank != 1:
            assert "PeerFailedError: stopped because rank 1: ValueError" in err, (rank, err[-3000:])


def test_first_failure_is_kept_in_the_store():
    store = torch.distributed.HashStore()

    class Group:
        def get_group_store(self):
            return store

    first = distributed.first_failure(Group(), 2, MemoryError("out of memory"))
    assert first == "rank 2: MemoryError: out of memory"
    assert distributed.first_failure(Group(), 0, RuntimeError("Connection closed by peer")) == first

    class Gone:
        def get_group_store(self):
            raise RuntimeError("store unreachable")

    assert distributed.first_failure(Gone(), 0, KeyError("x")) == "rank 0: KeyError: 'x'"


# ---------------------------------------------------------------------------------------------
# resume and best checkpoint without a shared file system

RESUME = """
with distributed.data_parallel("cpu") as ctx:
    own = out / f"rank{ctx.rank}"          # no shared file system: each rank sees only its own folder
    results = {"rank": ctx.rank}
    # 2 steps, then a new process continues to 4 (rank 0 alone holds the checkpoint)
    model, (sample, gen) = learner(ctx.group), sampler()
    training.fit(model, sample, 2, folder=own / "run", rng={"tasks": gen}, progress=False, is_main=ctx.is_main)
    model, (sample, gen) = learner(ctx.group), sampler()
    fit = training.fit(model, sample, 4, folder=own / "run", resume=True, rng={"tasks": gen}, progress=False,
                       is_main=ctx.is_main)
    results.update(resumed_from=fit.resumed_from, steps_run=fit.steps_run, resumed=model.meta_params())
    # the same 4 steps uninterrupted
    model, (sample, gen) = learner(ctx.group), sampler()
    calls = []
    training.fit(model, sample, 4, folder=own / "whole", checkpoint_every=2, rng={"tasks": gen}, progress=False,
                 is_main=ctx.is_main, on_checkpoint=lambda step, path, metrics: calls.append((step, path)))
    results["on_checkpoint"] = calls
    results["uninterrupted"] = model.meta_params()
    # the best validation is at step 2 of 4; rank 0 alone writes best.pt
    model, (sample, gen) = learner(ctx.group), sampler()
    fit = training.fit(model, sample, 4, folder=own / "best", validate=lambda step: {"score": -abs(step - 2)},
                       validate_every=1, select_best=lambda entry: entry["score"], rng={"tasks": gen},
                       progress=False, is_main=ctx.is_main)
    results.update(evaluated=fit.evaluated, best=model.state_dict())
    torch.save(results, out / f"result{ctx.rank}.pt")
"""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    port = free_port()
    results = run_job(tmp, RESUME, [torchrun_env(r, 2, port) for r in range(2)], timeout=150)
    for rank, (code, _, err, _) in enumerate(results):
        assert code == 0, (rank, err[-3000:])
    assert not (tmp / "rank1").exists() or not any((tmp / "rank1").rglob("*.pt"))
    return tmp, [torch.load(tmp / f"result{r}.pt", weights_only=False) for r in range(2)]


def test_resume_reads_rank_0s_checkpoint_on_every_rank(resumed):
    _, (r0, r1) = resumed
    assert r0["resumed_from"] == r1["resumed_from"] == 2 and r0["steps_run"] == r1["steps_run"] == 2
    for k, v in r0["resumed"].items():
        assert torch.equal(v, r1["resumed"][k]), k
        assert torch.equal(v, r0["uninterrupted"][k]), k   # and continues the uninterrupted trajectory


def test_on_checkpoint_runs_on_every_rank_with_the_file_on_rank_0(resumed):
    tmp, (r0, r1) = resumed
    assert r0["on_checkpoint"] == [(2, tmp / "rank0" / "whole" / "last.pt"), (4, tmp / "rank0" / "whole" / "last.pt")]
    assert r1["on_checkpoint"] == [(2, None), (4, None)]


def test_select_best_restores_identical_parameters_on_every_rank(resumed):
    tmp, (r0, r1) = resumed
    assert r0["evaluated"] == r1["evaluated"] == {"checkpoint": "best", "step": 2}
    saved = load_checkpoint(tmp / "rank0" / "best" / "best.pt")["learner"]
    for k, v in saved.items():
        assert torch.equal(r0["best"][k], v) and torch.equal(r1["best"][k], v), k


# ---------------------------------------------------------------------------------------------
# a process group that a launcher started (Ray Train, Lightning Fabric)

EXTERNAL = """
import torch.distributed as dist
rank, port = int(os.environ["JOB_RANK"]), os.environ["JOB_PORT"]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
ctx = distributed.init_from_env("cpu")
assert (ctx.rank, ctx.world_size, ctx.owns_group) == (rank, 2, False), ctx
with distributed.data_parallel("cpu") as ctx:
    model, (sample, _) = learner(ctx.group), sampler()
    model.meta_step(sample())
assert dist.is_initialized(), "data_parallel destroyed a group it did not start"
total = torch.ones(1)
dist.all_reduce(total)   # the launcher's group still works
print("after the block:", int(total), flush=True)
dist.barrier()   # the launcher's teardown: no rank destroys its group while a peer still reduces
dist.destroy_process_group()
"""


def test_a_group_started_by_the_launcher_is_used_and_left_alone(tmp_path):
    port = str(free_port())
    results = run_job(tmp_path, EXTERNAL, [clean_env(JOB_RANK=str(r), JOB_PORT=port) for r in range(2)], timeout=90)
    for rank, (code, out, err, _) in enumerate(results):
        assert code == 0, (rank, err[-3000:])
        assert "after the block: 2" in out


# ---------------------------------------------------------------------------------------------
# srun without torchrun

EXAMPLE_ARGS = ["--method", "imaml", "--meta-iters", "2", "--meta-batch", "4", "--inner-steps", "2", "--dtype",
                "float64", "--train-only", "--no-progress", "--threads", "1"]


def slurm_env(rank: int, tasks: int, **extra) -> dict:
    return clean_env(SLURM_NTASKS=str(tasks), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NNODES="1",
                     SLURM_JOB_ID="4242", **extra)


def test_srun_tasks_without_torchrun_become_ranks(tmp_path):
    port = str(free_port())
    args = [str(ROOT / "examples" / "sine_regression.py")] + EXAMPLE_ARGS + ["--out", str(tmp_path / "run")]
    results = launch(args, [slurm_env(r, 2, MASTER_PORT=port) for r in range(2)], timeout=150)
    for rank, (code, _, err, _) in enumerate(results):
        assert code == 0, (rank, err[-3000:])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
    assert sum(out.count("non-finite tasks skipped") for _, out, _, _ in results) == 1   # rank 0 reports alone


def test_slurm_variables_map_to_ranks():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "12", "MASTER_ADDR": "node001"}
    assert distributed.rank_environment(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                 "MASTER_ADDR": "node001", "MASTER_PORT": "20012"}
    assert distributed.launch_world_size(env) == 4 and distributed.launched_in_parallel(env)
    assert distributed.rank_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    with pytest.raises(distributed.LaunchError, match=r"^srun started 4 tasks on 2 nodes without torchrun: "
                                                      r"set MASTER_ADDR"):
        distributed.rank_environment({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_a_one_process_run_refuses_several_srun_tasks(monkeypatch):
    for k, v in slurm_env(1, 2).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.LaunchError, match="2 processes were launched but this run is not data-parallel"):
        with distributed.data_parallel("cpu", enabled=False):
            pass


def run_two_torchrun_nodes(args, timeout: float):
    """Start two torchrun agents (node ranks 0 and 1) with ``args`` on a fresh port; wait at most
    ``timeout`` seconds for both, kill any still running, and return ``[(returncode, stderr)]``."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = str(free_port())
    procs = [subprocess.Popen([torchrun, "--node_rank", str(node), "--nnodes", "2", "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", port] + args, env=clean_env(),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in range(2)]
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err = f"(killed after {timeout:.0f} s)\n" + err
        results.append((p.returncode, err))
    return results


def test_torchrun_on_two_nodes_is_one_job(tmp_path):
    """Two torchrun agents, one per "node" (both on this machine), rendezvous at node 0's address.

    A second try on a fresh port is allowed: the free port can be taken by another process between
    choosing and binding it, and torchrun's agents can miss each other in their exit barrier
    (pytorch/pytorch#69520), neither of which is this library's behaviour."""
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        args = [str(ROOT / "examples" / "sine_regression.py")] + EXAMPLE_ARGS + ["--out", str(out)]
        results = run_two_torchrun_nodes(args, timeout=90)
        if all(code == 0 for code, _ in results):
            break
    for node, (code, err) in enumerate(results):
        assert code == 0, (node, err[-3000:])
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
