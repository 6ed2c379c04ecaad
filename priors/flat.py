"""The improper flat prior of MAML: ``log p(w) = 0`` with a learnable location.

MAP inference under it is plain loss minimisation started at the learnable location
``μ`` (MAML's initialisation). It has no precision and no KL from a Gaussian, so it is
for MAP inference only.
"""

from __future__ import annotations

from pyro.nn import PyroParam
from torch import Tensor

from .base import Prior


class Flat(Prior):
    """``p(w) ∝ 1``; the inner loop starts at the learnable ``loc`` (MAML's θ)."""

    def __init__(self, template):
        super().__init__(template)
        self.loc = PyroParam(self.initial_weights.clone())

    def location(self) -> Tensor:
        return self.loc

    def log_prob(self, params) -> Tensor:
        """``0`` (kept differentiable in ``w`` and ``loc``)."""
        return (self.flat(params) * 0.0).sum() + (self.loc * 0.0).sum()

    def kl(self, mean, var, eps=None) -> Tensor:
        raise ValueError("the flat prior is improper: KL(q || p) is undefined; use MAP inference with it")
