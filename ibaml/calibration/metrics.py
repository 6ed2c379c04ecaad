"""Accuracy and calibration metrics of predictive distributions, per task.

Regression (Gaussian predictive ``N(μ, v)`` per point; inputs ``[T, Q]``, outputs ``[T]``):

* ``mse = mean_q (y − μ)²``
* ``gaussian_nll = mean_q [½ log(2π v) + (y − μ)² / (2v)]``
* ``interval_coverage(level) = mean_q 1[|y − μ| ≤ z_{(1+level)/2} √v]``
* ``calibration_curve(levels)``: the coverage at each level ``[T, L]``;
  ``calibration_error = (1/L) Σ_l |cov(l) − l|``, levels 0.05, 0.10, …, 0.95
* ``crps_gaussian = mean_q σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``, ``z = (y − μ)/σ``
* a heavy-tailed predictive around ``μ`` with squared scale ``v`` (Student-t, log-normal scale
  mixture): ``tails=`` in the coverage functions; the families in :mod:`ibaml.calibration.tails`

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
:func:`ece_floor` measures it: the ECE that a calibrated predictive with the same confidences
shows on as many points, per task (``ece_floor``) and pooled (``ece_pooled_floor``); an ECE
minus its floor is the miscalibration that the finite test set does not explain.

Fits of a predictive's scale to held-out data (temperature scaling, the regression noise) are in
:mod:`ibaml.calibration.recalibration`.

Metrics are computed in float64 on the CPU, whatever the device and dtype of the inputs.

"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch
from torch import Tensor
DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))
REGRESSION_KEYS = ("mse", "nll", "coverage_50", "coverage_90", "coverage_95", "calibration_error", "crps")
CLASSIFICATION_KEYS = ("accuracy", "nll", "ece", "ece_pooled", "ece_floor", "ece_pooled_floor", "mce", "brier",
                       "confidence")

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


def central_quantile(levels, tails=None) -> Tensor:
    """``z_l`` with ``P(|Z| ≤ z_l) = l`` for ``Z`` the standardised predictive: standard normal
    (``tails=None``) or a heavy-tailed family of :mod:`ibaml.calibration.tails`, float64.

    >>> from ibaml.calibration.tails import StudentTTails
    >>> round(float(central_quantile(torch.tensor([0.9]))[0]), 3), round(float(central_quantile(torch.tensor([0.9]), StudentTTails(3.0))[0]), 3)
    (1.645, 2.353)
    """
    if tails is None:
        return _normal_quantile(0.5 + torch.as_tensor(levels, dtype=torch.float64) / 2)
    return tails.central_quantile(levels)


def _coverage(mu: Tensor, var: Tensor, y: Tensor, levels: Tensor, tails=None) -> Tensor:
    half_width = central_quantile(levels, tails) * var.sqrt().unsqueeze(-1)  # [T, Q, L]
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


def calibration_curve(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS, tails=None) -> Tensor:
    """Per-task observed coverage at each nominal level, ``[T, L]``:
    ``cov_t(l) = interval_coverage(μ_t, v_t, y_t, l)``. A calibrated predictive has
    ``E cov_t(l) = l`` (the diagonal). With ``tails`` (:mod:`ibaml.calibration.tails`) the
    predictive is that heavy-tailed family around ``μ`` with squared scale ``v``, and the
    intervals are ``μ ± z_l √v`` with its :func:`central_quantile`.

    >>> calibration_curve(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 2.0]]), [0.5, 0.99])
    tensor([[0., 1.]], dtype=torch.float64)
    """
    lv = _check_levels(levels)
    mu, var, y = _check_regression(mu, var, y)
    return _coverage(mu, var, y, lv, tails)


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


def pooled_calibration_error(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS,
                             tails=None) -> Dict[str, float]:
    """Coverage gap pooled over tasks, ``{"mean", "ci95"}`` (``tails``: as in :func:`calibration_curve`):

        CE = (1/L) Σ_l |ḡ_l|,   ḡ_l = (1/T) Σ_t (cov_t(l) − l),
        ci95 = (1/L) Σ_l 1.96 · std_t(cov_t(l)) / √T     (0 for one task)

    >>> mu, var = torch.zeros(2, 2), torch.ones(2, 2)
    >>> pooled_calibration_error(mu, var, torch.tensor([[0.1, 3.0], [0.2, 3.0]]), [0.5])["mean"]
    0.0
    """
    gaps = calibration_curve(mu, var, y, levels, tails) - _check_levels(levels)  # [T, L]
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


def _confidence_bins(confidence: Tensor, n_bins: int):
    """Each point's bin as a one-hot ``[T, Q, B]``, and per task and bin the count and the
    confidence sum, each ``[T, B]``."""
    onehot = torch.nn.functional.one_hot(_bin_index(confidence, n_bins), n_bins).double()
    return onehot, onehot.sum(-2), (onehot * confidence.unsqueeze(-1)).sum(-2)


def _binned(probs: Tensor, labels: Tensor, n_bins: int):
    """Per-task, per-bin count, confidence sum and correct count, each ``[T, B]``."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    onehot, count, conf_sum = _confidence_bins(confidence, n_bins)
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


