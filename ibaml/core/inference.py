"""Task inference: the inner objectives of MAP and mean-field variational inference.

For a task with support set S and query set Q, and meta-parameters θ:

* **MAP** (``v = {"w"}``)::

      G(v, θ) = −Σ_{n∈S} log p(y_n | f(x_n; w)) − log p(w; θ)
      F(v, θ) = −(1/|Q|) Σ_{n∈Q} log p(y_n | f(x_n; w))

  With ``p = N(μ, λ⁻¹I)`` this is iMAML's proximal inner problem.

* **Variational** (``v = {"mean", "rho"}``, ``q(w) = N(m, diag s)``, ``s = softplus(ρ)``; or
  ``v = {"mean", "std"}``, ``s = u²``, with ``Variational(variance="std")``)::

      G(v, θ) = (1/M) Σ_j −Σ_{n∈S} log p(y_n | f(x_n; m + √s ⊙ ε_j)) + β KL(q ‖ p(·; θ))
      F(v, θ) = −(1/|Q|) Σ_{n∈Q} log (1/M') Σ_j p(y_n | f(x_n; m + √s ⊙ ε'_j))

  (iBaML / ABML), or with ``outer="elbo"`` ABML's outer objective (its eq. 5), the negative
  ELBO of support and query together under the task posterior, per point::

      F(v, θ) = (1/(|S|+|Q|)) [(1/M') Σ_j Σ_{n∈S∪Q} −log p(y_n | f(x_n; m + √s ⊙ ε'_j)) + β KL(q ‖ p(·; θ))]

  whose KL term gives the prior scales a direct empirical-Bayes gradient; or with ``outer="expected"``
  the query NLL expected under the posterior, ``−(1/|Q|) Σ_{n∈Q} (1/M') Σ_j log p(y_n | f(x_n; m + √s ⊙ ε'_j))``,
  which charges the posterior's spread at a query to the loss where the predictive density lets
  it excuse the error (Gaussian outputs ``N(μ_f, v_f)``, noise ``R``: ``½ log 2πR + ((y − μ_f)² + v_f)/(2R)``
  against ``½ log 2π(R + v_f) + (y − μ_f)²/(2(R + v_f))``). The draws ``ε [M, D]`` and ``ε' [M', D]``
  are part of the task data, fixed while a solution is differentiated.

Everything is a pure function of ``(v, θ, task)``, vmapped over tasks by the callers; the
inner loop that minimises ``G`` is :mod:`ibaml.core.inner_loop`. Why this file is long: it is
the contract of task inference with its three methods (MAP, mean-field, full covariance), which
share the task-noise and the draws' helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor

from ibaml.core.task_model import TaskModel
from ibaml.core.tree import ParamDict

Task = Dict[str, Tensor]


def _inverse_softplus(x: Tensor) -> Tensor:
    """``ρ`` with ``softplus(ρ) = x``: ``ρ = x + log(−expm1(−x))``."""
    return x + torch.log(-torch.expm1(-x))


def task_noise_ratio(model: TaskModel, meta, w: Tensor, task: Task) -> Optional[Tensor]:
    """The task's noise-variance ratio ``r = σ_t²/σ²`` of a likelihood with a conjugate task noise
    (:class:`ibaml.ConjugateNoiseGaussianLikelihood`; ``None`` for any other), from the support
    set at the posterior mean (or mode) ``w``:

        r = (a₀ + ½ [Σ_n (y_n − f(x_n; w))²/σ² + 2 (log p(μ; θ) − log p(w; θ))]) / (a₀ + N/2)

    with ``μ`` the prior's location (the prior term is ``(w − μ)ᵀ Σ⁻¹ (w − μ)`` for a Gaussian).
    A function of the solution and θ: the implicit gradient differentiates it like the rest of
    the outer objective."""
    if not model.likelihood.infers_task_noise:
        return None
    sx, sy = task["support_x"], task["support_y"]
    data = model.likelihood_squared_deviation(meta, model.net_output(meta, w, sx), sy).sum()
    location = model.prior_location(meta)
    prior = 2 * (model.prior_log_prob(meta, location) - model.prior_log_prob(meta, w))
    return model.likelihood_noise_ratio(meta, data, prior, sy.numel())


def _ratio_kwargs(ratio: Optional[Tensor]) -> Dict[str, Tensor]:
    return {} if ratio is None else {"noise_ratio": ratio}


def _ratio_args(ratio: Optional[Tensor]) -> tuple:
    return () if ratio is None else (ratio,)


class InferenceMethod:
    """The contract of a task-inference method, every function pure in ``(v, θ, task)``.

    Required: ``init(model, θ) → v₀``, ``inner_objective(model, v, θ, task) = G``,
    ``outer_objective(model, v, θ, task) = F``, ``point(v) → w [D]`` (the weights' point
    estimate) and ``weight_samples(v, ε [S, D]) → w [S, D]``. Declared with defaults:

    * ``task_init(model, θ, task) = init(model, θ)``: the inner loop's start for a task;
    * ``curvature(v, precision) = None``: the prior's diagonal curvature in ``v``'s blocks given
      ``precision_diag`` (``None``: none known), which a prior-preconditioned inner optimiser uses;
    * ``preconditioner(model, v, θ) = curvature(v, precision_diag(θ))``;
    * ``draws(T, S, D, generator)``: standard-normal ``ε [T, S, D]``;
    * ``task_noise(T, D, generator) = {}``: the fixed draws of one meta-step, by name;
    * ``posterior_extras(model, v, θ, task) = {}``: what a posterior holds beside the solved
      blocks, computed once after the inner solve (a covariance factor);
    * ``exact_outputs = False`` and ``head_outputs(model, v, θ, x)``: where ``True``, the
      posterior's network outputs at ``x`` are Gaussian, ``N(mean, var)`` ``[N, C]`` each, and
      the predictive needs no draws.
    """

    name = "inference"
    needs_noise = False
    exact_outputs = False

    def init(self, model: TaskModel, meta) -> ParamDict:
        raise NotImplementedError

    def inner_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        raise NotImplementedError

    def outer_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        raise NotImplementedError

    def point(self, v) -> Tensor:
        raise NotImplementedError

    def weight_samples(self, v, eps: Tensor) -> Tensor:
        raise NotImplementedError

    def task_init(self, model: TaskModel, meta, task: Task) -> ParamDict:
        """The inner loop's start for ``task``: :meth:`init`."""
        return self.init(model, meta)

    def curvature(self, v, precision: Optional[Tensor]) -> Optional[ParamDict]:
        """The prior's diagonal curvature in ``v``'s blocks: none known."""
        return None

    def preconditioner(self, model: TaskModel, v, meta) -> Optional[ParamDict]:
        """:meth:`curvature` at the prior's ``precision_diag(θ)``."""
        return self.curvature(v, model.prior_precision_diag(meta))

    def draws(self, num_tasks: int, num: int, dim: int, generator: torch.Generator, dtype=None) -> Tensor:
        """Standard-normal draws ``ε [num_tasks, num, dim]`` on the generator's device."""
        return torch.randn(num_tasks, num, dim, generator=generator, device=generator.device, dtype=dtype)

    def task_noise(self, num_tasks: int, dim: int, generator: torch.Generator, dtype=None) -> Dict[str, Tensor]:
        """The fixed draws of one meta-step: none."""
        return {}

    def posterior_extras(self, model: TaskModel, v, meta, task: Task) -> Dict[str, Tensor]:
        """What a posterior holds beside ``v``: nothing."""
        return {}

    def head_outputs(self, model: TaskModel, v, meta, x: Tensor):
        """``(mean, var)`` of the Gaussian outputs at ``x`` where :attr:`exact_outputs`."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form outputs")


class MAP(InferenceMethod):
    """Maximum a posteriori task inference; see the module docstring.

    Args:
        per_point: the inner objective divided by the number of support points,
            ``G/N = (1/N) Σ_n −log p(y_n | x_n, w) − (1/N) log p(w)``. The minimiser, and so the
            implicit meta-gradient ``−Bᵀ H⁻¹ ∂_v F`` (``B`` and ``H`` scale alike), are those of
            ``G``; a gradient step on ``G/N`` is a step on the mean loss, whose size does not grow
            with the support size (a step ``η`` on ``G`` at ``N₀`` points is the step ``η N₀`` on
            ``G/N``). With the summed objective a step tuned at 10 shots is three times too long
            at 30 and can diverge.

    >>> MAP(per_point=True).per_point
    True
    """

    name = "map"
    needs_noise = False

    def __init__(self, per_point: bool = False):
        self.per_point = bool(per_point)

    def init(self, model: TaskModel, meta) -> ParamDict:
        """Start at the prior's location ``w₀ = location(θ)``."""
        return {"w": model.prior_location(meta)}

    def inner_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        w = v["w"]
        nll = -model.log_likelihood(meta, w, task["support_x"], task["support_y"]).sum()
        objective = nll - model.prior_log_prob(meta, w)
        return objective / task["support_x"].shape[0] if self.per_point else objective

    def outer_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        ratio = task_noise_ratio(model, meta, v["w"], task)
        return -model.log_likelihood(meta, v["w"], task["query_x"], task["query_y"], predictive=True,
                                     **_ratio_kwargs(ratio)).mean()

    def point(self, v) -> Tensor:
        """The task weights' point estimate: the mode ``w``."""
        return v["w"]

    def curvature(self, v, precision: Optional[Tensor]) -> Optional[ParamDict]:
        """The prior's diagonal curvature in ``v``'s blocks, given ``precision_diag``."""
        return None if precision is None else {"w": precision}

    def weight_samples(self, v, eps: Tensor) -> Tensor:
        """The point estimate repeated: ``[S, D]`` for ``eps [S, D]``."""
        return v["w"].expand_as(eps)


