"""The generalized implicit gradient: differentiate through a stationary point.

Let ``v*(θ)`` satisfy ``∇_v G(v*, θ) = 0``. By the implicit function theorem, with
``H = ∇²_vv G`` and ``B = ∇²_vθ G`` at ``(v*, θ)``, ``dv*/dθ = −H⁻¹ B`` and for any
outer loss ``F(v*(θ), θ)``::

    dF/dθ = ∂_θ F − Bᵀ x,        H x = ∂_v F.

``H`` is never formed: the solver sees only Hessian-vector products
``u ↦ ∇_v⟨∇_v G(v*, θ), u⟩`` (reverse-over-reverse, the gradient graph built once) or
``u ↦ ∂_t ∇_v G(v* + t u, θ)`` (forward-over-reverse). ``Bᵀ x`` is one vector-Jacobian
product: the gradient in θ of ``⟨∇_v G(v*, θ), x⟩`` with ``v*`` and ``x`` fixed.
Nothing here knows what ``G`` is: any twice-differentiable inner objective works.

Two entry points to the same formula. :func:`implicit_diff` attaches ``v*`` to autograd (an
``autograd.Function``): use it in your own code, where ``loss.backward()`` should simply see
through a solver. :func:`implicit_vjp` / :func:`implicit_vjp_at_solution` take the
cotangent ``∂_v F`` and return ``Bᵀ x`` explicitly, with the CG result and ``∇_v G(v*)`` for
diagnostics, as pure functions that compose with ``torch.func`` transforms: the library's
:class:`ibaml.Implicit` estimator uses them, per task under ``vmap``. :func:`implicit_gradient`
adds ``∂_θ F`` to the latter: the whole meta-gradient of an outer loss at a given solution, the
reference that the tests and benchmarks check the estimators against.

Example
-------
>>> def G(v, m):   # ridge regression, closed form v* = (AᵀA + λI)⁻¹ Aᵀ b(m)
...     return 0.5 * ((A @ v["x"] - m["b"]) ** 2).sum() + 0.5 * lam * (v["x"] ** 2).sum()
>>> v_star = {"x": torch.linalg.solve(A.T @ A + lam * I, A.T @ b)}
>>> out = implicit_diff(G, v_star, {"b": b.requires_grad_()})
>>> out["x"].sum().backward()   # b.grad = A (AᵀA + λI)⁻¹ 1
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ibaml.core.linalg import CG, SolveResult
from ibaml.core.tree import FlatSpec, ParamDict

InnerObjective = Callable[[ParamDict, ParamDict], Tensor]

DEFAULT_SOLVER = CG(max_iter=20, tol=1e-10)


def _linearize(inner_objective: InnerObjective, solution: Mapping[str, Tensor], meta_params, hvp_mode: str,
               at_solution: bool = True):
    """Everything the implicit VJP needs at ``v*``, from one pass where possible.

    Returns ``(spec, v_flat, matvec, grad_v, g, value)``: the flat layout, ``v*`` flat, the
    Hessian-vector product ``u ↦ ∇²_vv G u``, the flat gradient map ``(v, θ) ↦ ∇_v G(v, θ)``
    (for ``Bᵀx``), and ``∇_v G(v*, θ)`` (flat) and ``G(v*, θ)`` at the solution. In ``"rev"``
    mode the gradient graph built for the products also yields ``g`` and ``G``; in ``"fwd"``
    mode they cost one gradient evaluation, made only with ``at_solution`` (else ``None``)."""
    spec = FlatSpec.from_dict(solution)
    v_flat = spec.flatten(solution)

    def grad_v(v, m):
        return spec.flatten(torch.func.grad(inner_objective)(spec.unflatten(v), m))

    def grad_and_value(v):
        g, value = torch.func.grad_and_value(inner_objective)(spec.unflatten(v), meta_params)
        return spec.flatten(g), value

    if hvp_mode == "rev":
        g, hvp_vjp, value = torch.func.vjp(grad_and_value, v_flat, has_aux=True)
        matvec = lambda u: hvp_vjp(u)[0]
    elif hvp_mode == "fwd":
        g, value = grad_and_value(v_flat) if at_solution else (None, None)
        matvec = lambda u: torch.func.jvp(lambda v: grad_v(v, meta_params), (v_flat,), (u,))[1]
    else:
        raise ValueError(f"hvp_mode must be 'rev' or 'fwd', got {hvp_mode!r}")
    return spec, v_flat, matvec, grad_v, g, value


class ImplicitVJP(NamedTuple):
    """Result of :func:`implicit_vjp_at_solution`: ``−Bᵀx``, the linear solve, and the inner
    objective's gradient (flat) and value at the solution (diagnostics at no extra cost)."""

    meta_cotangent: ParamDict
    solve: SolveResult
    inner_grad: Tensor
    inner_value: Tensor


