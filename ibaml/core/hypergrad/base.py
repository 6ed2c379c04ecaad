"""The interface shared by all hypergradient estimators.

An estimator maps ``(problem, θ, task)`` to the task's outer loss, an estimate of
``dF(v*(θ), θ)/dθ`` and diagnostics, for ONE task; :class:`ibaml.MetaLearner` vmaps it
over the tasks of a meta-batch. ``problem`` is a :class:`ibaml.core.inner_loop.TaskProblem`
(``init``, ``inner``, ``outer``, ``preconditioner``, ``solve``): estimators know no prior
family and no dataset.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

from torch import Tensor

from ibaml.core.tree import ParamDict


class TaskGradient(NamedTuple):
    """One task's outer loss, meta-gradient and diagnostics (batched under vmap)."""

    loss: Tensor
    grads: ParamDict
    diagnostics: Dict[str, Tensor]


class HypergradEstimator:
    """Base class: implement ``task_gradient(problem, meta, task) -> TaskGradient``."""

    name = "base"

    def task_gradient(self, problem, meta: ParamDict, task) -> TaskGradient:
        raise NotImplementedError
