"""``TaskBatch``: the tensors of a batch of few-shot tasks, with a leading task dimension."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


@dataclass
class TaskBatch:
    """Support and query sets of ``T`` tasks.

    Shapes: ``support_x [T, S, ...]``, ``support_y [T, S, ...]``, ``query_x [T, Q, ...]``,
    ``query_y [T, Q, ...]``; ``info`` holds per-task extras (e.g. sine amplitudes ``[T]``).
    Indexing selects tasks along the leading dimension and always keeps it: ``batch[i]`` is a
    batch of one task, ``batch[i:j]`` of ``j − i`` tasks, ``batch[index_tensor]`` of the tasks named.

    Example
    -------
    >>> batch = TaskBatch(torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(4, 10, 1), torch.zeros(4, 10, 1))
    >>> batch[:2].num_tasks, batch[3].support_x.shape
    (2, torch.Size([1, 5, 1]))
    >>> batch.to(dtype=torch.float64).query_y.dtype
    torch.float64
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in _FIELDS:
            if not isinstance(getattr(self, name), Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(getattr(self, name)).__name__}")
            if getattr(self, name).dim() < 2:
                raise ValueError(f"{name} must have shape [tasks, points, ...], got {tuple(getattr(self, name).shape)}")
        T = self.support_x.shape[0]
        for name in _FIELDS[1:]:
            if getattr(self, name).shape[0] != T:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} tasks but support_x has {T}")
        for name, a, b in (("support_y", self.support_x, self.support_y), ("query_y", self.query_x, self.query_y)):
            if a.shape[1] != b.shape[1]:
                raise ValueError(f"{name} has {b.shape[1]} points per task but its inputs have {a.shape[1]}")
        if not isinstance(self.info, dict):
            raise ValueError(f"info must be a dict, got {type(self.info).__name__}")

    @property
    def num_tasks(self) -> int:
        """``T``, the size of the leading dimension."""
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def _map(self, fn_float: Callable[[Tensor], Tensor], fn_other: Callable[[Tensor], Tensor]) -> "TaskBatch":
        def conv(t):
            if not isinstance(t, Tensor):
                return t
            return fn_float(t) if t.is_floating_point() else fn_other(t)

        return TaskBatch(conv(self.support_x), conv(self.support_y), conv(self.query_x), conv(self.query_y),
                         {k: conv(v) for k, v in self.info.items()})

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TaskBatch":
        """Move to ``device``; floating tensors also take ``dtype`` (integer labels keep theirs)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda t: t.to(device=device))

    def __getitem__(self, index) -> "TaskBatch":
        """Select tasks (an int, slice or index tensor along the task dimension; the dimension is kept).
        ``info`` entries that are tensors with a leading task dimension are selected too."""
        if isinstance(index, int):
            if not -self.num_tasks <= index < self.num_tasks:
                raise IndexError(f"task index {index} out of range for {self.num_tasks} tasks")
            index = index % self.num_tasks
            index = slice(index, index + 1)
        T = self.num_tasks

        def select(t: Tensor) -> Tensor:
            return t[index] if t.dim() > 0 and t.shape[0] == T else t

        return self._map(select, select)

    def chunk(self, start: int, stop: int) -> "TaskBatch":
        """Tasks ``start`` to ``stop − 1`` (``batch[start:stop]``)."""
        return self[start:stop]

    def as_dict(self) -> Dict[str, Tensor]:
        """The four tensors as a dict (the form :mod:`ibaml.learner` also accepts)."""
        return {name: getattr(self, name) for name in _FIELDS}
