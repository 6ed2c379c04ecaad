"""Named recipes: the published methods as combinations of prior, inference and estimator.

==========  ======================  ==============  =========================
method      prior                   inference       meta-gradient
==========  ======================  ==============  =========================
maml        flat (learned init)     MAP             explicit unrolled
fomaml      flat (learned init)     MAP             first-order
imaml       isotropic N(μ, λ⁻¹I)    MAP             implicit (CG)
abml        diagonal N(μ, σ²)       variational     explicit unrolled
ibaml       diagonal N(μ, σ²)       variational     implicit (CG)
lazy        flat (learned init)     MAP             lazy teacher–student
==========  ======================  ==============  =========================

Example
-------
>>> learner = build_learner("ibaml", MLP(1, (40, 40), 1), GaussianLikelihood(1.0, learn_noise=True))
"""

from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

import priors
from priors.base import Prior

from .hypergrad import Explicit, FirstOrder, Implicit, Lazy
from .inference import MAP, Variational
from .learner import MetaLearner
from .likelihoods import Likelihood
from .linalg import CG
from .optim import SGD, Adam, NewtonCG, PriorPreconditioned

METHODS = ("maml", "fomaml", "imaml", "abml", "ibaml", "lazy")
# MetaLearner arguments that build_learner does not set itself
_PASSED_ON = frozenset(inspect.signature(MetaLearner).parameters) - {
    "net", "prior", "likelihood", "method", "estimator", "inner_optimizer", "inner_steps"}


def prior_preconditioned(lr: float) -> PriorPreconditioned:
    """The ``"prior"`` inner optimiser: a proximal step of size ``lr`` on the weights (MAP) or
    the variational means, and a half Newton step on the prior term, bounded by 0.5, on the
    variational variance parameters ``ρ`` (see :class:`ibaml.optim.PriorPreconditioned`)."""
    return PriorPreconditioned(lr={"rho": float("inf")}, default_lr=lr, prior_step=0.5, max_step={"rho": 0.5})


def newton_cg(lr=None, cg_iters: int = 10) -> NewtonCG:
    """The ``"newton"`` inner optimiser: truncated Newton steps with ``cg_iters`` CG iterations,
    each variational variance parameter's step bounded by 1 (``lr`` is not used)."""
    return NewtonCG(cg_iters=cg_iters, max_step={"rho": 1.0})


def build_learner(method: str, net: nn.Module, likelihood: Likelihood, *, inner_steps: int = 10,
                  inner_lr: Optional[float] = None, inner_optimizer: Optional[str] = None, cg_steps: int = 5,
                  cg_damping: float = 0.0, precision: float = 100.0, learn_precision: bool = False,
                  init_scale: float = 0.1, kl_weight: float = 1.0, num_samples: int = 1, include=None,
                  antithetic: bool = False, outer: str = "predictive", num_outer_samples: int = 5,
                  relative_scale: Optional[float] = None,
                  prior: Optional[Prior] = None, **learner_kwargs) -> MetaLearner:
    """A :class:`MetaLearner` for a named method (see the module table).

    Args:
        method: one of ``maml``, ``fomaml``, ``imaml``, ``abml``, ``ibaml``, ``lazy``.
        inner_steps: inner steps during meta-training.
        inner_lr: inner learning rate (default 0.002 for SGD — on the summed Gaussian
            NLL with unit noise over 10 points this is the usual MAML step of 0.01 on the
            mean squared error — and 0.01 for Adam).
        inner_optimizer: ``"sgd"`` or ``"adam"`` (default: SGD for the methods that
            differentiate through the inner loop — MAML, FOMAML, ABML, lazy — as
            published, and because derivatives through many Adam steps overflow; Adam
            for iMAML and iBaML, whose implicit gradient needs the inner problem solved).
        cg_steps, cg_damping: conjugate-gradient iterations and damping (implicit methods).
        precision, learn_precision: iMAML's ``λ`` and whether it is meta-learned. The
            default ``λ = 100`` makes the few-shot inner problem strongly convex at the
            start (the data Hessian of an untrained sine network has eigenvalues near −50),
            so that 20 Adam steps solve it and the implicit gradient is right; the
            meta-gradient then lowers ``λ`` where the data allow it.
        init_scale: initial prior standard deviation (ABML, iBaML); 0.1 is precision 100,
            for the same reason.
        kl_weight: ``β`` (ABML, iBaML).
        num_samples: reparameterised draws in the variational inner objective.
        include: which network parameters get the prior (default all).
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
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if inner_optimizer is None:
        inner_optimizer = "sgd" if method in ("maml", "fomaml", "abml", "lazy") else "adam"
    if inner_lr is None:
        inner_lr = 0.01 if inner_optimizer == "adam" else 0.002
    table = {"sgd": SGD, "adam": Adam, "prior": prior_preconditioned, "newton": newton_cg}
    if not isinstance(inner_optimizer, str):       # an optimiser object of one's own
        optimizer = inner_optimizer
    elif inner_optimizer not in table:
        raise ValueError(f"unknown inner optimizer {inner_optimizer!r}; expected one of {sorted(table)}")
    else:
        optimizer = table[inner_optimizer](lr=inner_lr)

    if prior is not None and not isinstance(prior, Prior):
        raise TypeError(f"prior must be a priors.Prior, got {type(prior).__name__}")
    if method in ("maml", "fomaml", "lazy"):
        default_prior = lambda: priors.Flat.from_module(net, include=include)
        inference = MAP()
    elif method == "imaml":
        default_prior = lambda: priors.IsotropicGaussian.from_module(net, include=include, precision=precision,
                                                                     learn_precision=learn_precision)
        inference = MAP()
    else:
        default_prior = lambda: priors.DiagonalGaussian.from_module(net, include=include, init_scale=init_scale,
                                                                    relative_scale=relative_scale)
        inference = Variational(beta=kl_weight, num_samples=num_samples, num_outer_samples=num_outer_samples,
                                antithetic=antithetic, outer=outer)
    if prior is None:
        prior = default_prior()

    if method in ("maml", "abml"):
        estimator = Explicit()
    elif method == "fomaml":
        estimator = FirstOrder()
    elif method == "lazy":
        estimator = Lazy()
    else:
        estimator = Implicit(solver=CG(max_iter=cg_steps, tol=1e-10, damping=cg_damping))
    return MetaLearner(net, prior, likelihood, method=inference, estimator=estimator, inner_optimizer=optimizer,
                       inner_steps=inner_steps, **learner_kwargs)
