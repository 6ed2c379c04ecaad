"""Chunked evaluation: adapt to test tasks a chunk at a time, predict their query sets, and
report (:func:`evaluate`, a :class:`ibaml.calibration.CalibrationReport`) or return the raw
query outputs at the posterior draws (:func:`task_outputs`), or fit the predictive's noise to
held-out tasks (:func:`fit_noise_prior`). With ``seed`` the tasks and the draws are the same at
every call and the random generators are put back afterwards.

Example
-------
>>> learner = ibaml.build_learner("imaml", MLP(1, (8,), 1), ibaml.GaussianLikelihood(1.0), inner_steps=2)
>>> report = evaluate(learner, tasks.sample(8, generator), chunk=4)
>>> sorted(report.metrics)[:3], report.metrics["mse"]["mean"] > 0
(['calibration_error', 'coverage_50', 'coverage_90'], True)
"""

from __future__ import annotations

from typing import Optional

import torch

from .calibration import CalibrationReport
from .calibration.tails import describe
from .data.tasks import as_task_dict
from .nonfinite import check_finite_predictions
from .progress import progress_bar


def _chunks(tasks, num_tasks: Optional[int], chunk: Optional[int]):
    """``(sample, total)``: ``sample(start, n)`` returns ``n`` tasks, from a batch or a sampler."""
    if callable(tasks):
        if num_tasks is None:
            raise ValueError("num_tasks is needed when tasks is a sampler (a callable)")
        return (lambda start, n: tasks(n)), int(num_tasks)
    task = as_task_dict(tasks)
    total = task["support_x"].shape[0] if num_tasks is None else int(num_tasks)
    return (lambda start, n: {k: v[start:start + n] for k, v in task.items()}), total


class _Reseeded:
    """Within the block, ``generators`` start from ``seed``; their states are put back after."""

    def __init__(self, generators, seed: Optional[int]):
        self.generators, self.seed = [g for g in generators if g is not None], seed

    def __enter__(self):
        if self.seed is not None:
            self.saved = [g.get_state() for g in self.generators]
            for g in self.generators:
                g.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self.seed is not None:
            for g, s in zip(self.generators, self.saved):
                g.set_state(s)


def _over_chunks(learner, tasks, num_tasks, chunk, seed, generators, progress, desc, per_chunk, steps=None):
    """``[(per_chunk(posterior, batch), query targets)]`` over the chunks of ``tasks``."""
    sample, total = _chunks(tasks, num_tasks, chunk)
    chunk = total if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    results = []
    with _Reseeded([learner.generator, *generators], seed):
        starts = range(0, total, chunk)
        for start in progress_bar(starts, progress and len(starts) > 1, desc=desc, leave=False):
            batch = as_task_dict(sample(start, min(chunk, total - start)))
            posterior = learner.adapt(batch["support_x"], batch["support_y"], steps=steps)
            results.append((per_chunk(posterior, batch), batch["query_y"]))
    return results


def task_outputs(learner, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
                 seed: Optional[int] = None, generators=(), progress: bool = False, desc: str = "evaluate"):
    """Adapt to the tasks ``chunk`` at a time and return the network's query outputs at the
    posterior draws ``[T, S, N, ...]`` (``S = 1`` for a point estimate, on the CPU in float64)
    and the query targets ``[T, N, ...]``.

    ``tasks`` is a batch or a sampler ``tasks(n)`` (then ``num_tasks`` is needed). With
    ``seed``, the learner's generator and ``generators`` (e.g. the sampler's) start from
    ``seed``, so every call sees the same tasks and draws, and are restored afterwards."""
    results = _over_chunks(learner, tasks, num_tasks, chunk, seed, generators, progress, desc,
                           lambda post, b: learner.posterior_outputs(post, b["query_x"]).detach().double().cpu())
    return torch.cat([o for o, _ in results]), torch.cat([y.cpu() for _, y in results])


