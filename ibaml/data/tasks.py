"""``TaskBatch``: the tensors of a batch of few-shot tasks, with a leading task dimension, and
the checks a batch must pass before any work is done on it (:func:`validate_tasks`)."""

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
        """The four tensors as a dict (the form :mod:`ibaml.train.learner` also accepts)."""
        return {name: getattr(self, name) for name in _FIELDS}


def as_task_dict(batch) -> Dict[str, Tensor]:
    """A :class:`TaskBatch` (or any object with the four fields) as a dict; a dict is copied."""
    if isinstance(batch, dict):
        return dict(batch)
    return {k: getattr(batch, k) for k in _FIELDS}


def validate_tasks(task: Dict[str, Tensor], num_classes: Optional[int] = None) -> None:
    """Check a task batch before any work is done; raise ``ValueError`` with one line naming the
    problem: a missing support set, shapes that disagree (``[tasks, points, ...]`` for inputs
    and targets, the same tasks and point shape in support and query), an empty set, NaN or
    Inf in inputs or targets, and (classification, ``num_classes`` given) labels outside
    ``0..num_classes-1`` (:func:`validate_labels`). It reads values on the host, so it stays
    outside the per-task work (``MetaLearner.task_gradients`` does not call it).

    >>> validate_tasks({"support_x": torch.zeros(2, 3, 1), "support_y": torch.zeros(2, 4, 1)})
    Traceback (most recent call last):
    ValueError: support_x has (2, 3) [tasks, points] but support_y has (2, 4)
    """
    for key in ("support_x", "support_y"):
        if key not in task:
            raise ValueError(f"task batch has no {key!r}")
    for key, value in task.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
    for side in ("support", "query"):
        if f"{side}_x" not in task:
            continue
        if f"{side}_y" not in task:
            raise ValueError(f"task batch has {side}_x but no {side}_y")
        x, y = task[f"{side}_x"], task[f"{side}_y"]
        if x.dim() < 2:
            raise ValueError(f"{side}_x must have shape [tasks, points, ...], got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{side} set is empty: {side}_x has shape {tuple(x.shape)}")
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"{side}_x has {tuple(x.shape[:2])} [tasks, points] but {side}_y has {tuple(y.shape[:2])}")
        for name, t in ((f"{side}_x", x), (f"{side}_y", y)):
            if t.is_floating_point():
                bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(1)
                if bad.any():
                    first = int(bad.nonzero()[0, 0])
                    raise ValueError(f"{name} contains NaN or Inf in {int(bad.sum())} of {t.shape[0]} tasks "
                                     f"(first: task {first})")
    if "query_x" in task and task["query_x"].shape[0] != task["support_x"].shape[0]:
        raise ValueError(f"support has {task['support_x'].shape[0]} tasks but query has {task['query_x'].shape[0]}")
    if "query_x" in task and task["query_x"].shape[2:] != task["support_x"].shape[2:]:
        raise ValueError(f"support_x points have shape {tuple(task['support_x'].shape[2:])} but query_x points "
                         f"have {tuple(task['query_x'].shape[2:])}")
    if num_classes is not None:
        validate_labels(task, num_classes)


def validate_labels(task: Dict[str, Tensor], num_classes: int) -> None:
    """Classification targets must be integer labels in ``0..num_classes-1``.

    >>> validate_labels({"support_y": torch.tensor([[0, 5]])}, num_classes=5)
    Traceback (most recent call last):
    ValueError: support_y has labels outside 0..4 (min 0, max 5)
    """
    for key in ("support_y", "query_y"):
        if key not in task:
            continue
        y = task[key]
        if y.is_floating_point():
            raise ValueError(f"{key} must hold integer class labels, got dtype {y.dtype}")
        if (y < 0).any() or (y >= num_classes).any():
            raise ValueError(f"{key} has labels outside 0..{num_classes - 1} (min {int(y.min())}, max {int(y.max())})")
