"""Functional optimisers for the inner loop, on parameter dicts.

Every inner optimiser has one shape (:class:`InnerOptimizer`): ``init(params) -> state`` and
``step(objective, params, state, curvature=None) -> (new_params, new_state)``, one step on the
inner objective ``G(v)``. A gradient method (:class:`GradientOptimizer`: :class:`SGD`,
:class:`Adam`, :class:`PriorPreconditioned`) defines its rule ``update(params, grads, state)``
and takes ``grads = ∇G(v)`` in ``step``; a second-order one (:class:`NewtonCG`) evaluates what
it needs of ``G`` itself; :class:`Backtracking` shortens any of their steps that would raise ``G``. ``curvature`` is the problem's diagonal prior curvature at ``v``,
given to an optimiser that declares ``needs_curvature``. All are pure tensor functions, so they
can be

* run without a graph (the implicit and first-order estimators detach every step),
* differentiated through (explicit unrolled estimators: MAML, ABML),
* vmapped over the tasks of a meta-batch.

A user's own optimiser subclasses :class:`GradientOptimizer` (defining ``init`` and
``update``) or :class:`InnerOptimizer` (defining ``init`` and ``step``); an object with only
``init`` and ``update`` is taken as a gradient method (:func:`as_inner_optimizer`).

Example
-------
>>> opt = Adam(lr=0.1)
>>> params = {"w": torch.ones(3)}
>>> state = opt.init(params)
>>> params, state = opt.step(lambda v: (v["w"] ** 2).sum(), params, state)   # G = |w|²
>>> params, state = opt.update(params, {"w": 2 * params["w"]}, state)       # the rule, given ∇G
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ibaml.core.linalg import CG
from ibaml.core.tree import FlatSpec, ParamDict


class InnerOptimizer:
    """The shape of an inner optimiser: ``init(params) -> state`` and one step on the inner
    objective, ``step(objective, params, state, curvature=None) -> (params, state)``.
    ``needs_curvature``: whether the inner loop passes the prior curvature at ``params``."""

    needs_curvature = False

    def init(self, params: ParamDict) -> Dict[str, Any]:
        return {}

    def step(self, objective, params: ParamDict, state: Dict[str, Any],
             curvature: Optional[ParamDict] = None) -> Tuple[ParamDict, Dict[str, Any]]:
        raise NotImplementedError


class GradientOptimizer(InnerOptimizer):
    """An inner optimiser defined by its rule on the gradient, ``update(params, grads, state)``
    (with ``curvature=`` where it ``needs_curvature``); ``step`` evaluates ``∇G`` and applies it."""

    def step(self, objective, params: ParamDict, state: Dict[str, Any],
             curvature: Optional[ParamDict] = None) -> Tuple[ParamDict, Dict[str, Any]]:
        grads = torch.func.grad(objective)(params)
        if self.needs_curvature:
            return self.update(params, grads, state, curvature=curvature)
        return self.update(params, grads, state)

    def update(self, params: ParamDict, grads: ParamDict, state: Dict[str, Any]) -> Tuple[ParamDict, Dict[str, Any]]:
        raise NotImplementedError


@dataclass(frozen=True)
class _UpdateRule(GradientOptimizer):
    """An object with ``init`` and ``update`` only, as a :class:`GradientOptimizer`."""

    rule: Any

    @property
    def needs_curvature(self):
        return bool(getattr(self.rule, "needs_curvature", False))

    def init(self, params: ParamDict) -> Dict[str, Any]:
        return self.rule.init(params)

    def update(self, params, grads, state, **curvature):
        return self.rule.update(params, grads, state, **curvature)


def as_inner_optimizer(optimizer) -> InnerOptimizer:
    """``optimizer`` in the one shape of :class:`InnerOptimizer`: itself where it has it (or
    duck-types ``init`` and ``step``), an object with ``init`` and ``update`` wrapped as a
    gradient method; anything else is refused with a message naming what it lacks.

    >>> as_inner_optimizer(SGD(lr=0.1)) == SGD(lr=0.1)
    True
    >>> class Halve:                                    # a rule with init/update only
    ...     def init(self, params): return {}
    ...     def update(self, params, grads, state): return {k: v / 2 for k, v in params.items()}, state
    >>> as_inner_optimizer(Halve()).step(lambda v: v["w"].sum(), {"w": torch.ones(2)}, {})[0]["w"]
    tensor([0.5000, 0.5000])
    """
    if isinstance(optimizer, InnerOptimizer) or (hasattr(optimizer, "init") and hasattr(optimizer, "step")):
        return optimizer
    if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        return _UpdateRule(optimizer)
    raise TypeError(f"inner_optimizer must be an ibaml.core.optim optimiser (SGD(lr=...), Adam(lr=...), NewtonCG()) or "
                    f"have init(params) and step(objective, params, state) or update(params, grads, state), "
                    f"got {optimizer!r}")


def _per_block(option, name: str, default=None):
    """An optimiser option given for every block, or as a dict ``{block: value}``."""
    return option.get(name, default) if isinstance(option, dict) else option


def _bounded(step: torch.Tensor, bound) -> torch.Tensor:
    """``step`` clamped entrywise to ``[−bound, bound]`` (unchanged for ``bound=None``)."""
    return step if bound is None else step.clamp(-bound, bound)


def _check_lr(name: str, lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"{name} learning rate must be positive, got {lr!r}")


@dataclass(frozen=True)
class SGD(GradientOptimizer):
    """Gradient descent with optional heavy-ball momentum:

        b ← μ b + g,    v ← v − lr · b      (μ = 0: plain ``v ← v − lr · g``)
    """

    lr: float = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        _check_lr("SGD", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1), got {self.momentum!r}")

    def init(self, params: ParamDict) -> Dict[str, Any]:
        if self.momentum == 0.0:
            return {}
        return {"buf": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(self, params: ParamDict, grads: ParamDict, state: Dict[str, Any]) -> Tuple[ParamDict, Dict[str, Any]]:
        if self.momentum == 0.0:
            return {k: params[k] - self.lr * grads[k] for k in params}, state
        buf = {k: self.momentum * state["buf"][k] + grads[k] for k in params}
        return {k: params[k] - self.lr * buf[k] for k in params}, {"buf": buf}


@dataclass(frozen=True)
class Adam(GradientOptimizer):
    """Adam (Kingma & Ba), with bias correction:

        m ← β₁ m + (1 − β₁) g,   s ← β₂ s + (1 − β₂) g²
        v ← v − lr · (m / (1 − β₁ᵗ)) / sqrt(s / (1 − β₂ᵗ) + ε²)

    (ε inside the square root keeps the update differentiable where a gradient entry is
    exactly zero, as unrolled differentiation through the inner loop requires.)
    """

    lr: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        _check_lr("Adam", self.lr)
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam betas must lie in [0, 1), got {self.betas!r}")

    def init(self, params: ParamDict) -> Dict[str, Any]:
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return {"step": 0, "m": zeros, "s": dict(zeros)}

    def update(self, params: ParamDict, grads: ParamDict, state: Dict[str, Any]) -> Tuple[ParamDict, Dict[str, Any]]:
        b1, b2 = self.betas
        t = state["step"] + 1
        m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in params}
        s = {k: b2 * state["s"][k] + (1 - b2) * grads[k] * grads[k] for k in params}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new = {k: params[k] - self.lr * (m[k] / c1) / torch.sqrt(s[k] / c2 + self.eps ** 2) for k in params}
        return new, {"step": t, "m": m, "s": s}


@dataclass(frozen=True)
class PriorPreconditioned(GradientOptimizer):
    """Gradient descent preconditioned by the prior's curvature (a semi-implicit, proximal step).

    With ``P`` the inner problem's diagonal prior curvature (``TaskProblem.preconditioner``:
    ``λ`` or ``1/σ²`` for MAP, ``β/σ²`` for a variational mean, ``β s'(ρ)²/(2s²)`` for its
    variance parameter), each block ``b`` of the parameters takes the step

        v_b ← v_b − g_b / (1/lr_b + P_b / prior_step)

    For a Gaussian prior and ``prior_step = 1`` this is exactly the proximal gradient step
    ``argmin_v ⟨∇NLL(v_k), v⟩ + ||v − v_k||²/(2 lr) + ½ Σ P (v − μ)²``: it is stable for
    any prior strength (a stiff prior is solved in one step instead of limiting the step
    size, as it does for plain SGD), and ``lr`` only has to respect the data curvature
    (``lr < 2/L_data``). ``lr_b = inf`` gives a pure Newton step on the prior term,
    ``−prior_step · g_b / P_b``: for a variational variance parameter, whose curvature at
    the solution of ``G`` is close to ``P`` (``s* = σ²λ/(λ + h)`` gives
    ``∂²G/∂ρ² ≈ β/2 = P``), this converges in a few steps where a gradient step on ``ρ``
    moves only by about ``lr`` per step. Where the problem reports no curvature (a flat
    prior) the step is plain SGD.

    Args:
        lr: a step size for every block, or a dict ``{block: lr}`` (missing blocks get
            ``default_lr``); ``float("inf")`` for a Newton step on the prior term.
        prior_step: the fraction ``c ∈ (0, 1]`` of a Newton step on the prior term.
        default_lr: the step size of the blocks that a dict ``lr`` does not name.
        max_step: optional bound on each entry's step ``|Δv| ≤ max_step`` (a number, or a
            dict ``{block: bound}``), a trust region for steps that far from the solution
            are not curvature-limited (a Newton step on a variance parameter whose gradient
            is still dominated by the unconverged mean).

    Example
    -------
    >>> opt = PriorPreconditioned(lr={"mean": 0.002, "rho": float("inf")}, prior_step=0.5)
    >>> params, grads = {"mean": torch.ones(2), "rho": torch.zeros(2)}, {"mean": torch.ones(2), "rho": torch.ones(2)}
    >>> new, _ = opt.update(params, grads, opt.init(params), curvature={"mean": torch.full((2,), 100.0),
    ...                                                                 "rho": torch.full((2,), 0.5)})
    >>> new["rho"]
    tensor([-1., -1.])
    """

    lr: Any = 0.01
    prior_step: float = 1.0
    default_lr: float = 0.01
    max_step: Any = None
    needs_curvature = True

    def __post_init__(self):
        lrs = self.lr.values() if isinstance(self.lr, dict) else [self.lr]
        for lr in list(lrs) + [self.default_lr]:
            _check_lr("PriorPreconditioned", lr)
        bounds = self.max_step.values() if isinstance(self.max_step, dict) else [self.max_step]
        for b in bounds:
            if b is not None and not b > 0:
                raise ValueError(f"PriorPreconditioned max_step must be positive, got {self.max_step!r}")
        if not 0.0 < self.prior_step <= 1.0:
            raise ValueError(f"PriorPreconditioned prior_step must lie in (0, 1], got {self.prior_step!r}")

    def init(self, params: ParamDict) -> Dict[str, Any]:
        return {}

    def update(self, params: ParamDict, grads: ParamDict, state: Dict[str, Any],
               curvature: Optional[ParamDict] = None) -> Tuple[ParamDict, Dict[str, Any]]:
        new = {}
        for k in params:
            inv_lr = 1.0 / _per_block(self.lr, k, self.default_lr)
            if curvature is None or curvature.get(k) is None:
                if inv_lr == 0.0:
                    raise ValueError(f"PriorPreconditioned: block {k!r} has lr=inf but the problem reports no "
                                     f"prior curvature for it")
                step = grads[k] / inv_lr
            else:
                step = grads[k] / (inv_lr + curvature[k] / self.prior_step)
            new[k] = params[k] - _bounded(step, _per_block(self.max_step, k))
        return new, state


@dataclass(frozen=True)
class NewtonCG(InnerOptimizer):
    """Truncated Newton steps: ``v ← v + t · Δ`` with ``(∇²G(v) + δI + γP) Δ = −∇G(v)`` solved
    approximately by ``cg_iters`` iterations of preconditioned conjugate gradient on
    Hessian-vector products (one linearisation of ``∇G`` per step, reused by every
    product), the problem's prior curvature as the preconditioner.

    Its convergence does not depend on the scale of the curvature (a learned observation
    noise or growing features change the data Hessian by orders of magnitude over
    meta-training, which breaks any fixed gradient step), and for a quadratic inner problem
    whose data Hessian has rank ``r`` (a linear-Gaussian head on ``r`` support points) one
    step with ``cg_iters > r`` solves it exactly. Conjugate gradient stops at a direction of
    non-positive curvature and keeps its iterate, so an indefinite Hessian gives a shorter,
    finite step (add ``damping`` where that happens often). Pure tensor code with a fixed
    number of products: vmappable, no host synchronisation.

    Args:
        cg_iters: conjugate-gradient iterations per Newton step.
        damping: ``δ >= 0``.
        prior_damping: ``γ >= 0``: adds ``γ`` times the prior curvature ``P`` (a
            Levenberg–Marquardt term in the prior's own metric). It bounds the step where
            the Hessian is nearly singular or indefinite (the variance block of a
            fixed-draw variational objective is not convex), at the price of linear instead
            of quadratic convergence in prior-dominated directions (rate ``γ/(1+γ)``).
        step_size: ``t ∈ (0, 1]``.
        max_step: optional bound ``|Δv| ≤ max_step`` on each entry (a number or ``{block: bound}``).
        line_search: ``m >= 0`` backtracking candidates: with ``m > 0`` the step is
            ``v + t_j Δ`` for the ``t_j ∈ {t, t/2, …, t/2^(m−1), 0}`` with the lowest ``G``
            (non-finite values count as ``+∞``; ``t_j = 0`` keeps ``v``, so ``G`` never
            increases), and the same step sizes along ``−P⁻¹∇G`` (``−∇G`` without a
            preconditioner) are candidates too: where the Hessian is indefinite, conjugate
            gradient may return no direction at all (negative curvature in its first iteration)
            or one along which no step size decreases ``G``, and the iterate would stay where it
            is. This is the Hessian-free inner solver of iMAML ("iMAML-HF", Rajeswaran
            et al. 2019): on a non-convex inner problem (a prior over every weight) a full
            Newton-CG step can overshoot, and the search makes each step a descent step.
            ``2m + 1`` evaluations of ``G`` per step, all of them computed (no host
            synchronisation, vmappable).
        adaptive_damping: ``ω >= 1`` (``0``: off): a Levenberg–Marquardt (trust-region) rule for
            the prior damping, carried per solve in the optimiser's state: ``μ₀ = prior_damping``
            (``> 0``) and, after each step, with the reduction ratio of the full step ``Δ``
            of the damped system,

                ρ = [G(v) − G(v + Δ)] / [−(∇Gᵀ Δ + ½ Δᵀ ∇²G Δ)],

            ``μ ← ω μ`` where ``ρ < 1/4`` (or ``G`` is not finite: the quadratic model was not
            trusted enough) and ``μ ← μ / ω`` where ``ρ > 3/4``, within ``[10⁻⁶, 10⁸]``
            (Moré 1978; Martens 2010 for Hessian-free training). With ``μ`` large the step is
            ``−∇G / (μ P)``, a gradient step scaled to the curvature the rule has found, so
            the solver neither stalls where the data curvature dwarfs the prior's (a
            fixed line search's smallest step is still too long) nor crawls where it is flat.
            One more Hessian-vector product per step; ``G(v)`` and ``G(v + Δ)`` are the line
            search's values (without a search, the step is taken only where it lowers ``G``,
            so they are computed for that choice); vmappable.

    Example
    -------
    >>> opt = NewtonCG(cg_iters=3)
    >>> objective = lambda v: ((v["x"] - 2.0) ** 2).sum()
    >>> v, _ = opt.step(objective, {"x": torch.zeros(3)}, opt.init({"x": torch.zeros(3)}))
    >>> v["x"]
    tensor([2., 2., 2.])
    """

    cg_iters: int = 10
    damping: float = 0.0
    prior_damping: float = 0.0
    step_size: float = 1.0
    max_step: Any = None
    line_search: int = 0
    adaptive_damping: float = 0.0
    needs_curvature = True

    def __post_init__(self):
        if int(self.cg_iters) != self.cg_iters or self.cg_iters < 1:
            raise ValueError(f"NewtonCG cg_iters must be a positive integer, got {self.cg_iters!r}")
        if not self.damping >= 0:
            raise ValueError(f"NewtonCG damping must be non-negative, got {self.damping!r}")
        if not self.prior_damping >= 0:
            raise ValueError(f"NewtonCG prior_damping must be non-negative, got {self.prior_damping!r}")
        if not 0.0 < self.step_size <= 1.0:
            raise ValueError(f"NewtonCG step_size must lie in (0, 1], got {self.step_size!r}")
        if int(self.line_search) != self.line_search or self.line_search < 0:
            raise ValueError(f"NewtonCG line_search must be a non-negative integer, got {self.line_search!r}")
        if not (self.adaptive_damping == 0.0 or self.adaptive_damping >= 1.0):
            raise ValueError(f"NewtonCG adaptive_damping must be 0 (off) or >= 1, got {self.adaptive_damping!r}")
        if self.adaptive_damping and not self.prior_damping > 0:
            raise ValueError("NewtonCG adaptive_damping needs a positive prior_damping (its starting value)")

    def init(self, params: ParamDict) -> Dict[str, Any]:
        if not self.adaptive_damping:
            return {}
        first = next(iter(params.values()))
        return {"prior_damping": torch.full((), float(self.prior_damping), dtype=first.dtype, device=first.device)}

    def step(self, objective, params: ParamDict, state: Dict[str, Any],
             curvature: Optional[ParamDict] = None) -> Tuple[ParamDict, Dict[str, Any]]:
        spec = FlatSpec.from_dict(params)
        x = spec.flatten(params)
        flat_grad = torch.func.grad(lambda z: objective(spec.unflatten(z)))
        g, hvp = torch.func.vjp(flat_grad, x)
        precond = None if curvature is None else spec.flatten({k: curvature[k] if curvature.get(k) is not None
                                                                else torch.zeros_like(params[k]) for k in params})
        mu = state["prior_damping"] if self.adaptive_damping else self.prior_damping
        if precond is None and not self.adaptive_damping:
            matvec = lambda u: hvp(u)[0]
        else:
            metric = torch.ones_like(x) if precond is None else precond       # the damping's metric P (or I)
            matvec = lambda u: hvp(u)[0] + mu * metric * u
            precond = (1.0 + mu) * metric
            if self.damping == 0.0:
                precond = precond + torch.finfo(x.dtype).eps
        solve = CG(max_iter=self.cg_iters, tol=0.0, damping=self.damping)(matvec, -g, precond_diag=precond)
        bounded = lambda d: {k: _bounded(d[k], _per_block(self.max_step, k)) for k in params}
        delta = bounded(spec.unflatten(self.step_size * solve.x))
        if not (self.line_search or self.adaptive_damping):
            return {k: params[k] + delta[k] for k in params}, state
        deltas = [delta]   # with adapted damping and no search, a trust-region step: taken only where it lowers G
        if self.line_search:
            deltas.append(bounded(spec.unflatten(-g if precond is None else -g / precond)))
        chosen, values = _backtrack(objective, params, deltas, self.line_search or 1)
        if self.adaptive_damping:   # values[0] = G(v + Δ), values[-1] = G(v)
            state = {"prior_damping": self._adapted(g, hvp, spec.flatten(delta), values[-1] - values[0], mu)}
        return chosen, state

    def _adapted(self, g, hvp, d, actual, mu):
        """The next ``μ`` of the Levenberg–Marquardt rule (``adaptive_damping``) from the reduction
        ratio ``ρ`` of the step ``d`` (flat), whose actual decrease of ``G`` is ``actual``."""
        predicted = -(g @ d + 0.5 * (d @ hvp(d)[0]))
        rho = actual / predicted
        trusted = torch.isfinite(rho) & (predicted > 0)
        omega = self.adaptive_damping
        mu = torch.where(trusted & (rho > 0.75), mu / omega, torch.where(trusted & (rho >= 0.25), mu, mu * omega))
        return mu.clamp(1e-6, 1e8)


@dataclass(frozen=True)
class Backtracking(InnerOptimizer):
    """Any inner optimiser's step, shortened where it would raise the inner objective: with
    ``Δ`` the step of ``base`` from ``v``,

        v ← v + t Δ,    t = the largest of 1, ½, …, 2^−halvings with G(v + t Δ) ≤ G(v)

    (``t = 0``, the iterate kept, where none is; a non-finite ``G`` is never accepted). Where
    ``base``'s steps lower ``G`` (the support size a fixed gradient step was tuned at) every
    step is taken whole, bit for bit; where they would not (a step on the summed support loss
    at many more points, whose curvature grows with their number, or on a task far from the
    meta-training ones) the step shrinks to one that is safe, instead of diverging. Every
    candidate is evaluated and chosen with ``torch.where`` (``halvings + 2`` evaluations of
    ``G`` per step beyond ``base``'s): a fixed amount of tensor work, vmappable over tasks and
    differentiable through the chosen step (explicit meta-gradients). ``base``'s state
    (momentum, Adam's moments) advances as if its step had been taken.

    Args:
        base: the inner optimiser whose steps are safeguarded (any :class:`InnerOptimizer`,
            or an object :func:`as_inner_optimizer` accepts).
        halvings: how many times a step may be halved (``≥ 1``).

    Example
    -------
    >>> G = lambda v: 100.0 * (v["x"] ** 2).sum()      # curvature 200: SGD(0.015) diverges (from 1 to −2)
    >>> opt = Backtracking(SGD(lr=0.015), halvings=4)
    >>> v, state = opt.step(G, {"x": torch.ones(1)}, opt.init({"x": torch.ones(1)}))
    >>> v["x"]                                          # the step −3 halved once
    tensor([-0.5000])
    """

    base: Any
    halvings: int = 10

    def __post_init__(self):
        object.__setattr__(self, "base", as_inner_optimizer(self.base))
        if int(self.halvings) != self.halvings or self.halvings < 1:
            raise ValueError(f"Backtracking halvings must be a positive integer, got {self.halvings!r}")

    @property
    def needs_curvature(self):
        return bool(self.base.needs_curvature)

    def init(self, params: ParamDict) -> Dict[str, Any]:
        return self.base.init(params)

    def step(self, objective, params: ParamDict, state: Dict[str, Any],
             curvature: Optional[ParamDict] = None) -> Tuple[ParamDict, Dict[str, Any]]:
        if self.base.needs_curvature:
            new, state = self.base.step(objective, params, state, curvature=curvature)
        else:
            new, state = self.base.step(objective, params, state)
        start = objective(params)
        chosen = dict(params)
        # from the shortest step to the whole one, so that the longest accepted is kept
        for j in range(int(self.halvings), -1, -1):
            t = 0.5 ** j
            point = new if j == 0 else {k: params[k] + t * (new[k] - params[k]) for k in params}
            value = objective(point)
            accept = torch.isfinite(value) & (value <= start)
            chosen = {k: torch.where(accept, point[k], chosen[k]) for k in params}
        return chosen, state


def backtrack(objective, params: ParamDict, deltas, candidates: int) -> ParamDict:
    """``v + t* Δ*`` with ``(t*, Δ*) = argmin G(v + t Δ)`` over the directions ``deltas`` (one
    or a list) and ``t ∈ {1, 1/2, …, 2^−(candidates−1)}``, or ``v`` itself where none is lower;
    a non-finite ``G`` counts as ``+∞``, so ``G(v + t* Δ*) <= G(v)``. Every candidate is evaluated
    and the choice is made with ``torch.where``: a fixed amount of tensor work, vmappable over tasks.

    >>> G = lambda v: ((v["x"] - 1.0) ** 2).sum()
    >>> backtrack(G, {"x": torch.zeros(1)}, {"x": torch.full((1,), 4.0)}, 3)["x"]
    tensor([1.])
    """
    return _backtrack(objective, params, deltas, candidates)[0]


def _backtrack(objective, params: ParamDict, deltas, candidates: int) -> Tuple[ParamDict, torch.Tensor]:
    """:func:`backtrack`'s choice and the values of ``G`` it compared: for each direction in
    turn the steps ``1, 1/2, …``, then ``v`` itself (``values[0] = G(v + Δ₀)``, ``values[-1] = G(v)``)."""
    deltas = [deltas] if isinstance(deltas, dict) else list(deltas)
    steps = [0.5 ** j for j in range(int(candidates))]
    points = [{k: params[k] + t * d[k] for k in params} for d in deltas for t in steps] + [params]
    values = torch.stack([objective(p) for p in points])
    best = torch.nan_to_num(values, nan=float("inf")).argmin()
    chosen = dict(params)
    for j in range(len(points) - 2, -1, -1):
        chosen = {k: torch.where(best == j, points[j][k], chosen[k]) for k in params}
    return chosen, values
