"""Recalibration: one or two scale parameters of a predictive fitted to held-out data by
maximum likelihood, the model's means left where they are.

* :func:`fit_logit_scale` — a softmax's logit scale (temperature scaling);
* :func:`fit_variance_scale` — one factor on a regression predictive's variance (its analogue
  for regression: every method's predictive, whatever its noise model, can take it);
* :func:`fit_variance_scale_and_tails` — that factor with the shape of a heavy-tailed family
  (a Student-t's degrees of freedom, a log-normal scale mixture's spread) fitted with it;
* :func:`fit_linear_noise_ratio` — the two coefficients of a per-task Gaussian noise ratio
  linear in each task's support evidence (the noise prior of
  :class:`ibaml.ConjugateNoiseGaussianLikelihood`, refitted by :func:`refit_noise_prior`);
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
from .student_t import student_t_log_density
from .tails import LogNormalScale, StudentT, gauss_hermite_normal, scale_mixture_log_density


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


def fit_variance_scale(mu, var, y, tails=None) -> float:
    """The factor ``c`` on the predictive variance (or squared scale) that minimises the pooled
    NLL of held-out points: for a Gaussian predictive ``N(μ, c v)`` in closed form,

        c* = argmin_c Σ_{t,n} [log(c v_tn) + (y_tn − μ_tn)² / (c v_tn)] / 2 = mean_{t,n} (y_tn − μ_tn)² / v_tn,

    and for a heavy-tailed ``tails`` family (:mod:`ibaml.calibration.tails`) by a bounded search on
    ``log c`` over ``[10⁻⁴, 10⁴]``. ``mu``, ``var``, ``y`` are ``[T, N]``; the means do not move.

    >>> mu, var = torch.zeros(2, 3), torch.ones(2, 3)
    >>> fit_variance_scale(mu, var, torch.full((2, 3), 2.0))     # errors of 2 under unit variance
    4.0
    """
    mu, var, y = (_as_float64(n, t) for n, t in (("mu", mu), ("var", var), ("y", y)))
    if not (mu.shape == var.shape == y.shape):
        raise ValueError(f"mu, var and y must have one shape, got {tuple(mu.shape)}, {tuple(var.shape)}, {tuple(y.shape)}")
    if bool((var <= 0).any()):
        raise ValueError("var must be positive")
    if tails is None:
        return float(((y - mu) ** 2 / var).mean())
    result = minimize_scalar(lambda log_c: float(tails.nll(mu, math.exp(log_c) * var, y).mean()),
                             bounds=(math.log(1e-4), math.log(1e4)), method="bounded", options={"xatol": 1e-5})
    return math.exp(result.x)


def fit_variance_scale_and_tails(mu, var, y, family: str):
    """The factor ``c`` on the predictive's squared scale and the shape of a heavy-tailed
    ``family`` fitted together by maximum likelihood to held-out points, the means fixed:

    * ``"student_t"``: ``y ~ t_ν(μ, c v)``, returns ``(c, StudentT(ν))``;
    * ``"lognormal"``: ``y ~ E_u N(μ, c v e^{2τu})``, returns ``(c, LogNormalScale(τ))``
      (:mod:`ibaml.calibration.tails`).

    Pooled over tasks, the errors of a predictive whose width does not follow each task's
    scale are a scale mixture, heavier-tailed than any one Gaussian; these families fit such
    errors where :func:`fit_variance_scale` can only match their second moment. The fits are
    :func:`fit_linear_noise_ratio_student_t` and :func:`fit_linear_noise_ratio_lognormal`
    with no evidence term. ``mu``, ``var``, ``y`` are ``[T, N]``.

    >>> _ = torch.manual_seed(0)
    >>> mu, var = torch.zeros(500, 4), torch.ones(500, 4)
    >>> y = 0.5 * torch.distributions.StudentT(3.0).sample((500, 4))
    >>> c, tails = fit_variance_scale_and_tails(mu, var, y, "student_t")
    >>> 0.2 < c < 0.3, 2.0 < tails.df < 4.5
    (True, True)
    """
    mu, var, y = (_as_float64(n, t) for n, t in (("mu", mu), ("var", var), ("y", y)))
    if not (mu.shape == var.shape == y.shape) or mu.dim() != 2:
        raise ValueError(f"mu, var and y must be [T, N] of one shape, got {tuple(mu.shape)}, {tuple(var.shape)}, "
                         f"{tuple(y.shape)}")
    no_evidence = torch.zeros(mu.shape[0], dtype=torch.float64)
    if family == "student_t":
        c, _, df = fit_linear_noise_ratio_student_t(no_evidence, (y - mu) ** 2, var, start=(1.0, 1e-9))
        return c, StudentT(df)
    if family == "lognormal":
        c, _, sd = fit_linear_noise_ratio_lognormal(no_evidence, (y - mu) ** 2, var, start=(1.0, 1e-9))
        return c, LogNormalScale(sd)
    raise ValueError(f"family must be 'student_t' or 'lognormal', got {family!r}")


def _held_out_errors(evidence, squared_error, unit_variance) -> Tuple[Tensor, Tensor, Tensor]:
    """``(D [T], e² [T, N], v [T, N])`` in float64 on the CPU, checked."""
    D, e2, v = (torch.as_tensor(t, dtype=torch.float64).detach().cpu() for t in (evidence, squared_error, unit_variance))
    if D.dim() != 1 or e2.shape != v.shape or e2.shape[0] != D.shape[0]:
        raise ValueError(f"evidence must be [T] and squared_error, unit_variance [T, N], got "
                         f"{tuple(D.shape)}, {tuple(e2.shape)}, {tuple(v.shape)}")
    if not (torch.isfinite(D).all() and torch.isfinite(e2).all() and (v > 0).all()):
        raise ValueError("evidence and squared errors must be finite and the variances positive")
    return D, e2, v


def _minimize_by_autograd(objective, x0, bounds):
    """The minimiser of ``objective(x) → scalar tensor`` over float64 ``x`` within ``bounds``:
    L-BFGS-B (:func:`scipy.optimize.minimize`) with the gradient taken by autograd."""
    def value_and_grad(values):
        x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            value = objective(x)
            value.backward()
        return float(value.detach()), x.grad.numpy()

    return minimize(value_and_grad, x0, jac=True, method="L-BFGS-B", bounds=bounds).x


def _linear_ratio(x: Tensor, D: Tensor) -> Tensor:
    """``r_t = c₁ + c₂ D_t`` with ``(c₁, c₂) = exp(x[:2])`` (negative evidence read as 0)."""
    return x[0].exp() + x[1].exp() * D.clamp(min=0)


def _log_start(start) -> list:
    return [math.log(max(float(c), 1e-12)) for c in start]


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

    def nll(x):
        ratio = _linear_ratio(x, D)
        return 0.5 * (e2 / (ratio[:, None] * v) + torch.log(ratio[:, None] * v)).sum() / e2.numel()

    x = _minimize_by_autograd(nll, _log_start(start), [(-40.0, 20.0)] * 2)
    return math.exp(x[0]), math.exp(x[1])


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

    def nll(x):
        return -student_t_log_density(e2, _linear_ratio(x, D)[:, None] * v, 1 + x[2].exp()).sum() / e2.numel()

    x0 = _log_start(start) + [math.log(min(max(start_df, lo), hi) - 1)]
    x = _minimize_by_autograd(nll, x0, [(-40.0, 20.0)] * 2 + [(math.log(lo - 1), math.log(hi - 1))])
    return math.exp(x[0]), math.exp(x[1]), min(max(1 + math.exp(x[2]), lo), hi)


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

    def nll(x):
        log_scale2 = torch.log(_linear_ratio(x, D)[:, None] * v)[..., None] + 2 * x[2].exp() * nodes
        return -scale_mixture_log_density(e2, log_scale2, weights).mean()

    x0 = _log_start(start) + [math.log(min(max(start_sd, lo), hi))]
    x = _minimize_by_autograd(nll, x0, [(-40.0, 20.0)] * 2 + [(math.log(lo), math.log(hi))])
    return math.exp(x[0]), math.exp(x[1]), min(max(math.exp(x[2]), lo), hi)


#: the predictive families :func:`refit_noise_prior` fits (``None``: the Gaussian)
TAIL_FAMILIES = (None, "lognormal", "student_t")


@torch.no_grad()
def refit_noise_prior(likelihood, noise_ratio: Tensor, squared_error: Tensor, variance: Tensor,
                      num_entries: int, tails=None) -> Tuple[float, float]:
    """Set the prior noise ``s₀`` and the evidence scale ``γ`` of a
    :class:`ibaml.ConjugateNoiseGaussianLikelihood` (``a₀`` held) to the values that maximise the
    held-out predictive log-likelihood of query errors ``e [T, N]`` under the predictive
    variances ``variance [T, N]`` that the tasks' current ratios ``r [T]`` gave (``num_entries``
    support entries a task). With ``a_N = a₀ + N/2`` the ratio is linear in the evidence,
    ``r = c₁ + c₂ D`` with ``c₁ = a₀ s₀²/(σ² a_N)`` and ``c₂ = γ/(2 a_N)``:
    :func:`fit_linear_noise_ratio` fits ``(c₁, c₂)`` with the network and the prior over the
    weights fixed (the posterior mean does not depend on the noise), and

        s₀ = σ √(c₁ a_N / a₀),   γ = 2 a_N c₂.

    Empirical Bayes for the predictive's noise on held-out tasks, the regression counterpart
    of temperature scaling. With ``tails="lognormal"`` or ``"student_t"`` the predictive
    becomes that heavy-tailed family and its shape is fitted too
    (:func:`fit_linear_noise_ratio_lognormal`, :func:`fit_linear_noise_ratio_student_t`;
    ``likelihood.tails``); with ``None`` it is the Gaussian. Returns ``(s₀, γ)``."""
    a0, sigma, s0, gamma = (float(t.detach()) for t in (likelihood.prior_count, likelihood.noise,
                                                         likelihood.prior_noise, likelihood.evidence_scale))
    a_n = a0 + 0.5 * num_entries
    ratio = noise_ratio.detach()
    start = (a0 * (s0 / sigma) ** 2 / a_n, gamma / (2 * a_n))
    evidence, unit_variance = likelihood.evidence(ratio, num_entries), variance / ratio[:, None]
    if tails not in TAIL_FAMILIES:
        raise ValueError(f"tails must be one of {TAIL_FAMILIES}, got {tails!r}")
    shape = {}
    if tails == "student_t":
        c1, c2, shape["predictive_df"] = fit_linear_noise_ratio_student_t(evidence, squared_error, unit_variance, start)
    elif tails == "lognormal":
        c1, c2, shape["predictive_scale_sd"] = fit_linear_noise_ratio_lognormal(evidence, squared_error, unit_variance,
                                                                                start)
    else:
        c1, c2 = fit_linear_noise_ratio(evidence, squared_error, unit_variance, start)
    prior_noise, evidence_scale = sigma * math.sqrt(c1 * a_n / a0), 2 * a_n * c2
    likelihood.set_noise_prior(prior_noise, evidence_scale, **shape)
    return prior_noise, evidence_scale
