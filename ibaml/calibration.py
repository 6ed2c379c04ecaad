"""Accuracy and calibration of predictive distributions, per task, with reports and figures.

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
>>> g = torch.Generator().manual_seed(0)
>>> mu, var = torch.zeros(50, 20), torch.ones(50, 20)
>>> y = torch.randn(50, 20, generator=g)                 # drawn from the predictive itself
>>> report = CalibrationReport.regression(mu, var, y, name="oracle")
>>> abs(report.metrics["coverage_90"]["mean"] - 0.9) < 0.05
True
>>> fig = report.plot_calibration_curve()                # a matplotlib Figure; fig.savefig(...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))
REGRESSION_KEYS = ("mse", "nll", "coverage_50", "coverage_90", "coverage_95", "calibration_error", "crps")
CLASSIFICATION_KEYS = ("accuracy", "nll", "ece", "ece_pooled", "mce", "brier", "confidence")


# ----------------------------------------------------------------------------- checks
def _as_float64(name: str, t) -> Tensor:
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a tensor or array of numbers ({e})") from None
    if t.is_complex():
        raise ValueError(f"{name} must be real, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_pair(mu, y):
    mu, y = _as_float64("mu", mu), _as_float64("y", y)
    if mu.dim() != 2:
        raise ValueError(f"mu must have shape [tasks, points], got {tuple(mu.shape)}")
    if y.shape != mu.shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but mu has {tuple(mu.shape)}")
    return mu, y


def _check_regression(mu, var, y):
    mu, y = _check_pair(mu, y)
    var = _as_float64("var", var)
    if var.shape != mu.shape:
        raise ValueError(f"var has shape {tuple(var.shape)} but mu has {tuple(mu.shape)}")
    if (var <= 0).any():
        raise ValueError("var must be positive everywhere (a Gaussian predictive variance)")
    return mu, var, y


def _check_levels(levels) -> Tensor:
    lv = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if lv.numel() == 0 or not ((lv > 0) & (lv < 1)).all():
        raise ValueError(f"levels must be a non-empty sequence of numbers in (0, 1), got {levels!r}")
    return lv


def _check_classification(probs, labels, tol: float = 1e-3):
    probs = _as_float64("probs", probs)
    try:
        labels = torch.as_tensor(labels).detach().to("cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"labels must be a tensor or array of integers ({e})") from None
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape [tasks, points, classes], got {tuple(probs.shape)}")
    if labels.shape != probs.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but probs has {tuple(probs.shape[:2])} [tasks, points]")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if (labels < 0).any() or (labels >= probs.shape[-1]).any():
        raise ValueError(f"labels must lie in 0..{probs.shape[-1] - 1}")
    if (probs < 0).any():
        raise ValueError("probs must be non-negative (pass probabilities, not logits)")
    if ((probs.sum(-1) - 1).abs() > tol).any():
        raise ValueError(f"probs must sum to 1 over the last (class) dimension, within {tol}")
    return probs, labels.long()


def _check_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _normal_quantile(p) -> Tensor:
    """``Φ⁻¹(p) = √2 erfinv(2p − 1)`` (float64)."""
    return math.sqrt(2) * torch.erfinv(2 * torch.as_tensor(p, dtype=torch.float64) - 1)


# ----------------------------------------------------------------------------- regression
def mse(mu, y) -> Tensor:
    """Per-task mean squared error ``mean_q (y − μ)²``, ``[T]``.

    >>> mse(torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]))
    tensor([5.], dtype=torch.float64)
    """
    mu, y = _check_pair(mu, y)
    return ((y - mu) ** 2).mean(-1)


def gaussian_nll(mu, var, y) -> Tensor:
    """Per-task mean Gaussian negative log-likelihood ``[T]``:
    ``mean_q [½ log(2π v) + (y − μ)² / (2v)]``.

    >>> round(float(gaussian_nll(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1))), 4)  # ½ log 2π
    0.9189
    """
    mu, var, y = _check_regression(mu, var, y)
    return (0.5 * torch.log(2 * math.pi * var) + (y - mu) ** 2 / (2 * var)).mean(-1)


def _coverage(mu: Tensor, var: Tensor, y: Tensor, levels: Tensor) -> Tensor:
    half_width = _normal_quantile(0.5 + levels / 2) * var.sqrt().unsqueeze(-1)  # [T, Q, L]
    return ((y - mu).abs().unsqueeze(-1) <= half_width).double().mean(-2)  # [T, L]


def interval_coverage(mu, var, y, level: float) -> Tensor:
    """Per-task fraction of points inside the central ``level`` interval, ``[T]``:
    ``mean_q 1[|y − μ| ≤ z √v]`` with ``z = Φ⁻¹((1 + level)/2)`` (1.645 for 0.9).

    >>> interval_coverage(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 2.0]]), 0.9)
    tensor([0.5000], dtype=torch.float64)
    """
    try:
        ok = 0 < float(level) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    mu, var, y = _check_regression(mu, var, y)
    return _coverage(mu, var, y, torch.tensor([float(level)], dtype=torch.float64))[:, 0]


def calibration_curve(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS) -> Tensor:
    """Per-task observed coverage at each nominal level, ``[T, L]``:
    ``cov_t(l) = interval_coverage(μ_t, v_t, y_t, l)``. A calibrated predictive has
    ``E cov_t(l) = l`` (the diagonal).

    >>> calibration_curve(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 2.0]]), [0.5, 0.99])
    tensor([[0.0000, 1.0000]], dtype=torch.float64)
    """
    lv = _check_levels(levels)
    mu, var, y = _check_regression(mu, var, y)
    return _coverage(mu, var, y, lv)


def calibration_error(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS) -> Tensor:
    """Per-task mean absolute coverage gap, ``[T]``: ``CE_t = (1/L) Σ_l |cov_t(l) − l|``.

    With few query points per task ``cov_t(l)`` moves in steps of ``1/Q``, so even a perfectly
    calibrated predictive has ``CE_t > 0``; :func:`pooled_calibration_error` averages the
    coverages over tasks first and is the one the reports use.

    >>> calibration_error(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 2.0]]), [0.5, 0.9])
    tensor([0.4500], dtype=torch.float64)
    """
    lv = _check_levels(levels)
    mu, var, y = _check_regression(mu, var, y)
    return (_coverage(mu, var, y, lv) - lv).abs().mean(-1)


def pooled_calibration_error(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS) -> Dict[str, float]:
    """Coverage gap pooled over tasks, ``{"mean", "ci95"}``:

        CE = (1/L) Σ_l |ḡ_l|,   ḡ_l = (1/T) Σ_t (cov_t(l) − l),
        ci95 = (1/L) Σ_l 1.96 · std_t(cov_t(l)) / √T     (0 for one task)

    >>> mu, var = torch.zeros(2, 2), torch.ones(2, 2)
    >>> pooled_calibration_error(mu, var, torch.tensor([[0.1, 3.0], [0.2, 3.0]]), [0.5])["mean"]
    0.0
    """
    gaps = calibration_curve(mu, var, y, levels) - _check_levels(levels)  # [T, L]
    T = gaps.shape[0]
    spread = gaps.std(0, unbiased=True) if T > 1 else torch.zeros(gaps.shape[1], dtype=torch.float64)
    return {"mean": float(gaps.mean(0).abs().mean()), "ci95": float((1.96 * spread / math.sqrt(T)).mean())}


def crps_gaussian(mu, var, y) -> Tensor:
    """Per-task mean continuous ranked probability score of a Gaussian predictive, ``[T]``:

        CRPS(N(μ, σ²), y) = E|X − y| − ½ E|X − X'| = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π],  z = (y − μ)/σ

    (lower is better; it reduces to ``|y − μ|`` as ``σ → 0``).

    >>> round(float(crps_gaussian(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1))), 4)  # (√2 − 1)/√π
    0.2337
    """
    mu, var, y = _check_regression(mu, var, y)
    sigma = var.sqrt()
    z = (y - mu) / sigma
    pdf = torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return (sigma * (z * (2 * _normal_cdf(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).mean(-1)


# ----------------------------------------------------------------------------- classification
def accuracy(probs, labels) -> Tensor:
    """Per-task accuracy ``mean_q 1[argmax_c p_c = y]``, ``[T]``.

    >>> accuracy(torch.tensor([[[0.9, 0.1], [0.4, 0.6]]]), torch.tensor([[0, 0]]))
    tensor([0.5000], dtype=torch.float64)
    """
    probs, labels = _check_classification(probs, labels)
    return (probs.argmax(-1) == labels).double().mean(-1)


def nll(probs, labels, eps: float = 1e-12) -> Tensor:
    """Per-task negative log-likelihood ``−mean_q log max(p_y, eps)``, ``[T]`` (the cross
    entropy of the logits ``log p``).

    >>> nll(torch.tensor([[[0.5, 0.5]]]), torch.tensor([[1]]))   # log 2
    tensor([0.6931], dtype=torch.float64)
    """
    probs, labels = _check_classification(probs, labels)
    return -torch.log(probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).clamp(min=eps)).mean(-1)


def brier(probs, labels) -> Tensor:
    """Per-task Brier score ``mean_q Σ_c (p_c − 1[y = c])²``, ``[T]`` (0 is perfect, 2 the worst).

    >>> brier(torch.tensor([[[0.5, 0.5]]]), torch.tensor([[1]]))
    tensor([0.5000], dtype=torch.float64)
    """
    probs, labels = _check_classification(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return ((probs - onehot) ** 2).sum(-1).mean(-1)


def _bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    # bins ((b−1)/n, b/n]; a confidence of exactly 0 goes to the first bin
    return (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)


def _binned(probs: Tensor, labels: Tensor, n_bins: int):
    """Per-task, per-bin count, confidence sum and correct count, each ``[T, B]``."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    onehot = torch.nn.functional.one_hot(_bin_index(confidence, n_bins), n_bins).double()  # [T, Q, B]
    count = onehot.sum(-2)
    conf_sum = (onehot * confidence.unsqueeze(-1)).sum(-2)
    acc_sum = (onehot * correct.unsqueeze(-1)).sum(-2)
    return count, conf_sum, acc_sum


