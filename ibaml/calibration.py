"""Accuracy and calibration of predictive distributions, per task, with reports and figures.

Regression (Gaussian predictive ``N(μ, v)`` per point; inputs ``[T, Q]``):

* ``mse = mean (y − μ)²``
* ``gaussian_nll = mean [½ log(2π v) + (y − μ)² / (2v)]``
* ``interval_coverage(level)``: fraction of points with ``|y − μ| ≤ z_{(1+level)/2} √v``
* ``calibration_curve(levels)``: coverage at each level; ``calibration_error = mean_l |mean_t cov_t(l) − l|``
* ``crps_gaussian = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``, ``z = (y − μ)/σ``

Classification (probabilities ``[T, Q, C]``, labels ``[T, Q]``):

* ``accuracy``, ``nll = −mean log p_y``, ``brier = mean Σ_c (p_c − 1[y = c])²``
* ``ece = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)|`` and ``mce = max_b |acc(B_b) − conf(B_b)|``
  over equal-width confidence bins (``n_bins`` default 15)

Every metric but the calibration error is computed per task and reported as mean with a 95% confidence interval
over tasks (``1.96 · std / √T``).

Example
-------
>>> report = CalibrationReport.regression(mu, var, y, name="ibaml")
>>> print(report.to_markdown())
>>> report.plot_calibration_curve().savefig("calibration.png")
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


# ----------------------------------------------------------------------------- checks
def _as_float64(name: str, t) -> Tensor:
    t = torch.as_tensor(t).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_regression(mu, var, y):
    mu, var, y = _as_float64("mu", mu), _as_float64("var", var), _as_float64("y", y)
    if mu.dim() != 2:
        raise ValueError(f"mu must have shape [tasks, points], got {tuple(mu.shape)}")
    for name, t in (("var", var), ("y", y)):
        if t.shape != mu.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mu has {tuple(mu.shape)}")
    if (var <= 0).any():
        raise ValueError("var must be positive")
    return mu, var, y


def _check_classification(probs, labels):
    probs = _as_float64("probs", probs)
    labels = torch.as_tensor(labels).detach().to("cpu")
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape [tasks, points, classes], got {tuple(probs.shape)}")
    if labels.shape != probs.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but probs has {tuple(probs.shape[:2])} [tasks, points]")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if (labels < 0).any() or (labels >= probs.shape[-1]).any():
        raise ValueError(f"labels must lie in 0..{probs.shape[-1] - 1}")
    if (probs < 0).any():
        raise ValueError("probs must be non-negative")
    return probs, labels.long()


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _normal_quantile(p: float) -> float:
    return math.sqrt(2) * float(torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)))


# ----------------------------------------------------------------------------- regression
def mse(mu, y) -> Tensor:
    """Per-task mean squared error ``[T]``."""
    return ((_as_float64("y", y) - _as_float64("mu", mu)) ** 2).mean(-1)


def gaussian_nll(mu, var, y) -> Tensor:
    """Per-task mean Gaussian negative log-likelihood ``[T]``."""
    mu, var, y = _check_regression(mu, var, y)
    return (0.5 * torch.log(2 * math.pi * var) + (y - mu) ** 2 / (2 * var)).mean(-1)


def interval_coverage(mu, var, y, level: float) -> Tensor:
    """Per-task fraction of points inside the central ``level`` interval ``[T]``."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    mu, var, y = _check_regression(mu, var, y)
    half_width = _normal_quantile(0.5 + level / 2) * var.sqrt()
    return ((y - mu).abs() <= half_width).double().mean(-1)


def calibration_curve(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS) -> Tensor:
    """Per-task observed coverage at each nominal level ``[T, L]``."""
    return torch.stack([interval_coverage(mu, var, y, lvl) for lvl in levels], -1)


def calibration_error(mu, var, y, levels: Sequence[float] = DEFAULT_LEVELS) -> Dict[str, float]:
    """Gap between observed and nominal coverage, pooled over tasks:

        CE = (1/L) Σ_l |ḡ_l|,   ḡ_l = (1/T) Σ_t (cov_t(l) − l)

    (per-task curves of a few query points are too coarse to compare with the diagonal
    one by one). ``ci95 = (1/L) Σ_l 1.96 · std_t(cov_t(l)) / √T``.
    """
    gaps = calibration_curve(mu, var, y, levels) - torch.tensor(levels, dtype=torch.float64)  # [T, L]
    T = gaps.shape[0]
    spread = gaps.std(0, unbiased=True) if T > 1 else torch.zeros(gaps.shape[1], dtype=torch.float64)
    return {"mean": float(gaps.mean(0).abs().mean()), "ci95": float((1.96 * spread / math.sqrt(T)).mean())}


