"""Observation models p(y | f(x; w)): per-point log-likelihoods and predictive summaries.

A likelihood is a module (its learnable parameters, like a Gaussian noise scale, are
meta-parameters) with

* ``log_prob_points(output [N, ...], y [N, ...]) -> [N]``: ``log p(y_n | f_n)``,
* ``predictive(outputs [S, N, ...])``: the posterior predictive summary from ``S``
  network outputs at posterior weight samples.

Example
-------
>>> lik = GaussianLikelihood(noise=0.1)
>>> lik.log_prob_points(torch.zeros(4, 1), torch.ones(4, 1)).shape
torch.Size([4])
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import Tensor

from priors.base import LocalPyroModule, check_positive

from .calibration.recalibration import fit_linear_noise_ratio

LOG_2PI = math.log(2 * math.pi)


def _gaussian_log_prob(y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``log N(y; mean, var)`` summed over the trailing dimensions, per point ``[N]``."""
    per_entry = -0.5 * ((y - mean) ** 2 / var + torch.log(var) + LOG_2PI)
    return per_entry.reshape(per_entry.shape[0], -1).sum(-1)


def _positive_attribute(module: PyroModule, name: str, value: float, learn: bool, label: str) -> None:
    """Set ``module.<name>`` to the positive number ``value``: a positive meta-parameter
    (a constrained ``PyroParam``) if ``learn``, else a buffer."""
    check_positive(label, value)
    tensor = torch.tensor(float(value))
    if learn:
        setattr(module, name, PyroParam(tensor, constraint=constraints.positive))
    else:
        module.register_buffer(name, tensor)


class Likelihood(LocalPyroModule):
    """Base class; see the module docstring. Its Pyro parameters are module-local, like a
    prior's (:class:`priors.base.LocalPyroModule`)."""

    def forward(self, method: str, *args, **kwargs):
        return getattr(self, method)(*args, **kwargs)

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def predictive(self, outputs: Tensor):
        raise NotImplementedError

    def predictive_log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        """``log p(y | f)`` of the predictions, used by the outer (query) objectives; the inner
        objective uses :meth:`log_prob_points`. The same unless a likelihood calibrates its
        predictions only (:class:`CategoricalLikelihood` with ``scale_inner=False``)."""
        return self.log_prob_points(output, y)


