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
linear regression for the variational methods) and :class:`ibaml.optim.NewtonCG` solves it
to ``||∇G|| < 10⁻³`` in a few steps; for a softmax head it is convex. ``include="all"``
gives the prior over every weight of the papers, with the defaults of :data:`FULL_NETWORK`,
and :data:`RECIPES` names them:

==========  ==========================================================================
recipe      the method over every weight
==========  ==========================================================================
imaml-gd    iMAML, λ = 2, 20 Adam steps, implicit
imaml-hf    iMAML, λ = 2, 10 Hessian-free steps (5 CG iterations, a line search)
ibaml-all   iBaML, σ = 0.01, β = 2·10⁻⁴, 4 antithetic draws, 20 Adam steps, implicit
abml-all    ABML, σ = 0.01, β = 2·10⁻⁴, 4 antithetic draws, 10 SGD steps, explicit
==========  ==========================================================================

Whether their inner problems are solved is reported with every run (``inner_grad_norm``
per block along training, in both examples' ``metrics.json``).

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
                         at 1 (:data:`NOISE_PRIOR_COUNT`)
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
step (:mod:`ibaml.image_presets`, whose :func:`~ibaml.image_presets.image_learner` builds an
image learner with all of them).

``β = 1`` with σ = 1 on the head is the exact (untempered) posterior of the model. The
linearised expectation (:class:`Variational`, ``expectation="linearized"``) removes the
Monte Carlo noise from the inner problem: with fixed draws, the variance block of the
inner objective is not convex in ``ρ`` and Newton steps stalled on some tasks as the learned
noise fell, and independent draws shift the posterior mean by ``√s ⊙ mean_j ε_j`` (the
measurements are in ``docs/results/sine.md``). A prior over more than the head falls back
to ``"sampled"`` (1 draw unless ``num_samples`` is given).

Example
-------
>>> learner = build_learner("ibaml", MLP(1, (40, 40), 1), GaussianLikelihood(1.0, learn_noise=True))
"""

from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

import priors
from priors.base import Prior, select_names

from .hypergrad import Explicit, FirstOrder, Implicit, Lazy
from .inference import MAP, Variational
from .learner import MetaLearner
from .task_model import _head_only
from .likelihoods import CategoricalLikelihood, Likelihood, TaskNoiseGaussianLikelihood
from .linalg import CG
from .optim import SGD, Adam, NewtonCG, PriorPreconditioned
from .noise_presets import (NOISE_MODELS, NOISE_PRIOR_COUNT, REGRESSION_NOISE,  # noqa: F401  (ibaml.presets.*)
                            noise_prior_count, regression_likelihood)

METHODS = ("maml", "anil", "fomaml", "imaml", "abml", "ibaml", "lazy")
# MetaLearner arguments that build_learner does not set itself
_PASSED_ON = frozenset(inspect.signature(MetaLearner).parameters) - {
    "net", "prior", "likelihood", "method", "estimator", "inner_optimizer", "inner_steps"}


def prior_preconditioned(lr: float) -> PriorPreconditioned:
    """The ``"prior"`` inner optimiser: a proximal step of size ``lr`` on the weights (MAP) or
    the variational means, and a half Newton step on the prior term, bounded by 0.5, on the
    variational variance parameters ``ρ`` (see :class:`ibaml.optim.PriorPreconditioned`)."""
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


#: per-method defaults of :func:`build_learner` (see the module docstring)
PRESETS = {
    "maml": dict(inner_steps=5, inner_optimizer="sgd", include="all"),
    "anil": dict(inner_steps=5, inner_optimizer="sgd", include="head", inner_lr=0.02),
    "fomaml": dict(inner_steps=5, inner_optimizer="sgd", include="all"),
    "lazy": dict(inner_steps=10, inner_optimizer="sgd", include="all"),
    "imaml": dict(inner_steps=2, inner_optimizer="newton", include="head", precision=0.1),
    "ibaml": dict(inner_steps=10, inner_optimizer="newton", include="head", init_scale=1.0, kl_weight=1.0,
                  expectation="linearized", newton_max_rho_step=3.0, variance_start="fixed_point"),
    "abml": dict(inner_steps=10, inner_optimizer="prior", include="head", init_scale=1.0, kl_weight=1.0,
                 expectation="linearized"),
}


#: defaults that differ for a noise inferred per task (a :class:`TaskNoiseGaussianLikelihood`
#: with a :class:`ibaml.nets.NoiseHead`): the inner problem is no longer quadratic in the
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


#: defaults that differ with a prior over every weight (``include="all"``, the papers'
#: configuration; named recipes in :data:`RECIPES`). The inner problem is then non-convex and badly
#: scaled, so the presets spend what the implicit gradient makes cheap in memory: many inner
#: steps. iMAML-GD follows the paper's Omniglot recipe (λ = 2, 16–25 gradient steps) with Adam
#: (per-weight steps that do not depend on the scale of a learned noise or of the features),
#: iMAML-HF replaces them by Newton-CG steps (5 CG iterations) with a backtracking line search on
#: ``G`` (:class:`ibaml.optim.NewtonCG`, ``line_search``). iBaML and ABML over all weights follow
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

#: the full-network methods under their published names: ``build_learner(name, ...)`` is
#: ``build_learner(method, ..., **options)``, any option given explicitly taking precedence
RECIPES = {
    "imaml-gd": ("imaml", dict(include="all")),
    "imaml-hf": ("imaml", dict(include="all", inner_optimizer="hf", inner_steps=10)),
    "ibaml-all": ("ibaml", dict(include="all")),
    "abml-all": ("abml", dict(include="all")),
}


def hessian_free(cg_iters: int = 5, line_search: int = 6, damping: float = 0.0) -> NewtonCG:
    """The ``"hf"`` inner optimiser (iMAML-HF): Newton-CG steps with ``cg_iters`` CG iterations
    on Hessian-vector products and a backtracking line search over ``line_search`` step sizes
    ``1, 1/2, …`` (and 0) on the inner objective, so that every step decreases ``G``."""
    return NewtonCG(cg_iters=cg_iters, damping=damping, line_search=line_search)


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


def method_preset(method: str, include=None) -> dict:
    """The defaults of ``method`` (:data:`PRESETS`), with :data:`FULL_NETWORK`'s for a prior
    over every weight (``include="all"``, or the method's default where ``include`` is ``None``).

    >>> method_preset("imaml")["precision"], method_preset("imaml", "all")["precision"]
    (0.1, 2.0)
    """
    preset = dict(PRESETS[method])
    if (preset["include"] if include is None else include) == "all":
        preset.update(FULL_NETWORK.get(method, {}))
    return preset


def inner_steps(method: str, steps: Optional[int] = None, eval_steps: Optional[int] = None, include=None):
    """``(meta-training steps, evaluation steps)``: the ones given, else the method's
    (:func:`method_preset`; a name of :data:`RECIPES` included) and :data:`EVAL_STEPS_FACTOR`
    times those.

    >>> inner_steps("maml"), inner_steps("imaml", 5), inner_steps("maml", 3, 4), inner_steps("imaml-hf")
    ((5, 10), (5, 5), (3, 4), (10, 10))
    """
    method, recipe = resolve(method, {"include": include, "inner_steps": steps})
    steps = int(recipe.get("inner_steps") or method_preset(method, recipe.get("include"))["inner_steps"])
    return steps, int(eval_steps or EVAL_STEPS_FACTOR.get(method, 1) * steps)


def _noise_prior_scales(net: nn.Module, names, init_scale, noise_prior_scale: float):
    """``init_scale`` per tensor for a prior over a :class:`ibaml.nets.NoiseHead`: the log
    noise starts at ``noise_prior_scale`` (close to one noise shared by all tasks, which the
    meta-learned scale can widen), the weights at ``init_scale``."""
    keys = _head_only(net, names)
    if keys is None or keys.log_noise is None or isinstance(init_scale, dict):
        return init_scale
    scales = {k: float(init_scale) for k in keys if k is not None}
    scales[keys.log_noise] = noise_prior_scale
    return scales

#: defaults that differ for classification (a :class:`CategoricalLikelihood`): the exact MAP of
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


def _included(net: nn.Module, include):
    """``"head"`` → :func:`priors.last_layer`, ``"all"`` → every parameter, else as given."""
    if include == "head":
        return priors.last_layer(net)
    return None if include == "all" else include


def build_learner(method: str, net: nn.Module, likelihood: Likelihood, *, inner_steps: Optional[int] = None,
                  inner_lr: Optional[float] = None, inner_optimizer=None, cg_steps: int = 20,
                  cg_damping: float = 0.0, precision: Optional[float] = None, learn_precision: bool = False,
                  init_scale=None, kl_weight: Optional[float] = None, num_samples: Optional[int] = None,
                  include=None, antithetic: Optional[bool] = None, outer: str = "predictive",
                  num_outer_samples: int = 5, relative_scale: Optional[float] = None,
                  newton_prior_damping: Optional[float] = None, variance_param: Optional[str] = None,
                  expectation: Optional[str] = None, variance_start: Optional[str] = None,
                  prior: Optional[Prior] = None,
                  **learner_kwargs) -> MetaLearner:
    """A :class:`MetaLearner` for a named method (see the module tables). Every argument left
    at ``None`` takes the method's default from :data:`PRESETS`.

    Args:
        method: one of ``maml``, ``anil`` (MAML's inner loop on the head only), ``fomaml``,
            ``imaml``, ``abml``, ``ibaml``, ``lazy``.
        inner_steps: inner steps (Newton steps for ``"newton"``) during meta-training.
        inner_lr: inner learning rate for ``"sgd"`` and ``"prior"`` (default 0.002 — on the
            summed Gaussian NLL with unit noise over 10 points this is the usual MAML step of
            0.01 on the mean squared error) and ``"adam"`` (default 0.01).
        inner_optimizer: ``"sgd"``, ``"adam"``, ``"prior"`` (:class:`ibaml.optim.PriorPreconditioned`),
            ``"newton"`` (:class:`ibaml.optim.NewtonCG`), or an optimiser object.
        cg_steps, cg_damping: conjugate-gradient iterations and damping of the implicit
            meta-gradient (iMAML, iBaML; see the module docstring for the default 20).
        precision, learn_precision: iMAML's ``λ`` (default 0.1 on the head, 30 in classification) and whether it is
            meta-learned.
        init_scale: initial prior standard deviation (ABML, iBaML; default 1 on the head): a
            number or ``{tensor name: σ}``; ``relative_scale`` instead sets it per tensor to a
            fraction of the tensor's initial root-mean-square weight.
        kl_weight: ``β`` against the summed support NLL (ABML, iBaML; default 1).
        num_samples: reparameterised draws in the variational inner objective (default 8).
        antithetic: draws in pairs ``(ε, −ε)`` (default on for ABML and iBaML).
        outer: ``"predictive"`` or ``"elbo"`` (ABML's outer objective), see :class:`Variational`.
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
        learner_kwargs: passed to :class:`MetaLearner` (``meta_lr``, ``chunk_size``, ...).
    """
    unknown = sorted(set(learner_kwargs) - _PASSED_ON)
    if unknown:
        raise TypeError(f"build_learner got unknown option(s) {unknown}; MetaLearner options it passes on are "
                        f"{sorted(_PASSED_ON)}")
    method, recipe = resolve(method, dict(inner_steps=inner_steps, inner_optimizer=inner_optimizer, include=include))
    inner_steps, inner_optimizer, include = (recipe.get(k) for k in ("inner_steps", "inner_optimizer", "include"))
    given = dict(inner_steps=inner_steps, inner_optimizer=inner_optimizer, include=include, precision=precision,
                 init_scale=init_scale, kl_weight=kl_weight, num_samples=num_samples, antithetic=antithetic,
                 newton_prior_damping=newton_prior_damping)
    base = dict(precision=1.0, init_scale=1.0, kl_weight=1.0, num_samples=1, antithetic=False,
                newton_prior_damping=0.0)
    preset = method_preset(method, include)
    full_network = (include or preset["include"]) == "all" and method in FULL_NETWORK
    if isinstance(likelihood, CategoricalLikelihood) and not full_network:
        preset.update(CLASSIFICATION.get(method, {}))
    if isinstance(likelihood, TaskNoiseGaussianLikelihood) and not full_network:
        preset.update(TASK_NOISE.get(method, {}))
    opts = {k: (v if v is not None else preset.get(k, base.get(k))) for k, v in given.items()}
    include = _included(net, opts["include"])
    inner_optimizer = opts["inner_optimizer"]
    if inner_lr is None:
        inner_lr = preset.get("inner_lr", 0.01 if inner_optimizer == "adam" else 0.002)
    table = {"sgd": SGD, "adam": Adam, "prior": prior_preconditioned, "hf": lambda lr: hessian_free(),
             "newton": lambda lr: newton_cg(lr, prior_damping=opts["newton_prior_damping"],
                                            max_rho_step=preset.get("newton_max_rho_step", 1.0),
                                            max_mean_step=preset.get("newton_max_mean_step"))}
    if not isinstance(inner_optimizer, str):       # an optimiser object of one's own
        optimizer = inner_optimizer
    elif inner_optimizer not in table:
        raise ValueError(f"unknown inner optimizer {inner_optimizer!r}; expected one of {sorted(table)}")
    else:
        optimizer = table[inner_optimizer](lr=inner_lr)

    if prior is not None and not isinstance(prior, Prior):
        raise TypeError(f"prior must be a priors.Prior, got {type(prior).__name__}")
    if method in ("maml", "anil", "fomaml", "lazy"):
        default_prior = lambda: priors.Flat.from_module(net, include=include)
        inference = MAP()
    elif method == "imaml":
        default_prior = lambda: priors.IsotropicGaussian.from_module(net, include=include, precision=opts["precision"],
                                                                     learn_precision=learn_precision)
        inference = MAP()
    else:
        init_scale = opts["init_scale"]
        if "noise_prior_scale" in preset and relative_scale is None:
            init_scale = _noise_prior_scales(net, select_names(dict(net.named_parameters()), include), init_scale,
                                             preset["noise_prior_scale"])
        default_prior = lambda: priors.DiagonalGaussian.from_module(net, include=include, init_scale=init_scale,
                                                                    relative_scale=relative_scale)
        if expectation is None:   # the linearised expectation needs a prior over exactly a linear head
            names = (prior or default_prior()).names
            expectation = preset.get("expectation", "sampled") if _head_only(net, names) else "sampled"
        inference = Variational(beta=opts["kl_weight"], num_samples=opts["num_samples"],
                                num_outer_samples=num_outer_samples, antithetic=opts["antithetic"], outer=outer,
                                variance_param=variance_param or preset.get("variance_param", "softplus"),
                                expectation=expectation,
                                variance_start=variance_start or preset.get("variance_start", "prior"))
    if prior is None:
        prior = default_prior()

    if method in ("maml", "anil", "abml"):
        estimator = Explicit()
    elif method == "fomaml":
        estimator = FirstOrder()
    elif method == "lazy":
        estimator = Lazy() if isinstance(optimizer, SGD) else Lazy(teacher_lr=inner_lr)
    else:
        estimator = Implicit(solver=CG(max_iter=cg_steps, tol=1e-10, damping=cg_damping))
    return MetaLearner(net, prior, likelihood, method=inference, estimator=estimator, inner_optimizer=optimizer,
                       inner_steps=opts["inner_steps"], **learner_kwargs)
