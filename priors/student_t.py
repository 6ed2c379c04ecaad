"""A heavy-tailed prior: independent Student-t weights.

It is not Gaussian, has no closed-form KL from a Gaussian (the base class's Monte
Carlo estimate is used), and needs nothing else: the implicit meta-gradient follows
from ``log_prob`` by automatic differentiation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch import Tensor

from .base import Prior, check_positive


class StudentT(Prior):
    """``w_i ~ StudentT(ν, μ_i, σ_i)`` independently, with learnable ``μ`` and ``σ > 0``:

        log p(w) = Σ_i [lgamma((ν+1)/2) − lgamma(ν/2) − ½ log(νπ) − log σ_i
                        − (ν+1)/2 · log(1 + ((w_i − μ_i)/σ_i)² / ν)]

    Args:
        df: degrees of freedom ``ν > 0`` (fixed).
        init_scale: initial ``σ``.
    """

    def __init__(self, template, df: float = 3.0, init_scale: float = 0.1):
        check_positive("StudentT df", df)
        check_positive("StudentT init_scale", init_scale)
        super().__init__(template)
        self.df = float(df)
        self.loc = PyroParam(self.initial_weights.clone())
        self.scale = PyroParam(torch.full_like(self.initial_weights, float(init_scale)), constraint=constraints.positive)

    def location(self) -> Tensor:
        return self.loc

    def log_prob(self, params) -> Tensor:
        w = self.flat(params)
        nu = self.df
        z = (w - self.loc) / self.scale
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return (const - torch.log(self.scale) - 0.5 * (nu + 1) * torch.log1p(z * z / nu)).sum()

    def precision_diag(self) -> Tensor:
        """Curvature of ``−log p`` at the mode: ``(ν+1) / (ν σ²)``."""
        return (self.df + 1) / (self.df * self.scale ** 2)

    def rsample(self, n: int, generator: Optional[torch.Generator] = None):
        """``w = μ + σ z / sqrt(g/ν)`` with ``z ~ N(0,1)``, ``g ~ χ²_ν``."""
        z = self._standard_normal(n, self.dim, generator=generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[] if z.device.type == "cpu" else [z.device]):
            torch.manual_seed(seed)
            chi2 = torch.distributions.Chi2(torch.full((n, self.dim), self.df, dtype=z.dtype, device=z.device)).sample()
        w = self.loc + self.scale * z / torch.sqrt(chi2 / self.df)
        return torch.func.vmap(self.unflat)(w)
