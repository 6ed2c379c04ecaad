"""Named recipes: the published methods as combinations of prior, inference and estimator.

==========  ==================================  ==============  =========================
method      prior (default ``include``)         inference       meta-gradient
==========  ==================================  ==============  =========================
maml        flat (learned init), all weights    MAP             explicit unrolled
anil        flat (learned init), the head       MAP             explicit unrolled
fomaml      flat (learned init), all weights    MAP             first-order
imaml       isotropic N(μ, λ⁻¹I), the head      MAP             implicit (CG)
abml        diagonal N(μ, σ²), the head         variational     explicit unrolled
ibaml       diagonal N(μ, σ²), the head         variational     implicit (CG)
lazy        flat (learned init), all weights    MAP             lazy teacher–student
==========  ==================================  ==============  =========================

**Why the head.** The implicit gradient is exact only at a solution of the inner problem
(and, there, as accurate as its conjugate-gradient solve). With a prior over all weights that
solution is out of reach at a usable cost: a prior weak enough to let a task move the weights
leaves a non-convex, badly scaled few-shot problem that a few gradient steps do not solve, and
a prior strong enough to make it convex keeps the network at the prior (measured in
``docs/results/sine.md``, "The studies behind the presets"; the reasoning in
``docs/design.md``). The presets of the prior-based methods therefore put the prior on the
network's last layer
(:func:`priors.last_layer`) and meta-learn the rest as shared weights (``net.*``
meta-parameters, reached through ``B = ∇²_vθ G`` of the implicit gradient). For a Gaussian
likelihood the inner problem is then a ridge regression on learned features (a Bayesian
linear regression for the variational methods) and :class:`ibaml.core.optim.NewtonCG` solves it
to ``||∇G|| < 10⁻³`` in a few steps; for a softmax head it is convex. ``include="all"``
gives the prior over every weight of the papers, with the defaults of :data:`FULL_NETWORK`,
and :data:`RECIPES` names them:

==========  ==========================================================================
recipe      the method over every weight
==========  ==========================================================================
imaml-gd    iMAML, λ = 2, 20 Adam steps, implicit
imaml-hf    iMAML, λ = 2, 10 Hessian-free steps (5 CG iterations, adapted damping, a line search)
ibaml-all   iBaML, σ = 0.01, β = 2·10⁻⁴, 4 antithetic draws, 20 Adam steps, implicit
ibaml-hf    iBaML as ibaml-all, 10 Hessian-free steps (imaml-hf's solver on the means and scales)
abml-all    ABML, σ = 0.01, β = 2·10⁻⁴, 4 antithetic draws, 10 SGD steps, explicit
==========  ==========================================================================

and one head recipe for regression, ``ibaml-fullcov``: iBaML with a Gaussian posterior of full
covariance over the head (:class:`ibaml.core.inference.FullCovariance`, the covariance in closed
form, the mean from its Gauss–Newton start and one Newton step) under a low-rank-plus-diagonal
prior of rank 2 (:class:`priors.LowRankGaussian`), the implicit gradient through the mean; with
:class:`ibaml.core.nets.RandomFourierFeatures` under the head its predictive variance returns to the
prior's away from the training inputs (``docs/results/shift.md``).

Whether their inner problems are solved is reported with every run (``inner_grad_norm``
per block along training, in both examples' ``metrics.json``). Where they are not, keep the
implicit gradient's linear solve short: at an unsolved point ``∇²G`` has directions of curvature
near zero that a close CG solve divides by. On the stroke images (1 shot) ``imaml-gd`` learns as
MAML does with ``cg_steps=1``, 20 SGD steps of 0.005 on the summed NLL and ``λ = 3`` (chosen on
validation), and stays near chance with 20 CG iterations; ``imaml-hf`` learns with ``cg_steps=1``
at its preset, and ``ibaml-all`` with ``cg_steps=1`` and 20 SGD steps of 0.005 in place of Adam
(chosen on validation; ``docs/results/images.md``).

Per-method defaults (each can be overridden by the matching argument):

==========  ===========  ==============================================================
method      inner steps  inner optimiser, prior, inference
==========  ===========  ==============================================================
maml        5            SGD 0.002 (MAML's 0.01 on the mean squared error of 10 points)
anil        5            SGD 0.02 on the head
fomaml      5            SGD 0.002
lazy        10           SGD 0.002
imaml       2            NewtonCG (10 CG iterations); λ = 0.1
ibaml       10           NewtonCG (10 CG iterations, |Δρ| ≤ 3) from the fixed-point
                         variances (``variance_start="fixed_point"``); σ = 1, β = 1, the
                         linearised expectation (exact for a linear-Gaussian head); in
                         regression a noise per task with its prior's pseudo-count held
                         at 1 (:data:`ibaml.recipes.noise_presets.NOISE_PRIOR_COUNT`)
abml        10           PriorPreconditioned (proximal step 0.002 on the means, half a
                         Newton step on ρ bounded by 0.5), differentiated through; the
                         model of ibaml (differentiating through Newton-CG iterations
                         was not stable over long runs: ``docs/results/sine.md``)
==========  ===========  ==============================================================

MAML's and ANIL's inner step, iMAML's ``λ`` and iBaML's ``a₀`` in regression are the values
with the lowest recalibrated NLL on validation tasks among those tried
(``benchmarks/sine_protocol.py``, ``docs/results/sine/protocol/selection.json``); the tables
of ``docs/results/sine.md`` say which results were run with which.

**CG iterations of the implicit gradient** (``cg_steps``, default 20): with a prior on a
linear head the Hessian of the inner problem is the prior precision plus a data term of rank at
most the support points times the outputs, so that CG preconditioned by the prior precision
converges in about that many iterations plus one (11 for 10 sine shots; a softmax head's term
has a fast-falling spectrum). Against the dense implicit solve (``benchmarks/cg_accuracy.py``,
float64, worst of 25 sine tasks), 5 iterations were off by 1–3 % after 300 sine meta-iterations
(9 % on one task) and 10 by 8 % on one task after 3000, where 20 stay below 2·10⁻⁹; on the stroke
images at 5 shots 10 iterations were off by 4·10⁻⁴ and 20 by 4·10⁻⁹. 20 iterations cost a sine
meta-iteration 1.1–1.3× what 5 did, a 1-shot image one 1.0–1.3× (on a shared CPU). A task with
many more support points than 20 needs more (``cg_steps``, ``--cg-steps``).

For classification (a :class:`CategoricalLikelihood`) iMAML's ``λ`` is 30 and ABML's and
iBaML's ``σ`` 0.01 with ``β = 10⁻³`` (ABML) and ``3·10⁻³`` (iBaML) (:data:`CLASSIFICATION`);
every method gets a meta-learned logit scale on its predictions and, with SGD, MAML's inner
step (:mod:`ibaml.recipes.image_presets`, whose :func:`~ibaml.recipes.image_presets.image_learner` builds an
image learner with all of them).

``β = 1`` with σ = 1 on the head is the exact (untempered) posterior of the model. On sine the
results protocol chose a weaker pull on validation tasks (iBaML β = 0.05 with a noise per task
and 0.2 with one shared noise, ABML 0.05), which the sine example takes as its default
(:data:`ibaml.recipes.sine_presets.SINE_KL_WEIGHT`): more accurate in range, narrower away from it
(``docs/results/shift.md``). The
linearised expectation (:class:`Variational`, ``expectation="linearized"``) removes the
Monte Carlo noise from the inner problem: with fixed draws, the variance block of the
inner objective is not convex in ``ρ`` and Newton steps stalled on some tasks as the learned
noise fell, and independent draws shift the posterior mean by ``√s ⊙ mean_j ε_j`` (the
measurements are in ``docs/results/sine.md``). A prior over more than the head falls back
to ``"sampled"`` (1 draw unless ``num_samples`` is given).

**The recipes as data.** Each method is one frozen :class:`Recipe` (:data:`METHOD_RECIPES`):
its prior family, inference, meta-gradient estimator, inner optimiser and the numbers of the
tables above. The variants are overrides of its fields, applied with
:func:`dataclasses.replace` where their condition holds: :data:`FULL_NETWORK` for a prior over
every weight (``include="all"``), which takes the place of the other two where the method has
one, :data:`CLASSIFICATION` for a :class:`CategoricalLikelihood` and :data:`TASK_NOISE` for a
:class:`TaskNoiseGaussianLikelihood` (:func:`variants`); the arguments given to
:func:`build_learner` override them all (:func:`method_recipe`). :func:`build_learner` then
assembles the prior, the inference, the estimator and the inner optimiser from the recipe
(:mod:`ibaml.recipes.recipe`). :data:`PRESETS` is the view of the recipes as the options each method
sets.

Example
-------
>>> learner = build_learner("ibaml", MLP(1, (40, 40), 1), GaussianLikelihood(1.0, learn_noise=True))
>>> method_recipe("ibaml", CategoricalLikelihood()).kl_weight, method_recipe("imaml-hf").inner_optimizer
(0.003, 'hf')
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields, replace
from typing import Optional

from torch import nn

from priors.base import Prior

from ibaml.core.likelihoods import CategoricalLikelihood, Likelihood, TaskNoiseGaussianLikelihood
from ibaml.core.optim import Backtracking
from ibaml.recipes.recipe import (GRADIENT_OPTIMIZERS, Recipe, build_estimator, build_inference, build_inner_optimizer, build_prior,
                                  build_scope)
from ibaml.train.learner import MetaLearner


#: one recipe per method (see the module tables); :data:`METHODS` are their names
METHOD_RECIPES = {
    "maml": Recipe("flat", "map", "explicit", inner_steps=5, inner_optimizer="sgd", include="all"),
    "anil": Recipe("flat", "map", "explicit", inner_steps=5, inner_optimizer="sgd", include="head", inner_lr=0.02),
    "fomaml": Recipe("flat", "map", "first_order", inner_steps=5, inner_optimizer="sgd", include="all"),
    "imaml": Recipe("isotropic", "map", "implicit", inner_steps=2, inner_optimizer="newton", include="head",
                    precision=0.1),
    "abml": Recipe("diagonal", "variational", "explicit", inner_steps=10, inner_optimizer="prior", include="head",
                   init_scale=1.0, kl_weight=1.0, expectation="linearized"),
    "ibaml": Recipe("diagonal", "variational", "implicit", inner_steps=10, inner_optimizer="newton", include="head",
                    init_scale=1.0, kl_weight=1.0, expectation="linearized", newton_max_rho_step=3.0,
                    variance_start="fixed_point"),
    "lazy": Recipe("flat", "map", "lazy", inner_steps=10, inner_optimizer="sgd", include="all"),
}

METHODS = tuple(METHOD_RECIPES)
_KINDS = ("prior", "inference", "estimator")
# MetaLearner arguments that build_learner does not set itself
_PASSED_ON = frozenset(inspect.signature(MetaLearner).parameters) - {
    "net", "prior", "likelihood", "method", "estimator", "inner_optimizer", "inner_steps"}


def _options(recipe: Recipe) -> dict:
    """The options a recipe sets: its inner loop's and scope, and every number not at the default."""
    return {f.name: getattr(recipe, f.name) for f in fields(recipe)
            if f.name not in _KINDS and (f.default is MISSING or getattr(recipe, f.name) != f.default)}


