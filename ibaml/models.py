"""Networks for meta-learning, usable with ``torch.func.functional_call`` and ``vmap``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Fully connected network ``in_dim → hidden... → out_dim`` with ``activation`` between
    layers; ``MLP(1, (40, 40), 1)`` is the standard sine-regression network.

    Example
    -------
    >>> MLP(1, (40, 40), 1)(torch.zeros(5, 1)).shape
    torch.Size([5, 1])
    """

    def __init__(self, in_dim: int = 1, hidden: Sequence[int] = (40, 40), out_dim: int = 1,
                 activation: type = nn.ReLU):
        layers = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
