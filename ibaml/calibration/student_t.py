"""Scores of a Student-t predictive ``t_ν(μ, s²)`` per point (location ``μ``, squared scale
``s²``, ``ν`` degrees of freedom; inputs ``[T, Q]``, outputs ``[T]``, float64 on the CPU):

* ``student_t_nll = mean_q −log t_ν(y; μ, s²)``, with
  ``log t_ν(y; μ, s²) = log Γ((ν+1)/2) − log Γ(ν/2) − ½ log(νπ s²) − (ν+1)/2 · log(1 + z²/ν)``,
  ``z = (y − μ)/s``;
* ``crps_student_t = mean_q s · CRPS_ν(z)`` (``ν > 1``), the closed form of the standard
  Student-t's continuous ranked probability score

      CRPS_ν(z) = z (2F_ν(z) − 1) + 2 f_ν(z) (ν + z²)/(ν − 1) − 2√ν B(½, ν − ½) / ((ν − 1) B(½, ν/2)²)

  with ``F_ν``, ``f_ν`` its distribution and density functions and ``B`` the beta function.

Both tend to their Gaussian counterparts (:func:`ibaml.calibration.gaussian_nll`,
:func:`ibaml.calibration.crps_gaussian` with ``v = s²``) as ``ν → ∞``. The coverage of a
Student-t predictive is :func:`ibaml.calibration.calibration_curve` with
``tails=StudentTTails(ν)`` (:mod:`ibaml.calibration.tails`).

Example
-------
>>> mu, s2, y = torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1)
>>> round(float(student_t_nll(mu, s2, y, 1e6)), 4), round(float(crps_student_t(mu, s2, y, 1e6)), 4)   # Gaussian limits
(0.9189, 0.2337)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import betaln, stdtr
from torch import Tensor

from .metrics import _check_regression

__all__ = ["student_t_nll", "crps_student_t", "student_t_log_density"]


def _check_df(df, low: float = 0.0) -> float:
    try:
        value = float(df)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > low:
        raise ValueError(f"df must be a number above {low:g}, got {df!r}")
    return value


def student_t_log_density(squared_error: Tensor, scale2: Tensor, df) -> Tensor:
    """``log t_ν(e; 0, s²)`` elementwise from ``e²`` and ``s²`` (the module docstring's density);
    ``df`` a number or a tensor, so that it can be differentiated (the fit of ``ν``)."""
    nu = torch.as_tensor(df, dtype=scale2.dtype)
    return (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * torch.log(nu * math.pi)
            - 0.5 * torch.log(scale2) - (nu + 1) / 2 * torch.log1p(squared_error / (nu * scale2)))


def student_t_nll(mu, var, y, df: float) -> Tensor:
    """Per-task mean negative log-likelihood ``[T]`` of ``y`` under ``t_df(μ, var)`` (``var`` the
    squared scale; the module docstring gives the density).

    >>> round(float(student_t_nll(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), 1.0)), 4)  # Cauchy: log π
    1.1447
    """
    nu = _check_df(df)
    mu, var, y = _check_regression(mu, var, y)
    return -student_t_log_density((y - mu) ** 2, var, nu).mean(-1)


def crps_student_t(mu, var, y, df: float) -> Tensor:
    """Per-task mean CRPS ``[T]`` of ``t_df(μ, var)`` against ``y`` (``df > 1``; the closed form
    in the module docstring; lower is better).

    >>> round(float(crps_student_t(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), 3.0)), 4)
    0.2757
    """
    nu = _check_df(df, 1.0)
    mu, var, y = _check_regression(mu, var, y)
    s = var.sqrt()
    z_t = (y - mu) / s
    z = z_t.numpy()
    cdf = stdtr(nu, z)
    log_pdf = student_t_log_density(z_t ** 2, torch.ones_like(z_t), nu).numpy()
    constant = 2 * math.sqrt(nu) * math.exp(betaln(0.5, nu - 0.5) - 2 * betaln(0.5, nu / 2)) / (nu - 1)
    score = z * (2 * cdf - 1) + 2 * np.exp(log_pdf) * (nu + z ** 2) / (nu - 1) - constant
    return (s * torch.from_numpy(score)).mean(-1)