class GaussianLikelihood(Likelihood):
    """``y ~ N(f(x; w), σ²)`` per output dimension, summed over the trailing dimensions:

        log p(y | f) = −½ Σ_d [(y_d − f_d)²/σ² + log σ² + log 2π]

    Args:
        noise: the standard deviation ``σ > 0``.
        learn_noise: learn ``σ`` as a positive meta-parameter.
    """

    def __init__(self, noise: float = 0.1, learn_noise: bool = False):
        super().__init__()
        _positive_attribute(self, "noise", noise, learn_noise, "GaussianLikelihood noise")

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        return _gaussian_log_prob(y, output, self.noise.to(output.dtype) ** 2)

    def output_curvature(self, output: Tensor) -> Tensor:
        """``−∂² log p(y | f) / ∂f²`` per output entry: ``1/σ²`` ``[N, d]``."""
        return (1.0 / self.noise.to(output.dtype) ** 2).expand_as(output)

    def log_prob_gaussian_outputs(self, mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """``log ∫ p(y | f) N(f; mean, var) df = log N(y; mean, var + σ²)`` per point ``[N]``
        (outputs Gaussian under the posterior, as those of a linear head are)."""
        return _gaussian_log_prob(y, mean, var + self.noise.to(mean.dtype) ** 2)

    def predictive_gaussian_outputs(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        """The exact predictive for outputs ``N(mean, var)``: ``(mean, var + σ²)``."""
        return mean, var + self.noise.to(mean.dtype) ** 2

    def predictive(self, outputs: Tensor) -> Tuple[Tensor, Tensor]:
        """Moment-matched predictive from ``S`` output samples ``[S, N, d]``:
        mean ``(1/S) Σ_s f_s`` and variance ``Var_s(f_s) + σ²`` (both ``[N, d]``)."""
        mean = outputs.mean(0)
        var = outputs.var(0, unbiased=False) + self.noise.to(outputs.dtype) ** 2
        return mean, var


class ConjugateNoiseGaussianLikelihood(GaussianLikelihood):
    """``y ~ N(f(x; w), σ_t²)`` with a noise variance per task under a conjugate prior, inferred in
    closed form from the task's support set: the Normal–inverse-gamma model of Bayesian linear
    regression,

        σ_t² ~ InvGamma(a₀, a₀ s₀²),   w | σ_t² ~ N(μ, (σ_t²/σ²) Σ),   y | w, σ_t² ~ N(f(x; w), σ_t²)

    with ``μ, Σ`` the prior over the task weights expressed at a reference noise ``σ`` (a fixed
    unit, ``noise``), and the pseudo-count ``a₀`` and the prior noise scale ``s₀`` meta-learned.
    For a linear-Gaussian head the posterior mean of ``w`` does not depend on ``σ_t`` (the data
    and the prior both scale with it), so the inner problem is that of :class:`GaussianLikelihood`
    with noise ``σ`` and is solved as before; the noise's posterior is ``InvGamma(a₀ + N/2, b_N)``,

        b_N / σ² = a₀ s₀²/σ² + ½ [Σ_n (y_n − f(x_n; m))² / σ² + (m − μ)ᵀ Σ⁻¹ (m − μ)]

    at the posterior mean (or mode) ``m`` over the ``N`` support entries, and the predictive of
    the weights' posterior ``N(m, S)`` (at ``σ``) is scaled by

        r = σ_t² / σ² = b_N / (a_N σ²),   a_N = a₀ + N/2:   p(y | x) ≈ N(y; f(x; m), r (φᵀ S φ + σ²))

    (``σ_t² = b_N/a_N = 1/E[σ_t⁻²]``: a Gaussian with the scale of the Student-t predictive). A
    task that the prior's mean function explains poorly (large residuals, or weights far from
    the prior) gets a wider predictive than one it explains well, which one shared noise cannot
    do: its predictive variance does not depend on the observed values. ``a₀ → ∞`` recovers one
    shared noise ``s₀``. The reference ``σ`` is not learned: only ``Σ/σ²`` enters the weights'
    posterior and only ``a₀ s₀²`` the noise's, so a learned ``σ`` would be a direction of the
    meta-parameters that changes nothing but the conditioning of the inner problem. With priors
    other than Gaussian the same formula uses ``2 [log p(μ) − log p(m)]`` in place of the
    quadratic form.

    The support's deviations are in-sample: the weights were fitted to them, so they
    underestimate the query's, and the prior term, in units of a meta-learned prior, need not
    match either. ``evidence_scale`` ``γ`` weighs them, ``b_N/σ² = a₀ s₀²/σ² + ½ γ D``
    (``γ = 1``: the model above); meta-learned, it is the ratio of the query's squared deviations
    to the support's that the predictive uses, the one free scale of the predictive once
    ``a₀`` is small (``r → γ D / N``). :meth:`fit_prior_noise` refits ``s₀`` and ``γ`` to
    held-out tasks after meta-training (:func:`ibaml.training.fit_noise_prior`).

    Args:
        noise: the reference ``σ > 0`` (fixed).
        prior_count: ``a₀ > 0``.
        prior_noise: ``s₀ > 0``.
        evidence_scale: ``γ > 0``.
        learn_prior: learn ``a₀``, ``s₀`` and ``γ`` as positive meta-parameters.
        learn_prior_count: learn ``a₀`` (default: ``learn_prior``). Held fixed, ``a₀`` is how
            many observations' worth of weight the meta-learned noise ``s₀`` keeps against each
            task's own evidence; learned by the query likelihood, it falls towards 0 (measured on
            sine, 1 → 0.10–0.12 in 3000 meta-iterations), the noise becomes the task's alone,
            and tasks with large errors are down-weighted in the meta-objective by ``1/r``.

    Example
    -------
    >>> lik = ConjugateNoiseGaussianLikelihood(noise=1.0, prior_count=2.0, prior_noise=0.5)
    >>> round(float(lik.noise_ratio(torch.tensor(12.0), torch.tensor(0.0), 10).detach()), 6)   # (2·0.25 + 6)/(2 + 5)
    0.928571
    """

    def __init__(self, noise: float = 1.0, prior_count: float = 1.0, prior_noise: float = 1.0,
                 evidence_scale: float = 1.0, learn_prior: bool = True, learn_prior_count: Optional[bool] = None):
        super().__init__(noise, learn_noise=False)
        learn_count = learn_prior if learn_prior_count is None else bool(learn_prior_count)
        for name, value, learn in (("prior_count", prior_count, learn_count), ("prior_noise", prior_noise, learn_prior),
                                   ("evidence_scale", evidence_scale, learn_prior)):
            _positive_attribute(self, name, value, learn, f"ConjugateNoiseGaussianLikelihood {name}")

    def squared_deviation(self, output: Tensor, y: Tensor) -> Tensor:
        """``Σ_d (y_d − f_d)² / σ²`` per point ``[N]``."""
        per_entry = (y - output) ** 2 / self.noise.to(output.dtype) ** 2
        return per_entry.reshape(per_entry.shape[0], -1).sum(-1)

    def noise_ratio(self, data_deviation: Tensor, prior_deviation: Tensor, num_entries: int) -> Tensor:
        """``r = (a₀ s₀²/σ² + ½ γ (data_deviation + prior_deviation)) / (a₀ + num_entries / 2)`` (the
        class docstring), from the support's :meth:`squared_deviation` summed and the prior's
        quadratic form at the posterior mean."""
        dtype = data_deviation.dtype
        a0 = self.prior_count.to(dtype)
        b0 = a0 * (self.prior_noise.to(dtype) / self.noise.to(dtype)) ** 2
        evidence = self.evidence_scale.to(dtype) * (data_deviation + prior_deviation)
        return (b0 + 0.5 * evidence) / (a0 + 0.5 * num_entries)

    def evidence(self, noise_ratio: Tensor, num_entries: int) -> Tensor:
        """The support evidence ``D`` of a task from its ratio ``r`` (the inverse of
        :meth:`noise_ratio`): ``D = 2 [r (a₀ + N/2) − a₀ s₀²/σ²] / γ``."""
        dtype = noise_ratio.dtype
        a0 = self.prior_count.to(dtype)
        b0 = a0 * (self.prior_noise.to(dtype) / self.noise.to(dtype)) ** 2
        return 2 * (noise_ratio * (a0 + 0.5 * num_entries) - b0) / self.evidence_scale.to(dtype)

    @torch.no_grad()
    def fit_prior_noise(self, noise_ratio: Tensor, squared_error: Tensor, variance: Tensor,
                        num_entries: int) -> Tuple[float, float]:
        """Set the prior noise ``s₀`` and the evidence scale ``γ`` (``a₀`` held) to the values
        that maximise the held-out predictive log-likelihood of query errors ``e [T, N]`` under
        the predictive variances ``variance [T, N]`` that the tasks' current ratios ``r [T]``
        gave (``num_entries`` support entries a task). With ``a_N = a₀ + N/2`` the ratio is
        linear in the evidence, ``r = c₁ + c₂ D`` with ``c₁ = a₀ s₀²/(σ² a_N)`` and
        ``c₂ = γ/(2 a_N)``: :func:`fit_linear_noise_ratio` fits ``(c₁, c₂)`` with the network and
        the prior over the weights fixed (the posterior mean does not depend on the noise), and

            s₀ = σ √(c₁ a_N / a₀),   γ = 2 a_N c₂.

        Empirical Bayes for the predictive's noise on held-out tasks, the regression counterpart
        of temperature scaling. Returns ``(s₀, γ)``."""
        a0, sigma, s0, gamma = (float(t.detach()) for t in (self.prior_count, self.noise, self.prior_noise,
                                                             self.evidence_scale))
        a_n = a0 + 0.5 * num_entries
        ratio = noise_ratio.detach()
        start = (a0 * (s0 / sigma) ** 2 / a_n, gamma / (2 * a_n))
        c1, c2 = fit_linear_noise_ratio(self.evidence(ratio, num_entries), squared_error,
                                        variance / ratio[:, None], start)
        prior_noise, evidence_scale = sigma * math.sqrt(c1 * a_n / a0), 2 * a_n * c2
        device = self.noise.device
        self.prior_noise = torch.tensor(prior_noise, dtype=self.noise.dtype, device=device)
        self.evidence_scale = torch.tensor(evidence_scale, dtype=self.noise.dtype, device=device)
        return prior_noise, evidence_scale

    def predictive_log_prob_points(self, output: Tensor, y: Tensor, noise_ratio=None) -> Tensor:
        """``log N(y; f, r σ²)`` per point (``r = 1`` if not given)."""
        ratio = 1.0 if noise_ratio is None else noise_ratio
        return _gaussian_log_prob(y, output, ratio * self.noise.to(output.dtype) ** 2)

    def log_prob_gaussian_outputs(self, mean: Tensor, var: Tensor, y: Tensor, noise_ratio=None) -> Tensor:
        """``log N(y; mean, r (var + σ²))`` per point ``[N]`` (``r = 1`` if not given)."""
        ratio = 1.0 if noise_ratio is None else noise_ratio
        return _gaussian_log_prob(y, mean, ratio * (var + self.noise.to(mean.dtype) ** 2))

    def predictive_gaussian_outputs(self, mean: Tensor, var: Tensor, noise_ratio=None) -> Tuple[Tensor, Tensor]:
        """``(mean, r (var + σ²))`` (``r = 1`` if not given)."""
        ratio = 1.0 if noise_ratio is None else noise_ratio
        return mean, ratio * (var + self.noise.to(mean.dtype) ** 2)

    def predictive(self, outputs: Tensor, noise_ratio=None) -> Tuple[Tensor, Tensor]:
        """:meth:`GaussianLikelihood.predictive` with the variance scaled by ``r`` (if given): the
        draws ``outputs [S, N, d]`` of the weights' posterior at ``σ`` spread by ``√r`` under ``σ_t``."""
        mean, var = super().predictive(outputs)
        return mean, (var if noise_ratio is None else noise_ratio * var)


class TaskNoiseGaussianLikelihood(Likelihood):
    """``y ~ N(μ, σ²)`` with the noise scale a task parameter: the network has ``2d`` outputs
    ``(μ, g)`` for ``d`` targets, the mean and the log standard deviation relative to
    ``noise``, bounded smoothly by ``c = max_log_ratio``:

        log σ = c tanh(g / c) + log noise,   log p(y | f) = −½ Σ_d [(y_d − μ_d)²/σ_d² + 2 log σ_d + log 2π]

    (the bound keeps a task that its few points fit exactly from driving ``σ`` to zero). With
    a :class:`ibaml.nets.NoiseHead` (``MLP(..., noise_head=True)``) ``g`` is a parameter of
    the head that does not depend on the input, so a prior over the head makes the noise a
    per-task parameter, inferred with the weights: a task that the prior's mean function
    explains poorly gets a wider predictive than one it explains well. A noise scale shared
    by all tasks cannot do this: its predictive variance does not depend on the observed
    values, which over-covers easy tasks and under-covers hard ones. The prior's location and
    scale for ``g`` are meta-learned, from a shared noise (small scale) to a per-task one.

    Under a Gaussian posterior over the outputs (a linear head), the outer objective and the
    predictive are moment-matched with ``log σ`` linearised at the mean ``m_g`` (slope
    ``σ' = 1 − tanh²(m_g/c)``): ``E[σ²] ≈ σ(m_g)² exp(2 σ'² s_g)``, so
    ``p(y) ≈ N(y; m_μ, s_μ + E[σ²])``. The curvature used by the linearised expectation and
    the Newton inner steps is the Fisher information, ``1/σ²`` for the mean outputs and
    ``2 σ'²`` for the log scales.

    Args:
        noise: the standard deviation ``σ > 0`` at ``g = 0``.
        max_log_ratio: ``c``, the bound on ``|log(σ / noise)|``.
        scale_mean: the mean in units of the noise, ``μ = σ f`` (``y / σ ~ N(f, 1)``): the
            Normal–inverse-gamma structure of Bayesian linear regression, where the prior
            over the function scales with the noise, so a task's inferred scale widens its
            epistemic uncertainty as well as its noise, and the per-point objective is
            convex in ``(f, 1/σ)``.

    Example
    -------
    >>> lik = TaskNoiseGaussianLikelihood(noise=0.5)
    >>> lik.log_prob_points(torch.zeros(4, 2), torch.zeros(4, 1)).shape
    torch.Size([4])
    """

    def __init__(self, noise: float = 1.0, max_log_ratio: float = 5.0, scale_mean: bool = False):
        super().__init__()
        check_positive("TaskNoiseGaussianLikelihood noise", noise)
        check_positive("TaskNoiseGaussianLikelihood max_log_ratio", max_log_ratio)
        self.register_buffer("log_noise", torch.tensor(math.log(float(noise))))
        self.max_log_ratio = float(max_log_ratio)
        self.scale_mean = bool(scale_mean)

    def _parts(self, output: Tensor):
        """``(f, log σ, ∂ log σ/∂g)`` from the outputs ``[..., 2d]``."""
        d = output.shape[-1]
        if d % 2:
            raise ValueError(f"TaskNoiseGaussianLikelihood needs 2d network outputs for d targets, got {d}")
        c = self.max_log_ratio
        t = torch.tanh(output[..., d // 2:] / c)
        return output[..., : d // 2], c * t + self.log_noise.to(output.dtype), 1 - t ** 2

    def _split(self, output: Tensor):
        """``(μ, log σ)``: the mean (``σ f`` with ``scale_mean``, else ``f``) and the log scale."""
        f, log_std, _ = self._parts(output)
        return (torch.exp(log_std) * f if self.scale_mean else f), log_std

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        mean, log_std = self._split(output)
        return _gaussian_log_prob(y, mean, torch.exp(2 * log_std))

    def output_curvature(self, output: Tensor) -> Tensor:
        """Fisher information per output entry ``[N, 2d]`` (its diagonal): ``1/σ²`` for the means
        and ``2 σ'²`` for the log scales, or with ``scale_mean`` ``1`` and ``σ'² (f² + 2)``."""
        f, log_std, slope = self._parts(output)
        if self.scale_mean:
            return torch.cat([torch.ones_like(f), slope ** 2 * (f ** 2 + 2)], dim=-1)
        return torch.cat([torch.exp(-2 * log_std), 2 * slope ** 2], dim=-1)

    def log_prob_gaussian_outputs(self, mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """``log N(y; E[μ], Var[y])`` per point ``[N]`` for outputs ``N(mean, var)`` (``[N, 2d]`` each),
        with ``log σ`` linearised in ``g`` at ``m_g`` (``log σ ~ N(log σ(m_g), σ'² s_g)``, independent
        of ``f``): ``E[σ²] = σ(m_g)² exp(2 σ'² s_g)``; without ``scale_mean``
        ``y ~ N(m_f, s_f + E[σ²])``; with it ``E[y] = E[σ] m_f`` and
        ``Var[y] = E[σ²] (1 + s_f + m_f²) − E[σ]² m_f²``, ``E[σ] = σ(m_g) exp(σ'² s_g / 2)``."""
        m_f, log_std, slope = self._parts(mean)
        d = m_f.shape[-1]
        s_f, s_log_std = var[..., :d], slope ** 2 * var[..., d:]
        second = torch.exp(2 * log_std + 2 * s_log_std)                 # E[σ²]
        if not self.scale_mean:
            return _gaussian_log_prob(y, m_f, s_f + second)
        first = torch.exp(log_std + 0.5 * s_log_std)                     # E[σ]
        return _gaussian_log_prob(y, first * m_f, second * (1 + s_f + m_f ** 2) - (first * m_f) ** 2)

    def predictive(self, outputs: Tensor) -> Tuple[Tensor, Tensor]:
        """Moment-matched predictive from ``S`` output samples ``[S, N, 2d]``: mean
        ``(1/S) Σ_s μ_s`` and variance ``Var_s(μ_s) + (1/S) Σ_s σ_s²`` (both ``[N, d]``)."""
        mean, log_std = self._split(outputs)
        return mean.mean(0), mean.var(0, unbiased=False) + torch.exp(2 * log_std).mean(0)


class CategoricalLikelihood(Likelihood):
    """``y ~ Categorical(softmax(τ f(x; w)))``: ``log p(y | f) = τ f_y − logsumexp(τ f)``.

    Args:
        scale: the logit scale ``τ > 0`` (``1``: the plain softmax).
        learn_scale: learn ``τ`` as a positive meta-parameter, the classification analogue of a
            learned noise scale: a prior that shrinks the head's weights shrinks its logits
            too, and the query loss can undo that in one number (the output scale that
            ridge-regression and SVM heads on learned features meta-learn for the same reason).
        scale_inner: apply ``τ`` in the inner (support) objective too. With ``False`` the task
            is inferred under the plain softmax and ``τ`` scales only the predictions (the
            outer objective and :meth:`predictive`): a learned calibration of the predictive
            that leaves the inner problem, and so its solution and its conditioning, as they
            are (a learned ``τ`` inside the inner problem also weakens the prior against the
            data by ``τ²``, which feeds back: measured on the stroke benchmark with iBaML,
            ``τ`` ran to 126 in 300 meta-iterations and the inner problem went unsolved).

    Example
    -------
    >>> lik = CategoricalLikelihood(scale=2.0)
    >>> lik.log_prob_points(torch.tensor([[0.0, 1.0]]), torch.tensor([1])).exp()
    tensor([0.8808])
    """

    def __init__(self, scale: float = 1.0, learn_scale: bool = False, scale_inner: bool = True):
        super().__init__()
        _positive_attribute(self, "scale", scale, learn_scale, "CategoricalLikelihood scale")
        self.scale_inner = bool(scale_inner)

    def _inner_scale(self, output: Tensor):
        """The logit scale of :meth:`log_prob_points`: ``τ``, or ``1`` where ``τ`` applies only
        to the predictions."""
        return self.scale.to(output.dtype) if self.scale_inner else 1.0

    @staticmethod
    def _log_prob(logits: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=-1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        return self._log_prob(self._inner_scale(output) * output, y)

    def predictive_log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        """``log softmax(τ f)_y``, whether or not ``τ`` applies in the inner objective."""
        return self._log_prob(self.scale.to(output.dtype) * output, y)

    def output_curvature(self, output: Tensor) -> Tensor:
        """The diagonal of ``−∂² log p(y | f) / ∂f² = τ² (diag(p) − ppᵀ)`` of :meth:`log_prob_points`:
        ``τ² p (1 − p)`` ``[N, C]`` (``τ = 1`` where it applies only to the predictions)."""
        tau = self._inner_scale(output)
        p = torch.softmax(tau * output, dim=-1)
        return tau ** 2 * p * (1 - p)

    def predictive(self, outputs: Tensor) -> Tensor:
        """Class probabilities averaged over ``S`` samples: ``(1/S) Σ_s softmax(τ f_s)`` ``[N, C]``."""
        return torch.softmax(self.scale.to(outputs.dtype) * outputs, dim=-1).mean(0)