#: per-method defaults of :func:`build_learner` as options (a view of :data:`METHOD_RECIPES`)
PRESETS = {method: _options(recipe) for method, recipe in METHOD_RECIPES.items()}


#: overrides of a recipe for a noise inferred per task (a :class:`TaskNoiseGaussianLikelihood`
#: with a :class:`ibaml.core.nets.NoiseHead`): the inner problem is no longer quadratic in the
#: head (the mean's curvature ``1/σ²`` depends on the noise, and the Hessian in the mean and
#: the log noise is indefinite wherever a residual is non-zero), and an unbounded Newton step
#: from the prior can overshoot to a non-finite iterate; each weight's step is bounded by 1 and
#: damped in the prior's metric, and the log noise's prior starts at σ = 0.1, close to one
#: noise shared by all tasks. On sine this does not yet learn (``docs/design.md``, "The noise models").
TASK_NOISE = {
    "imaml": dict(newton_max_mean_step=1.0, newton_prior_damping=1.0),
    "ibaml": dict(newton_max_mean_step=1.0, newton_prior_damping=1.0, noise_prior_scale=0.1),
    "abml": dict(noise_prior_scale=0.1),
}


#: overrides of a recipe with a prior over every weight (``include="all"``, the papers'
#: configuration; named recipes in :data:`RECIPES`). The inner problem is then non-convex and badly
#: scaled, so the presets spend what the implicit gradient makes cheap in memory: many inner
#: steps. iMAML-GD follows the paper's Omniglot recipe (λ = 2, 16–25 gradient steps) with Adam
#: (per-weight steps that do not depend on the scale of a learned noise or of the features),
#: iMAML-HF replaces them by Newton-CG steps (5 CG iterations) on ``∇²G + μP`` with a
#: Levenberg–Marquardt damping ``μ`` adapted per task and a backtracking line search on ``G``
#: (:func:`ibaml.recipes.recipe.hessian_free`; ``adaptive_damping`` and ``line_search`` of
#: :class:`ibaml.core.optim.NewtonCG`). iBaML and ABML over all weights follow
#: the published variational recipes (``../notes``: a prior scale far below the weights', the KL
#: down-weighted against the summed NLL, several antithetic draws, the posterior started at the
#: prior); their KL weight and scale set the pull on the mean to ``β/σ² = 2``, iMAML's λ. ABML,
#: differentiated through its inner steps, takes SGD with MAML's step: the derivative of an Adam
#: step is ``lr/ε`` where a gradient entry is zero, and through 20 steps it overflowed.
FULL_NETWORK = {
    "imaml": dict(inner_steps=20, inner_optimizer="adam", precision=2.0),
    "ibaml": dict(inner_steps=20, inner_optimizer="adam", init_scale=0.01, kl_weight=2e-4,
                  num_samples=4, antithetic=True, expectation="sampled", variance_start="prior"),
    "abml": dict(inner_steps=10, inner_optimizer="sgd", init_scale=0.01, kl_weight=2e-4,
                 num_samples=4, antithetic=True, expectation="sampled", variance_start="prior"),
}

