"""Task data: the sine family, image-classification loaders and the episodic sampler."""

from .sine import SineTaskDistribution
from .tasks import TaskBatch
from .episodes import DatasetError, EpisodeSampler, ImageClassDataset, IMAGENET_MEAN, IMAGENET_STD
from .miniimagenet import load_miniimagenet, load_miniimagenet_splits
from .omniglot import load_omniglot, omniglot_split
from .fixtures import write_miniimagenet_fixture, write_omniglot_fixture
from .splits import load_splits, write_fixture

__all__ = ["SineTaskDistribution", "TaskBatch", "DatasetError", "EpisodeSampler", "ImageClassDataset",
           "IMAGENET_MEAN", "IMAGENET_STD", "load_miniimagenet", "load_miniimagenet_splits", "load_omniglot",
           "omniglot_split", "write_miniimagenet_fixture", "write_omniglot_fixture", "load_splits", "write_fixture"]
