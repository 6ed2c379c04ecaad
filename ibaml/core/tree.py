"""Small pure functions on dicts of tensors ("parameter dicts").

Every algorithm in ibaml works on parameter dicts ``{name: tensor}``; these helpers
combine and flatten them. They contain only tensor operations, so they run
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

from typing import Mapping

import torch
from torch import Tensor

from priors.flatten import FlatSpec, ParamDict   # the priors lay their weights out the same way

__all__ = ["ParamDict", "FlatSpec", "tree_add", "tree_norm", "tree_detach", "tree_all_finite"]


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> ParamDict:
    """``a + alpha * b`` leafwise."""
    return {k: a[k] + alpha * b[k] for k in a}


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of all leaves."""
    return torch.sqrt(sum((v * v).sum() for v in a.values()))


def tree_detach(a: Mapping[str, Tensor]) -> ParamDict:
    return {k: v.detach() for k, v in a.items()}


def tree_all_finite(a: Mapping[str, Tensor]) -> Tensor:
    """A boolean 0-d tensor: every entry of every leaf is finite (no host synchronisation)."""
    out = torch.ones((), dtype=torch.bool, device=next(iter(a.values())).device)
    for v in a.values():
        out = out & torch.isfinite(v).all()
    return out