#: overrides of a recipe for classification (a :class:`CategoricalLikelihood`): the exact MAP of
#: a softmax head under a weak prior is over-confident (its logits grow until the prior stops
#: them) and a strong one keeps the head at the prior, so iMAML's λ sits between the two. The
#: variational methods follow the published recipes: a prior scale far below the weights'
#: (σ = 0.01) with the KL down-weighted against the summed NLL, so that the pull on the
#: posterior mean is iMAML's with ``λ = β/σ²``; ABML keeps ``β = 0.001``. The study that chose
#: these values, on the stroke benchmark, is in ``docs/results/images.md``.
CLASSIFICATION = {
    "imaml": dict(precision=30.0),
    "ibaml": dict(init_scale=0.01, kl_weight=3e-3),
    "abml": dict(init_scale=0.01, kl_weight=1e-3),
}

#: the variants that a likelihood selects, in the order they apply: ``(its class, overrides per
#: method)``; a prior over every weight takes :data:`FULL_NETWORK`'s in their place where the
#: method has them
LIKELIHOOD_VARIANTS = ((CategoricalLikelihood, CLASSIFICATION), (TaskNoiseGaussianLikelihood, TASK_NOISE))

#: the full-network methods under their published names, and the full-covariance head:
#: ``build_learner(name, ...)`` is ``build_learner(method, ..., **options)``, any option given
#: explicitly taking precedence
RECIPES = {
    "imaml-gd": ("imaml", dict(include="all")),
    "imaml-hf": ("imaml", dict(include="all", inner_optimizer="hf", inner_steps=10)),
    "ibaml-all": ("ibaml", dict(include="all")),
    "ibaml-hf": ("ibaml", dict(include="all", inner_optimizer="hf", inner_steps=10)),
    "abml-all": ("abml", dict(include="all")),
    "ibaml-fullcov": ("ibaml", dict(prior="lowrank", inference="full_covariance", rank=2, init_scale=1.0,
                                    init_factor_scale=0.1, inner_steps=1, inner_optimizer="newton")),
}


