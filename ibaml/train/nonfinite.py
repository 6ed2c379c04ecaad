"""The non-finite policy of a meta-step: which tasks failed, at which stage, and the error.

A task is *non-finite* when its inner solution (the iterate, the inner loss or its gradient),
the linear solver's residual norm, its meta-gradient or its query loss is NaN or Inf. Under
``nonfinite="raise"`` a meta-step with such a task raises :class:`NonFiniteError`; under
``"skip"`` the task is dropped from the mean, ``g = (1/N) Σ_{t finite} g_t``, unless every
task failed. The counts by stage are tensor operations (no host read) until read.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import Tensor

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """Raised when inner solutions or meta-gradients are not finite and the policy is ``"raise"``."""


def nonfinite_cause_counts(diagnostics: Dict[str, Tensor], losses: Tensor, finite: Tensor) -> Dict[str, Tensor]:
    """Count the non-finite tasks (``~finite``) by the first stage that failed, in the order
    of the computation, as 0-d tensors (no host read): ``inner`` (inner loss or gradient norm at
    the inner solution), ``query`` (the query loss ``F``), ``solver`` (the linear solver's
    residual norm, implicit estimators), ``gradient`` (the meta-gradient itself)."""
    left = ~finite
    counts = {}
    stages = (("inner", ("inner_loss", "inner_grad_norm")), ("query", None), ("solver", ("residual_norm",)))
    for stage, keys in stages:
        values = [losses] if keys is None else [diagnostics[k] for k in keys if k in diagnostics]
        failed = torch.zeros_like(left)
        for v in values:
            failed = failed | ~torch.isfinite(v)
        failed = failed & left
        counts[stage] = failed.sum()
        left = left & ~failed
    counts["gradient"] = left.sum()
    return counts


def nonfinite_causes(diagnostics: Dict[str, Tensor], losses: Tensor, finite: Tensor) -> Dict[str, int]:
    """:func:`nonfinite_cause_counts` read as integers.

    >>> nonfinite_causes({"inner_loss": torch.tensor([0.0, float("nan")])}, torch.zeros(2),
    ...                  torch.tensor([True, False]))
    {'inner': 1, 'query': 0, 'solver': 0, 'gradient': 0}
    """
    return {k: int(v) for k, v in nonfinite_cause_counts(diagnostics, losses, finite).items()}


def nonfinite_message(causes: Mapping[str, int], n_bad: int, n_tasks: int) -> str:
    """The one-line error: how many tasks failed, of how many, and at which stage."""
    return (f"{n_bad} of {n_tasks} tasks gave non-finite values (inner solution: {causes['inner']}, query loss: "
            f"{causes['query']}, CG residual: {causes['solver']}, meta-gradient: {causes['gradient']}); lower the "
            f"inner learning rate, add CG damping, or use nonfinite='skip'"
            + (" (every task failed, so nothing is left to learn from)" if n_bad == n_tasks else ""))


def check_finite_predictions(where: str, *predictions: Tensor) -> None:
    """Raise :class:`NonFiniteError` if any task's predictions ``[T, ...]`` (means, variances,
    probabilities) are NaN or Inf, naming how many tasks of how many, the first few indices,
    ``where`` (the tasks' condition), and what to change: a diverged adaptation is reported as
    such, not as an error of the metrics computed from it.

    >>> check_finite_predictions("10-shot tasks", torch.zeros(3, 4))
    >>> check_finite_predictions("30-shot tasks", torch.tensor([[0.0], [float("nan")]]))
    Traceback (most recent call last):
        ...
    ibaml.train.nonfinite.NonFiniteError: 30-shot tasks: 1 of 2 tasks have non-finite predictions (tasks [1]); ...
    """
    num_tasks = predictions[0].shape[0]
    bad = torch.zeros(num_tasks, dtype=torch.bool, device=predictions[0].device)
    for p in predictions:
        bad = bad | ~torch.isfinite(p.detach().reshape(num_tasks, -1)).all(1)
    if bool(bad.any()):
        index = bad.nonzero().flatten().tolist()
        shown = f"{index[:5]}" + (" ..." if len(index) > 5 else "")
        raise NonFiniteError(
            f"{where}: {len(index)} of {num_tasks} tasks have non-finite predictions (tasks {shown}); the adaptation to "
            "their support sets diverged: lower the inner step (inner_lr) or the inner steps for this support size, "
            "or adapt with a step-size-free inner optimiser (inner_optimizer='newton')")
