"""Data-parallel meta-training on ``torch.distributed``: each process solves a share of the
meta-batch, and the meta-gradient is summed across processes.

With ``P`` processes and a batch of ``T`` tasks, process ``r`` solves the contiguous shard
``[start_r, stop_r)`` (:func:`shard_bounds`, sizes differing by at most one). It keeps the
``n_r`` tasks whose meta-gradient is finite and sums their gradients, ``s_r = Σ_{t kept on r} g_t``.
One all-reduce (:func:`all_reduce_sum`) then gives every process

    g = (Σ_r s_r) / (Σ_r n_r) = Σ_r (n_r / N) · mean_r,      N = Σ_r n_r,

the mean over all finite tasks of the batch: the one-process result, up to the order of
floating-point sums. Per-task values (losses, diagnostics, the finite mask) are gathered
(:func:`all_gather_tasks`) so that every process sees the whole batch, decides the
non-finite policy identically, and reports the same statistics.

:class:`ibaml.MetaLearner` does this when it is given ``process_group=...``; every process
samples the same full batch (same seed), the learner draws its per-task noise for the whole
batch and then keeps its shard.

Launching on one or several nodes, SLURM, Ray Train and failures: ``docs/guide/distributed.md``.
Launch with ``torchrun`` (gloo on the CPU, NCCL on CUDA)::

    torchrun --nproc_per_node 2 examples/sine_regression.py --method imaml --out runs/sine_ddp

Example
-------
In a process that ``torchrun`` started::

    ctx = init_from_env("cpu")
    learner = build_learner("imaml", net, lik, process_group=ctx.group)

Each rank's share of a batch of 10 tasks:

>>> shard_bounds(10, rank=1, world_size=4)
(3, 6)
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

ENV_VARS = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
#: the store key under which the first failing rank leaves its error (:func:`first_failure`)
FAILURE_KEY = "ibaml/first_failure"


class LaunchError(RuntimeError):
    """The launch environment does not describe a usable multi-process job."""


class PeerFailedError(RuntimeError):
    """Another rank of the job failed first; the message names that rank and its error."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: ``rank`` of ``world_size``, its ``device`` and ``group``;
    ``owns_group`` is ``False`` where a launcher (Ray Train, Lightning Fabric) started the
    group, which ibaml then uses and leaves to it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    group: Any
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        """``True`` on rank 0, the process that writes checkpoints and reports."""
        return self.rank == 0


def launched_with_torchrun() -> bool:
    """``True`` when the ``torchrun`` environment (``WORLD_SIZE`` ...) is present."""
    return "WORLD_SIZE" in os.environ


def _slurm_tasks(environ: Mapping[str, str]) -> int:
    """Tasks of the SLURM job step this process belongs to (``1`` outside SLURM)."""
    if "SLURM_PROCID" not in environ:
        return 1
    return int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)


def slurm_port(job_id: str) -> str:
    """A rendezvous port derived from the SLURM job id, so that jobs sharing a node differ:
    ``20000 + job_id mod 20000``.

    >>> slurm_port("1234567")
    '34567'
    """
    return str(20000 + int(job_id) % 20000)


def rank_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, str]]:
    """The rank variables (``RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT``) of a
    multi-process launch, or ``None`` for a single process.

    * ``torchrun`` (and launchers that export its variables): those variables, as they are;
    * ``srun`` with several tasks and no torchrun (``SLURM_NTASKS > 1``, ``SLURM_PROCID`` set):
      ``RANK = SLURM_PROCID``, ``WORLD_SIZE = SLURM_NTASKS`` (the step's
      ``SLURM_STEP_NUM_TASKS`` where set), ``LOCAL_RANK = SLURM_LOCALID``; ``MASTER_ADDR`` and
      ``MASTER_PORT`` from the environment, else ``127.0.0.1`` on a single node
      (``SLURM_NNODES = 1``) and :func:`slurm_port` of ``SLURM_JOB_ID``. Several nodes without
      ``MASTER_ADDR`` raise :class:`LaunchError`.

    ``environ`` defaults to ``os.environ``.

    >>> rank_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2",
    ...                   "SLURM_NNODES": "1", "SLURM_JOB_ID": "7"})
    {'RANK': '2', 'WORLD_SIZE': '4', 'LOCAL_RANK': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '20007'}
    >>> rank_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    True
    """
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ:
        return {k: environ[k] for k in ENV_VARS + ("LOCAL_RANK",) if k in environ}
    tasks = _slurm_tasks(environ)
    if tasks < 2:
        return None
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES")
                or environ.get("SLURM_JOB_NUM_NODES") or 1)
    if "MASTER_ADDR" not in environ and nodes > 1:
        raise LaunchError(f"srun started {tasks} tasks on {nodes} nodes without torchrun: set MASTER_ADDR to the "
                          f"first node (export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))")
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT") or slurm_port(environ.get("SLURM_JOB_ID", "0"))}


