"""One meta-update of a :class:`ibaml.core.meta_problem.MetaProblem` by an optimiser: the mean over
the finite tasks by masks, the non-finite policy, the distributed all-reduce and the optimiser
step. Everything the step needs comes in as an argument (the problem, the optimiser, the tasks
and their draws, the policy, the process group); the caller (:class:`ibaml.MetaLearner`) keeps
the step and skip counts::

    (F_t, g_t) = problem.task_gradients(θ, task, draws)             mapped over tasks, no host synchronisation
    g = (1/N) Σ_{t finite} g_t,   N = #{t : F_t, g_t, v_t* finite}  the non-finite policy
    g ← g − hyper_weight · ∇_θ log p_hyper(θ)
    θ ← meta_optimizer.step(θ, g)

With a ``process_group`` each process computes ``g_t`` for its shard of the batch and the
sums over tasks are all-reduced (:mod:`ibaml.train.distributed`): every process gets the
one-process meta-gradient.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ibaml.train import distributed
from ibaml.train.nonfinite import NonFiniteError, nonfinite_cause_counts, nonfinite_causes, nonfinite_message

__all__ = ["MetaGradient", "reduce_task_gradients", "meta_gradient", "meta_step", "read_stats", "apply_nonfinite_policy"]


class MetaGradient(NamedTuple):
    """The reduced meta-gradient of a batch: ``loss`` and ``grads`` are means over the finite
    tasks; ``diagnostics`` (each ``[T]``, the estimator's and ``query_loss``, ``F_t``) and
    ``finite`` (``[T]`` bool) are per task."""

    loss: Tensor
    grads: Dict[str, Tensor]
    diagnostics: Dict[str, Tensor]
    finite: Tensor


def _masked_sum(values: Tensor, keep: Tensor) -> Tensor:
    """``Σ_t keep_t · values_t`` over the leading (task) dimension, NaN in dropped tasks ignored."""
    mask = keep.view(-1, *([1] * (values.dim() - 1)))
    return torch.where(mask, values, torch.zeros_like(values)).sum(0)


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """``Σ_t keep_t · values_t / max(1, Σ_t keep_t)`` (:func:`_masked_sum` over the kept tasks' count)."""
    return _masked_sum(values, keep) / keep.to(values.dtype).sum().clamp(min=1)


def reduce_task_gradients(out) -> MetaGradient:
    """The mean over the finite tasks of :meth:`ibaml.core.meta_problem.MetaProblem.task_gradients`' output, by
    masks alone (no host read; it compiles with ``torch.compile(fullgraph=True)``)::

        finite_t = finite(v_t*) ∧ finite(F_t),   N = max(1, Σ_t finite_t)
        loss = (1/N) Σ_t finite_t F_t,   g = (1/N) Σ_t finite_t g_t

    >>> learner = ibaml.build_learner("imaml", MLP(1, (8,), 1), ibaml.GaussianLikelihood(1.0), inner_steps=2)
    >>> reduced = reduce_task_gradients(learner.task_gradients(tasks.sample(4, generator)))
    >>> reduced.finite.tolist(), sorted(reduced.grads) == sorted(learner.meta_params())
    ([True, True, True, True], True)
    """
    finite = out.diagnostics["finite"] & torch.isfinite(out.loss)
    grads = {k: _masked_mean(g, finite) for k, g in out.grads.items()}
    return MetaGradient(_masked_mean(out.loss, finite), grads, dict(out.diagnostics, query_loss=out.loss), finite)


def meta_gradient(problem, task: Dict[str, Tensor], draws: Dict[str, Tensor], *, meta: Optional[Dict[str, Tensor]] = None,
                  nonfinite: str = "raise", process_group: Any = None, check: bool = True) -> MetaGradient:
    """Mean meta-gradient over the finite tasks of ``task`` with the fixed ``draws`` (no update)::

        g = (1/N) Σ_{t finite} g_t,    loss = (1/N) Σ_{t finite} F_t

    ``problem`` is a :class:`ibaml.core.meta_problem.MetaProblem`, ``task`` on its device, ``meta`` the
    meta-parameters (default the problem's, detached). With ``check`` non-finite tasks are
    handled by the policy ``nonfinite`` (``"raise"``: :class:`NonFiniteError` naming the stage
    that failed; ``"skip"``: dropped, unless every task failed), which reads one count on the
    host; without it nothing is read on the host and the non-finite tasks are only masked out
    (``finite`` says which). With a ``process_group`` each process computes its shard of the
    tasks and the sums over tasks are all-reduced."""
    meta = problem.meta_params() if meta is None else meta
    num_tasks = task["support_x"].shape[0]
    if process_group is not None:
        rank, world = distributed.dist.get_rank(process_group), distributed.dist.get_world_size(process_group)
        task, draws = distributed.shard_tasks(task, rank, world), distributed.shard_tasks(draws, rank, world, num_tasks)
    out = problem.task_gradients(meta, task, draws)
    if process_group is None:
        reduced = reduce_task_gradients(out)
        per_task, losses, finite = reduced.diagnostics, out.loss, reduced.finite
    else:
        local_finite = out.diagnostics["finite"] & torch.isfinite(out.loss)
        per_task = distributed.all_gather_tasks(dict(out.diagnostics, query_loss=out.loss, _finite=local_finite),
                                                num_tasks, process_group)
        losses, finite = per_task["query_loss"], per_task.pop("_finite")
    if check:
        n_bad = int((~finite).sum())
        if n_bad and (nonfinite == "raise" or n_bad == finite.numel()):
            raise NonFiniteError(nonfinite_message(nonfinite_causes(per_task, losses, finite), n_bad, finite.numel()))
    if process_group is None:
        return reduced
    sums = distributed.all_reduce_sum({k: _masked_sum(g, local_finite) for k, g in out.grads.items()}, process_group)
    n_keep = finite.to(losses.dtype).sum().clamp(min=1)
    return MetaGradient(_masked_sum(losses, finite) / n_keep, {k: v / n_keep for k, v in sums.items()}, per_task, finite)


def meta_step(problem, optimizer, task: Dict[str, Tensor], draws: Dict[str, Tensor], *, nonfinite: str = "raise",
              process_group: Any = None, check: bool = True) -> Dict[str, Any]:
    """One update of the meta-parameters of ``problem`` (a :class:`ibaml.core.meta_problem.MetaProblem`)
    by ``optimizer`` (a ``torch.optim`` optimiser over them) on ``task`` with the fixed ``draws``;
    returns summary statistics: ``loss`` (mean query loss of the finite tasks), ``skipped``
    (non-finite tasks dropped), the means of ``inner_grad_norm`` and ``residual_norm`` over the
    finite tasks, ``hyper``, and the stationarity of each block of the inner solution,
    ``inner_grad_norm.<block>`` (``||∇_b G(v*, θ)||`` averaged over the finite tasks: ``w`` for
    MAP, ``mean`` and ``rho`` for a variational posterior): the meta-gradient is exact only where
    these are small. The caller keeps the step and skip counts.

    With ``check`` (the default) the non-finite policy ``nonfinite`` is applied at once (one host
    read) and ``loss``, ``skipped``, ``inner_grad_norm``, ``residual_norm`` and ``hyper`` are
    numbers; the per-block norms stay 0-d tensors. With ``check=False`` the step reads nothing on
    the host: every statistic is a 0-d tensor, the non-finite tasks are masked out (with none left
    the parameters are kept; the optimiser's moments see a zero gradient), ``nonfinite.<stage>``
    counts them, and :func:`read_stats` applies the policy when the caller reads the statistics."""
    loss, grads, diagnostics, finite = meta_gradient(problem, task, draws, nonfinite=nonfinite,
                                                     process_group=process_group, check=check)
    optimizer.zero_grad(set_to_none=True)
    params = problem.model.meta_parameters()
    hyper = problem.hyper_objective(params)
    if hyper is not None and hyper.requires_grad:
        hyper.backward()
    for k, p in params.items():
        p.grad = grads[k].to(p.dtype) if p.grad is None else p.grad + grads[k].to(p.dtype)
    before = None if check else {k: p.detach().clone() for k, p in params.items()}
    optimizer.step()
    if before is not None:   # no host read: with no finite task left the parameters are kept
        any_finite = finite.any()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(torch.where(any_finite, p, before[k]))
    stats: Dict[str, Any] = {"loss": loss.detach(), "skipped": (~finite).sum()}
    for key in diagnostics:
        if key in ("inner_grad_norm", "residual_norm") or key.startswith("inner_grad_norm."):
            stats[key] = _masked_mean(diagnostics[key].detach(), finite)
    if hyper is not None:
        stats["hyper"] = hyper.detach()
    if not check:
        causes = nonfinite_cause_counts(diagnostics, diagnostics["query_loss"], finite)
        stats.update({f"nonfinite.{k}": v for k, v in causes.items()})
        stats["tasks"] = finite.numel()
        return stats
    return {k: (v if k.startswith("inner_grad_norm.") else float(v)) for k, v in stats.items()}


def read_stats(stats: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, int], int]:
    """The statistics of a ``meta_step(..., check=False)`` read on the host: ``(values, causes,
    tasks)``, the statistics as numbers (``values["skipped"]``: the tasks masked out), the count
    of non-finite tasks per stage, and the number of tasks (:func:`apply_nonfinite_policy` takes
    the last two)."""
    values = {k: (v if k.startswith("inner_grad_norm.") else float(v) if torch.is_tensor(v) else v)
              for k, v in stats.items()}
    causes = {k.split(".", 1)[1]: int(values.pop(k)) for k in list(values) if k.startswith("nonfinite.")}
    n_tasks = int(values.pop("tasks", 0))
    values["skipped"] = int(values["skipped"])
    return values, causes, n_tasks


def apply_nonfinite_policy(nonfinite: str, num_bad: int, causes: Mapping[str, int], num_tasks: int) -> None:
    """Raise :class:`NonFiniteError` where ``num_bad`` of ``num_tasks`` tasks failed (``causes``: the
    count per stage) and the policy ``nonfinite`` does not allow it: any failed task under
    ``"raise"``, every task under ``"skip"``."""
    if num_bad and causes and (nonfinite == "raise" or num_bad == num_tasks):
        raise NonFiniteError(nonfinite_message(causes, num_bad, num_tasks))