def _ece_mce(probs: Tensor, labels: Tensor, n_bins: int):
    count, conf_sum, acc_sum = _binned(probs, labels, n_bins)
    gap = (acc_sum - conf_sum).abs() / count.clamp(min=1)  # |acc(B) − conf(B)|, 0 for empty bins
    ece = (gap * count).sum(-1) / count.sum(-1)
    mce = gap.max(-1).values
    return ece, mce


def ece(probs, labels, n_bins: int = 15) -> Tensor:
    """Per-task expected calibration error, ``[T]``:
    ``ECE = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)|`` over ``n_bins`` equal-width bins of the
    top-class confidence ``max_c p_c`` (bins ``((b−1)/n_bins, b/n_bins]``).

    >>> ece(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]), torch.tensor([[0, 1]]), n_bins=2)  # |0.5 − 0.85|
    tensor([0.3500], dtype=torch.float64)
    """
    n_bins = _check_bins(n_bins)
    probs, labels = _check_classification(probs, labels)
    return _ece_mce(probs, labels, n_bins)[0]


def pooled_ece(probs, labels, n_bins: int = 15, num_bootstrap: int = 1000, seed: int = 0) -> Dict[str, float]:
    """ECE of all tasks' points pooled, ``{"mean", "ci95"}``:
    ``ECE = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)|`` with the bins ``B_b`` filled by every task's
    query points (``n = T·Q``); ``ci95`` is half the central 95% interval of ``num_bootstrap``
    resamplings of the tasks with replacement (generator seeded with ``seed``).

    Per task, a bin of ``m`` points has ``|acc − conf|`` of order ``√(acc (1 − acc)/m)`` even for
    a calibrated predictive, so the mean of per-task ECEs (:func:`ece`) measures that noise as
    much as the miscalibration; pooled, the noise falls as ``1/√(T Q)``.

    >>> round(pooled_ece(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]), torch.tensor([[0, 1]]), n_bins=2)["mean"], 6)
    0.35
    """
    n_bins = _check_bins(n_bins)
    probs, labels = _check_classification(probs, labels)
    count, conf_sum, acc_sum = _binned(probs, labels, n_bins)              # [T, B]

    def of(c, cs, a):   # sums over tasks [..., B] → ECE [...]
        return (a - cs).abs().sum(-1) / c.sum(-1)

    value = float(of(count.sum(0), conf_sum.sum(0), acc_sum.sum(0)))
    T = count.shape[0]
    if T < 2 or num_bootstrap < 1:
        return {"mean": value, "ci95": 0.0}
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(T, (int(num_bootstrap), T), generator=g)
    boot = of(count[idx].sum(1), conf_sum[idx].sum(1), acc_sum[idx].sum(1))
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {"mean": value, "ci95": (hi - lo) / 2}


