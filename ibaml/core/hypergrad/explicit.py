"""Explicit unrolled differentiation (MAML for MAP, ABML for variational inference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ibaml.core.hypergrad.base import HypergradEstimator, TaskGradient
from ibaml.core.tree import tree_all_finite


@dataclass
class Explicit(HypergradEstimator):
    """Backpropagate through all ``K`` inner steps:

        dF/dθ = d/dθ F(v_K(θ), θ),   v_{k+1} = update(v_k, ∇_v G(v_k, θ)),  v_0 = init(θ)

    Exact for the truncated inner loop; memory grows linearly with ``K``.
    """

    name = "explicit"

    def task_gradient(self, problem, meta, task) -> TaskGradient:
        def unrolled(m):
            v, inner_diag = problem.solve(m, task, differentiable=True)
            return problem.outer(v, m, task), inner_diag

        grads, (loss, inner_diag) = torch.func.grad_and_value(unrolled, has_aux=True)(meta)
        diagnostics = {
            "inner_loss": inner_diag.loss,
            "inner_grad_norm": inner_diag.grad_norm,
            **{f"inner_grad_norm.{k}": n for k, n in inner_diag.block_grad_norm.items()},
            "finite": inner_diag.finite & tree_all_finite(grads) & torch.isfinite(loss),
        }
        return TaskGradient(loss, grads, diagnostics)
