"""Meta-training: the trainer and what it owns.

- :mod:`~ibaml.train.learner`: :class:`~ibaml.train.learner.MetaLearner`, which holds the meta-optimiser,
  the step and skip counters and the generator, and calls the per-task problem
  (:mod:`ibaml.core.meta_problem`), never the reverse.
- :mod:`~ibaml.train.meta_update`: one meta-step from per-task meta-gradients (averaging,
  all-reduce, the non-finite policy).
- :mod:`~ibaml.train.evaluation`: chunked evaluation and calibration reports.
- :mod:`~ibaml.train.training`: ``fit`` (validation, checkpoints, resume, progress).
- :mod:`~ibaml.train.checkpoint`, :mod:`~ibaml.train.distributed`, :mod:`~ibaml.train.progress`,
  :mod:`~ibaml.train.nonfinite`: atomic checkpoints, process groups, progress lines, non-finite
  values named by cause.
"""

from ibaml.train import (checkpoint, distributed, evaluation, learner, meta_update, nonfinite, progress,
                         training)

__all__ = ["checkpoint", "distributed", "evaluation", "learner", "meta_update", "nonfinite", "progress", "training"]
