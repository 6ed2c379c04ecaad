"""Heavy-tailed predictives around a location ``μ`` and a squared scale ``v`` (the ``var`` of
a Gaussian predictive), for the regression metrics (``tails=`` in
:func:`ibaml.calibration.calibration_curve`, :meth:`CalibrationReport.regression`, the plots):

* :class:`StudentTTails` ``(df=ν)``: ``t_ν(μ, v)`` (:mod:`ibaml.calibration.student_t`);
* :class:`LogNormalScale` ``(sd=τ)``: a Gaussian whose scale is uncertain by a log-normal
  factor, ``y = μ + √v · e^{τu} · ε`` with ``u, ε ~ N(0, 1)``: the scale mixture

      p(y) = E_u N(y; μ, v e^{2τu}),

  computed with ``K``-node Gauss–Hermite quadrature over ``u`` (nodes ``u_k``, weights
  ``w_k``, ``Σ w_k = 1``): ``−log p = −log Σ_k w_k N(y; μ, v e^{2τu_k})``; the central interval
  ``μ ± q_l √v`` with ``Σ_k w_k (2Φ(q_l e^{−τu_k}) − 1) = l`` (bisection); and the CRPS of the
  Gaussian mixture, ``E|X − y| − ½ E|X − X'|`` with ``E|Z − m| = σ√(2/π) e^{−m²/2σ²} +
  m (2Φ(m/σ) − 1)`` for ``Z ~ N(0, σ²)``. ``τ = 0`` is the Gaussian.

Each family has ``central_quantile(levels)``, ``nll(mu, var, y)`` and ``crps(mu, var, y)``
(per task ``[T]``, float64). ``None`` stands for the Gaussian everywhere.

Example
-------
>>> mu, v, y = torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1)
>>> round(float(LogNormalScale(1e-6).nll(mu, v, y)), 4), round(float(LogNormalScale(1e-6).crps(mu, v, y)), 4)
(0.9189, 0.2337)
>>> round(float(LogNormalScale(0.0).central_quantile(torch.tensor([0.9]))[0]), 3)
1.645
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy.special import stdtrit
from torch import Tensor

from .metrics import _check_regression, _normal_cdf, _normal_quantile
from .student_t import _check_df, crps_student_t, student_t_nll

__all__ = ["StudentTTails", "LogNormalScale", "gauss_hermite_normal", "scale_mixture_log_density", "describe"]


def describe(tails) -> Optional[dict]:
    """``tails.describe()`` (``{"family", ...}``), or ``None`` for the Gaussian (``tails=None``)."""
    return None if tails is None else tails.describe()


def gauss_hermite_normal(num_nodes: int = 40):
    """Nodes ``u_k`` and weights ``w_k`` (``Σ w_k = 1``, float64 tensors) with
    ``E f(u) ≈ Σ_k w_k f(u_k)`` for ``u ~ N(0, 1)``."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(int(num_nodes))
    return torch.from_numpy(nodes), torch.from_numpy(weights / weights.sum())


def scale_mixture_log_density(squared_error: Tensor, log_scale2: Tensor, weights: Tensor) -> Tensor:
    """``log Σ_k w_k N(e; 0, s_k²)`` from ``e² [...]`` and the components' ``log s_k² [..., K]``
    (weights ``[K]`` summing to 1): the log-density of a Gaussian scale mixture, elementwise."""
    log_n = -0.5 * (math.log(2 * math.pi) + log_scale2 + squared_error[..., None] / log_scale2.exp())
    return torch.logsumexp(log_n + weights.log(), -1)


@dataclass(frozen=True)
class StudentTTails:
    """``t_df(μ, v)``; ``df > 1`` (a finite CRPS)."""

    df: float

    def __post_init__(self):
        _check_df(self.df, 1.0)

    def central_quantile(self, levels) -> Tensor:
        p = 0.5 + torch.as_tensor(levels, dtype=torch.float64) / 2
        return torch.from_numpy(np.asarray(stdtrit(float(self.df), p.numpy()), dtype=np.float64))

    def nll(self, mu, var, y) -> Tensor:
        return student_t_nll(mu, var, y, self.df)

    def crps(self, mu, var, y) -> Tensor:
        return crps_student_t(mu, var, y, self.df)

    def describe(self) -> dict:
        return {"family": "student_t", "df": float(self.df)}


@dataclass(frozen=True)
class LogNormalScale:
    """``E_u N(μ, v e^{2τu})``, ``u ~ N(0, 1)``, ``τ = sd ≥ 0`` (module docstring), by
    ``num_nodes``-point Gauss–Hermite quadrature."""

    sd: float
    num_nodes: int = 40

    def __post_init__(self):
        if not (math.isfinite(float(self.sd)) and 0 <= float(self.sd) <= 3):
            raise ValueError(f"LogNormalScale sd must lie in [0, 3], got {self.sd!r}")

    def _log_scales(self) -> tuple:
        nodes, weights = gauss_hermite_normal(self.num_nodes)
        return float(self.sd) * nodes, weights                 # log of each component's scale factor

    def central_quantile(self, levels) -> Tensor:
        levels = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
        if float(self.sd) == 0:
            return _normal_quantile(0.5 + levels / 2)
        log_f, w = self._log_scales()
        lo, hi = torch.zeros_like(levels), torch.full_like(levels, 1e4)
        for _ in range(100):                                     # bisection on the mixture's |y − μ|/√v
            q = 0.5 * (lo + hi)
            mass = (w * (2 * _normal_cdf(q[:, None] * torch.exp(-log_f)) - 1)).sum(-1)
            below = mass < levels
            lo, hi = torch.where(below, q, lo), torch.where(below, hi, q)
        return 0.5 * (lo + hi)

    def nll(self, mu, var, y) -> Tensor:
        mu, var, y = _check_regression(mu, var, y)
        log_f, w = self._log_scales()
        return -scale_mixture_log_density((y - mu) ** 2, torch.log(var)[..., None] + 2 * log_f, w).mean(-1)

    def crps(self, mu, var, y) -> Tensor:
        mu, var, y = _check_regression(mu, var, y)
        log_f, w = self._log_scales()
        sigma = var.sqrt()[..., None] * torch.exp(log_f)         # [T, Q, K]
        m = (y - mu)[..., None]
        to_y = sigma * math.sqrt(2 / math.pi) * torch.exp(-0.5 * (m / sigma) ** 2) + m * (2 * _normal_cdf(m / sigma) - 1)
        f2 = torch.exp(2 * log_f)
        spread = math.sqrt(2 / math.pi) * (w[:, None] * w[None, :] * (f2[:, None] + f2[None, :]).sqrt()).sum()
        return ((to_y * w).sum(-1) - 0.5 * var.sqrt() * spread).mean(-1)

    def describe(self) -> dict:
        return {"family": "lognormal_scale", "sd": float(self.sd)}