@dataclass(frozen=True)
class Variational(InferenceMethod):
    """Mean-field Gaussian task inference; see the module docstring.

    Args:
        beta: KL weight ``β``.
        num_samples: ``M`` reparameterised draws in the inner objective.
        num_outer_samples: ``M'`` draws in the query predictive.
        init_variance: starting variance of ``q`` where the prior reports no precision
            (otherwise ``q`` starts at the prior's marginal variance ``1/precision``).
        min_variance: floor added to ``softplus(ρ)``.
        outer: ``"predictive"`` (the query log predictive density, default), ``"elbo"``
            (ABML's support-and-query negative ELBO) or ``"expected"`` (the query NLL expected
            under the posterior), see the module docstring.
        variance_param: the coordinates of the variances, ``"softplus"`` (``s = softplus(ρ)``, block
            ``"rho"``) or ``"std"`` (``s = u²``, block ``"std"``). In ``u`` the fixed-draw
            objective of weights that enter the output linearly is convex (a positive
            semi-definite quadratic plus the KL's ``β Σ (u²/(2σ²) − log u)``), where in
            ``ρ ≈ log s`` it is not: second-order inner solvers converge reliably in ``u``.
        expectation: how ``E_q[NLL]`` is computed: ``"sampled"`` (the ``M`` fixed draws) or
            ``"linearized"``, the second-order (delta-method) expansion with the Gauss–Newton
            curvature, for a prior over exactly the network's linear head::

                E_q[NLL(w; S)] ≈ NLL(m; S) + ½ Σ_i s_i h_i,    h = diag Σ_n J_nᵀ Λ_n J_n

            exact for a Gaussian likelihood (a linear-Gaussian head), where the query
            predictive is also exact, ``N(y; φᵀm, (φ²)ᵀs + σ²)``; no Monte Carlo noise enters
            the inner problem, whose stationary variances are ``s = 1/(1/σ² + h/β)``.
        variance_start: where the inner loop starts the variances: ``"prior"`` (``s₀`` as
            in :meth:`init`) or ``"fixed_point"``, one fixed-point (natural-gradient) step on
            the precisions from there (:meth:`task_init`)::

                1/s₁ = 1/s₀ + (2/β) ∂G/∂s (m₀, s₀)

            which is the stationary variance ``1/s = 1/σ² + (2/β) ∂E_q[NLL]/∂s`` evaluated at
            the start; exact in one step for the linearised expectation of a linear-Gaussian
            head, where ``∂E_q[NLL]/∂s = ½h`` depends on neither ``m`` nor ``s``. Newton steps
            on ``ρ = log s`` from above move ``log s`` by about −1 each
            (``∂²/∂ρ²`` of ``½ h eᵖ − ½ β ρ`` is ``½ h eᵖ``), so a posterior ``eᴷ`` times
            narrower than the prior is not reached in ``K`` steps; from the fixed point the
            variance block starts solved.
        antithetic: draw the standard-normal ``ε`` in pairs ``(ε, −ε)`` (:meth:`draws`).
            The odd terms of the Monte Carlo error then cancel: for weights that enter the
            output linearly (a head) the fixed-draw objective's mean block is exactly that of
            the expected NLL, where independent draws shift its solution by
            ``√s ⊙ mean_j ε_j``, a random displacement of the order of the posterior standard
            deviation.

    ``β`` weighs the KL against the *summed* support NLL: ``β = 1`` is the ELBO of the
    support set; with a Gaussian prior the pull on the posterior mean is that of iMAML's
    proximal term with ``λ = β/σ²``, so a prior scale ``σ`` well below the weights' scale
    needs ``β ≪ 1`` for the data to move the weights (``σ = 0.01, β = 10⁻³`` is ``λ = 10``).
    """

    beta: float = 1.0
    num_samples: int = 1
    num_outer_samples: int = 5
    init_variance: float = 1e-4
    min_variance: float = 1e-10
    outer: str = "predictive"
    antithetic: bool = False
    variance_param: str = "softplus"
    expectation: str = "sampled"
    variance_start: str = "prior"
    name = "variational"
    needs_noise = True

    @property
    def exact_outputs(self) -> bool:
        """The linearised expectation's outputs over a linear head are Gaussian."""
        return self.expectation == "linearized"

    def head_outputs(self, model: TaskModel, v, meta, x: Tensor):
        """``(φ(x) m, φ(x)² s)`` (:meth:`ibaml.core.task_model.TaskModel.head_outputs`)."""
        return model.head_outputs(meta, self.point(v), self.variance(v), x)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"Variational beta must be positive, got {self.beta!r}")
        if self.variance_param not in ("softplus", "std"):
            raise ValueError(f"Variational variance_param must be 'softplus' or 'std', got {self.variance_param!r}")
        if self.expectation not in ("sampled", "linearized"):
            raise ValueError(f"Variational expectation must be 'sampled' or 'linearized', got {self.expectation!r}")
        if self.variance_start not in ("prior", "fixed_point"):
            raise ValueError(f"Variational variance_start must be 'prior' or 'fixed_point', got {self.variance_start!r}")
        if self.outer not in ("predictive", "elbo", "expected"):
            raise ValueError(f"Variational outer must be 'predictive', 'elbo' or 'expected', got {self.outer!r}")
        for arg in ("num_samples", "num_outer_samples"):
            value = getattr(self, arg)
            if int(value) != value or value < 1:
                raise ValueError(f"Variational {arg} must be a positive integer, got {value!r}")
        if not self.init_variance > 0:
            raise ValueError(f"Variational init_variance must be positive, got {self.init_variance!r}")

    def draws(self, num_tasks: int, num: int, dim: int, generator: torch.Generator, dtype=None) -> Tensor:
        """Standard-normal draws ``ε [num_tasks, num, dim]`` on the generator's device; with
        ``antithetic``, ``ε_{j + ⌈num/2⌉} = −ε_j`` (an odd ``num`` keeps one unpaired draw)."""
        half = (num + 1) // 2 if self.antithetic else num
        eps = torch.randn(num_tasks, half, dim, generator=generator, device=generator.device, dtype=dtype)
        if self.antithetic:
            eps = torch.cat([eps, -eps[:, :num - half]], 1)
        return eps

    def task_noise(self, num_tasks: int, dim: int, generator: torch.Generator, dtype=None) -> Dict[str, Tensor]:
        """The fixed draws of one meta-step, on the generator's device: ``eps_inner [T, M, D]``
        for the inner objective, then ``eps_outer [T, M', D]`` for the query predictive."""
        return {"eps_inner": self.draws(num_tasks, self.num_samples, dim, generator, dtype),
                "eps_outer": self.draws(num_tasks, self.num_outer_samples, dim, generator, dtype)}

    def variance(self, v) -> Tensor:
        """``s = softplus(ρ) + min_variance`` (``s = u² + min_variance`` with ``variance_param="std"``)."""
        if self.variance_param == "std":
            return v["std"] ** 2 + self.min_variance
        return Fn.softplus(v["rho"]) + self.min_variance

    def init(self, model: TaskModel, meta) -> ParamDict:
        """``m₀ = location(θ)``, ``s₀ = 1/precision_diag(θ)`` (or ``init_variance``)."""
        mean = model.prior_location(meta)
        precision = model.prior_precision_diag(meta)
        var0 = torch.full_like(mean, self.init_variance) if precision is None else 1.0 / precision
        if self.variance_param == "std":
            return {"mean": mean, "std": torch.sqrt(torch.clamp(var0 - self.min_variance, min=1e-30))}
        return {"mean": mean, "rho": _inverse_softplus(torch.clamp(var0 - self.min_variance, min=1e-30))}

    def task_init(self, model: TaskModel, meta, task: Task) -> ParamDict:
        """The inner loop's start for ``task``: :meth:`init`, then with
        ``variance_start="fixed_point"`` the variances ``1/s₁ = 1/s₀ + (2/β) ∂G/∂s`` (at most
        doubled where ``∂G/∂s < 0``, possible with sampled draws)."""
        v0 = self.init(model, meta)
        if self.variance_start == "prior":
            return v0
        key = "std" if self.variance_param == "std" else "rho"
        grad = torch.func.grad(lambda u: self.inner_objective(model, dict(v0, **{key: u}), meta, task))(v0[key])
        s0 = self.variance(v0)
        ds = 2.0 * v0["std"] if key == "std" else torch.sigmoid(v0["rho"])       # s'(u), s'(ρ)
        precision = torch.clamp(1.0 / s0 + (2.0 / self.beta) * grad / ds, min=0.5 / s0)
        free = torch.clamp(1.0 / precision - self.min_variance, min=1e-30)
        return dict(v0, **{key: torch.sqrt(free) if key == "std" else _inverse_softplus(free)})

    def weight_samples(self, v, eps: Tensor) -> Tensor:
        """``w_j = m + √s ⊙ ε_j`` ``[S, D]``."""
        return v["mean"] + torch.sqrt(self.variance(v)) * eps

    def expected_nll(self, model: TaskModel, v, meta, x: Tensor, y: Tensor, eps: Tensor) -> Tensor:
        """``E_q[−Σ_n log p(y_n | f(x_n; w))]`` by the draws ``eps`` or linearised (``expectation``)."""
        if self.expectation == "linearized":
            return model.linearized_nll(meta, v["mean"], self.variance(v), x, y)
        samples = self.weight_samples(v, eps)
        return -model.log_likelihood_samples(meta, samples, x, y).sum(1).mean()

    def _draws_of(self, task: Task, key: str) -> Optional[Tensor]:
        """The task's fixed draws ``task[key]``; the linearised expectation needs none."""
        return task.get(key) if self.expectation == "linearized" else task[key]

    def inner_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        eps = self._draws_of(task, "eps_inner")
        nll = self.expected_nll(model, v, meta, task["support_x"], task["support_y"], eps)
        kl = model.prior_kl(meta, v["mean"], self.variance(v), eps)
        return nll + self.beta * kl

    def outer_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        qx, qy = task["query_x"], task["query_y"]
        if self.outer == "elbo":
            if model.likelihood.infers_task_noise:
                raise ValueError("outer='elbo' is the inner model's objective and has no task noise; use "
                                 "outer='predictive' with a ConjugateNoiseGaussianLikelihood")
            eps = self._draws_of(task, "eps_outer")
            sx, sy = task["support_x"], task["support_y"]
            nll = self.expected_nll(model, v, meta, sx, sy, eps) + self.expected_nll(model, v, meta, qx, qy, eps)
            kl = model.prior_kl(meta, v["mean"], self.variance(v), eps)
            return (nll + self.beta * kl) / (sx.shape[0] + qx.shape[0])
        ratio = task_noise_ratio(model, meta, v["mean"], task)
        if self.exact_outputs and model.likelihood.gaussian_outputs_log_prob:
            mean, var = self.head_outputs(model, v, meta, qx)
            if self.outer == "expected":   # E_f[log N(y; f, R)] = log N(y; μ_f, R) − v_f/(2R), v_f under σ_t
                var, zero = (var if ratio is None else ratio * var), torch.zeros_like(var)
                _, noise_var = model.likelihood_predictive_gaussian_outputs(meta, mean, zero, *_ratio_args(ratio))
                at_mean = model.likelihood_log_prob_gaussian_outputs(meta, mean, zero, qy, *_ratio_args(ratio))
                return -(at_mean - (var / (2 * noise_var)).reshape(var.shape[0], -1).sum(-1)).mean()
            return -model.likelihood_log_prob_gaussian_outputs(meta, mean, var, qy, *_ratio_args(ratio)).mean()
        eps = task["eps_outer"] if ratio is None else torch.sqrt(ratio) * task["eps_outer"]   # draws under σ_t
        samples = self.weight_samples(v, eps)
        loglik = model.log_likelihood_samples(meta, samples, qx, qy, predictive=True, **_ratio_kwargs(ratio))
        if self.outer == "expected":                                                            # [M', Q] → scalar
            return -loglik.mean()
        return -(torch.logsumexp(loglik, 0) - math.log(samples.shape[0])).mean()

    def point(self, v) -> Tensor:
        """The task weights' point estimate: the posterior mean ``m``."""
        return v["mean"]

    def curvature(self, v, precision: Optional[Tensor]) -> Optional[ParamDict]:
        """``β · precision`` for ``m``; ``β s'(ρ)² / (2 s²)`` for ``ρ``, ``β (precision + 1/s)`` for
        ``u`` (``None`` without a precision)."""
        if precision is None:
            return None
        s = self.variance(v)
        if self.variance_param == "std":   # ∂²/∂u² of β Σ (u²/(2σ²) − log u) with 1/σ² = precision
            return {"mean": self.beta * precision, "std": self.beta * (precision + 1.0 / s)}
        ds = torch.sigmoid(v["rho"])
        return {"mean": self.beta * precision, "rho": self.beta * ds ** 2 / (2 * s ** 2)}


