"""The named methods as data and their assembly.

- :mod:`~ibaml.recipes.recipe`: :class:`Recipe` (prior, inference, estimator, inner optimiser,
  steps, scope) and the builders of each part.
- :mod:`~ibaml.recipes.presets`: one recipe per method, the classification, per-task-noise and
  full-network variants, and :func:`build_learner`.
- :mod:`~ibaml.recipes.noise_presets`: the observation-noise model of each regression method.
- :mod:`~ibaml.recipes.sine_presets`, :mod:`~ibaml.recipes.image_presets`: the networks and
  run settings of the sine and image examples, for scripts that reproduce their runs (imported
  by name: the sine one brings in GPyTorch for its deep-kernel baseline).
"""

from ibaml.recipes import noise_presets, presets, recipe
from ibaml.recipes.noise_presets import (NOISE_MODELS, NOISE_PRIOR_COUNT, REGRESSION_NOISE, noise_prior_count,
                                         regression_likelihood)
from ibaml.recipes.presets import (CLASSIFICATION, FULL_NETWORK, METHOD_RECIPES, METHODS, RECIPES, TASK_NOISE,
                                   build_learner)
from ibaml.recipes.recipe import (ESTIMATORS, INNER_OPTIMIZERS, PRIOR_FAMILIES, Recipe, build_estimator,
                                  build_inference, build_inner_optimizer, build_prior, build_scope, hessian_free,
                                  newton_cg, prior_preconditioned)

__all__ = ["noise_presets", "presets", "recipe",
           "NOISE_MODELS", "NOISE_PRIOR_COUNT", "REGRESSION_NOISE", "noise_prior_count", "regression_likelihood",
           "CLASSIFICATION", "FULL_NETWORK", "METHOD_RECIPES", "METHODS", "RECIPES", "TASK_NOISE", "build_learner",
           "ESTIMATORS", "INNER_OPTIMIZERS", "PRIOR_FAMILIES", "Recipe", "build_estimator", "build_inference",
           "build_inner_optimizer", "build_prior", "build_scope", "hessian_free", "newton_cg", "prior_preconditioned"]
