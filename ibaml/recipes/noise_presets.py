"""The observation-noise models of regression and their per-method defaults (also importable
from :mod:`ibaml.recipes.presets`): :data:`REGRESSION_NOISE` (which model each method uses),
:data:`NOISE_PRIOR_COUNT` (the conjugate noise's pseudo-count), :func:`regression_likelihood`
(the likelihood of a model) and :func:`noise_prior_count`.

Example
-------
>>> lik = regression_likelihood(REGRESSION_NOISE["ibaml"], *noise_prior_count("ibaml"))
>>> type(lik).__name__, float(lik.prior_count)
('ConjugateNoiseGaussianLikelihood', 1.0)
"""

from __future__ import annotations

from typing import Optional

from ibaml.core.conjugate_noise import ConjugateNoiseGaussianLikelihood
from ibaml.core.likelihoods import GaussianLikelihood, Likelihood, TaskNoiseGaussianLikelihood

#: the observation noise per method in regression (``examples/sine_regression.py``'s ``--noise``;
#: a likelihood built by the caller): ``"shared"``, one learned noise scale for all tasks
#: (:class:`ibaml.GaussianLikelihood` with ``learn_noise=True``), or ``"conjugate"``, a noise
#: variance per task inferred in closed form under an inverse-gamma prior with the weights' prior
#: scaling with it (:class:`ibaml.ConjugateNoiseGaussianLikelihood`, the Normal–inverse-gamma
#: model with a meta-learned evidence scale; its inner problem, and so its posterior mean, is
#: that of a fixed noise). One shared noise cannot follow the task: the predictive variance of a
#: linear-Gaussian head does not depend on the observed values, so tasks whose errors differ
#: five-fold (sine amplitudes 0.1–5) get one width. Both noise models are measured side by side,
#: every method under each, in ``docs/results/sine.md`` ("Under the validation protocol": a table
#: per noise model). iBaML's variances start at their fixed point
#: (``variance_start="fixed_point"``): from the prior, its variance block was not solved by ten
#: Newton steps once the features had grown, and the meta-training diverged.
REGRESSION_NOISE = {"maml": "shared", "fomaml": "shared", "lazy": "shared", "imaml": "shared",
                    "ibaml": "conjugate", "abml": "conjugate"}

#: the conjugate noise's pseudo-count ``a₀`` per method, ``(value, learned)`` (default ``(1, True)``,
#: :func:`noise_prior_count`). iBaML holds ``a₀`` fixed: learned, it fell towards 0
#: (``docs/results/sine.md``, "The studies behind the presets"), each task's noise became its own, and the query likelihood weighed a task by the inverse of
#: its noise, so the tasks with the largest errors (the largest amplitudes) counted least. The
#: value held, 1, is the one of 1, 5 and 20 with the lowest recalibrated NLL on validation tasks
#: (``benchmarks/sine_protocol.py``; ``docs/results/sine/protocol/selection.json``).
NOISE_PRIOR_COUNT = {"ibaml": (1.0, False)}

#: the noise models of :func:`regression_likelihood`
NOISE_MODELS = ("shared", "conjugate", "task", "task-scaled")


def noise_prior_count(method: str, count: Optional[float] = None, learn: Optional[bool] = None):
    """``(a₀, learned)`` of the conjugate noise for ``method``: the ones given, else the method's
    :data:`NOISE_PRIOR_COUNT`, else ``(1.0, True)``.

    >>> noise_prior_count("ibaml"), noise_prior_count("abml"), noise_prior_count("ibaml", 2.0, True)
    ((1.0, False), (1.0, True), (2.0, True))
    """
    default_count, default_learn = NOISE_PRIOR_COUNT.get(method, (1.0, True))
    return (float(default_count if count is None else count), bool(default_learn if learn is None else learn))


def regression_likelihood(noise: str, prior_count: float = 1.0, learn_prior_count: bool = True,
                          initial_noise: float = 1.0) -> Likelihood:
    """The Gaussian likelihood of a noise model (:data:`REGRESSION_NOISE`), from noise
    ``initial_noise``:
    ``"shared"`` one learned scale, ``"conjugate"`` a variance per task in closed form
    (:class:`ibaml.ConjugateNoiseGaussianLikelihood` with pseudo-count ``prior_count``, learned
    or held fixed: :func:`noise_prior_count`),
    ``"task"`` / ``"task-scaled"`` a log noise per task in the network's head
    (:class:`ibaml.TaskNoiseGaussianLikelihood`, the net needs ``noise_head=True``).

    >>> type(regression_likelihood("conjugate")).__name__
    'ConjugateNoiseGaussianLikelihood'
    """
    if noise == "shared":
        return GaussianLikelihood(noise=initial_noise, learn_noise=True)
    if noise == "conjugate":
        return ConjugateNoiseGaussianLikelihood(noise=initial_noise, prior_count=prior_count,
                                                learn_prior_count=learn_prior_count)
    if noise in ("task", "task-scaled"):
        return TaskNoiseGaussianLikelihood(noise=initial_noise, scale_mean=noise == "task-scaled")
    raise ValueError(f"unknown noise model {noise!r}; expected one of {NOISE_MODELS}")
