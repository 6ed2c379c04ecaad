"""Recalibration: one or two scale parameters of a predictive fitted to held-out data by
maximum likelihood, the model's means left where they are.

* :func:`fit_logit_scale` — a softmax's logit scale (temperature scaling);
* :func:`fit_variance_scale` — one factor on a regression predictive's variance (its analogue
  for regression: every method's predictive, whatever its noise model, can take it);
* :func:`fit_variance_power` — a power of the variance times a factor, ``c v^p``
  (:class:`VariancePowerScale`): one parameter more than one factor, for a predictive that
  is too narrow where it is wide and too wide where it is narrow;
* :func:`fit_variance_bins` — a factor that depends on the predictive variance itself, one per
  bin of held-out log-variances, interpolated between them (:class:`VarianceBinScale`): for
  a predictive whose width is right at some sizes of the support and not at others;
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
from dataclasses import dataclass
from typing import Tuple

import numpy as np

import torch
from scipy.optimize import minimize, minimize_scalar
from torch import Tensor

from .metrics import _as_float64
from .student_t import student_t_log_density
from .tails import LogNormalScale, StudentTTails, gauss_hermite_normal, scale_mixture_log_density


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


def _held_out(mu, var, y, finite: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """``mu``, ``var``, ``y`` in float64, checked: one shape, ``var`` positive (and, with
    ``finite``, ``mu`` and ``var`` finite)."""
    mu, var, y = (_as_float64(n, t) for n, t in (("mu", mu), ("var", var), ("y", y)))
    if not (mu.shape == var.shape == y.shape):
        raise ValueError(f"mu, var and y must have one shape, got {tuple(mu.shape)}, {tuple(var.shape)}, {tuple(y.shape)}")
    if finite and (bool((var <= 0).any()) or not bool(torch.isfinite(var).all() & torch.isfinite(mu).all())):
        raise ValueError("var must be positive and mu and var finite")
    if bool((var <= 0).any()):
        raise ValueError("var must be positive")
    return mu, var, y


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
    mu, var, y = _held_out(mu, var, y)
    if tails is None:
        return float(((y - mu) ** 2 / var).mean())
    result = minimize_scalar(lambda log_c: float(tails.nll(mu, math.exp(log_c) * var, y).mean()),
                             bounds=(math.log(1e-4), math.log(1e4)), method="bounded", options={"xatol": 1e-5})
    return math.exp(result.x)


@dataclass(frozen=True)
class VariancePowerScale:
    """The map ``v ↦ c v^p`` of a regression predictive's variance (:func:`fit_variance_power`).

    >>> VariancePowerScale(c=2.0, p=0.5)(torch.tensor([4.0, 16.0]))
    tensor([4., 8.])
    """

    c: float
    p: float

    def __call__(self, var: Tensor) -> Tensor:
        return self.c * var ** self.p

    def to_dict(self) -> dict:
        return {"c": self.c, "p": self.p}


def fit_variance_power(mu, var, y, bounds: Tuple[float, float] = (0.2, 3.0)) -> VariancePowerScale:
    """The map ``v ↦ c v^p`` of the predictive variance that minimises the pooled Gaussian NLL of
    held-out points, the means fixed:

        (c*, p*) = argmin Σ_{t,n} [log(c v_tn^p) + (y_tn − μ_tn)² / (c v_tn^p)] / 2,

    for a given ``p`` in closed form ``c = mean (y − μ)² / v^p``, and ``p`` by a bounded scalar
    search over ``bounds``. ``p = 1`` is :func:`fit_variance_scale`'s one factor; ``p > 1``
    widens the wide predictives and narrows the narrow ones relative to it — a model whose
    posterior shrinks too slowly with the support size, say, fitted on held-out tasks of mixed
    sizes. ``mu``, ``var``, ``y`` are ``[T, N]``.

    >>> v = torch.tensor([[0.01, 1.0, 100.0]]).repeat(400, 1)
    >>> y = torch.randn(400, 3, generator=torch.Generator().manual_seed(0)) * v ** 0.75   # variance v^1.5
    >>> round(fit_variance_power(torch.zeros(400, 3), v, y).p, 1)
    1.5
    """
    mu, var, y = _held_out(mu, var, y, finite=True)
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds!r}")
    e2, log_v = ((y - mu) ** 2).reshape(-1), var.reshape(-1).log()

    def nll(p: float) -> float:   # mean of log(c v^p) + e²/(c v^p) at the optimal c, up to constants
        return float(torch.log((e2 / torch.exp(p * log_v)).mean()) + p * log_v.mean())

    p = float(minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-5}).x)
    return VariancePowerScale(c=float((e2 / torch.exp(p * log_v)).mean()), p=p)


@dataclass(frozen=True)
class VarianceBinScale:
    """A factor on a regression predictive's variance that depends on the variance:
    ``v ↦ c(v) v`` with ``log c`` piecewise linear in ``log v`` through the points
    ``(log_variance[b], log_factor[b])`` and constant beyond the first and the last
    (:func:`fit_variance_bins` fits them).

    >>> scale = VarianceBinScale(log_variance=(0.0, 2.0), log_factor=(0.0, math.log(4.0)))
    >>> [round(float(c), 6) for c in scale(torch.tensor([0.1, math.e, 100.0])) / torch.tensor([0.1, math.e, 100.0])]
    [1.0, 2.0, 4.0]
    """

    log_variance: Tuple[float, ...]
    log_factor: Tuple[float, ...]

    def __post_init__(self):
        if len(self.log_variance) != len(self.log_factor) or not self.log_variance:
            raise ValueError("log_variance and log_factor must be non-empty and of one length")
        if any(b <= a for a, b in zip(self.log_variance, self.log_variance[1:])):
            raise ValueError("log_variance must increase")

    def factor(self, var: Tensor) -> Tensor:
        """``c(v)`` at every element of ``var`` (positive), in its dtype and on its device."""
        var = torch.as_tensor(var)
        log_c = np.interp(torch.log(var).detach().cpu().double().numpy(), self.log_variance, self.log_factor)
        return torch.as_tensor(np.exp(log_c)).to(dtype=var.dtype, device=var.device)

    def __call__(self, var: Tensor) -> Tensor:
        """The recalibrated variance ``c(v) v``."""
        return self.factor(var) * var

    def to_dict(self) -> dict:
        return {"log_variance": list(self.log_variance), "log_factor": list(self.log_factor)}


def fit_variance_bins(mu, var, y, bins: int = 10) -> VarianceBinScale:
    """A variance-dependent factor on a Gaussian predictive fitted to held-out points: the
    points sorted by their predictive variance ``v`` and cut into ``bins`` groups of equal
    count ``B_b``, each group's factor the maximum-likelihood one of :func:`fit_variance_scale`,

        c_b = mean_{n ∈ B_b} (y_n − μ_n)² / v_n,     at   log v_b = median_{n ∈ B_b} log v_n,

    and ``log c`` interpolated linearly in ``log v`` between the groups
    (:class:`VarianceBinScale`). One factor (``bins = 1``) is :func:`fit_variance_scale`. Fitted
    on held-out tasks that mix support sizes (or any other source of different widths), it
    corrects a predictive that is too narrow where it is wide and too wide where it is narrow,
    which one factor cannot; applied to a shifted condition, each point takes the factor of
    the held-out points with its variance. (Variance-binned scaling, in the spirit of the
    binned calibration error of Levi et al., 2022.) ``mu``, ``var``, ``y`` are ``[T, N]``.

    >>> _ = torch.manual_seed(0)
    >>> var = torch.cat([torch.full((200, 5), 0.01), torch.full((200, 5), 1.0)])
    >>> y = torch.randn(400, 5) * torch.cat([torch.full((200, 5), 0.05), torch.full((200, 5), 2.0)])
    >>> scale = fit_variance_bins(torch.zeros(400, 5), var, y, bins=2)
    >>> low, high = (math.exp(c) for c in scale.log_factor)            # true factors 0.25 and 4
    >>> 0.2 < low < 0.3, 3.5 < high < 4.5
    (True, True)
    """
    mu, var, y = _held_out(mu, var, y, finite=True)
    bins = int(bins)
    if not 1 <= bins <= var.numel():
        raise ValueError(f"bins must be between 1 and the number of points ({var.numel()}), got {bins}")
    log_v = var.reshape(-1).log()
    order = torch.argsort(log_v)
    z2 = ((y - mu) ** 2 / var).reshape(-1)[order]
    centres, factors = [], []
    for part_log_v, part_z2 in zip(torch.tensor_split(log_v[order], bins), torch.tensor_split(z2, bins)):
        centres.append(float(part_log_v.median()))
        factors.append(math.log(float(part_z2.mean())))
    # groups of one variance (a constant predictive) merge into one point
    merged_v, merged_c = [centres[0]], [[factors[0]]]
    for v, c in zip(centres[1:], factors[1:]):
        if v > merged_v[-1]:
            merged_v.append(v)
            merged_c.append([c])
        else:
            merged_c[-1].append(c)
    return VarianceBinScale(tuple(merged_v), tuple(sum(c) / len(c) for c in merged_c))


def fit_variance_scale_and_tails(mu, var, y, family: str):
    """The factor ``c`` on the predictive's squared scale and the shape of a heavy-tailed
    ``family`` fitted together by maximum likelihood to held-out points, the means fixed:

    * ``"student_t"``: ``y ~ t_ν(μ, c v)``, returns ``(c, StudentTTails(ν))``;
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
        return c, StudentTTails(df)
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
