"""Chunked evaluation: adapt to test tasks a chunk at a time (:func:`over_chunks`, driven by a
per-chunk function the caller gives), and assemble the results: a
:class:`ibaml.calibration.CalibrationReport` of the predictions (:func:`prediction_report`),
the raw query outputs at the posterior draws (:func:`query_outputs`), or the refit of the
predictive's noise to them (:func:`noise_prior_refit`). With ``seed`` the tasks and the draws
are the same at every call and the random generators are put back afterwards.
:meth:`ibaml.MetaLearner.evaluate`, :meth:`~ibaml.MetaLearner.task_outputs` and
:meth:`~ibaml.MetaLearner.fit_noise_prior` use these with the learner's adaptation and prediction.

Example
-------
>>> batch = tasks.sample(5, generator)
>>> results = over_chunks(lambda b: b["support_y"].sum(1), batch, chunk=2)
>>> [tuple(r.shape) for r, _ in results], tuple(query_outputs(results)[0].shape)
([(2, 1), (2, 1), (1, 1)], (5, 1))
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ibaml.calibration import CalibrationReport
from ibaml.calibration.recalibration import refit_noise_prior
from ibaml.calibration.tails import describe
from ibaml.data.tasks import as_task_dict
from ibaml.train.nonfinite import check_finite_predictions
from ibaml.train.progress import progress_bar


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


def over_chunks(per_chunk: Callable, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
                seed: Optional[int] = None, generators=(), progress: bool = False, desc: str = "evaluate"):
    """``[(per_chunk(batch), batch["query_y"])]`` over the chunks of ``chunk`` tasks of ``tasks``
    (a batch, or a sampler ``tasks(n)``, then ``num_tasks`` is needed). With ``seed`` the
    ``generators`` (e.g. a learner's and a sampler's) start from ``seed``, so every call sees the
    same tasks and draws, and are restored afterwards."""
    sample, total = _chunks(tasks, num_tasks, chunk)
    chunk = total if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    results = []
    with _Reseeded(generators, seed):
        starts = range(0, total, chunk)
        for start in progress_bar(starts, progress and len(starts) > 1, desc=desc, leave=False):
            batch = as_task_dict(sample(start, min(chunk, total - start)))
            results.append((per_chunk(batch), batch["query_y"]))
    return results


def query_outputs(results):
    """``(outputs, targets)``: the per-chunk outputs of :func:`over_chunks` and their query
    targets, concatenated over the tasks (the targets on the CPU)."""
    return torch.cat([o for o, _ in results]), torch.cat([y.cpu() for _, y in results])


def prediction_report(results, name: str = "", tails=None) -> CalibrationReport:
    """A :class:`ibaml.calibration.CalibrationReport` of the per-chunk predictions of
    :func:`over_chunks`: ``(mean, var)`` (regression; ``tails`` the predictive's heavy-tailed
    family, ``None`` for the Gaussian) or class probabilities (classification). Tasks whose
    predictions are not finite raise :class:`ibaml.NonFiniteError` naming them."""
    first = results[0][0]
    if isinstance(first, tuple):          # a Gaussian predictive: (mean, var)
        mean = torch.cat([m for (m, _), _ in results])
        var = torch.cat([v for (_, v), _ in results])
        y = torch.cat([t for _, t in results]).to(mean)
        check_finite_predictions(name or "evaluate", mean, var)
        return CalibrationReport.regression(mean.reshape(mean.shape[0], -1), var.reshape(var.shape[0], -1),
                                            y.reshape(y.shape[0], -1), name=name, tails=tails)
    probs = torch.cat([p for p, _ in results])
    labels = torch.cat([t.to(probs.device) for _, t in results])
    check_finite_predictions(name or "evaluate", probs)
    return CalibrationReport.classification(probs, labels, name=name)


def noise_prior_refit(likelihood, results, tails: Optional[str] = None) -> dict:
    """Refit the noise prior of a :class:`ibaml.ConjugateNoiseGaussianLikelihood` to the
    per-chunk ``((mean, var), noise_ratio, support entries)`` of :func:`over_chunks`
    (:func:`ibaml.calibration.recalibration.refit_noise_prior` on the squared query errors);
    returns ``{"prior_noise": (before, after), "evidence_scale": (before, after), "tails":
    (before, after), "tasks": T}``."""
    mean = torch.cat([m.reshape(m.shape[0], -1) for ((m, _), _, _), _ in results])
    var = torch.cat([v.reshape(v.shape[0], -1) for ((_, v), _, _), _ in results])
    ratio = torch.cat([r for (_, r, _), _ in results])
    y = torch.cat([t.reshape(t.shape[0], -1) for _, t in results]).to(mean)
    before = float(likelihood.prior_noise.detach()), float(likelihood.evidence_scale.detach()), likelihood.tails
    after = refit_noise_prior(likelihood, ratio, (y - mean) ** 2, var, results[0][0][2], tails=tails)
    return {"prior_noise": (before[0], after[0]), "evidence_scale": (before[1], after[1]),
            "tails": (describe(before[2]), describe(likelihood.tails)), "tasks": int(ratio.shape[0])}
