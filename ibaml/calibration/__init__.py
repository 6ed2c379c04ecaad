"""Accuracy and calibration of predictive distributions, per task, with reports and figures.

Modules: :mod:`.metrics` (the formulas below), :mod:`.report` (:class:`CalibrationReport`,
:func:`compare_markdown`), :mod:`.plots` (predictive bands).

Regression (Gaussian predictive ``N(μ, v)`` per point; inputs ``[T, Q]``, outputs ``[T]``):

* ``mse = mean_q (y − μ)²``
* ``gaussian_nll = mean_q [½ log(2π v) + (y − μ)² / (2v)]``
* ``interval_coverage(level) = mean_q 1[|y − μ| ≤ z_{(1+level)/2} √v]``
* ``calibration_curve(levels)``: the coverage at each level ``[T, L]``;
  ``calibration_error = (1/L) Σ_l |cov(l) − l|``, levels 0.05, 0.10, …, 0.95
* ``crps_gaussian = mean_q σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``, ``z = (y − μ)/σ``

Classification (probabilities ``[T, Q, C]``, integer labels ``[T, Q]``, outputs ``[T]``):

* ``accuracy = mean_q 1[argmax p = y]``, ``nll = −mean_q log p_y``,
  ``brier = mean_q Σ_c (p_c − 1[y = c])²``
* ``ece = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)|`` and ``mce = max_{b: B_b ≠ ∅} |acc(B_b) − conf(B_b)|``
  over equal-width confidence bins ``((b−1)/n_bins, b/n_bins]`` (``n_bins`` default 15)

Every metric is computed per task and summarised as ``mean ± 1.96 · std / √T`` over tasks
(:func:`mean_ci95`). In a :class:`CalibrationReport`, ``calibration_error`` is the pooled
version (:func:`pooled_calibration_error`): a task of ten query points has coverages in steps of
0.1, too coarse to compare with the diagonal task by task. For the same reason a report also
gives ``ece_pooled`` (:func:`pooled_ece`), the ECE of all tasks' query points together (its
usual definition over a test set): the ECE of one task's few points is dominated by the
binomial noise of its bins, so a perfectly calibrated predictive has a per-task ECE well
above zero, and that floor falls as the accuracy rises (the bins fill near confidence 1).

:func:`fit_logit_scale` fits a softmax's logit scale to held-out data (temperature scaling).

Metrics are computed in float64 on the CPU, whatever the device and dtype of the inputs.

Example
-------
>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> mu, var = torch.zeros(50, 20), torch.ones(50, 20)
>>> y = torch.randn(50, 20, generator=g)                 # drawn from the predictive itself
>>> report = CalibrationReport.regression(mu, var, y, name="oracle")
>>> abs(report.metrics["coverage_90"]["mean"] - 0.9) < 0.05
True
>>> fig = report.plot_calibration_curve()                # a matplotlib Figure; fig.savefig(...)
"""

from .metrics import (CLASSIFICATION_KEYS, DEFAULT_LEVELS, REGRESSION_KEYS, mse, gaussian_nll,
                      interval_coverage, calibration_curve, calibration_error, pooled_calibration_error,
                      crps_gaussian, accuracy, nll, brier, ece, pooled_ece, fit_logit_scale, mce,
                      reliability_bins, mean_ci95)
from .plots import plot_predictive_bands, plot_predictive_grid
from .report import CalibrationReport, compare_markdown

__all__ = ['CLASSIFICATION_KEYS', 'DEFAULT_LEVELS', 'REGRESSION_KEYS', 'mse', 'gaussian_nll', 'interval_coverage', 'calibration_curve', 'calibration_error', 'pooled_calibration_error', 'crps_gaussian', 'accuracy', 'nll', 'brier', 'ece', 'pooled_ece', 'fit_logit_scale', 'mce', 'reliability_bins', 'mean_ci95', 'plot_predictive_bands', 'plot_predictive_grid', 'CalibrationReport', 'compare_markdown']
