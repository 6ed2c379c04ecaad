"""A method as data, :class:`Recipe`, and its assembly: the prior (:data:`PRIOR_FAMILIES`,
:func:`build_prior`), the task inference (:func:`build_inference`), the meta-gradient
(:data:`ESTIMATORS`, :func:`build_estimator`) and the inner optimiser (:data:`INNER_OPTIMIZERS`,
:func:`build_inner_optimizer`). The methods' recipes, their variants and
:func:`ibaml.recipes.presets.build_learner`, which puts them together, are in :mod:`ibaml.recipes.presets`
(where these names can be imported from too).

Example
-------
>>> r = Recipe("isotropic", "map", "implicit", inner_steps=2, inner_optimizer="newton", include="head", precision=0.1)
>>> build_inner_optimizer(r).cg_iters, build_estimator(r, None).solver.max_iter
(10, 20)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from torch import nn

import priors
from priors.base import Prior, select_names

from ibaml.core.hypergrad import Explicit, FirstOrder, Implicit, Lazy
from ibaml.core.inference import MAP, FullCovariance, Variational
from ibaml.core.linalg import CG
from ibaml.core.optim import SGD, Adam, NewtonCG, PriorPreconditioned
from ibaml.core.task_model import _head_only


@dataclass(frozen=True)
class Recipe:
    """One method as data: what :func:`ibaml.recipes.presets.build_learner` assembles and the numbers it uses.

    Ingredients (each a key of the table that builds it):
        prior: the prior family over the task weights (:data:`PRIOR_FAMILIES`): ``"flat"``
            (``log p(w) = 0``, the inner loop starts at the meta-learned weights, MAML),
            ``"isotropic"`` (``N(μ, λ⁻¹I)``, iMAML), ``"diagonal"`` (``N(μ, diag σ²)``,
            ABML, iBaML) or ``"lowrank"`` (``N(μ, diag d + UUᵀ)``, ``U [D, rank]``).
        inference: ``"map"`` (the mode ``w* = argmin_w NLL − log p(w)``), ``"variational"``
            (``q = N(m, diag s)`` minimising ``E_q[NLL] + β KL(q ‖ p)``) or
            ``"full_covariance"`` (``q = N(m, Σ)`` over a linear head, ``Σ`` in closed form,
            :class:`ibaml.core.inference.FullCovariance`), see :mod:`ibaml.core.inference`.
        estimator: the meta-gradient (:data:`ESTIMATORS`): ``"explicit"`` (differentiated through
            the inner steps), ``"first_order"`` (``∂v*/∂θ`` dropped), ``"lazy"`` (teacher–student)
            or ``"implicit"`` (``dF/dθ = ∂_θ F − Bᵀ H⁻¹ ∂_v F`` at the inner solution, ``H⁻¹`` by CG).
        inner_steps: inner steps (Newton steps for ``"newton"``) during meta-training.
        inner_optimizer: a name of :data:`INNER_OPTIMIZERS` (``"sgd"``, ``"adam"``, ``"prior"``,
            ``"newton"``, ``"hf"``) or an optimiser object used as is.
        include: the weights under the prior: ``"head"`` (:func:`priors.last_layer`), ``"all"``,
            or a selection as in :func:`priors.select_names`.

    The inner optimiser's options:
        inner_lr: the step of ``"sgd"``, ``"adam"`` and ``"prior"``; ``None``: 0.01 for Adam,
            else 0.002 (MAML's 0.01 on the mean squared error of 10 points, on the summed NLL).
        newton_prior_damping: :class:`NewtonCG`'s ``prior_damping`` (``H + d·P``, ``P`` the
            prior precision).
        newton_max_rho_step, newton_max_mean_step: the bound of a Newton step on each variance
            parameter ``ρ`` and, if not ``None``, on each weight or mean.

    The prior's numbers (``None`` where the family has none):
        precision, learn_precision: iMAML's ``λ`` and whether it is meta-learned.
        init_scale: the diagonal prior's initial ``σ``, a number or ``{tensor name: σ}``
            (the low-rank prior's initial ``√d``).
        rank, init_factor_scale: the low-rank prior's ``r`` and the standard deviation of its
            initial factor's entries.
        relative_scale: instead, ``σ`` per tensor as this fraction of its initial RMS weight.
        noise_prior_scale: with a :class:`ibaml.core.nets.NoiseHead`, the initial ``σ`` of the prior
            over its log noise (the weights keep ``init_scale``); ``None``: no own value.

    The variational inference's (:class:`Variational`):
        kl_weight: ``β``, the KL's weight against the summed support NLL.
        num_samples, antithetic: the ``M`` draws of the inner objective, in pairs ``(ε, −ε)``.
        expectation: ``E_q[NLL]`` where the prior covers exactly a linear head (``"linearized"``
            is exact for a linear-Gaussian head); any other prior takes ``"sampled"``.
        variance_param, variance_start, outer, num_outer_samples: as in :class:`Variational`.

    The implicit gradient's:
        cg_steps, cg_damping: CG iterations and damping of ``H x = ∂_v F``
            (:mod:`ibaml.recipes.presets` on the default 20).
    """

    prior: str
    inference: str
    estimator: str
    inner_steps: int
    inner_optimizer: Any
    include: Any
    inner_lr: Optional[float] = None
    precision: Optional[float] = None
    learn_precision: bool = False
    init_scale: Any = None
    relative_scale: Optional[float] = None
    noise_prior_scale: Optional[float] = None
    rank: int = 2
    init_factor_scale: float = 0.01
    kl_weight: Optional[float] = None
    num_samples: int = 1
    antithetic: bool = False
    expectation: str = "sampled"
    newton_prior_damping: float = 0.0
    newton_max_rho_step: float = 1.0
    newton_max_mean_step: Optional[float] = None
    variance_param: str = "softplus"
    variance_start: str = "prior"
    outer: str = "predictive"
    num_outer_samples: int = 5
    cg_steps: int = 20
    cg_damping: float = 0.0

    @property
    def step(self) -> float:
        """The inner step: ``inner_lr``, else 0.01 for Adam and 0.002 for the others."""
        if self.inner_lr is not None:
            return self.inner_lr
        return 0.01 if self.inner_optimizer == "adam" else 0.002


def prior_preconditioned(lr: float) -> PriorPreconditioned:
    """The ``"prior"`` inner optimiser: a proximal step of size ``lr`` on the weights (MAP) or
    the variational means, and a half Newton step on the prior term, bounded by 0.5, on the
    variational variance parameters ``ρ`` (see :class:`ibaml.core.optim.PriorPreconditioned`)."""
    return PriorPreconditioned(lr={"rho": float("inf")}, default_lr=lr, prior_step=0.5, max_step={"rho": 0.5})


def newton_cg(lr=None, cg_iters: int = 10, prior_damping: float = 0.0, max_rho_step: float = 1.0,
              max_mean_step: Optional[float] = None) -> NewtonCG:
    """The ``"newton"`` inner optimiser: truncated Newton steps with ``cg_iters`` CG iterations,
    each variational variance parameter's step bounded by ``max_rho_step`` and, if given, each
    weight's or variational mean's by ``max_mean_step`` (``lr`` is not used)."""
    bounds = {"rho": max_rho_step}
    if max_mean_step is not None:
        bounds.update(mean=max_mean_step, w=max_mean_step)
    return NewtonCG(cg_iters=cg_iters, prior_damping=prior_damping, max_step=bounds)


def hessian_free(cg_iters: int = 5, line_search: int = 6, damping: float = 0.0, initial_damping: float = 1.0,
                 damping_factor: float = 3.0) -> NewtonCG:
    """The ``"hf"`` inner optimiser (iMAML-HF): Newton-CG steps with ``cg_iters`` CG iterations
    on Hessian-vector products of ``∇²G + μP`` (``P`` the prior's curvature), the
    Levenberg–Marquardt damping ``μ`` adapted per task from ``initial_damping`` by the factor
    ``damping_factor`` (:class:`ibaml.core.optim.NewtonCG`'s ``adaptive_damping``; ``0``: a fixed
    ``μ``), and a backtracking line search over ``line_search`` step sizes ``1, 1/2, …`` (and 0)
    on the inner objective, so that every step decreases ``G``."""
    return NewtonCG(cg_iters=cg_iters, damping=damping, line_search=line_search, prior_damping=initial_damping,
                    adaptive_damping=damping_factor)


#: the inner optimisers by name, built from a recipe
INNER_OPTIMIZERS = {
    "sgd": lambda r: SGD(lr=r.step),
    "adam": lambda r: Adam(lr=r.step),
    "prior": lambda r: prior_preconditioned(r.step),
    "hf": lambda r: hessian_free(),
    "newton": lambda r: newton_cg(r.step, prior_damping=r.newton_prior_damping,
                                  max_rho_step=r.newton_max_rho_step, max_mean_step=r.newton_max_mean_step),
}

#: the prior families, built from a network, the names they cover and a recipe
PRIOR_FAMILIES = {
    "flat": lambda net, include, r: priors.Flat.from_module(net, include=include),
    "isotropic": lambda net, include, r: priors.IsotropicGaussian.from_module(
        net, include=include, precision=r.precision, learn_precision=r.learn_precision),
    "diagonal": lambda net, include, r: priors.DiagonalGaussian.from_module(
        net, include=include, init_scale=r.init_scale, relative_scale=r.relative_scale),
    "lowrank": lambda net, include, r: priors.LowRankGaussian.from_module(
        net, include=include, rank=r.rank, init_scale=r.init_scale if r.init_scale is not None else 0.1,
        init_factor_scale=r.init_factor_scale),
}

#: the meta-gradient estimators, built from a recipe and its inner optimiser (the lazy
#: teacher's step is the student's, given apart unless the student is SGD)
ESTIMATORS = {
    "explicit": lambda r, optimizer: Explicit(),
    "first_order": lambda r, optimizer: FirstOrder(),
    "lazy": lambda r, optimizer: Lazy() if isinstance(optimizer, SGD) else Lazy(teacher_lr=r.step),
    "implicit": lambda r, optimizer: Implicit(solver=CG(max_iter=r.cg_steps, tol=1e-10, damping=r.cg_damping)),
}


#: the inner optimisers that take steps along the gradient of the inner objective with a fixed
#: step size (their step on the summed support NLL grows with the support size; Newton-type
#: steps, ``"newton"`` and ``"hf"``, are invariant to the objective's scale)
GRADIENT_OPTIMIZERS = ("sgd", "adam", "prior")


def build_inner_optimizer(recipe: Recipe):
    """The recipe's inner optimiser: by name (:data:`INNER_OPTIMIZERS`), or the object it holds."""
    if not isinstance(recipe.inner_optimizer, str):       # an optimiser object of one's own
        return recipe.inner_optimizer
    if recipe.inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"unknown inner optimizer {recipe.inner_optimizer!r}; expected one of "
                         f"{sorted(INNER_OPTIMIZERS)}")
    return INNER_OPTIMIZERS[recipe.inner_optimizer](recipe)


def build_estimator(recipe: Recipe, optimizer):
    """The recipe's meta-gradient estimator (:data:`ESTIMATORS`) for its inner ``optimizer``."""
    return ESTIMATORS[recipe.estimator](recipe, optimizer)


def build_scope(net: nn.Module, include):
    """The names a prior covers, as :meth:`priors.Prior.from_module` takes them: ``"head"`` →
    :func:`priors.last_layer`, ``"all"`` → every parameter (``None``), else as given."""
    if include == "head":
        return priors.last_layer(net)
    return None if include == "all" else include


def _noise_prior_scales(net: nn.Module, names, init_scale, noise_prior_scale: float):
    """``init_scale`` per tensor for a prior over a :class:`ibaml.core.nets.NoiseHead`: the log
    noise starts at ``noise_prior_scale`` (close to one noise shared by all tasks, which the
    meta-learned scale can widen), the weights at ``init_scale``."""
    keys = _head_only(net, names)
    if keys is None or keys.log_noise is None or isinstance(init_scale, dict):
        return init_scale
    scales = {k: float(init_scale) for k in keys if k is not None}
    scales[keys.log_noise] = noise_prior_scale
    return scales


def build_prior(recipe: Recipe, net: nn.Module, include, prior: Optional[Prior] = None) -> Callable[[], Prior]:
    """A function that gives ``prior`` where one is given, else the recipe's family
    (:data:`PRIOR_FAMILIES`) over ``include``, a noise head's log noise at its own scale
    (``noise_prior_scale``), built on the first call: after :func:`build_inference` has checked
    its options, unless the expectation depends on the prior."""
    if prior is not None and not isinstance(prior, Prior):
        raise TypeError(f"prior must be a priors.Prior, got {type(prior).__name__}")
    if recipe.noise_prior_scale is not None and recipe.relative_scale is None:   # selects, and checks, include
        recipe = replace(recipe, init_scale=_noise_prior_scales(
            net, select_names(dict(net.named_parameters()), include), recipe.init_scale, recipe.noise_prior_scale))
    return functools.cache(lambda: PRIOR_FAMILIES[recipe.prior](net, include, recipe) if prior is None else prior)


def build_inference(recipe: Recipe, net: nn.Module, prior: Callable[[], Prior], expectation: Optional[str] = None,
                    per_point: bool = False):
    """The recipe's task inference; ``expectation`` (given) or the recipe's where the prior
    covers exactly a linear head (the linearised expectation needs that), else ``"sampled"``;
    ``per_point``: a MAP inner objective divided by the support size (:class:`MAP`)."""
    if recipe.inference == "map":
        return MAP(per_point=per_point)
    if per_point:
        raise ValueError(f"per_point applies to MAP inference (maml, anil, fomaml, lazy, imaml), not {recipe.inference}")
    if recipe.inference == "full_covariance":
        if not _head_only(net, prior().names):
            raise ValueError("full_covariance inference needs a prior over exactly the network's linear head "
                             "(include='head')")
        return FullCovariance(beta=recipe.kl_weight if recipe.kl_weight is not None else 1.0)
    if expectation is None:
        expectation = recipe.expectation if _head_only(net, prior().names) else "sampled"
    return Variational(beta=recipe.kl_weight, num_samples=recipe.num_samples,
                       num_outer_samples=recipe.num_outer_samples, antithetic=recipe.antithetic, outer=recipe.outer,
                       variance_param=recipe.variance_param, expectation=expectation,
                       variance_start=recipe.variance_start)
