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
from typing import Tuple

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import Tensor

from priors.base import LOG_2PI, LocalPyroModule, check_positive


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
    prior's (:class:`priors.base.LocalPyroModule`).

    Optional capabilities, declared here with their defaults (a subclass that has one sets the
    flag and overrides the methods):

    * ``infers_task_noise = False``: a noise variance inferred per task in closed form from the
      support set, :meth:`noise_ratio` (:class:`ibaml.ConjugateNoiseGaussianLikelihood`);
    * ``gaussian_outputs_log_prob = False``: :meth:`log_prob_gaussian_outputs`, the log density
      for network outputs that are Gaussian under the posterior (a linear head's);
    * ``gaussian_outputs_predictive = False``: :meth:`predictive_gaussian_outputs`, the exact
      predictive for such outputs.
    """

    infers_task_noise = False
    gaussian_outputs_log_prob = False
    gaussian_outputs_predictive = False

    def noise_ratio(self, data_deviation: Tensor, prior_deviation: Tensor, num_entries: int) -> Tensor:
        """A task's noise-variance ratio from its support (where ``infers_task_noise``)."""
        raise NotImplementedError(f"{type(self).__name__} does not infer a noise per task")

    def log_prob_gaussian_outputs(self, mean: Tensor, var: Tensor, y: Tensor, *noise_ratio) -> Tensor:
        """``log ∫ p(y | f) N(f; mean, var) df`` per point (where ``gaussian_outputs_log_prob``)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed form for Gaussian outputs")

    def predictive_gaussian_outputs(self, mean: Tensor, var: Tensor, *noise_ratio):
        """The exact predictive for outputs ``N(mean, var)`` (where ``gaussian_outputs_predictive``)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form predictive for Gaussian outputs")

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

    def summary(self) -> dict:
        """The learned noise parameters as plain numbers, for a run's metrics (none here)."""
        return {}


class GaussianLikelihood(Likelihood):
    """``y ~ N(f(x; w), σ²)`` per output dimension, summed over the trailing dimensions:

        log p(y | f) = −½ Σ_d [(y_d − f_d)²/σ² + log σ² + log 2π]

    Args:
        noise: the standard deviation ``σ > 0``.
        learn_noise: learn ``σ`` as a positive meta-parameter.
    """

    gaussian_outputs_log_prob = True
    gaussian_outputs_predictive = True

    def __init__(self, noise: float = 0.1, learn_noise: bool = False):
        super().__init__()
        _positive_attribute(self, "noise", noise, learn_noise, "GaussianLikelihood noise")

    def summary(self) -> dict:
        """``{"noise_std": σ}``."""
        return {"noise_std": float(self.noise.detach())}

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


class TaskNoiseGaussianLikelihood(Likelihood):
    """``y ~ N(μ, σ²)`` with the noise scale a task parameter: the network has ``2d`` outputs
    ``(μ, g)`` for ``d`` targets, the mean and the log standard deviation relative to
    ``noise``, bounded smoothly by ``c = max_log_ratio``:

        log σ = c tanh(g / c) + log noise,   log p(y | f) = −½ Σ_d [(y_d − μ_d)²/σ_d² + 2 log σ_d + log 2π]

    (the bound keeps a task that its few points fit exactly from driving ``σ`` to zero). With
    a :class:`ibaml.core.nets.NoiseHead` (``MLP(..., noise_head=True)``) ``g`` is a parameter of
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

    gaussian_outputs_log_prob = True

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
            data by ``τ²``, which feeds back: on the stroke benchmark iBaML's ``τ`` ran away and
            the inner problem went unsolved, ``docs/results/images.md``, the logit-scale study).

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
