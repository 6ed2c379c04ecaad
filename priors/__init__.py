"""Learnable priors over network weights, as Pyro modules.

Families: :class:`IsotropicGaussian` (iMAML), :class:`DiagonalGaussian` (iBaML),
:class:`LayerwiseGaussian`, :class:`LowRankGaussian`, and the heavy-tailed
:class:`StudentT`. Write your own by subclassing :class:`Prior` (see its docstring).
"""

from .base import LocalPyroModule, Prior, last_layer, select_names
from .gaussian import (DiagonalGaussian, GaussianHyperprior, IsotropicGaussian, LayerwiseGaussian,
                       LowRankGaussian)
from .flat import Flat
from .student_t import StudentT

__all__ = ["Prior", "LocalPyroModule", "last_layer", "select_names", "IsotropicGaussian", "DiagonalGaussian", "LayerwiseGaussian",
           "LowRankGaussian", "GaussianHyperprior", "StudentT", "Flat"]