def implicit_vjp_at_solution(inner_objective: InnerObjective, solution: Mapping[str, Tensor],
                             meta_params: Mapping[str, Tensor], cotangent: Mapping[str, Tensor], solver=None,
                             preconditioner: Optional[Mapping[str, Tensor]] = None,
                             hvp_mode: str = "rev", at_solution: bool = True) -> ImplicitVJP:
    """:func:`implicit_vjp`, also returning ``∇_v G(v*, θ)`` and ``G(v*, θ)``, which the
    Hessian-vector products compute anyway (an estimator's diagnostics need no extra
    gradient evaluation). ``at_solution=False`` skips them where they would cost extra work
    (``"fwd"`` mode); they are then ``None``."""
    solver = DEFAULT_SOLVER if solver is None else solver
    spec, v_flat, matvec, grad_v, g, value = _linearize(inner_objective, solution, meta_params, hvp_mode,
                                                        at_solution)
    b = spec.flatten(cotangent)
    precond = None if preconditioner is None else spec.flatten(preconditioner)
    result = solver(matvec, b, precond_diag=precond)
    _, cross_vjp = torch.func.vjp(lambda m: grad_v(v_flat, m), dict(meta_params))
    (meta_cotangent,) = cross_vjp(-result.x)
    return ImplicitVJP(meta_cotangent, result, g, value)


def implicit_vjp(inner_objective: InnerObjective, solution: Mapping[str, Tensor], meta_params: Mapping[str, Tensor],
                 cotangent: Mapping[str, Tensor], solver=None, preconditioner: Optional[Mapping[str, Tensor]] = None,
                 hvp_mode: str = "rev") -> Tuple[ParamDict, SolveResult]:
    """``(−Bᵀ H⁻¹ c, solve result)`` for a cotangent ``c = ∂_v F`` at the solution.

    Pure ``torch.func`` code (no host synchronisation), so it can be vmapped over tasks.

    Args:
        inner_objective: ``G(v, θ)`` taking two dicts and returning a 0-d tensor.
        solution: ``v*``, a dict at a stationary point of ``G`` in ``v``.
        meta_params: ``θ``.
        cotangent: dict shaped like ``solution``.
        solver: a linear solver of :mod:`ibaml.core.linalg` (default ``CG(20, 1e-10)``).
        preconditioner: optional dict of diagonal curvature estimates shaped like ``solution``.
        hvp_mode: ``"rev"`` (reverse-over-reverse) or ``"fwd"`` (forward-over-reverse).
    """
    out = implicit_vjp_at_solution(inner_objective, solution, meta_params, cotangent, solver, preconditioner,
                                   hvp_mode, at_solution=False)
    return out.meta_cotangent, out.solve