def fit_logit_scale(outputs, labels, bounds=(0.05, 50.0)) -> float:
    """The logit scale that minimises the pooled NLL of held-out points (temperature scaling):
    ``τ* = argmin_τ −Σ_{t,n} log (1/S) Σ_s softmax(τ f_{t,s,n})_{y_{t,n}}`` for network outputs
    ``f [T, S, N, C]`` at ``S`` posterior draws (``S = 1`` for a point estimate) and labels
    ``[T, N]``; a bounded scalar search on ``log τ`` (:func:`scipy.optimize.minimize_scalar`).

    >>> f = torch.tensor([[[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]]])          # T = S = 1, N = 3
    >>> round(fit_logit_scale(f, torch.tensor([[0, 1, 1]])), 3)             # 2 of 3 right: p = 2/3
    0.347
    """
    from scipy.optimize import minimize_scalar

    f = _as_float64("outputs", outputs)
    y = torch.as_tensor(labels).long()
    if f.dim() != 4 or y.shape != (f.shape[0], f.shape[2]):
        raise ValueError(f"outputs must be [T, S, N, C] and labels [T, N], got {tuple(f.shape)} and {tuple(y.shape)}")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds!r}")
    index = y[:, None, :, None].expand(-1, f.shape[1], -1, 1)

    def nll(log_tau: float) -> float:
        logp = torch.log_softmax(math.exp(log_tau) * f, -1).gather(-1, index).squeeze(-1)   # [T, S, N]
        return float(-(torch.logsumexp(logp, 1) - math.log(f.shape[1])).sum())

    result = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-4})
    return math.exp(result.x)


