"""A noise variance per task under a conjugate (Normal–inverse-gamma) prior, inferred in closed
form from each task's support set: :class:`ConjugateNoiseGaussianLikelihood`. The refit of its
prior to held-out tasks after meta-training is
:func:`ibaml.calibration.recalibration.refit_noise_prior`."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ibaml.calibration.tails import LogNormalScale, StudentTTails, describe
from ibaml.core.likelihoods import GaussianLikelihood, _gaussian_log_prob, _positive_attribute

__all__ = ["ConjugateNoiseGaussianLikelihood"]

#: the buffers that hold a fitted family's shape, at their Gaussian values
TAIL_BUFFERS = {"predictive_df": math.inf, "predictive_scale_sd": 0.0}


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
    ``a₀`` is small (``r → γ D / N``). :func:`ibaml.calibration.recalibration.refit_noise_prior`
    refits ``s₀`` and ``γ`` to held-out tasks after meta-training
    (:meth:`ibaml.MetaLearner.fit_noise_prior`).

    The predictive is this Gaussian unless a heavy-tailed family has been fitted to held-out
    tasks (:func:`~ibaml.calibration.recalibration.refit_noise_prior` with ``tails``; :attr:`tails`), around the same location with
    the same squared scale ``r (φᵀ S φ + σ²)``: a log-normal scale mixture (``"lognormal"``, its
    spread ``τ`` in the buffer ``predictive_scale_sd``, 0 by default: each task's scale uncertain
    by a factor ``e^{±τ}``) or a Student-t (``"student_t"``, ``ν`` in ``predictive_df``, ``inf``
    by default). The model's own Student-t has ``ν = 2 a_N``; on sine the tasks' query errors
    vary in scale far more than their evidence predicts (a fitted ν ≈ 2, against 2 a_N = 20;
    τ ≈ 0.6–0.7), and the log-normal mixture fits their coverage closest.

    Args:
        noise: the reference ``σ > 0`` (fixed).
        prior_count: ``a₀ > 0``.
        prior_noise: ``s₀ > 0``.
        evidence_scale: ``γ > 0``.
        learn_prior: learn ``a₀``, ``s₀`` and ``γ`` as positive meta-parameters.
        learn_prior_count: learn ``a₀`` (default: ``learn_prior``). Held fixed, ``a₀`` is how
            many observations' worth of weight the meta-learned noise ``s₀`` keeps against each
            task's own evidence; learned by the query likelihood, it falls towards 0 (on sine:
            ``docs/results/sine.md``, "The studies behind the presets"), the noise becomes the task's alone,
            and tasks with large errors are down-weighted in the meta-objective by ``1/r``.

    Example
    -------
    >>> lik = ConjugateNoiseGaussianLikelihood(noise=1.0, prior_count=2.0, prior_noise=0.5)
    >>> round(float(lik.noise_ratio(torch.tensor(12.0), torch.tensor(0.0), 10).detach()), 6)   # (2·0.25 + 6)/(2 + 5)
    0.928571
    """

    infers_task_noise = True

    def __init__(self, noise: float = 1.0, prior_count: float = 1.0, prior_noise: float = 1.0,
                 evidence_scale: float = 1.0, learn_prior: bool = True, learn_prior_count: Optional[bool] = None):
        super().__init__(noise, learn_noise=False)
        learn_count = learn_prior if learn_prior_count is None else bool(learn_prior_count)
        for name, value, learn in (("prior_count", prior_count, learn_count), ("prior_noise", prior_noise, learn_prior),
                                   ("evidence_scale", evidence_scale, learn_prior)):
            _positive_attribute(self, name, value, learn, f"ConjugateNoiseGaussianLikelihood {name}")
        for name, value in TAIL_BUFFERS.items():
            self.register_buffer(name, torch.tensor(value))

    @property
    def tails(self):
        """The predictive's heavy-tailed family (:mod:`ibaml.calibration.tails`), ``None`` for the Gaussian."""
        if float(self.predictive_scale_sd) > 0:
            return LogNormalScale(float(self.predictive_scale_sd))
        if math.isfinite(float(self.predictive_df)):
            return StudentTTails(float(self.predictive_df))
        return None

    def summary(self) -> dict:
        """The noise prior: ``{"noise_prior": {"count": a₀, "scale": s₀, "evidence_scale": γ, "tails": ...}}``
        (``tails`` as :func:`ibaml.calibration.tails.describe` gives it)."""
        return {"noise_prior": {"count": float(self.prior_count.detach()), "scale": float(self.prior_noise.detach()),
                                "evidence_scale": float(self.evidence_scale.detach()), "tails": describe(self.tails)}}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, value in TAIL_BUFFERS.items():   # saved before they existed: the Gaussian
            state_dict.setdefault(prefix + name, torch.tensor(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    def set_noise_prior(self, prior_noise: float, evidence_scale: float, predictive_df: float = math.inf,
                        predictive_scale_sd: float = 0.0) -> None:
        """Set ``s₀``, ``γ`` and the predictive's tail shape (``ν`` of a Student-t, ``τ`` of a
        log-normal scale mixture; the defaults give the Gaussian), as a refit to held-out tasks
        finds them (:func:`ibaml.calibration.recalibration.refit_noise_prior`); ``a₀`` and the
        reference ``σ`` are kept."""
        self.predictive_df.fill_(predictive_df)
        self.predictive_scale_sd.fill_(predictive_scale_sd)
        device = self.noise.device
        self.prior_noise = torch.tensor(prior_noise, dtype=self.noise.dtype, device=device)
        self.evidence_scale = torch.tensor(evidence_scale, dtype=self.noise.dtype, device=device)

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
