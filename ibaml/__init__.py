"""ibaml: Bayesian meta-learning with generalized implicit gradients.

Learnable priors (package :mod:`priors`) over network weights, MAP or mean-field
variational task inference vmapped over tasks, and meta-gradients through the posterior
mode by the implicit function theorem (:func:`implicit_diff`), with explicit unrolled,
first-order and lazy estimators behind the same interface.

The packages, one concept each, calls going one way (data → core → train → calibration):

- :mod:`ibaml.core`: the per-task problem (likelihoods, task model, inference, inner loop,
  inner optimisers, linear solves, the implicit-function rule, meta-gradient estimators);
- :mod:`ibaml.train`: the trainer (:class:`MetaLearner`, ``fit``, evaluation, checkpoints,
  processes);
- :mod:`ibaml.recipes`: the named methods as data and :func:`build_learner`;
- :mod:`ibaml.calibration`, :mod:`ibaml.data`, :mod:`ibaml.baselines`: reports and
  recalibration, task sources and dataset files, the deep-kernel GP.
"""

from ibaml import calibration, core, data, recipes, train
from ibaml.core.conjugate_noise import ConjugateNoiseGaussianLikelihood
from ibaml.core.hypergrad import Explicit, FirstOrder, HypergradEstimator, Implicit
from ibaml.core.implicit_function import implicit_diff, implicit_vjp
from ibaml.core.inference import MAP, InferenceMethod, Variational
from ibaml.core.inner_loop import InnerLoop, TaskProblem
from ibaml.core.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood, TaskNoiseGaussianLikelihood
from ibaml.core.meta_problem import MetaProblem, Posterior
from ibaml.core.task_model import TaskModel
from ibaml.recipes.presets import METHODS, build_learner
from ibaml.train.learner import MetaLearner
from ibaml.train.nonfinite import NonFiniteError
from ibaml.train.training import fit

__version__ = "0.1.0"

__all__ = [
    "calibration", "core", "data", "recipes", "train",
    "implicit_diff", "implicit_vjp", "InferenceMethod", "MAP", "Variational", "InnerLoop", "TaskProblem", "MetaProblem",
    "HypergradEstimator", "Implicit", "Explicit", "FirstOrder", "MetaLearner", "NonFiniteError", "Posterior",
    "GaussianLikelihood", "ConjugateNoiseGaussianLikelihood", "TaskNoiseGaussianLikelihood", "CategoricalLikelihood",
    "Likelihood", "TaskModel", "build_learner", "METHODS", "fit",
]
