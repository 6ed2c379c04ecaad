"""Small pure functions on dicts of tensors ("parameter dicts").

Every algorithm in ibaml works on parameter dicts ``{name: tensor}``; these helpers
map, combine and flatten them. They contain only tensor operations, so they run
under ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``).

Example
-------
>>> a = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
>>> spec = FlatSpec.from_dict(a)
>>> vec = spec.flatten(a)          # shape [9]
>>> spec.unflatten(vec)["w"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch
from torch import Tensor

ParamDict = Dict[str, Tensor]


def tree_map(fn: Callable, *trees: Mapping[str, Tensor]) -> ParamDict:
    """Apply ``fn`` leafwise: ``{k: fn(t1[k], t2[k], ...)}`` over the keys of the first tree."""
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> ParamDict:
    """``a + alpha * b`` leafwise."""
    return {k: a[k] + alpha * b[k] for k in a}


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> ParamDict:
    """``a - b`` leafwise."""
    return {k: a[k] - b[k] for k in a}


def tree_scale(a: Mapping[str, Tensor], s) -> ParamDict:
    """``s * a`` leafwise (``s`` a number or a broadcastable tensor)."""
    return {k: s * v for k, v in a.items()}


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``<a, b> = sum_k sum(a[k] * b[k])`` as a 0-d tensor."""
    return sum((a[k] * b[k]).sum() for k in a)


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of all leaves."""
    return torch.sqrt(sum((v * v).sum() for v in a.values()))


def tree_detach(a: Mapping[str, Tensor]) -> ParamDict:
    return {k: v.detach() for k, v in a.items()}


def tree_zeros_like(a: Mapping[str, Tensor]) -> ParamDict:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_all_finite(a: Mapping[str, Tensor]) -> Tensor:
    """A boolean 0-d tensor: every entry of every leaf is finite (no host synchronisation)."""
    out = torch.ones((), dtype=torch.bool, device=next(iter(a.values())).device)
    for v in a.values():
        out = out & torch.isfinite(v).all()
    return out


@dataclass(frozen=True)
class FlatSpec:
    """Names and shapes of a parameter dict, to go between the dict and one flat vector.

    ``flatten(d)`` concatenates ``d[name].reshape(-1)`` in ``names`` order (length ``D``);
    ``unflatten(v)`` returns views of ``v`` with the original shapes. Both work on a
    single vector; use ``torch.func.vmap`` for batches.
    """

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Tensor], names: Sequence[str] | None = None) -> "FlatSpec":
        names = tuple(d) if names is None else tuple(names)
        return cls(names, tuple(torch.Size(d[n].shape) for n in names))

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        """Total number of entries ``D``."""
        return sum(self.numels)

    def segment_ids(self) -> Tensor:
        """Long tensor [D]: index of the named tensor each flat entry belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.names)), torch.tensor(self.numels, dtype=torch.long))

    def flatten(self, d: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([d[n].reshape(-1) for n in self.names])

    def unflatten(self, v: Tensor) -> ParamDict:
        out, start = {}, 0
        for n, shape, k in zip(self.names, self.shapes, self.numels):
            out[n] = v[start:start + k].view(shape)
            start += k
        return out
