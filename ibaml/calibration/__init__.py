"""Accuracy and calibration of predictive distributions, per task, with reports and figures.

Modules: :mod:`.metrics` (the formulas below), :mod:`.student_t` (NLL and CRPS of a
Student-t predictive), :mod:`.tails` (heavy-tailed predictive families for the reports), :mod:`.report` (:class:`CalibrationReport`, :func:`compare_markdown`),
:mod:`.plots` (predictive bands), :mod:`.recalibration` (scales fitted to held-out data).

The formulas are in :mod:`ibaml.calibration.metrics`: per-task regression metrics (MSE,
Gaussian NLL, interval coverage, calibration curve and error, CRPS) and classification
metrics (accuracy, NLL, Brier, ECE, MCE, pooled ECE), each summarised as mean ± 95% CI over
tasks; :func:`fit_logit_scale` (temperature scaling), :func:`fit_variance_scale` (its regression analogue) and :func:`fit_linear_noise_ratio` are in
:mod:`ibaml.calibration.recalibration`.

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
                      crps_gaussian, accuracy, nll, brier, ece, pooled_ece, ece_floor, mce,
                      reliability_bins, mean_ci95, central_quantile)
from .recalibration import (fit_linear_noise_ratio, fit_linear_noise_ratio_lognormal,
                            fit_linear_noise_ratio_student_t, fit_logit_scale, fit_variance_scale,
                            fit_variance_scale_and_tails, refit_noise_prior, fit_variance_bins,
                            fit_variance_power, VarianceBinScale, VariancePowerScale)
from .student_t import crps_student_t, student_t_nll
from .tails import LogNormalScale, StudentTTails
from .plots import plot_predictive_bands, plot_predictive_grid
from .report import CalibrationReport, compare_markdown, recalibrated_metrics

__all__ = ['CLASSIFICATION_KEYS', 'DEFAULT_LEVELS', 'REGRESSION_KEYS', 'mse', 'gaussian_nll', 'interval_coverage', 'calibration_curve', 'calibration_error', 'pooled_calibration_error', 'crps_gaussian', 'accuracy', 'nll', 'brier', 'ece', 'pooled_ece', 'ece_floor', 'fit_logit_scale', 'fit_variance_scale', 'fit_variance_scale_and_tails', 'fit_variance_bins', 'VarianceBinScale', 'fit_variance_power', 'VariancePowerScale', 'refit_noise_prior', 'mce', 'reliability_bins', 'mean_ci95', 'fit_linear_noise_ratio', 'fit_linear_noise_ratio_student_t', 'fit_linear_noise_ratio_lognormal', 'StudentTTails', 'LogNormalScale', 'student_t_nll', 'crps_student_t', 'central_quantile', 'plot_predictive_bands', 'plot_predictive_grid', 'CalibrationReport', 'compare_markdown', 'recalibrated_metrics']
