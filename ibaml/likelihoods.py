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

from priors.base import check_positive

LOG_2PI = math.log(2 * math.pi)


def _gaussian_log_prob(y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``log N(y; mean, var)`` summed over the trailing dimensions, per point ``[N]``."""
    per_entry = -0.5 * ((y - mean) ** 2 / var + torch.log(var) + LOG_2PI)
    return per_entry.reshape(per_entry.shape[0], -1).sum(-1)


class Likelihood(PyroModule):
    """Base class; see the module docstring."""

    def forward(self, method: str, *args, **kwargs):
        return getattr(self, method)(*args, **kwargs)

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def predictive(self, outputs: Tensor):
        raise NotImplementedError


class GaussianLikelihood(Likelihood):
    """``y ~ N(f(x; w), σ²)`` per output dimension, summed over the trailing dimensions:

        log p(y | f) = −½ Σ_d [(y_d − f_d)²/σ² + log σ² + log 2π]

    Args:
        noise: the standard deviation ``σ > 0``.
        learn_noise: learn ``σ`` as a positive meta-parameter.
    """

    def __init__(self, noise: float = 0.1, learn_noise: bool = False):
        super().__init__()
        check_positive("GaussianLikelihood noise", noise)
        sigma = torch.tensor(float(noise))
        if learn_noise:
            self.noise = PyroParam(sigma, constraint=constraints.positive)
        else:
            self.register_buffer("noise", sigma)

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        return _gaussian_log_prob(y, output, self.noise.to(output.dtype) ** 2)

    def output_curvature(self, output: Tensor) -> Tensor:
        """``−∂² log p(y | f) / ∂f²`` per output entry: ``1/σ²`` ``[N, d]``."""
        return (1.0 / self.noise.to(output.dtype) ** 2).expand_as(output)

    def log_prob_gaussian_outputs(self, mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """``log ∫ p(y | f) N(f; mean, var) df = log N(y; mean, var + σ²)`` per point ``[N]``
        (outputs Gaussian under the posterior, as those of a linear head are)."""
        return _gaussian_log_prob(y, mean, var + self.noise.to(mean.dtype) ** 2)

    def predictive(self, outputs: Tensor) -> Tuple[Tensor, Tensor]:
        """Moment-matched predictive from ``S`` output samples ``[S, N, d]``:
        mean ``(1/S) Σ_s f_s`` and variance ``Var_s(f_s) + σ²`` (both ``[N, d]``)."""
        mean = outputs.mean(0)
        var = outputs.var(0, unbiased=False) + self.noise.to(outputs.dtype) ** 2
        return mean, var


class CategoricalLikelihood(Likelihood):
    """``y ~ Categorical(softmax(f(x; w)))``: ``log p(y | f) = f_y − logsumexp(f)``."""

    def log_prob_points(self, output: Tensor, y: Tensor) -> Tensor:
        logp = torch.log_softmax(output, dim=-1)
        return logp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def output_curvature(self, output: Tensor) -> Tensor:
        """The diagonal of ``−∂² log p(y | f) / ∂f² = diag(p) − ppᵀ``: ``p (1 − p)`` ``[N, C]``."""
        p = torch.softmax(output, dim=-1)
        return p * (1 - p)

    def predictive(self, outputs: Tensor) -> Tensor:
        """Class probabilities averaged over ``S`` samples: ``(1/S) Σ_s softmax(f_s)`` ``[N, C]``."""
        return torch.softmax(outputs, dim=-1).mean(0)
