"""``TaskBatch``: the tensors of a batch of few-shot tasks, with a leading task dimension."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """Support and query sets of ``T`` tasks.

    Shapes: ``support_x [T, S, ...]``, ``support_y [T, S, ...]``, ``query_x [T, Q, ...]``,
    ``query_y [T, Q, ...]``; ``info`` holds per-task extras (e.g. sine amplitudes ``[T]``).

    Example
    -------
    >>> batch = TaskBatch(torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(4, 10, 1), torch.zeros(4, 10, 1))
    >>> batch[:2].num_tasks
    2
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def _map(self, fn_float, fn_other) -> "TaskBatch":
        def conv(t):
            return fn_float(t) if t.is_floating_point() else fn_other(t)

        return TaskBatch(conv(self.support_x), conv(self.support_y), conv(self.query_x), conv(self.query_y),
                         {k: conv(v) for k, v in self.info.items()})

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TaskBatch":
        """Move to ``device``; floating tensors also take ``dtype`` (integer labels keep theirs)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda t: t.to(device=device))

    def __getitem__(self, index) -> "TaskBatch":
        """Select tasks (an int, slice or index tensor along the task dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index], lambda t: t[index])

    def chunk(self, start: int, stop: int) -> "TaskBatch":
        """Tasks ``start`` to ``stop - 1``."""
        return self[start:stop]

    def as_dict(self) -> Dict[str, Tensor]:
        return {"support_x": self.support_x, "support_y": self.support_y, "query_x": self.query_x,
                "query_y": self.query_y}
