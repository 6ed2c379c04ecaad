"""ibaml: Bayesian meta-learning with generalized implicit gradients.

Learnable priors (package :mod:`priors`) over network weights, MAP or mean-field
variational task inference vmapped over tasks (:mod:`ibaml.inference`), and
meta-gradients through the posterior mode by the implicit function theorem
(:func:`implicit_diff`, :mod:`ibaml.hypergrad`), with explicit unrolled and
first-order estimators behind the same interface.
"""

from . import evaluation, linalg, meta_update, nets, optim, training
from .hypergrad import Explicit, FirstOrder, HypergradEstimator, Implicit
from .implicit_function import implicit_diff, implicit_vjp
from .inference import MAP, InferenceMethod, Variational
from .inner_loop import InnerLoop, TaskProblem
from .learner import MetaLearner
from .meta_problem import MetaProblem, Posterior
from .nonfinite import NonFiniteError
from .likelihoods import (CategoricalLikelihood, GaussianLikelihood, Likelihood,
                          TaskNoiseGaussianLikelihood)
from .conjugate_noise import ConjugateNoiseGaussianLikelihood
from .task_model import TaskModel
from .presets import METHODS, build_learner

__version__ = "0.1.0"

__all__ = [
    "linalg", "nets", "optim", "training", "meta_update", "evaluation",
    "implicit_diff", "implicit_vjp", "InferenceMethod", "MAP", "Variational", "InnerLoop", "TaskProblem", "MetaProblem",
    "HypergradEstimator", "Implicit", "Explicit", "FirstOrder", "MetaLearner", "NonFiniteError", "Posterior",
    "GaussianLikelihood", "ConjugateNoiseGaussianLikelihood", "TaskNoiseGaussianLikelihood", "CategoricalLikelihood", "Likelihood", "TaskModel", "build_learner", "METHODS",
]