def evaluate(learner, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
             seed: Optional[int] = None, generators=(), steps: Optional[int] = None,
             num_samples: Optional[int] = None, name: str = "", progress: bool = False) -> CalibrationReport:
    """Adapt on each task's support set, predict its query set, ``chunk`` tasks at a time, and
    return a :class:`ibaml.calibration.CalibrationReport` over all of them (regression: the
    predictive mean and variance, or squared scale where the likelihood's predictive is
    heavy-tailed, ``likelihood.tails``; classification: the predictive class probabilities).
    Tasks whose predictions are not finite raise :class:`ibaml.NonFiniteError` naming them.
    ``tasks``, ``num_tasks``, ``seed`` and ``generators`` as in :func:`task_outputs`."""
    results = _over_chunks(learner, tasks, num_tasks, chunk, seed, generators, progress, name or "evaluate",
                           lambda post, b: learner.predict(post, b["query_x"], num_samples), steps)
    first = results[0][0]
    if isinstance(first, tuple):          # a Gaussian predictive: (mean, var)
        mean = torch.cat([m for (m, _), _ in results])
        var = torch.cat([v for (_, v), _ in results])
        y = torch.cat([t for _, t in results]).to(mean)
        check_finite_predictions(name or "evaluate", mean, var)
        return CalibrationReport.regression(mean.reshape(mean.shape[0], -1), var.reshape(var.shape[0], -1),
                                            y.reshape(y.shape[0], -1), name=name,
                                            tails=getattr(learner.likelihood, "tails", None))
    probs = torch.cat([p for p, _ in results])
    labels = torch.cat([t.to(probs.device) for _, t in results])
    check_finite_predictions(name or "evaluate", probs)
    return CalibrationReport.classification(probs, labels, name=name)


def fit_noise_prior(learner, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
                    seed: Optional[int] = None, generators=(), steps: Optional[int] = None,
                    progress: bool = False, tails: Optional[str] = None) -> dict:
    """Fit the predictive's noise to held-out tasks: adapt to their support sets, predict their
    query sets, and set the prior noise ``s₀`` and evidence scale ``γ`` of the learner's
    :class:`ibaml.ConjugateNoiseGaussianLikelihood` to the maximisers of the query
    log-likelihood (:meth:`~ibaml.ConjugateNoiseGaussianLikelihood.fit_prior_noise`; the
    network, the prior and ``a₀`` unchanged, so the predictive means do not move); with
    ``tails="lognormal"`` or ``"student_t"`` the predictive becomes that heavy-tailed family,
    its shape fitted too (``likelihood.tails``). Returns ``{"prior_noise": (before, after),
    "evidence_scale": (before, after), "tails": (before, after), "tasks": T}`` (a family as
    ``{"family", ...}``, ``None`` for the Gaussian).
    ``tasks``, ``num_tasks``, ``seed`` and ``generators`` as in :func:`task_outputs`.

    Meta-training learns ``s₀`` and ``γ`` too, but slowly (their meta learning rate is that of
    the network) and under an objective in which they also weigh the tasks against each other;
    this is the closed-loop step that makes the predictive's width match the held-out errors.

    Example
    -------
    >>> import ibaml
    >>> from ibaml.data.sine import SineTaskDistribution
    >>> from ibaml.nets import MLP
    >>> likelihood = ibaml.presets.regression_likelihood("conjugate", 5.0, False)
    >>> learner = ibaml.build_learner("ibaml", MLP(1, (8,), 1), likelihood, inner_steps=2)
    >>> held_out = SineTaskDistribution(shots=10).sample(50, torch.Generator().manual_seed(0))
    >>> fitted = fit_noise_prior(learner, held_out, tails="lognormal")
    >>> fitted["tails"][1]["family"], learner.likelihood.tails.sd > 0
    ('lognormal_scale', True)
    """
    likelihood = learner.likelihood
    if not hasattr(likelihood, "fit_prior_noise"):
        raise TypeError(f"fit_noise_prior needs a ConjugateNoiseGaussianLikelihood, the learner has "
                        f"{type(likelihood).__name__}")
    results = _over_chunks(learner, tasks, num_tasks, chunk, seed, generators, progress, "fit noise prior",
                           lambda post, b: (learner.predict(post, b["query_x"]), post.noise_ratio,
                                            b["support_y"][0].numel()), steps)
    mean = torch.cat([m.reshape(m.shape[0], -1) for ((m, _), _, _), _ in results])
    var = torch.cat([v.reshape(v.shape[0], -1) for ((_, v), _, _), _ in results])
    ratio = torch.cat([r for (_, r, _), _ in results])
    y = torch.cat([t.reshape(t.shape[0], -1) for _, t in results]).to(mean)
    before = float(likelihood.prior_noise.detach()), float(likelihood.evidence_scale.detach()), likelihood.tails
    after = likelihood.fit_prior_noise(ratio, (y - mean) ** 2, var, results[0][0][2], tails=tails)
    return {"prior_noise": (before[0], after[0]), "evidence_scale": (before[1], after[1]),
            "tails": (describe(before[2]), describe(likelihood.tails)), "tasks": int(ratio.shape[0])}