#: inner steps at evaluation over those of meta-training: MAML and FOMAML, whose few inner steps
#: stop early by design, adapt for twice as long on new tasks; the other methods solve their
#: inner problem and adapt as in meta-training.
EVAL_STEPS_FACTOR = {"maml": 2, "anil": 2, "fomaml": 2}


def resolve(method: str, options: dict) -> tuple:
    """``(method, options)`` of a name of :data:`METHODS` or :data:`RECIPES` (a recipe's options
    under those given that are not ``None``).

    >>> resolve("imaml-hf", {"precision": 5.0, "inner_steps": None})[1]["inner_optimizer"]
    'hf'
    """
    name = method.lower()
    if name in RECIPES:
        base, recipe = RECIPES[name]
        return base, {**recipe, **{k: v for k, v in options.items() if v is not None}}
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS + tuple(RECIPES))}")
    return name, dict(options)


def inner_steps(method: str, steps: Optional[int] = None, eval_steps: Optional[int] = None, include=None):
    """``(meta-training steps, evaluation steps)``: the ones given, else the method's recipe's
    (:func:`method_recipe`; a name of :data:`RECIPES` included) and :data:`EVAL_STEPS_FACTOR`
    times those.

    >>> inner_steps("maml"), inner_steps("imaml", 5), inner_steps("maml", 3, 4), inner_steps("imaml-hf")
    ((5, 10), (5, 5), (3, 4), (10, 10))
    """
    steps = int(method_recipe(method, include=include, inner_steps=steps or None).inner_steps)
    return steps, int(eval_steps or EVAL_STEPS_FACTOR.get(resolve(method, {})[0], 1) * steps)