def mce(probs, labels, n_bins: int = 15) -> Tensor:
    """Per-task maximum calibration error ``MCE = max_{b: B_b ≠ ∅} |acc(B_b) − conf(B_b)|``, ``[T]``.

    >>> mce(torch.tensor([[[0.9, 0.1], [0.6, 0.4]]]), torch.tensor([[0, 1]]), n_bins=10)  # bin of 0.6
    tensor([0.6000], dtype=torch.float64)
    """
    n_bins = _check_bins(n_bins)
    probs, labels = _check_classification(probs, labels)
    return _ece_mce(probs, labels, n_bins)[1]


def reliability_bins(probs, labels, n_bins: int = 15) -> Dict[str, np.ndarray]:
    """Confidence bins pooled over all tasks and points, for a reliability diagram:
    ``confidence`` (mean top-class probability in the bin), ``accuracy`` (fraction correct;
    both NaN where the bin is empty), ``count`` (points per bin, summing to ``T·Q``) and
    ``edges`` (``n_bins + 1`` bin edges from 0 to 1).

    >>> bins = reliability_bins(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]), torch.tensor([[0, 1]]), n_bins=2)
    >>> bins["count"].tolist(), bins["accuracy"][1]
    ([0, 2], 0.5)
    """
    n_bins = _check_bins(n_bins)
    probs, labels = _check_classification(probs, labels)
    count, conf_sum, acc_sum = (t[0] for t in _binned(probs.reshape(1, -1, probs.shape[-1]), labels.reshape(1, -1), n_bins))
    empty = count == 0
    nan = torch.full_like(count, float("nan"))
    return {"confidence": torch.where(empty, nan, conf_sum / count.clamp(min=1)).numpy(),
            "accuracy": torch.where(empty, nan, acc_sum / count.clamp(min=1)).numpy(),
            "count": count.numpy().astype(int),
            "edges": np.linspace(0, 1, n_bins + 1)}


def mean_ci95(values) -> Dict[str, float]:
    """Mean and 95% confidence half-width over tasks:
    ``{"mean": v̄, "ci95": 1.96 · std(v, ddof=1) / √T}`` (``ci95 = 0`` when ``T = 1``).

    >>> mean_ci95([1.0, 2.0, 3.0])
    {'mean': 2.0, 'ci95': 1.1315914696717467}
    """
    v = _as_float64("values", values).reshape(-1)
    if v.numel() == 0:
        raise ValueError("values must hold at least one number")
    ci = 0.0 if v.numel() == 1 else float(1.96 * v.std(unbiased=True) / math.sqrt(v.numel()))
    return {"mean": float(v.mean()), "ci95": ci}


