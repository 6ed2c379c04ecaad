"""Hypergradient estimators behind one interface (:class:`HypergradEstimator`):
implicit (CG / Neumann / dense solve), explicit unrolled, first-order, lazy teacher–student."""

from .base import HypergradEstimator, TaskGradient
from .explicit import Explicit
from .first_order import FirstOrder
from .implicit import Implicit
from .lazy import Lazy

__all__ = ["HypergradEstimator", "TaskGradient", "Implicit", "Explicit", "FirstOrder", "Lazy"]