def ece_floor(probs, n_bins: int = 15, num_draws: int = 100, seed: int = 0) -> Dict[str, object]:
    """The ECE of a calibrated predictive with the confidences of ``probs [T, Q, C]`` (consistency
    resampling, Bröcker & Smith 2007): with each point's correctness drawn as
    ``c_{t,q} ~ Bernoulli(max_c p_{t,q,c})``, so that ``acc(B) = conf(B)`` in expectation,
    ``floor = E_c[Σ_b (|B_b|/n) |acc_c(B_b) − conf(B_b)|]`` over ``num_draws`` draws (generator
    seeded with ``seed``). Returns ``{"per_task": [T], "pooled": {"mean", "ci95"}}``: the floor
    of :func:`ece` per task and of :func:`pooled_ece` (``ci95``: the Monte Carlo error,
    ``1.96 · std / √num_draws``).

    A predictive that is calibrated has ``E[ece] = floor``; the floor grows as the confidences
    spread over more bins and as the points per bin fall, whatever the calibration.

    >>> floor = ece_floor(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), n_bins=2, num_draws=10)
    >>> floor["per_task"]            # the sure point adds 0, the other ½ · |c − ½| = ¼ with c ∈ {0, 1}
    tensor([0.2500], dtype=torch.float64)
    """
    n_bins = _check_bins(n_bins)
    probs = _as_float64("probs", probs)
    if probs.dim() != 3:
        raise ValueError(f"probs must be [T, Q, C], got {tuple(probs.shape)}")
    if int(num_draws) < 1:
        raise ValueError(f"num_draws must be at least 1, got {num_draws}")
    confidence = probs.max(-1).values                                                   # [T, Q]
    onehot, count, conf_sum = _confidence_bins(confidence, n_bins)
    g = torch.Generator().manual_seed(int(seed))
    correct = (torch.rand((int(num_draws), *confidence.shape), generator=g, dtype=torch.float64) < confidence).double()
    acc_sum = torch.einsum("rtq,tqb->rtb", correct, onehot)                               # [R, T, B]
    per_task = ((acc_sum - conf_sum).abs().sum(-1) / count.sum(-1)).mean(0)
    pooled = (acc_sum.sum(1) - conf_sum.sum(0)).abs().sum(-1) / count.sum()               # [R]
    spread = float(pooled.std()) if pooled.numel() > 1 else 0.0
    return {"per_task": per_task,
            "pooled": {"mean": float(pooled.mean()), "ci95": 1.96 * spread / math.sqrt(pooled.numel())}}


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
    >>> bins["count"].tolist(), float(bins["accuracy"][1])
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
    {'mean': 2.0, 'ci95': 1.1316065276116665}
    """
    v = _as_float64("values", values).reshape(-1)
    if v.numel() == 0:
        raise ValueError("values must hold at least one number")
    ci = 0.0 if v.numel() == 1 else float(1.96 * v.std(unbiased=True) / math.sqrt(v.numel()))
    return {"mean": float(v.mean()), "ci95": ci}
