"""The implicit (iMAML / iBaML) estimator: inner loop without a graph, then the IFT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ibaml.core.hypergrad.base import HypergradEstimator, TaskGradient
from ibaml.core.implicit_function import implicit_vjp_at_solution
from ibaml.core.linalg import CG
from ibaml.core.tree import FlatSpec, tree_add, tree_all_finite


@dataclass
class Implicit(HypergradEstimator):
    """``dF/dθ = ∂_θ F − Bᵀ x``, ``H x = ∂_v F`` at ``v*`` from the inner loop (run without
    a graph: memory does not grow with the number of inner steps).

    Args:
        solver: linear solver from :mod:`ibaml.core.linalg` (``CG``, ``Neumann``, ``Dense``).
        precondition: pass the problem's diagonal curvature (the prior precision) to
            the solver.
        hvp_mode: ``"rev"`` or ``"fwd"`` Hessian-vector products.
    """

    solver: Any = field(default_factory=lambda: CG(max_iter=5, tol=1e-10, damping=0.0))
    precondition: bool = True
    hvp_mode: str = "rev"
    name = "implicit"

    def task_gradient(self, problem, meta, task) -> TaskGradient:
        # The inner loop's own diagnostics would cost a gradient evaluation at v*; the
        # Hessian-vector products linearise ∇_v G at v* and give that gradient for free.
        v_star, _ = problem.solve(meta, task, differentiable=False, diagnose=False)
        loss, (grad_v, grad_meta) = _outer_value_and_grads(problem, v_star, meta, task)
        precond = problem.preconditioner(v_star, meta) if self.precondition else None
        out = implicit_vjp_at_solution(lambda v, m: problem.inner(v, m, task), v_star, meta, grad_v,
                                       solver=self.solver, preconditioner=precond, hvp_mode=self.hvp_mode)
        grads = tree_add(grad_meta, out.meta_cotangent)
        inner_loss = out.inner_value.detach()
        inner_grad = FlatSpec.from_dict(v_star).unflatten(out.inner_grad.detach())
        diagnostics = {
            "inner_loss": inner_loss,
            "inner_grad_norm": torch.linalg.vector_norm(out.inner_grad).detach(),
            **{f"inner_grad_norm.{k}": torch.linalg.vector_norm(g) for k, g in inner_grad.items()},
            "residual_norm": out.solve.residual_norm,
            "solver_iterations": out.solve.iterations,
            "finite": (tree_all_finite(v_star) & torch.isfinite(inner_loss) & tree_all_finite(grads)
                       & torch.isfinite(out.solve.residual_norm)),
        }
        return TaskGradient(loss, grads, diagnostics)


def _outer_value_and_grads(problem, v, meta, task):
    """``F(v, θ)`` and ``(∂_v F, ∂_θ F)``."""
    (grad_v, grad_meta), loss = torch.func.grad_and_value(problem.outer, argnums=(0, 1))(v, meta, task)
    return loss, (grad_v, grad_meta)
