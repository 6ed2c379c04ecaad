"""``FlatSpec``: the layout of a parameter dict ``{name: tensor}`` as one flat vector.

A prior holds its weights as one vector of length ``D``; :class:`FlatSpec` goes between that
vector and the network's parameter dict (``ibaml.core.tree`` re-exports it). Pure tensor
operations, so it runs under ``torch.func`` transforms.

Example
-------
>>> a = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
>>> spec = FlatSpec.from_dict(a)
>>> spec.flatten(a).shape, spec.unflatten(torch.arange(9.0))["b"]
(torch.Size([9]), tensor([6., 7., 8.]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import torch
from torch import Tensor

ParamDict = Dict[str, Tensor]


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
