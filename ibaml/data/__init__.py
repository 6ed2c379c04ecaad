"""Task data: the sine family, image-classification loaders and the episodic sampler."""

from .sine import SineTaskDistribution
from .tasks import TaskBatch

__all__ = ["SineTaskDistribution", "TaskBatch"]
