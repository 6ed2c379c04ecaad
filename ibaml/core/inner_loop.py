"""The inner loop: minimise a task's inner objective ``G(v, θ)`` over ``v`` with a functional
optimiser, and the bilevel problem of one task that the meta-gradient estimators use.

:class:`InnerLoop` runs any functional optimiser (:mod:`ibaml.core.optim`) for a fixed number of
steps, ``v_{k+1} = update(v_k, ∇_v G(v_k, θ))``, either without a graph (implicit, first-order
estimators; memory independent of the steps) or differentiably (explicit). :class:`TaskProblem`
binds a :class:`ibaml.core.task_model.TaskModel`, an inference method of :mod:`ibaml.core.inference`
(which defines ``G`` and the outer ``F``) and an inner loop. Everything is a pure function of
``(v, θ, task)``, vmapped over tasks by the callers.

Example
-------
>>> problem = TaskProblem(model, MAP(), InnerLoop(Adam(lr=0.01), steps=50))
>>> v, diagnostics = problem.solve(meta, task)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ibaml.core.optim import SGD, as_inner_optimizer
from ibaml.core.task_model import TaskModel
from ibaml.core.tree import FlatSpec, ParamDict, tree_all_finite, tree_detach, tree_norm

Task = Dict[str, Tensor]


class InnerDiagnostics(NamedTuple):
    """Per-task diagnostics of an inner solve (tensors; batched under vmap): the inner loss,
    ``||∇_v G||`` at the returned iterate (all blocks, and per block in ``block_grad_norm``:
    ``{"w"}`` for MAP, ``{"mean", "rho"}`` or ``{"mean", "std"}`` for a variational posterior), and finiteness."""

    loss: Tensor
    grad_norm: Tensor
    finite: Tensor
    block_grad_norm: Dict[str, Tensor]


@dataclass(frozen=True)
class InnerLoop:
    """Runs ``steps`` updates of a functional optimiser on an inner objective.

    ``v_{k+1}, state_{k+1} = optimizer.step(G, v_k, state_k)`` (for a gradient method
    ``update(v_k, ∇_v G(v_k), state_k)``; :class:`ibaml.core.optim.InnerOptimizer`); with
    ``differentiable=False`` every iterate is detached (no graph, memory independent
    of ``steps``); with ``differentiable=True`` the whole path stays differentiable.
    The diagnostics (loss, gradient norm, finiteness at the last iterate) cost one more
    gradient evaluation; ``diagnose=False`` skips it and returns ``None`` in their place,
    for callers that evaluate the gradient at the solution anyway.

    ``support_size``: the number of support points ``N₀`` the optimiser's step was chosen at.
    On a task with ``N > N₀`` support points the optimiser sees the inner objective scaled by
    ``N₀/N`` (:meth:`TaskProblem.solve`): a gradient step on the summed loss, whose curvature
    grows with ``N``, keeps the size per point it had at ``N₀`` instead of growing ``N/N₀``-fold
    and diverging; at ``N ≤ N₀``, where the summed loss is flatter, it is left as it is. Scaling
    ``G`` moves none of its stationary points, so the solution the loop aims at, and the implicit
    meta-gradient, are unchanged; Newton steps are invariant to it.
    """

    optimizer: Any = field(default_factory=lambda: SGD(lr=0.01))
    steps: int = 10
    support_size: Optional[int] = None

    def __post_init__(self):
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"inner steps must be a non-negative integer, got {self.steps!r}")
        if self.support_size is not None and (int(self.support_size) != self.support_size or self.support_size < 1):
            raise ValueError(f"support_size must be a positive integer or None, got {self.support_size!r}")
        # one shape from here on (refused, naming what it lacks, if it has neither)
        object.__setattr__(self, "optimizer", as_inner_optimizer(self.optimizer))

    def run(self, objective, v0: ParamDict, differentiable: bool = False,
            diagnose: bool = True, curvature=None) -> Tuple[ParamDict, Optional[InnerDiagnostics]]:
        """``curvature(v)``: the problem's diagonal prior curvature at ``v``, passed to an
        optimiser that declares ``needs_curvature`` (:class:`ibaml.core.optim.PriorPreconditioned`)."""
        grad_fn = torch.func.grad_and_value(objective)
        optimizer = self.optimizer
        v = dict(v0) if differentiable else tree_detach(v0)
        state = optimizer.init(v)
        for _ in range(int(self.steps)):
            if optimizer.needs_curvature:
                v, state = optimizer.step(objective, v, state, curvature=None if curvature is None else curvature(v))
            else:
                v, state = optimizer.step(objective, v, state)
            if not differentiable:
                v = tree_detach(v)
                state = _detach_state(state)
        if not diagnose:
            return v, None
        g, loss = grad_fn(tree_detach(v))
        finite = tree_all_finite(v) & torch.isfinite(loss)
        blocks = {k: torch.linalg.vector_norm(x.detach()) for k, x in g.items()}
        return v, InnerDiagnostics(loss.detach(), tree_norm(g).detach(), finite, blocks)


def _detach_state(state):
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: _detach_state(s) for k, s in state.items()}
    return state


@dataclass
class TaskProblem:
    """The bilevel problem of one task: model, inference method (an
    :class:`ibaml.core.inference.InferenceMethod`) and inner loop.

    Everything the hypergradient estimators need, as functions of ``(v, θ, task)``:
    ``init(θ)``, ``inner(v, θ, task) = G``, ``outer(v, θ, task) = F``,
    ``preconditioner(v, θ)``, and ``solve(θ, task)`` for ``v*``.
    """

    model: TaskModel
    method: Any
    inner_loop: InnerLoop

    def init(self, meta) -> ParamDict:
        return self.method.init(self.model, meta)

    def inner(self, v, meta, task: Task) -> Tensor:
        return self.method.inner_objective(self.model, v, meta, task)

    def outer(self, v, meta, task: Task) -> Tensor:
        return self.method.outer_objective(self.model, v, meta, task)

    def preconditioner(self, v, meta) -> Optional[ParamDict]:
        return self.method.preconditioner(self.model, v, meta)

    def solve(self, meta, task: Task, differentiable: bool = False, v0: Optional[ParamDict] = None,
              steps: Optional[int] = None, diagnose: bool = True):
        """``(v*, diagnostics)`` after the inner loop from ``v0`` (default the method's
        ``task_init(θ, task)``); an optimiser that declares ``needs_curvature`` gets the method's
        ``curvature(v, precision_diag(θ))``; see :meth:`InnerLoop.run` for ``diagnose``."""
        loop = self.inner_loop if steps is None else replace(self.inner_loop, steps=steps)
        start = self.method.task_init(self.model, meta, task) if v0 is None else v0
        scale = 1.0 if loop.support_size is None else step_scale(loop.support_size, task["support_x"].shape[0])
        curvature = None
        if loop.optimizer.needs_curvature:
            precision = self.model.prior_precision_diag(meta)   # θ is fixed during the solve
            curvature = lambda v: _scaled(self.method.curvature(v, precision), scale)
        objective = (lambda v: self.inner(v, meta, task)) if scale == 1.0 else (lambda v: scale * self.inner(v, meta, task))
        return loop.run(objective, start, differentiable=differentiable, diagnose=diagnose, curvature=curvature)


def step_scale(support_size: Optional[int], num_points: int) -> float:
    """The factor on the inner objective that an :class:`InnerLoop` with ``support_size`` ``N₀``
    applies on a task of ``num_points`` support points ``N``: ``min(1, N₀/N)`` (1 for ``None``).

    >>> step_scale(10, 30), step_scale(10, 1), step_scale(None, 30)
    (0.3333333333333333, 1.0, 1.0)
    """
    return 1.0 if support_size is None else min(1.0, support_size / num_points)


def _scaled(curvature: Optional[ParamDict], scale: float) -> Optional[ParamDict]:
    if curvature is None or scale == 1.0:
        return curvature
    return {k: None if c is None else scale * c for k, c in curvature.items()}


def newton_polish(objective, v: ParamDict, steps: int = 5, max_halvings: int = 30) -> ParamDict:
    """Refine a stationary point with ``steps`` Newton steps ``v ← v − t H⁻¹ ∇G`` on the dense
    Hessian, halving ``t`` from 1 until ``||∇G||`` decreases. For tiny problems only (``O(D²)``
    memory, host synchronisation): it gives the tight solutions that reference
    meta-gradients and finite-difference checks need."""
    spec = FlatSpec.from_dict(v)
    x = spec.flatten(tree_detach(v))
    flat_objective = lambda z: objective(spec.unflatten(z))
    grad = torch.func.grad(flat_objective)
    for _ in range(int(steps)):
        g = grad(x)
        direction = torch.linalg.solve(torch.func.hessian(flat_objective)(x), g)
        t, norm = 1.0, torch.linalg.vector_norm(g)
        for _ in range(int(max_halvings)):
            candidate = x - t * direction
            if torch.linalg.vector_norm(grad(candidate)) < norm:
                x = candidate
                break
            t *= 0.5
    return spec.unflatten(x)