def launched_in_parallel(environ: Optional[Mapping[str, str]] = None) -> bool:
    """``True`` when this process is one of several that ``torchrun`` or ``srun`` started
    (:func:`rank_environment`).

    >>> launched_in_parallel({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_NNODES": "1"})
    True
    """
    return rank_environment(environ) is not None


def launch_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """The number of processes the launcher started (``1`` for a single process).

    >>> launch_world_size({"WORLD_SIZE": "3", "RANK": "0"})
    3
    """
    env = rank_environment(environ)
    return 1 if env is None else int(env["WORLD_SIZE"])


def _init_parameters():
    return inspect.signature(dist.init_process_group).parameters


def _as_timedelta(timeout) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=timeout)


def _existing_context(device: torch.device) -> DistributedContext:
    """The context of a default group that someone else initialised (``owns_group=False``)."""
    group = dist.group.WORLD
    local_rank = int(os.environ.get("LOCAL_RANK", device.index or 0))
    return DistributedContext(dist.get_rank(group), dist.get_world_size(group), local_rank,
                              dist.get_backend(group), device, group, owns_group=False)


def init_from_env(device: Any = "cpu", backend: Optional[str] = None, timeout: Any = None) -> DistributedContext:
    """Join the job's process group.

    * A default group that is already initialised (Ray Train, Lightning Fabric, a script of
      one's own) is used as it is: ``owns_group=False``, and :func:`data_parallel` leaves it to
      its owner.
    * Otherwise the group is started from :func:`rank_environment`: ``torchrun``'s variables
      (``env://``) or, under ``srun`` without torchrun, SLURM's (``tcp://MASTER_ADDR:MASTER_PORT``).

    ``backend`` defaults to NCCL for a CUDA ``device`` (then ``cuda:LOCAL_RANK`` is used) and
    gloo otherwise; ``timeout`` (seconds or a ``timedelta``) bounds every collective
    (torch's default where ``None``)."""
    device = torch.device(device)
    if dist.is_initialized():
        return _existing_context(device)
    env = rank_environment()
    missing = [v for v in ENV_VARS if env is None or v not in env]
    if missing:
        raise LaunchError(f"distributed training needs the torchrun environment; {', '.join(missing)} not set "
                          f"(launch with: torchrun --nproc_per_node N script.py ..., or srun with several tasks)")
    local_rank = int(env.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    options = {"device_id": device} if device.type == "cuda" and "device_id" in _init_parameters() else {}
    if timeout is not None:
        options["timeout"] = _as_timedelta(timeout)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", **options)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                                rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), **options)
    group = dist.group.WORLD
    return DistributedContext(dist.get_rank(group), dist.get_world_size(group), local_rank,
                              dist.get_backend(group), device, group)


def describe_failure(rank: int, error: BaseException) -> str:
    """One line naming a rank's error: ``"rank R: Type: first line of the message"``.

    >>> describe_failure(1, ValueError("bad file\\nmore"))
    'rank 1: ValueError: bad file'
    """
    first = (str(error).strip().splitlines() or [""])[0]
    return f"rank {rank}: {type(error).__name__}" + (f": {first}" if first else "")


def first_failure(group, rank: int, error: BaseException) -> str:
    """Record this rank's failure in the group's store unless another rank's came first, and
    return the first one (:func:`describe_failure`). The store is shared by the whole job, so
    every failing rank gets the same answer; where it cannot be reached (the rank that hosted
    it is gone), this rank's own failure is returned."""
    mine = describe_failure(rank, error)
    try:
        return group.get_group_store().compare_set(FAILURE_KEY, "", mine).decode()
    except Exception:   # the store went down with its host: name this rank's error
        return mine


def _abort(group) -> None:
    """Close the group's connections without a collective, then forget it, so that peers blocked
    in a collective fail at once instead of waiting for the timeout."""
    with contextlib.suppress(Exception):
        group.abort()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def refuse_silent_copies(environ: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`LaunchError` when the launcher started several processes (``srun -n N``,
    ``torchrun``) that were about to run as independent one-process jobs.

    >>> refuse_silent_copies({})   # one process: nothing to refuse
    """
    env = rank_environment(environ)
    if env is not None:
        raise LaunchError(f"{env['WORLD_SIZE']} processes were launched but this run is not data-parallel: each would "
                          f"run the whole job into the same output; run data-parallel or launch a single process")


@contextlib.contextmanager
def data_parallel(device: Any = "cpu", enabled: bool = True, backend: Optional[str] = None,
                  timeout: Any = None) -> Iterator[Optional[DistributedContext]]:
    """The process group of :func:`init_from_env` for the length of a ``with`` block.

    * Normal end: a barrier (no process quits while another still reduces), then the group is
      destroyed, if this block started it.
    * A rank that raises names its error in the job's store (:func:`first_failure`) and, if the
      block started the group, aborts it: the peers' next or current collective fails at once,
      and they raise :class:`PeerFailedError` naming the first failing rank and its error. Every
      process exits non-zero promptly, and ``torchrun`` tears the job down.
    * A group someone else started (Ray Train, Lightning Fabric) is used and left alone: neither
      destroyed nor aborted; its launcher tears it down.

    ``enabled=False`` (a one-process run) yields ``None`` and joins nothing, so one code path
    serves both; it raises :class:`LaunchError` where several processes were launched (e.g.
    ``srun -n 2`` without data parallelism), instead of running the job in each::

        with data_parallel(device, enabled=launched_in_parallel()) as ctx:
            learner = build_learner(..., process_group=ctx.group if ctx else None)
    """
    if not enabled:
        refuse_silent_copies()
        yield None
        return
    ctx = init_from_env(device, backend, timeout)
    try:
        yield ctx
    except BaseException as error:
        first = first_failure(ctx.group, ctx.rank, error)
        if ctx.owns_group:
            _abort(ctx.group)
        if first == describe_failure(ctx.rank, error):
            raise
        raise PeerFailedError(f"stopped because {first} (this rank then saw: "
                              f"{describe_failure(ctx.rank, error)})") from error
    if ctx.owns_group:
        dist.barrier(ctx.group)
        dist.destroy_process_group()


def shard_bounds(num_tasks: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous shard of ``num_tasks`` tasks; the first
    ``num_tasks % world_size`` shards hold one task more (as :func:`torch.tensor_split`)."""
    if num_tasks < world_size:
        raise ValueError(f"a meta-batch of {num_tasks} tasks cannot be split over {world_size} processes; "
                         f"use a meta-batch of at least {world_size}")
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_tasks(task: Mapping[str, Tensor], rank: int, world_size: int, num_tasks: Optional[int] = None) -> Dict[str, Tensor]:
    """The tasks ``[start, stop)`` of every tensor of a task dict (leading task dimension, of
    ``num_tasks`` tasks; default the length of ``task["support_x"]``)."""
    num_tasks = task["support_x"].shape[0] if num_tasks is None else num_tasks
    start, stop = shard_bounds(num_tasks, rank, world_size)
    return {k: v[start:stop] for k, v in task.items()}


def all_gather_tasks(values: Mapping[str, Tensor], num_tasks: int, group=None) -> Dict[str, Tensor]:
    """Concatenate per-task tensors ``[n_r, ...]`` of every rank into ``[num_tasks, ...]`` in rank
    order (the shards of :func:`shard_bounds`). Any dtype: values travel as float64 (exact for
    bool, for integers below 2⁵³ and for float32/float64) in a single all-gather."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    start, stop = shard_bounds(num_tasks, rank, world)
    sizes = [shard_bounds(num_tasks, r, world) for r in range(world)]
    longest = max(b - a for a, b in sizes)
    names = list(values)
    first = values[names[0]]
    columns = [values[k].reshape(stop - start, -1).to(torch.float64) for k in names]
    widths = [c.shape[1] for c in columns]
    packed = torch.zeros(longest, sum(widths), dtype=torch.float64, device=first.device)
    packed[: stop - start] = torch.cat(columns, 1)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    rows = torch.cat([g[: b - a] for g, (a, b) in zip(gathered, sizes)])
    out, offset = {}, 0
    for k, w in zip(names, widths):
        out[k] = rows[:, offset: offset + w].reshape(num_tasks, *values[k].shape[1:]).to(values[k].dtype)
        offset += w
    return out


def all_reduce_sum(tensors: Mapping[str, Tensor], group=None) -> Dict[str, Tensor]:
    """Elementwise sums over the ranks of a dict of tensors, in one all-reduce (the tensors are
    flattened into one vector of their common dtype and split again)."""
    names = list(tensors)
    dtype = tensors[names[0]].dtype
    for k in names[1:]:
        dtype = torch.promote_types(dtype, tensors[k].dtype)
    flat = torch.cat([tensors[k].reshape(-1).to(dtype) for k in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = {}, 0
    for k in names:
        n = tensors[k].numel()
        out[k] = flat[offset: offset + n].view_as(tensors[k]).to(tensors[k].dtype)
        offset += n
    return out


def broadcast_state(module: nn.Module, generator: Optional[torch.Generator] = None, src: int = 0,
                    group=None) -> None:
    """Overwrite ``module``'s parameters and buffers (and ``generator``'s state) with rank
    ``src``'s, so that every process starts from the same meta-parameters and draws."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)
    if generator is not None:
        device = next(iter(module.parameters())).device
        state = generator.get_state().to(device)
        dist.broadcast(state, src=src, group=group)
        generator.set_state(state.cpu())
