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

from typing import Callable, Mapping

import torch
from torch import Tensor

from priors.flatten import FlatSpec, ParamDict   # the priors lay their weights out the same way

__all__ = ["ParamDict", "FlatSpec", "tree_map", "tree_add", "tree_sub", "tree_scale", "tree_dot", "tree_norm",
           "tree_detach", "tree_zeros_like", "tree_all_finite"]


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
