"""The lazy teacher–student estimator (Jamal, Wang & Gong, "A Lazy Approach to
Long-Horizon Gradient-Based Meta-Learning", ICCV 2021).

A *student* explores the inner problem for ``K`` steps without a graph; a *teacher*
builds a one-step differentiable graph from θ that leaps towards the student's region.
Memory and backward cost are those of one inner step, whatever ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..tree import tree_all_finite
from .base import HypergradEstimator, TaskGradient


@dataclass
class Lazy(HypergradEstimator):
    """Lazy teacher–student meta-gradient. With ``v_K`` the student's iterate after the
    problem's inner loop (``K`` steps from ``v₀(θ)``, no graph), leap size ``γ ∈ [0, 1]``
    and teacher step size ``α``::

        u(θ)   = v₀(θ) + γ · sg(v_K − v₀(θ))          (leap; sg = stop-gradient, ∂u/∂θ = ∂v₀/∂θ)
        v_T(θ) = u(θ) − α ∇_v G(u(θ), θ)              (one differentiable gradient step at u)
        dF/dθ ≈ d/dθ F(v_T(θ), θ)

    This is our reading of the paper. Its value ``u = (1 − γ) v₀ + γ v_K`` interpolates
    between the starting point and the student; its derivative is that of ``v₀``. Special
    cases: ``γ = 0`` is explicit differentiation through one SGD step of size ``α`` from
    ``v₀`` (one-step MAML, for any ``K``); ``K = 1, γ = 1`` with an SGD(``α``) student is
    explicit differentiation of a two-step SGD loop whose first step is first-order
    (its gradient ``∇_v G(v₀, θ)`` held constant).

    The reported ``loss`` is the teacher's ``F(v_T, θ)`` (the objective differentiated);
    ``diagnostics["student_loss"]`` is ``F(v_K, θ)``.

    Args:
        leap: ``γ``, the fraction of the student's displacement the teacher leaps.
        teacher_lr: ``α`` (default: the inner optimiser's ``lr``).

    Example
    -------
    >>> learner = MetaLearner(net, priors.Flat.from_module(net), GaussianLikelihood(1.0), method="map",
    ...                       estimator=Lazy(leap=1.0), inner_optimizer=SGD(lr=0.01), inner_steps=50)
    """

    leap: float = 1.0
    teacher_lr: Optional[float] = None
    name = "lazy"

    def __post_init__(self):
        if not 0.0 <= self.leap <= 1.0:
            raise ValueError(f"Lazy leap must lie in [0, 1], got {self.leap!r}")
        if self.teacher_lr is not None and not self.teacher_lr > 0:
            raise ValueError(f"Lazy teacher_lr must be positive, got {self.teacher_lr!r}")

    def step_size(self, problem) -> float:
        """``α``: ``teacher_lr`` or the inner optimiser's ``lr``."""
        if self.teacher_lr is not None:
            return float(self.teacher_lr)
        lr = getattr(problem.inner_loop.optimizer, "lr", None)
        if lr is None:
            raise ValueError("Lazy needs teacher_lr: the inner optimizer "
                             f"{type(problem.inner_loop.optimizer).__name__} has no lr")
        return float(lr)

    def task_gradient(self, problem, meta, task) -> TaskGradient:
        alpha, gamma = self.step_size(problem), float(self.leap)
        v_student, inner_diag = problem.solve(meta, task, differentiable=False)
        v0_const = problem.init(meta)  # evaluated outside the graph: the stop-gradient term
        shift = {k: gamma * (v_student[k] - v0_const[k]) for k in v_student}
        inner_grad = torch.func.grad(problem.inner)

        def teacher(m):
            v0 = problem.init(m)
            u = {k: v0[k] + shift[k] for k in v0}
            g = inner_grad(u, m, task)
            v_teacher = {k: u[k] - alpha * g[k] for k in u}
            return problem.outer(v_teacher, m, task)

        grads, loss = torch.func.grad_and_value(teacher)(meta)
        student_loss = problem.outer(v_student, meta, task)
        diagnostics = {
            "inner_loss": inner_diag.loss,
            "inner_grad_norm": inner_diag.grad_norm,
            "student_loss": student_loss.detach(),
            "finite": inner_diag.finite & tree_all_finite(grads) & torch.isfinite(loss),
        }
        return TaskGradient(loss, grads, diagnostics)