def implicit_gradient(outer_objective: Callable, inner_objective: InnerObjective, solution: Mapping[str, Tensor],
                      meta_params: Mapping[str, Tensor], solver=None) -> Tuple[ParamDict, SolveResult]:
    """``(dF/dθ, solve result)`` at a stationary point ``v*`` of ``G``: the whole meta-gradient

        dF/dθ = ∂_θ F(v*, θ) − Bᵀ H⁻¹ ∂_v F(v*, θ),

    ``F = outer_objective(v, θ)``, ``G = inner_objective(v, θ)``. With ``solver=Dense()`` and a
    solution polished to stationarity (``ibaml.core.inner_loop.newton_polish``) this is the
    reference the estimators are checked against.

    >>> A, b, lam = torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64), 1.0
    >>> G = lambda v, m: 0.5 * ((A @ v["x"] - m["b"]) ** 2).sum() + 0.5 * lam * (v["x"] ** 2).sum()
    >>> F = lambda v, m: v["x"].sum()
    >>> grads, _ = implicit_gradient(F, G, {"x": b / 2}, {"b": b})   # v* = b / (1 + λ)
    >>> grads["b"]
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    (grad_v, grad_meta) = torch.func.grad(outer_objective, argnums=(0, 1))(dict(solution), dict(meta_params))
    cross, result = implicit_vjp(inner_objective, solution, meta_params, grad_v, solver=solver)
    return {k: grad_meta[k] + cross[k] for k in grad_meta}, result


class _ImplicitSolution(torch.autograd.Function):
    """Identity on ``v*`` in the forward pass; the implicit vector-Jacobian product backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(config, n_solution, *tensors):
        return tuple(t.detach().clone() for t in tensors[:n_solution])

    @staticmethod
    def setup_context(ctx, inputs, output):
        config, n_solution, *tensors = inputs
        ctx.config = config
        ctx.n_solution = n_solution
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inner_objective, solution_names, meta_names, solver, hvp_mode = ctx.config
        tensors = ctx.saved_tensors
        n = ctx.n_solution
        solution = {k: t.detach() for k, t in zip(solution_names, tensors[:n])}
        meta = {k: t.detach() for k, t in zip(meta_names, tensors[n:])}
        cotangent = {k: (torch.zeros_like(solution[k]) if g is None else g)
                     for k, g in zip(solution_names, grad_outputs)}
        meta_cotangent, _ = implicit_vjp(inner_objective, solution, meta, cotangent, solver, hvp_mode=hvp_mode)
        return (None, None) + (None,) * n + tuple(meta_cotangent[k] for k in meta_names)


def implicit_diff(inner_objective: InnerObjective, solution: Mapping[str, Tensor],
                  meta_params: Mapping[str, Tensor], solver=None, hvp_mode: str = "rev") -> ParamDict:
    """Attach a stationary point ``v*`` of ``G(·, θ)`` to autograd through the implicit function theorem.

    Returns tensors equal to ``solution``; any loss ``F`` built on them (and on θ directly)
    backpropagates into ``meta_params`` as ``dF/dθ = ∂_θ F − Bᵀ H⁻¹ ∂_v F``. Composes with
    ``torch.func.vmap`` over tasks.

    Args:
        inner_objective: ``G(v, θ)``, two dicts of tensors → 0-d tensor, twice differentiable in ``v``.
        solution: ``v*`` (values only; it is detached).
        meta_params: ``θ``, a dict of tensors (the ones to differentiate should require grad).
        solver: a solver from :mod:`ibaml.core.linalg`, e.g. ``CG(max_iter=20, tol=1e-10)``
            (the default) or ``Dense()``.
        hvp_mode: ``"rev"`` or ``"fwd"``.
    """
    if not isinstance(solution, Mapping) or not isinstance(meta_params, Mapping):
        raise TypeError("implicit_diff takes dicts of tensors for solution and meta_params")
    if not solution:
        raise ValueError("implicit_diff: solution is empty")
    solution_names = tuple(solution)
    meta_names = tuple(meta_params)
    config = (inner_objective, solution_names, meta_names, solver, hvp_mode)
    tensors = [solution[k] for k in solution_names] + [meta_params[k] for k in meta_names]
    out = _ImplicitSolution.apply(config, len(solution_names), *tensors)
    return dict(zip(solution_names, out))