# ----------------------------------------------------------------------------- report
def _jsonable(o):
    """NaN/Inf → None, numpy/tensors → lists, recursively (strict JSON)."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.ndarray, Tensor)):
        return _jsonable(np.asarray(o.detach().cpu() if isinstance(o, Tensor) else o).tolist())
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return str(o)


@dataclass
class CalibrationReport:
    """Metrics of one method on a set of tasks, each ``{"mean", "ci95"}`` over tasks, with the
    data behind the figures.

    Regression keys: ``mse``, ``nll``, ``coverage_50``, ``coverage_90``, ``coverage_95``,
    ``calibration_error`` (pooled, :func:`pooled_calibration_error`), ``crps``.
    Classification keys: ``accuracy``, ``nll``, ``ece``, ``mce``, ``brier`` and ``confidence``
    (the mean top-class probability: above ``accuracy`` an over-confident method, below it an
    under-confident one).

    Example
    -------
    >>> probs = torch.softmax(torch.randn(4, 10, 5, generator=torch.Generator().manual_seed(0)), -1)
    >>> rep = CalibrationReport.classification(probs, torch.zeros(4, 10, dtype=torch.long), name="net")
    >>> CalibrationReport.from_json(rep.to_json()).metrics == rep.metrics
    True
    >>> print(rep.to_markdown().splitlines()[0])
    | metric | net |
    """

    kind: str
    metrics: Dict[str, Dict[str, float]]
    name: str = ""
    curve: Optional[Dict[str, list]] = None
    bins: Optional[Dict[str, list]] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def regression(cls, mu, var, y, name: str = "", levels: Sequence[float] = DEFAULT_LEVELS,
                   extra: Optional[dict] = None) -> "CalibrationReport":
        """Report for Gaussian predictives ``N(mu, var)`` against targets ``y``, all ``[T, Q]``."""
        lv = _check_levels(levels)
        mu, var, y = _check_regression(mu, var, y)
        cov = _coverage(mu, var, y, torch.tensor([0.5, 0.9, 0.95], dtype=torch.float64))
        metrics = {
            "mse": mean_ci95(mse(mu, y)),
            "nll": mean_ci95(gaussian_nll(mu, var, y)),
            "coverage_50": mean_ci95(cov[:, 0]),
            "coverage_90": mean_ci95(cov[:, 1]),
            "coverage_95": mean_ci95(cov[:, 2]),
            "calibration_error": pooled_calibration_error(mu, var, y, levels),
            "crps": mean_ci95(crps_gaussian(mu, var, y)),
        }
        curve = _coverage(mu, var, y, lv).mean(0)
        return cls("regression", metrics, name, curve={"levels": lv.tolist(), "observed": curve.tolist()},
                   extra=dict(extra or {}))

    @classmethod
    def classification(cls, probs, labels, n_bins: int = 15, name: str = "",
                       extra: Optional[dict] = None) -> "CalibrationReport":
        """Report for class probabilities ``probs [T, Q, C]`` against ``labels [T, Q]``."""
        n_bins = _check_bins(n_bins)
        probs, labels = _check_classification(probs, labels)
        e, m = _ece_mce(probs, labels, n_bins)
        metrics = {
            "accuracy": mean_ci95(accuracy(probs, labels)),
            "nll": mean_ci95(nll(probs, labels)),
            "ece": mean_ci95(e),
            "ece_pooled": pooled_ece(probs, labels, n_bins),
            "mce": mean_ci95(m),
            "brier": mean_ci95(brier(probs, labels)),
            "confidence": mean_ci95(probs.max(-1).values.mean(-1)),
        }
        bins = {k: np.asarray(v).tolist() for k, v in reliability_bins(probs, labels, n_bins).items()}
        return cls("classification", metrics, name, bins=bins, extra=dict(extra or {}))

    # -- serialisation
    def to_dict(self) -> dict:
        """Plain data (NaN as ``None``): ``kind``, ``name``, ``metrics``, ``curve``, ``bins``, ``extra``."""
        return _jsonable({"kind": self.kind, "name": self.name, "metrics": self.metrics, "curve": self.curve,
                          "bins": self.bins, "extra": self.extra})

    def to_json(self) -> str:
        """Strict JSON of :meth:`to_dict` (read back with :meth:`from_json`)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationReport":
        """Inverse of :meth:`to_dict` (empty bins come back as NaN)."""
        try:
            kind, metrics = data["kind"], data["metrics"]
        except (KeyError, TypeError):
            raise ValueError("data must be a dict with at least 'kind' and 'metrics'") from None
        bins = data.get("bins")
        if bins is not None:
            bins = {k: [float("nan") if v is None else v for v in vals] for k, vals in bins.items()}
        return cls(kind, {k: dict(v) for k, v in metrics.items()}, data.get("name", ""), data.get("curve"), bins,
                   dict(data.get("extra") or {}))

    @classmethod
    def from_json(cls, text: str) -> "CalibrationReport":
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        """A two-column markdown table: ``| metric | mean ± ci95 |``."""
        lines = [f"| metric | {self.name or 'mean ± ci95'} |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in self.metrics.items()]
        return "\n".join(lines)

    # -- figures
    def plot_calibration_curve(self, ax=None):
        """Observed against nominal central-interval coverage (regression), with the diagonal.
        Returns the Figure (that of ``ax`` when given)."""
        if self.curve is None:
            raise ValueError("plot_calibration_curve needs a regression report (this one is "
                             f"{self.kind!r})")
        fig, ax = _figure_and_axes(ax, (4, 4))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        ax.plot(self.curve["levels"], self.curve["observed"], "o-", ms=3, label=self.name or "model")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("nominal coverage")
        ax.set_ylabel("observed coverage")
        err = self.metrics.get("calibration_error", {}).get("mean", float("nan"))
        ax.set_title(f"{self.name} calibration error {err:.3f}".strip())
        ax.legend(loc="upper left")
        return fig

    def plot_reliability_diagram(self, ax=None):
        """Accuracy per confidence bin as bars, the gap to the bin's mean confidence shaded, the
        diagonal, and in the title the ECE of these bins, ``Σ_b (n_b/n) |acc_b − conf_b|`` over
        all tasks' query points pooled (classification). Returns the Figure."""
        if self.bins is None:
            raise ValueError("plot_reliability_diagram needs a classification report (this one is "
                             f"{self.kind!r})")
        fig, ax = _figure_and_axes(ax, (4, 4))
        edges = np.asarray(self.bins["edges"], dtype=float)
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        count = np.asarray(self.bins["count"])
        acc = np.where(count > 0, np.asarray(self.bins["accuracy"], dtype=float), 0.0)
        conf = np.where(count > 0, np.asarray(self.bins["confidence"], dtype=float), centers)
        gap = np.where(count > 0, conf - acc, 0.0)
        ax.bar(centers, acc, width=width, edgecolor="k", alpha=0.8, label="accuracy")
        ax.bar(centers, gap, bottom=acc, width=width, color="tab:red", alpha=0.3, hatch="//", edgecolor="tab:red",
               label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        # the bars pool every task's query points, so the title gives the ECE of those same bins
        pooled_ece = float((count * np.abs(gap)).sum() / max(count.sum(), 1))
        ax.set_title(f"{self.name} ECE {pooled_ece:.3f} (pooled)".strip())
        ax.legend(loc="upper left")
        return fig


def _fmt(v: Dict[str, float]) -> str:
    return f"{v['mean']:.4f} ± {v['ci95']:.4f}"


def compare_markdown(reports: Dict[str, CalibrationReport], keys: Optional[Iterable[str]] = None) -> str:
    """One markdown table: a row per report, a column per metric, cells ``mean ± ci95``
    (``–`` where a report lacks the metric). ``keys`` default to the first report's metrics.

    >>> rep = CalibrationReport("regression", {"mse": {"mean": 0.5, "ci95": 0.1}})
    >>> print(compare_markdown({"a": rep}))
    | method | mse |
    |---|---|
    | a | 0.5000 ± 0.1000 |
    """
    if not reports:
        raise ValueError("reports must hold at least one report")
    keys = list(keys) if keys is not None else list(next(iter(reports.values())).metrics)
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, rep in reports.items():
        cells = [(_fmt(rep.metrics[k]) if k in rep.metrics else "–") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- predictive bands
def _figure_and_axes(ax, figsize):
    """A new Agg-backed Figure (outside pyplot's global state) unless ``ax`` is given."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot(1, 1, 1)


def _flat(name: str, t) -> np.ndarray:
    return _as_float64(name, t).reshape(-1).numpy()


def plot_predictive_bands(x_support, y_support, x_grid, mean, var, x_true=None, y_true=None, ax=None,
                          title=None, level: float = 0.9):
    """One regression task: predictive mean over ``x_grid``, the central ``level`` band
    ``mean ± z √var`` (``z = Φ⁻¹((1 + level)/2)``, 1.645 for the default 90%), the support
    points and, if given, the true curve ``(x_true, y_true)``. Returns the axes.

    >>> x = torch.linspace(-5, 5, 50)
    >>> ax = plot_predictive_bands(x[::10], torch.sin(x[::10]), x, torch.sin(x), torch.full((50,), 0.1))
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    x, m, v = _flat("x_grid", x_grid), _flat("mean", mean), _flat("var", var)
    if not len(x) == len(m) == len(v):
        raise ValueError(f"x_grid, mean and var must have as many points each, got {len(x)}, {len(m)}, {len(v)}")
    if (v < 0).any():
        raise ValueError("var must be non-negative")
    xs, ys = _flat("x_support", x_support), _flat("y_support", y_support)
    if len(xs) != len(ys):
        raise ValueError(f"x_support has {len(xs)} points but y_support has {len(ys)}")
    _, ax = _figure_and_axes(ax, (5, 3.5))
    order = np.argsort(x, kind="stable")
    x, m, s = x[order], m[order], np.sqrt(v[order])
    z = float(_normal_quantile(0.5 + level / 2))
    if x_true is not None and y_true is not None:
        xt, yt = _flat("x_true", x_true), _flat("y_true", y_true)
        if len(xt) != len(yt):
            raise ValueError(f"x_true has {len(xt)} points but y_true has {len(yt)}")
        o = np.argsort(xt, kind="stable")
        ax.plot(xt[o], yt[o], "k--", lw=1, label="truth")
    ax.plot(x, m, color="tab:blue", label="predictive mean")
    ax.fill_between(x, m - z * s, m + z * s, color="tab:blue", alpha=0.25, label=f"{level:.0%} interval")
    ax.scatter(xs, ys, color="tab:red", zorder=3, s=18, label="support")
    if title:
        ax.set_title(title)
    return ax


def plot_predictive_grid(x_support, y_support, x_grid, mean, var, x_true=None, y_true=None, title=None,
                         cols: int = 3, level: float = 0.9, titles: Optional[Sequence[str]] = None):
    """Several tasks in a grid of :func:`plot_predictive_bands` panels; returns the Figure.

    Per-task arguments have a leading task dimension: ``x_support, y_support [T, S]``,
    ``mean, var [T, G]``, ``y_true [T, G']``. ``x_grid`` and ``x_true`` are shared ``[G]`` or
    per task ``[T, G]``.

    >>> x = torch.linspace(-5, 5, 40)
    >>> fig = plot_predictive_grid(torch.zeros(4, 3), torch.zeros(4, 3), x, torch.zeros(4, 40), torch.ones(4, 40))
    """
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be a positive integer, got {cols!r}")
    mean_t = _as_float64("mean", mean)
    if mean_t.dim() < 2:
        raise ValueError(f"mean must have shape [tasks, grid points], got {tuple(mean_t.shape)}")
    n = mean_t.shape[0]
    for name, t in (("x_support", x_support), ("y_support", y_support), ("var", var), ("y_true", y_true)):
        if t is not None and len(t) != n:
            raise ValueError(f"{name} has {len(t)} tasks but mean has {n}")

    def per_task(t, i):
        if t is None:
            return None
        t = torch.as_tensor(t)
        return t[i] if t.dim() >= 2 and t.shape[0] == n else t

    from matplotlib.figure import Figure

    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        plot_predictive_bands(x_support[i], y_support[i], per_task(x_grid, i), mean_t[i], var[i],
                              x_true=per_task(x_true, i), y_true=None if y_true is None else y_true[i], ax=ax,
                              title=None if titles is None else titles[i], level=level)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