@dataclass(frozen=True)
class FullCovariance(InferenceMethod):
    """A Gaussian posterior ``q = N(m, Σ)`` with a full covariance over a linear head, for a
    Gaussian likelihood (``v = {"mean"}``; the covariance is solved in closed form).

    With the head's outputs ``f = J w`` (``J [N, C, D]``, :meth:`TaskModel.head_jacobian`), the
    Gauss–Newton curvature ``A = Σ_n J_nᵀ Λ_n J_n`` of the support NLL (``Λ`` the likelihood's
    ``output_curvature``, ``1/σ²``) and the prior's precision ``P`` (``precision_matrix``), the
    variational objective ``E_q[NLL] + β KL(q ‖ p)`` with the linearised (for a linear-Gaussian
    head exact) expectation, ``NLL(m) + ½ tr(Σ A)``, is stationary in ``Σ`` at::

        Σ*(θ) = (P + A/β)⁻¹

    and in ``m`` where ``G(m, θ) = NLL(m; S) − β log p(m; θ)`` is (for a linear-Gaussian head
    ``Σ*`` does not depend on ``m``, so this is the profile objective's stationarity; with
    ``β = 1`` ``q`` is the exact posterior of Bayesian linear regression). The implicit gradient
    runs through ``m``; ``Σ*`` is a closed-form function of θ inside the outer objective::

        F(m, θ) = −(1/|Q|) Σ_{n∈Q} log N(y_n; J_n m, diag(J_n Σ* J_nᵀ) + σ²)

    (with a :class:`ibaml.ConjugateNoiseGaussianLikelihood` the variance times the task's noise
    ratio). Where a mean-field posterior shrinks every weight a support point touches, ``Σ*``
    keeps the prior's variance in the directions the support does not determine, which is what a
    one-shot task needs. The inner loop starts from the Gauss–Newton step from the prior
    location (:meth:`task_init`), the solution itself for a linear-Gaussian head. ``D`` is the
    head's size: the ``D × D`` factorisation per task suits heads of up to a few hundred weights.

    Args:
        beta: KL weight ``β`` (1: the Bayesian posterior).

    >>> FullCovariance().beta
    1.0
    """

    beta: float = 1.0
    name = "full_covariance"
    needs_noise = False
    exact_outputs = True

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"FullCovariance beta must be positive, got {self.beta!r}")

    def init(self, model: TaskModel, meta) -> ParamDict:
        """``m₀ = location(θ)``."""
        return {"mean": model.prior_location(meta)}

    def _precision_cholesky(self, model: TaskModel, meta, m: Tensor, x: Tensor) -> Tensor:
        """The Cholesky factor ``L`` of ``β P + A`` ``[D, D]``, the inner objective's
        Gauss–Newton Hessian in ``m`` (the head's outputs at ``x`` are ``J m``)."""
        prior_precision = model.prior_precision_matrix(meta)
        if prior_precision is None:
            raise ValueError("FullCovariance needs a Gaussian prior with a precision (Prior.precision_matrix)")
        jac = model.head_jacobian(meta, x)                                           # [N, C, D]
        curvature = model.likelihood_output_curvature(meta, jac @ m)                 # [N, C]
        data = torch.einsum("ncd,nc,nce->de", jac, curvature, jac)
        return torch.linalg.cholesky_ex(self.beta * prior_precision + data)[0]

    def covariance_factor(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        """``R = √β L⁻ᵀ`` ``[D, D]`` with ``R Rᵀ = Σ* = β (β P + A)⁻¹``, ``L Lᵀ = β P + A``."""
        chol = self._precision_cholesky(model, meta, v["mean"], task["support_x"])
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        return math.sqrt(self.beta) * torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)

    def task_init(self, model: TaskModel, meta, task: Task) -> ParamDict:
        """One Gauss–Newton step from the location: ``m₁ = μ − (β P + A)⁻¹ ∇G(μ)``."""
        v0 = self.init(model, meta)
        grad = torch.func.grad(lambda m: self.inner_objective(model, {"mean": m}, meta, task))(v0["mean"])
        chol = self._precision_cholesky(model, meta, v0["mean"], task["support_x"])
        return {"mean": v0["mean"] - torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)}

    def inner_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        m = v["mean"]
        nll = -model.log_likelihood(meta, m, task["support_x"], task["support_y"]).sum()
        return nll - self.beta * model.prior_log_prob(meta, m)

    def _outputs(self, model: TaskModel, m: Tensor, factor: Tensor, meta, x: Tensor):
        jac = model.head_jacobian(meta, x)                                           # [N, C, D]
        return jac @ m, ((jac @ factor) ** 2).sum(-1)

    def outer_objective(self, model: TaskModel, v, meta, task: Task) -> Tensor:
        if not model.likelihood.gaussian_outputs_log_prob:
            raise ValueError(f"FullCovariance needs a likelihood with Gaussian outputs (a GaussianLikelihood), "
                             f"got {type(model.likelihood).__name__}")
        factor = self.covariance_factor(model, v, meta, task)
        mean, var = self._outputs(model, v["mean"], factor, meta, task["query_x"])
        ratio = task_noise_ratio(model, meta, v["mean"], task)
        return -model.likelihood_log_prob_gaussian_outputs(meta, mean, var, task["query_y"], *_ratio_args(ratio)).mean()

    def posterior_extras(self, model: TaskModel, v, meta, task: Task) -> Dict[str, Tensor]:
        """``{"covariance_factor": R}`` at the solution (:meth:`covariance_factor`)."""
        return {"covariance_factor": self.covariance_factor(model, v, meta, task)}

    def head_outputs(self, model: TaskModel, v, meta, x: Tensor):
        """``(J m, diag(J R Rᵀ Jᵀ))`` ``[N, C]`` each, with the posterior's ``covariance_factor``."""
        return self._outputs(model, v["mean"], v["covariance_factor"], meta, x)

    def point(self, v) -> Tensor:
        """The posterior mean ``m``."""
        return v["mean"]

    def weight_samples(self, v, eps: Tensor) -> Tensor:
        """``w_j = m + R ε_j`` ``[S, D]`` (the posterior's ``covariance_factor``)."""
        return v["mean"] + eps @ v["covariance_factor"].transpose(-1, -2)

    def curvature(self, v, precision: Optional[Tensor]) -> Optional[ParamDict]:
        """``β · precision`` for ``m``."""
        return None if precision is None else {"mean": self.beta * precision}
