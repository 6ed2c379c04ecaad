"""Recalibration: one or two scale parameters of a predictive fitted to held-out data by
maximum likelihood, the model's means left where they are.

* :func:`fit_logit_scale` — a softmax's logit scale (temperature scaling);
* :func:`fit_linear_noise_ratio` — the two coefficients of a per-task Gaussian noise ratio
  linear in each task's support evidence (the noise prior of
  :class:`ibaml.ConjugateNoiseGaussianLikelihood`, through its ``fit_prior_noise``);
* :func:`fit_linear_noise_ratio_student_t` — the same two coefficients with the degrees of
  freedom of a Student-t predictive, for errors whose scale varies between tasks more than
  the evidence predicts (heavy tails once pooled);
* :func:`fit_linear_noise_ratio_lognormal` — the same with the spread of a log-normal scale
  mixture instead (each task's scale uncertain by a log-normal factor), which fits such
  errors closer to their nominal coverage at every level.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from scipy.optimize import minimize, minimize_scalar
from torch import Tensor

from .metrics import _as_float64
from .tails import gauss_hermite_normal


def fit_logit_scale(outputs, labels, bounds=(0.05, 50.0)) -> float:
    """The logit scale that minimises the pooled NLL of held-out points (temperature scaling):
    ``τ* = argmin_τ −Σ_{t,n} log (1/S) Σ_s softmax(τ f_{t,s,n})_{y_{t,n}}`` for network outputs
    ``f [T, S, N, C]`` at ``S`` posterior draws (``S = 1`` for a point estimate) and labels
    ``[T, N]``; a bounded scalar search on ``log τ`` (:func:`scipy.optimize.minimize_scalar`).

    >>> f = torch.tensor([[[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]]])          # T = S = 1, N = 3
    >>> round(fit_logit_scale(f, torch.tensor([[0, 1, 1]])), 3)             # 2 of 3 right: p = 2/3
    0.347
    """
    f = _as_float64("outputs", outputs)
    y = torch.as_tensor(labels).long()
    if f.dim() != 4 or y.shape != (f.shape[0], f.shape[2]):
        raise ValueError(f"outputs must be [T, S, N, C] and labels [T, N], got {tuple(f.shape)} and {tuple(y.shape)}")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds!r}")
    index = y[:, None, :, None].expand(-1, f.shape[1], -1, 1)

    def nll(log_tau: float) -> float:
        logp = torch.log_softmax(math.exp(log_tau) * f, -1).gather(-1, index).squeeze(-1)   # [T, S, N]
        return float(-(torch.logsumexp(logp, 1) - math.log(f.shape[1])).sum())

    result = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-4})
    return math.exp(result.x)


def _held_out_errors(evidence, squared_error, unit_variance) -> Tuple[Tensor, Tensor, Tensor]:
    """``(D [T], e² [T, N], v [T, N])`` in float64 on the CPU, checked."""
    D, e2, v = (torch.as_tensor(t, dtype=torch.float64).detach().cpu() for t in (evidence, squared_error, unit_variance))
    if D.dim() != 1 or e2.shape != v.shape or e2.shape[0] != D.shape[0]:
        raise ValueError(f"evidence must be [T] and squared_error, unit_variance [T, N], got "
                         f"{tuple(D.shape)}, {tuple(e2.shape)}, {tuple(v.shape)}")
    if not (torch.isfinite(D).all() and torch.isfinite(e2).all() and (v > 0).all()):
        raise ValueError("evidence and squared errors must be finite and the variances positive")
    return D, e2, v


def fit_linear_noise_ratio(evidence: Tensor, squared_error: Tensor, unit_variance: Tensor,
                           start: Tuple[float, float] = (1.0, 1.0)) -> Tuple[float, float]:
    """The coefficients ``(c₁, c₂) > 0`` of a per-task noise ratio ``r_t = c₁ + c₂ D_t`` that
    maximise the held-out Gaussian log-likelihood

        Σ_t Σ_n log N(e_tn; 0, r_t v_tn)

    of the query errors ``e [T, N]`` under predictive variances ``r_t v [T, N]``, from each
    task's support evidence ``D [T]`` (:meth:`ConjugateNoiseGaussianLikelihood.noise_ratio`'s
    ``D``, with ``r = c₁ + c₂ D``). L-BFGS-B on ``log c`` in float64 from ``start``.

    >>> D = torch.tensor([1.0, 4.0]); v = torch.ones(2, 3)
    >>> e2 = (0.5 + 0.25 * D)[:, None] * v                    # errors of exactly that size
    >>> [round(c, 3) for c in fit_linear_noise_ratio(D, e2, v)]
    [0.5, 0.25]
    """
    D, e2, v = _held_out_errors(evidence, squared_error, unit_variance)
    count = e2.shape[1]

    def nll(log_c):
        c = torch.tensor(log_c, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            ratio = c[0].exp() + c[1].exp() * D.clamp(min=0)
            value = 0.5 * (e2 / (ratio[:, None] * v) + torch.log(ratio[:, None] * v)).sum() / (D.shape[0] * count)
            value.backward()
        return float(value.detach()), c.grad.numpy()

    x0 = [math.log(max(float(c), 1e-12)) for c in start]
    result = minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=[(-40.0, 20.0)] * 2)
    return math.exp(result.x[0]), math.exp(result.x[1])


def fit_linear_noise_ratio_student_t(evidence: Tensor, squared_error: Tensor, unit_variance: Tensor,
                                     start: Tuple[float, float] = (1.0, 1.0), start_df: float = 5.0,
                                     df_bounds: Tuple[float, float] = (1.05, 1000.0)) -> Tuple[float, float, float]:
    """The coefficients ``(c₁, c₂) > 0`` of the squared scale ``r_t v_tn`` (``r_t = c₁ + c₂ D_t``)
    and the degrees of freedom ``ν`` of a Student-t predictive that maximise the held-out
    log-likelihood

        Σ_t Σ_n log t_ν(e_tn; 0, r_t v_tn)

    (:func:`ibaml.calibration.student_t_nll`; arguments as in :func:`fit_linear_noise_ratio`).
    ``ν`` stays within ``df_bounds``, above 1 so that the CRPS is finite; a large ``ν`` means
    the Gaussian fits. L-BFGS-B on ``(log c₁, log c₂, log(ν − 1))`` in float64.

    >>> _ = torch.manual_seed(0)
    >>> D, v = torch.ones(400), torch.ones(400, 5)
    >>> e = torch.distributions.StudentT(3.0).sample((400, 5)) * 0.5       # t_3 errors, scale 0.5
    >>> c1, c2, nu = fit_linear_noise_ratio_student_t(D, e ** 2, v)
    >>> 0.2 < c1 + c2 < 0.3, 2 < nu < 4.5                                    # r = 0.25, ν = 3
    (True, True)
    """
    D, e2, v = _held_out_errors(evidence, squared_error, unit_variance)
    lo, hi = df_bounds
    if not 1.0 < lo < hi:
        raise ValueError(f"df_bounds must satisfy 1 < low < high, got {df_bounds!r}")
    count = e2.numel()

    def nll(x):
        x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            nu = 1 + x[2].exp()
            scale2 = (x[0].exp() + x[1].exp() * D.clamp(min=0))[:, None] * v
            log_t = (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * torch.log(nu * math.pi)
                     - 0.5 * torch.log(scale2) - (nu + 1) / 2 * torch.log1p(e2 / (nu * scale2)))
            value = -log_t.sum() / count
            value.backward()
        return float(value.detach()), x.grad.numpy()

    x0 = [math.log(max(float(c), 1e-12)) for c in start] + [math.log(min(max(start_df, lo), hi) - 1)]
    bounds = [(-40.0, 20.0)] * 2 + [(math.log(lo - 1), math.log(hi - 1))]
    result = minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=bounds)
    return math.exp(result.x[0]), math.exp(result.x[1]), min(max(1 + math.exp(result.x[2]), lo), hi)


def fit_linear_noise_ratio_lognormal(evidence: Tensor, squared_error: Tensor, unit_variance: Tensor,
                                     start: Tuple[float, float] = (1.0, 1.0), start_sd: float = 0.5,
                                     sd_bounds: Tuple[float, float] = (1e-4, 3.0),
                                     num_nodes: int = 40) -> Tuple[float, float, float]:
    """The coefficients ``(c₁, c₂) > 0`` of the squared scale ``r_t v_tn`` (``r_t = c₁ + c₂ D_t``)
    and the spread ``τ`` of a log-normal scale mixture (:class:`ibaml.calibration.LogNormalScale`:
    each task's scale uncertain by a factor ``e^{τu}``, ``u ~ N(0, 1)``) that maximise

        Σ_t Σ_n log E_u N(e_tn; 0, r_t v_tn e^{2τu})

    (``num_nodes``-point Gauss–Hermite quadrature; arguments as in
    :func:`fit_linear_noise_ratio`). ``τ`` within ``sd_bounds``; near its lower bound the
    Gaussian fits. L-BFGS-B on ``(log c₁, log c₂, log τ)`` in float64.

    >>> _ = torch.manual_seed(0)
    >>> D, v = torch.ones(400), torch.ones(400, 5)
    >>> e = torch.randn(400, 5) * 0.5 * torch.exp(0.6 * torch.randn(400, 5))   # τ = 0.6 around scale 0.5
    >>> c1, c2, tau = fit_linear_noise_ratio_lognormal(D, e ** 2, v)
    >>> 0.2 < c1 + c2 < 0.3, 0.5 < tau < 0.7
    (True, True)
    """
    D, e2, v = _held_out_errors(evidence, squared_error, unit_variance)
    lo, hi = sd_bounds
    if not 0 < lo < hi <= 3:
        raise ValueError(f"sd_bounds must satisfy 0 < low < high <= 3, got {sd_bounds!r}")
    nodes, weights = gauss_hermite_normal(num_nodes)
    log_w = weights.log()

    def nll(x):
        x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            log_s2 = torch.log((x[0].exp() + x[1].exp() * D.clamp(min=0))[:, None] * v)[..., None] + 2 * x[2].exp() * nodes
            log_n = -0.5 * (math.log(2 * math.pi) + log_s2 + e2[..., None] / log_s2.exp())
            value = -torch.logsumexp(log_n + log_w, -1).mean()
            value.backward()
        return float(value.detach()), x.grad.numpy()

    x0 = [math.log(max(float(c), 1e-12)) for c in start] + [math.log(min(max(start_sd, lo), hi))]
    bounds = [(-40.0, 20.0)] * 2 + [(math.log(lo), math.log(hi))]
    result = minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=bounds)
    return math.exp(result.x[0]), math.exp(result.x[1]), min(max(math.exp(result.x[2]), lo), hi)