def takes_gradient_steps(method: str, inner_optimizer: Optional[str] = None, include=None) -> bool:
    """Whether ``method``'s inner loop (its recipe's optimiser over ``include``, or
    ``inner_optimizer`` where a run chose another) takes fixed-size gradient steps
    (:data:`ibaml.recipes.recipe.GRADIENT_OPTIMIZERS`), the steps that a support-size scaling
    or a backtracking search applies to.

    >>> takes_gradient_steps("maml"), takes_gradient_steps("ibaml"), takes_gradient_steps("ibaml", include="all")
    (True, False, True)
    >>> takes_gradient_steps("imaml-gd", inner_optimizer="sgd"), takes_gradient_steps("imaml-hf")
    (True, False)
    """
    optimizer = inner_optimizer or method_recipe(method, include=include).inner_optimizer
    return optimizer in GRADIENT_OPTIMIZERS


def variants(method: str, include, likelihood: Optional[Likelihood] = None) -> list:
    """The overrides of ``method``'s recipe, in the order they apply, for a prior over
    ``include`` (``"all"``: :data:`FULL_NETWORK`'s, where the method has them) and
    ``likelihood`` (:data:`LIKELIHOOD_VARIANTS`).

    >>> variants("imaml", "head", CategoricalLikelihood()), variants("imaml", "all", CategoricalLikelihood())
    ([{'precision': 30.0}], [{'inner_steps': 20, 'inner_optimizer': 'adam', 'precision': 2.0}])
    """
    if include == "all" and method in FULL_NETWORK:
        return [FULL_NETWORK[method]]
    return [table[method] for kind, table in LIKELIHOOD_VARIANTS if isinstance(likelihood, kind) and method in table]


def method_recipe(method: str, likelihood: Optional[Likelihood] = None, **options) -> Recipe:
    """The :class:`Recipe` that :func:`build_learner` follows: ``method``'s (a name of
    :data:`METHODS` or :data:`RECIPES`), with its :func:`variants` for ``likelihood`` and the
    scope, and the ``options`` that are not ``None`` over all of them.

    >>> r = method_recipe("ibaml-all", inner_steps=30)
    >>> r.include, r.inner_steps, r.inner_optimizer, r.kl_weight
    ('all', 30, 'adam', 0.0002)
    """
    method, options = resolve(method, options)
    options = {k: v for k, v in options.items() if v is not None}
    recipe = METHOD_RECIPES[method]
    for overrides in variants(method, options.get("include", recipe.include), likelihood):
        recipe = replace(recipe, **overrides)
    return replace(recipe, **options)


