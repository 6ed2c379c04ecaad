"""Hypergradient estimators behind one interface (:class:`HypergradEstimator`):
implicit (CG / Neumann / dense solve), explicit unrolled, first-order, lazy teacher–student."""

from ibaml.core.hypergrad.base import HypergradEstimator, TaskGradient
from ibaml.core.hypergrad.explicit import Explicit
from ibaml.core.hypergrad.first_order import FirstOrder
from ibaml.core.hypergrad.implicit import Implicit
from ibaml.core.hypergrad.lazy import Lazy

__all__ = ["HypergradEstimator", "TaskGradient", "Implicit", "Explicit", "FirstOrder", "Lazy"]
