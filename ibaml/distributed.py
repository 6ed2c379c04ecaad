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
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

ENV_VARS = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: ``rank`` of ``world_size``, its ``device`` and ``group``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    group: Any

    @property
    def is_main(self) -> bool:
        """``True`` on rank 0, the process that writes checkpoints and reports."""
        return self.rank == 0


def launched_with_torchrun() -> bool:
    """``True`` when the ``torchrun`` environment (``WORLD_SIZE`` ...) is present."""
    return "WORLD_SIZE" in os.environ


def _init_parameters():
    return inspect.signature(dist.init_process_group).parameters


def init_from_env(device: Any = "cpu", backend: Optional[str] = None) -> DistributedContext:
    """Join the process group described by ``torchrun``'s environment variables
    (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``backend`` defaults to NCCL for a CUDA ``device`` (then ``cuda:LOCAL_RANK`` is used) and
    gloo otherwise. An already initialised default group is reused."""
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"distributed training needs the torchrun environment; {', '.join(missing)} not set "
                           f"(launch with: torchrun --nproc_per_node N script.py ...)")
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        bind = {"device_id": device} if device.type == "cuda" and "device_id" in _init_parameters() else {}
        dist.init_process_group(backend=backend, init_method="env://", **bind)
    group = dist.group.WORLD
    return DistributedContext(dist.get_rank(group), dist.get_world_size(group), local_rank,
                              dist.get_backend(group), device, group)


@contextlib.contextmanager
def data_parallel(device: Any = "cpu", enabled: bool = True,
                  backend: Optional[str] = None) -> Iterator[Optional[DistributedContext]]:
    """The process group of :func:`init_from_env` for the length of a ``with`` block, left
    cleanly at its end (a barrier, so that no process quits while another still reduces, then
    the group destroyed), also when the block raises. ``enabled=False`` (a one-process run)
    yields ``None`` and joins nothing, so one code path serves both::

        with data_parallel(device, enabled=launched_with_torchrun()) as ctx:
            learner = build_learner(..., process_group=ctx.group if ctx else None)
    """
    if not enabled:
        yield None
        return
    ctx = init_from_env(device, backend)
    try:
        yield ctx
    finally:
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


def shard_tasks(task: Mapping[str, Tensor], rank: int, world_size: int) -> Dict[str, Tensor]:
    """The tasks ``[start, stop)`` of every tensor of a task dict (leading task dimension)."""
    num_tasks = task["support_x"].shape[0]
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