def build_learner(method: str, net: nn.Module, likelihood: Likelihood, *, inner_steps: Optional[int] = None,
                  inner_lr: Optional[float] = None, inner_optimizer=None, cg_steps: int = 20,
                  cg_damping: float = 0.0, precision: Optional[float] = None, learn_precision: bool = False,
                  init_scale=None, kl_weight: Optional[float] = None, num_samples: Optional[int] = None,
                  include=None, antithetic: Optional[bool] = None, outer: str = "predictive",
                  num_outer_samples: int = 5, relative_scale: Optional[float] = None,
                  newton_prior_damping: Optional[float] = None, variance_param: Optional[str] = None,
                  expectation: Optional[str] = None, variance_start: Optional[str] = None,
                  prior: Optional[Prior] = None, per_point: bool = False, inner_backtracking: int = 0,
                  **learner_kwargs) -> MetaLearner:
    """A :class:`MetaLearner` for a named method (see the module tables): its recipe
    (:func:`method_recipe`, with the variants for ``likelihood`` and the scope), every argument
    left at ``None`` taking the recipe's value.

    Args:
        method: one of ``maml``, ``anil`` (MAML's inner loop on the head only), ``fomaml``,
            ``imaml``, ``abml``, ``ibaml``, ``lazy``, or a name of :data:`RECIPES`.
        inner_steps: inner steps (Newton steps for ``"newton"``) during meta-training.
        inner_lr: inner learning rate for ``"sgd"`` and ``"prior"`` (default 0.002 — on the
            summed Gaussian NLL with unit noise over 10 points this is the usual MAML step of
            0.01 on the mean squared error) and ``"adam"`` (default 0.01).
        inner_optimizer: ``"sgd"``, ``"adam"``, ``"prior"`` (:class:`ibaml.core.optim.PriorPreconditioned`),
            ``"newton"`` (:class:`ibaml.core.optim.NewtonCG`), ``"hf"`` (:func:`ibaml.recipes.recipe.hessian_free`), or an
            optimiser object.
        cg_steps, cg_damping: conjugate-gradient iterations and damping of the implicit
            meta-gradient (iMAML, iBaML; see the module docstring for the default 20).
        precision, learn_precision: iMAML's ``λ`` (default 0.1 on the head, 30 in classification) and whether it is
            meta-learned.
        init_scale: initial prior standard deviation (ABML, iBaML; default 1 on the head): a
            number or ``{tensor name: σ}``; ``relative_scale`` instead sets it per tensor to a
            fraction of the tensor's initial root-mean-square weight.
        kl_weight: ``β`` against the summed support NLL (ABML, iBaML; default 1).
        num_samples: reparameterised draws in the variational inner objective (default 1; 4 over
            every weight).
        antithetic: draws in pairs ``(ε, −ε)`` (default on over every weight).
        outer: ``"predictive"``, ``"elbo"`` (ABML's outer objective) or ``"expected"`` (the query
            NLL expected under the posterior), see :class:`Variational`.
        num_outer_samples: draws in the variational outer objective.
        newton_prior_damping: :class:`NewtonCG`'s ``prior_damping`` for ``"newton"``.
        variance_param, expectation, variance_start: see :class:`Variational` (ABML, iBaML).
        include: which network parameters get the prior: ``"head"`` (the last layer,
            :func:`priors.last_layer`), ``"all"``, or a selection as in :func:`priors.select_names`
            (default: the method's, see the module table).
        prior: a prior of your own (a :class:`priors.Prior`, e.g. a custom subclass) used in
            place of the method's; the method still fixes inference and meta-gradient, so
            ``build_learner("ibaml", net, lik, prior=MyPrior.from_module(net))`` is iBaML's
            variational inference and implicit gradient with ``MyPrior``. ``precision``,
            ``learn_precision``, ``init_scale`` and ``include`` then do not apply.
        per_point: MAP methods only: the inner objective on the mean over the support points
            (:class:`ibaml.core.inference.MAP`), so that an inner step size means the same at every
            support size; the step on the summed loss ``η`` at ``N₀`` points is ``η N₀`` here.
        inner_backtracking: ``N > 0`` wraps the inner optimiser in
            :class:`ibaml.core.optim.Backtracking`: a step that would raise the inner objective is
            halved, up to ``N`` times (kept whole where it lowers it), so that a gradient step
            tuned at one support size stays finite at larger ones.
        learner_kwargs: passed to :class:`MetaLearner` (``meta_lr``, ``chunk_size``, ...).
    """
    unknown = sorted(set(learner_kwargs) - _PASSED_ON)
    if unknown:
        raise TypeError(f"build_learner got unknown option(s) {unknown}; MetaLearner options it passes on are "
                        f"{sorted(_PASSED_ON)}")
    recipe = method_recipe(
        method, likelihood, inner_steps=inner_steps, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
        include=include, cg_steps=cg_steps, cg_damping=cg_damping, precision=precision,
        learn_precision=learn_precision, init_scale=init_scale, relative_scale=relative_scale, kl_weight=kl_weight,
        num_samples=num_samples, antithetic=antithetic, outer=outer, num_outer_samples=num_outer_samples,
        newton_prior_damping=newton_prior_damping, variance_param=variance_param or None,
        variance_start=variance_start or None)
    scope = build_scope(net, recipe.include)
    optimizer = build_inner_optimizer(recipe)
    if inner_backtracking:
        optimizer = Backtracking(optimizer, halvings=inner_backtracking)
    prior = build_prior(recipe, net, scope, prior)
    inference = build_inference(recipe, net, prior, expectation, per_point)
    return MetaLearner(net, prior(), likelihood, method=inference,
                       estimator=build_estimator(recipe, optimizer), inner_optimizer=optimizer,
                       inner_steps=recipe.inner_steps, **learner_kwargs)