def crps_gaussian(mu, var, y) -> Tensor:
    """Per-task mean continuous ranked probability score of a Gaussian predictive ``[T]``."""
    mu, var, y = _check_regression(mu, var, y)
    sigma = var.sqrt()
    z = (y - mu) / sigma
    pdf = torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return (sigma * (z * (2 * _normal_cdf(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).mean(-1)


# ----------------------------------------------------------------------------- classification
def accuracy(probs, labels) -> Tensor:
    probs, labels = _check_classification(probs, labels)
    return (probs.argmax(-1) == labels).double().mean(-1)


def nll(probs, labels, eps: float = 1e-12) -> Tensor:
    """Per-task ``−mean log p_y`` (probabilities clamped at ``eps``)."""
    probs, labels = _check_classification(probs, labels)
    return -torch.log(probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).clamp(min=eps)).mean(-1)


def brier(probs, labels) -> Tensor:
    probs, labels = _check_classification(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return ((probs - onehot) ** 2).sum(-1).mean(-1)


def _bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    # bins (k/n, (k+1)/n]; confidence 0 goes to the first bin
    return (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)


def _ece_mce(probs: Tensor, labels: Tensor, n_bins: int):
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    bins = _bin_index(confidence, n_bins)
    onehot = torch.nn.functional.one_hot(bins, n_bins).double()  # [..., n, B]
    count = onehot.sum(-2)
    conf_sum = (onehot * confidence.unsqueeze(-1)).sum(-2)
    acc_sum = (onehot * correct.unsqueeze(-1)).sum(-2)
    gap = (acc_sum - conf_sum).abs() / count.clamp(min=1)
    ece = (gap * count).sum(-1) / count.sum(-1)
    mce = torch.where(count > 0, gap, torch.zeros_like(gap)).max(-1).values
    return ece, mce, count, conf_sum, acc_sum


def ece(probs, labels, n_bins: int = 15) -> Tensor:
    """Per-task expected calibration error ``[T]``."""
    probs, labels = _check_classification(probs, labels)
    return _ece_mce(probs, labels, n_bins)[0]


def mce(probs, labels, n_bins: int = 15) -> Tensor:
    """Per-task maximum calibration error ``[T]``."""
    probs, labels = _check_classification(probs, labels)
    return _ece_mce(probs, labels, n_bins)[1]


def reliability_bins(probs, labels, n_bins: int = 15) -> Dict[str, np.ndarray]:
    """Confidence bins pooled over tasks: ``confidence``, ``accuracy`` (NaN where empty),
    ``count`` per bin, and ``edges``."""
    probs, labels = _check_classification(probs, labels)
    _, _, count, conf_sum, acc_sum = _ece_mce(probs.reshape(1, -1, probs.shape[-1]), labels.reshape(1, -1), n_bins)
    count, conf_sum, acc_sum = count[0], conf_sum[0], acc_sum[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = (conf_sum / count).numpy()
        acc = (acc_sum / count).numpy()
    return {"confidence": conf, "accuracy": acc, "count": count.numpy().astype(int),
            "edges": np.linspace(0, 1, n_bins + 1)}


def mean_ci95(values) -> Dict[str, float]:
    """``{"mean": m, "ci95": 1.96 · std(ddof=1) / √T}`` (``ci95 = 0`` for one task)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    ci = 0.0 if v.numel() == 1 else float(1.96 * v.std(unbiased=True) / math.sqrt(v.numel()))
    return {"mean": float(v.mean()), "ci95": ci}


# ----------------------------------------------------------------------------- report
@dataclass
class CalibrationReport:
    """Metrics (each ``{"mean", "ci95"}`` over tasks) with the data behind the figures."""

    kind: str
    metrics: Dict[str, Dict[str, float]]
    name: str = ""
    curve: Optional[Dict[str, list]] = None
    bins: Optional[Dict[str, list]] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def regression(cls, mu, var, y, name: str = "", levels: Sequence[float] = DEFAULT_LEVELS,
                   extra: Optional[dict] = None) -> "CalibrationReport":
        mu, var, y = _check_regression(mu, var, y)
        metrics = {
            "mse": mean_ci95(mse(mu, y)),
            "nll": mean_ci95(gaussian_nll(mu, var, y)),
            "coverage_50": mean_ci95(interval_coverage(mu, var, y, 0.5)),
            "coverage_90": mean_ci95(interval_coverage(mu, var, y, 0.9)),
            "coverage_95": mean_ci95(interval_coverage(mu, var, y, 0.95)),
            "calibration_error": calibration_error(mu, var, y, levels),
            "crps": mean_ci95(crps_gaussian(mu, var, y)),
        }
        curve = calibration_curve(mu, var, y, levels).mean(0)
        return cls("regression", metrics, name, curve={"levels": list(levels), "observed": curve.tolist()},
                   extra=dict(extra or {}))

    @classmethod
    def classification(cls, probs, labels, n_bins: int = 15, name: str = "",
                       extra: Optional[dict] = None) -> "CalibrationReport":
        probs, labels = _check_classification(probs, labels)
        e, m, *_ = _ece_mce(probs, labels, n_bins)
        metrics = {
            "accuracy": mean_ci95(accuracy(probs, labels)),
            "nll": mean_ci95(nll(probs, labels)),
            "ece": mean_ci95(e),
            "mce": mean_ci95(m),
            "brier": mean_ci95(brier(probs, labels)),
        }
        bins = {k: np.asarray(v).tolist() for k, v in reliability_bins(probs, labels, n_bins).items()}
        return cls("classification", metrics, name, bins=bins, extra=dict(extra or {}))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "metrics": self.metrics, "curve": self.curve,
                "bins": self.bins, "extra": self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=lambda o: None if o != o else o)

    def to_markdown(self) -> str:
        lines = [f"| metric | {self.name or 'value'} |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in self.metrics.items()]
        return "\n".join(lines)

    def plot_calibration_curve(self, ax=None):
        """Observed against nominal central-interval coverage (regression)."""
        if self.curve is None:
            raise ValueError("plot_calibration_curve needs a regression report")
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        ax.plot(self.curve["levels"], self.curve["observed"], "o-", label=self.name or "model")
        ax.set_xlabel("nominal coverage")
        ax.set_ylabel("observed coverage")
        err = self.metrics["calibration_error"]["mean"]
        ax.set_title(f"calibration curve (error {err:.3f})")
        ax.legend()
        return fig if fig is not None else ax.figure

    def plot_reliability_diagram(self, ax=None):
        """Accuracy against confidence per bin, with the gap shaded (classification)."""
        if self.bins is None:
            raise ValueError("plot_reliability_diagram needs a classification report")
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(4, 4))
        edges = np.asarray(self.bins["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        acc = np.nan_to_num(np.asarray(self.bins["accuracy"], dtype=float))
        conf = np.asarray(self.bins["confidence"], dtype=float)
        conf = np.where(np.isnan(conf), centers, conf)
        ax.bar(centers, acc, width=width, edgecolor="k", alpha=0.8, label="accuracy")
        ax.bar(centers, conf - acc, bottom=acc, width=width, color="tab:red", alpha=0.3, hatch="//", label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{self.name} ECE {self.metrics['ece']['mean']:.3f}".strip())
        ax.legend(loc="upper left")
        return fig if fig is not None else ax.figure


def _fmt(v: Dict[str, float]) -> str:
    return f"{v['mean']:.4f} ± {v['ci95']:.4f}"


def compare_markdown(reports: Dict[str, CalibrationReport], keys: Optional[Iterable[str]] = None) -> str:
    """One markdown table: a row per report, a column per metric (``mean ± ci95``)."""
    if not reports:
        raise ValueError("compare_markdown needs at least one report")
    keys = list(keys) if keys is not None else list(next(iter(reports.values())).metrics)
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, rep in reports.items():
        cells = [(_fmt(rep.metrics[k]) if k in rep.metrics else "–") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- predictive bands
def plot_predictive_bands(x_support, y_support, x_grid, mean, var, x_true=None, y_true=None, ax=None,
                          title=None, level: float = 0.9):
    """One regression task: predictive mean, central ``level`` band, support points, true curve."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    x = np.asarray(torch.as_tensor(x_grid).detach().cpu()).reshape(-1)
    m = np.asarray(torch.as_tensor(mean).detach().cpu()).reshape(-1)
    s = np.sqrt(np.asarray(torch.as_tensor(var).detach().cpu()).reshape(-1))
    z = _normal_quantile(0.5 + level / 2)
    if x_true is not None and y_true is not None:
        ax.plot(np.asarray(torch.as_tensor(x_true).cpu()).reshape(-1), np.asarray(torch.as_tensor(y_true).cpu()).reshape(-1),
                "k--", lw=1, label="truth")
    ax.plot(x, m, color="tab:blue", label="predictive mean")
    ax.fill_between(x, m - z * s, m + z * s, color="tab:blue", alpha=0.25, label=f"{int(level * 100)}% interval")
    ax.scatter(np.asarray(torch.as_tensor(x_support).cpu()).reshape(-1),
               np.asarray(torch.as_tensor(y_support).cpu()).reshape(-1), color="tab:red", zorder=3, s=18, label="support")
    if title:
        ax.set_title(title)
    return ax


def plot_predictive_grid(x_support, y_support, x_grid, mean, var, x_true=None, y_true=None, title=None, cols: int = 3):
    """Several tasks (leading dimension) in a grid of :func:`plot_predictive_bands` panels."""
    import matplotlib.pyplot as plt

    n = len(mean)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        plot_predictive_bands(x_support[i], y_support[i], x_grid, mean[i], var[i],
                              x_true=None if x_true is None else x_true,
                              y_true=None if y_true is None else y_true[i], ax=ax)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
