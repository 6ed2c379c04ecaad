"""First-order estimator (FOMAML and its variational counterpart)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ibaml.core.hypergrad.base import HypergradEstimator, TaskGradient
from ibaml.core.hypergrad.implicit import _outer_value_and_grads
from ibaml.core.tree import tree_add, tree_all_finite


@dataclass
class FirstOrder(HypergradEstimator):
    """Drop the second-order term: take ``dv*/dθ ≈ dv₀/dθ`` (the solution moves with
    its starting point), so

        dF/dθ ≈ ∂_θ F + (∂v₀/∂θ)ᵀ ∂_v F     at v* from the inner loop (no graph).

    For MAP with ``v₀ = μ`` this is FOMAML: ``∂F/∂μ ≈ ∂_w F(w*)``.
    """

    name = "first_order"

    def task_gradient(self, problem, meta, task) -> TaskGradient:
        v_star, inner_diag = problem.solve(meta, task, differentiable=False)
        loss, (grad_v, grad_meta) = _outer_value_and_grads(problem, v_star, meta, task)
        _, init_vjp = torch.func.vjp(problem.init, meta)
        (through_init,) = init_vjp(grad_v)
        grads = tree_add(grad_meta, through_init)
        diagnostics = {
            "inner_loss": inner_diag.loss,
            "inner_grad_norm": inner_diag.grad_norm,
            **{f"inner_grad_norm.{k}": n for k, n in inner_diag.block_grad_norm.items()},
            "finite": inner_diag.finite & tree_all_finite(grads),
        }
        return TaskGradient(loss, grads, diagnostics)
