"""The lazy teacher–student estimator (Jamal, Wang & Gong, "A Lazy Approach to
Long-Horizon Gradient-Based Meta-Learning", ICCV 2021).

A *student* explores the inner problem for ``K`` steps without a graph; a *teacher*
leaps towards the student's region and defines a one-step differentiable graph from θ.
Memory and backward cost are those of one inner step, whatever ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ibaml.core.hypergrad.base import HypergradEstimator, TaskGradient
from ibaml.core.optim import SGD
from ibaml.core.tree import tree_all_finite, tree_detach

VARIANTS = ("paper", "leap_then_step")


@dataclass
class Lazy(HypergradEstimator):
    """Lazy teacher–student meta-gradient.

    Notation: ``v₀(θ)`` the inner problem's starting point, ``G`` the inner and ``F`` the
    outer objective, ``v_K`` the student's iterate after ``K`` steps of the problem's inner
    optimiser from ``v₀`` (no graph; ``sg`` = stop-gradient), ``γ ∈ [0, 1]`` the leap and
    ``α`` the step size of the teacher's one-step graph (the student's SGD step).

    ``variant="paper"`` (default) — our reading of the paper: the teacher's value lies on
    the segment from ``v₀`` to the student, and its graph is one SGD step anchored at
    ``v₀(θ)`` whose displacement is scaled by ``γ``::

        φ_T = v₀ + γ (v_K − v₀)                                   (teacher value)
        J_T = ∂v₀/∂θ − γα [ ∇²_vv G(v₀, θ) ∂v₀/∂θ + ∇²_vθ G(v₀, θ) ]   (teacher Jacobian)
        dF/dθ ≈ ∂_θ F(φ_T, θ) + J_Tᵀ ∇_v F(φ_T, θ)

    computed as ``φ(θ) = φ_g(θ) + sg(φ_T − φ_g(θ))`` with the one-step graph
    ``φ_g(θ) = v₀(θ) − γα ∇_v G(v₀(θ), θ)``, then ``d/dθ F(φ(θ), θ)``: one Hessian-vector
    product at ``v₀``, whatever ``K``. For MAML (flat prior, ``v₀ = θ``) this is
    ``(I − γα ∇²L_S(θ)) ∇L_Q(φ_T)``. Special cases: ``K = 1, γ = 1`` with an SGD(``α``)
    student is one-step MAML (explicit differentiation through one SGD step); ``γ = 0``
    is the first-order gradient at ``v₀`` (no adaptation),
    ``∂_θ F(v₀, θ) + (∂v₀/∂θ)ᵀ ∇_v F(v₀, θ)``.

    ``variant="leap_then_step"`` — this library's own variant (its behaviour before the
    paper reading became the default): leap, then one more differentiable step taken at
    the leaped point, with the Jacobian of the leap that of ``v₀``::

        u(θ)   = v₀(θ) + γ · sg(v_K − v₀(θ))        (value (1 − γ) v₀ + γ v_K)
        v_T(θ) = u(θ) − α ∇_v G(u(θ), θ)
        dF/dθ ≈ d/dθ F(v_T(θ), θ)

    Here ``γ = 0`` is one-step MAML for any ``K``, and ``K = 1, γ = 1`` is a two-step SGD
    loop whose first step is first-order.

    The reported ``loss`` is the teacher's ``F`` (``F(φ_T, θ)``, resp. ``F(v_T, θ)``);
    ``diagnostics["student_loss"]`` is ``F(v_K, θ)``; the inner loss and ``‖∇_v G‖`` (all
    blocks, and per block) are those of the student at ``v_K``.

    Args:
        leap: ``γ``, the fraction of the student's displacement the teacher leaps.
        teacher_lr: ``α`` (default: the ``lr`` of the inner optimiser when it is
            :class:`ibaml.core.optim.SGD`; required for any other inner optimiser).
        student_steps: ``K`` (default: the problem's inner-loop steps).
        variant: ``"paper"`` or ``"leap_then_step"`` (see above).

    Example
    -------
    >>> learner = MetaLearner(net, priors.Flat.from_module(net), GaussianLikelihood(1.0), method="map",
    ...                       estimator=Lazy(leap=1.0), inner_optimizer=SGD(lr=0.01), inner_steps=50)
    """

    leap: float = 1.0
    teacher_lr: Optional[float] = None
    student_steps: Optional[int] = None
    variant: str = "paper"
    name = "lazy"

    def __post_init__(self):
        if not 0.0 <= self.leap <= 1.0:
            raise ValueError(f"Lazy leap must lie in [0, 1], got {self.leap!r}")
        if self.teacher_lr is not None and not self.teacher_lr > 0:
            raise ValueError(f"Lazy teacher_lr must be positive, got {self.teacher_lr!r}")
        if self.student_steps is not None and (int(self.student_steps) != self.student_steps
                                               or self.student_steps < 0):
            raise ValueError(f"Lazy student_steps must be a non-negative integer, got {self.student_steps!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"Lazy variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")

    def step_size(self, problem) -> float:
        """``α``: ``teacher_lr``, or the inner optimiser's ``lr`` when it is SGD."""
        if self.teacher_lr is not None:
            return float(self.teacher_lr)
        optimizer = problem.inner_loop.optimizer
        if not isinstance(optimizer, SGD):
            raise ValueError("Lazy needs teacher_lr (the step size α of the teacher's one-step SGD graph): "
                             f"the inner optimizer is {type(optimizer).__name__}, not SGD, so its lr is not α")
        return float(optimizer.lr)

    def task_gradient(self, problem, meta, task) -> TaskGradient:
        alpha, gamma = self.step_size(problem), float(self.leap)
        v_student, inner_diag = problem.solve(meta, task, differentiable=False, steps=self.student_steps)
        v0_const = tree_detach(problem.init(meta))
        inner_grad = torch.func.grad(problem.inner)

        if self.variant == "paper":
            phi_t = {k: v0_const[k] + gamma * (v_student[k] - v0_const[k]) for k in v_student}

            def teacher(m):
                v0 = problem.init(m)
                g = inner_grad(v0, m, task)
                graph = {k: v0[k] - (gamma * alpha) * g[k] for k in v0}   # one step at v₀(θ)
                phi = {k: graph[k] + (phi_t[k] - graph[k]).detach() for k in graph}  # value φ_T
                return problem.outer(phi, m, task)
        else:
            shift = {k: gamma * (v_student[k] - v0_const[k]) for k in v_student}

            def teacher(m):
                v0 = problem.init(m)
                u = {k: v0[k] + shift[k] for k in v0}
                g = inner_grad(u, m, task)
                return problem.outer({k: u[k] - alpha * g[k] for k in u}, m, task)

        grads, loss = torch.func.grad_and_value(teacher)(meta)
        student_loss = problem.outer(v_student, meta, task)
        diagnostics = {
            "inner_loss": inner_diag.loss,
            "inner_grad_norm": inner_diag.grad_norm,
            **{f"inner_grad_norm.{k}": n for k, n in getattr(inner_diag, "block_grad_norm", {}).items()},
            "student_loss": student_loss.detach(),
            "finite": inner_diag.finite & tree_all_finite(grads) & torch.isfinite(loss),
        }
        return TaskGradient(loss, grads, diagnostics)
