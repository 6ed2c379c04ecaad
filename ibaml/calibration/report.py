"""``CalibrationReport``: the metrics of one method on a set of tasks as numbers, markdown,
JSON and figures (calibration curve, reliability diagram)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .metrics import (DEFAULT_LEVELS, _check_bins, _check_classification, _check_levels, _check_regression,
                      _coverage, _ece_mce, accuracy, brier, calibration_error, crps_gaussian, ece,
                      ece_floor, gaussian_nll, mce, mean_ci95, mse, nll, pooled_calibration_error, pooled_ece,
                      reliability_bins)
from .plots import _figure_and_axes
from .recalibration import fit_variance_scale, fit_variance_scale_and_tails
from .tails import describe


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
                   extra: Optional[dict] = None, tails=None) -> "CalibrationReport":
        """Report for Gaussian predictives ``N(mu, var)`` against targets ``y``, all ``[T, Q]``;
        with ``tails`` (a family of :mod:`ibaml.calibration.tails`, such as ``StudentTTails(df)`` or
        ``LogNormalScale(sd)``), for that heavy-tailed predictive around ``mu`` with squared
        scale ``var``: its NLL, coverage and CRPS (and ``extra["tails"]`` describing it)."""
        lv = _check_levels(levels)
        mu, var, y = _check_regression(mu, var, y)
        cov = _coverage(mu, var, y, torch.tensor([0.5, 0.9, 0.95], dtype=torch.float64), tails)
        metrics = {
            "mse": mean_ci95(mse(mu, y)),
            "nll": mean_ci95(gaussian_nll(mu, var, y) if tails is None else tails.nll(mu, var, y)),
            "coverage_50": mean_ci95(cov[:, 0]),
            "coverage_90": mean_ci95(cov[:, 1]),
            "coverage_95": mean_ci95(cov[:, 2]),
            "calibration_error": pooled_calibration_error(mu, var, y, levels, tails),
            "crps": mean_ci95(crps_gaussian(mu, var, y) if tails is None else tails.crps(mu, var, y)),
        }
        curve = _coverage(mu, var, y, lv, tails).mean(0)
        extra = dict(extra or {}, **({} if tails is None else {"tails": describe(tails)}))
        return cls("regression", metrics, name, curve={"levels": lv.tolist(), "observed": curve.tolist()},
                   extra=extra)

    @classmethod
    def from_logits(cls, outputs, labels, scale: float = 1.0, name: str = "") -> "CalibrationReport":
        """The classification report of network outputs ``f [T, S, N, C]`` at ``S`` posterior
        draws under the logit scale ``τ``: class probabilities ``(1/S) Σ_s softmax(τ f_s)``, as
        :meth:`ibaml.MetaLearner.predict` forms them, against ``labels [T, N]``. With the ``τ``
        of :func:`ibaml.calibration.fit_logit_scale` this is the temperature-scaled report."""
        return cls.classification(torch.softmax(scale * torch.as_tensor(outputs), dim=-1).mean(1), labels, name=name)

    @classmethod
    def classification(cls, probs, labels, n_bins: int = 15, name: str = "",
                       extra: Optional[dict] = None) -> "CalibrationReport":
        """Report for class probabilities ``probs [T, Q, C]`` against ``labels [T, Q]``."""
        n_bins = _check_bins(n_bins)
        probs, labels = _check_classification(probs, labels)
        e, m = _ece_mce(probs, labels, n_bins)
        floor = ece_floor(probs, n_bins)
        metrics = {
            "accuracy": mean_ci95(accuracy(probs, labels)),
            "nll": mean_ci95(nll(probs, labels)),
            "ece": mean_ci95(e),
            "ece_pooled": pooled_ece(probs, labels, n_bins),
            "ece_floor": mean_ci95(floor["per_task"]),
            "ece_pooled_floor": floor["pooled"],
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


def recalibrated_metrics(held_out, evaluated: Dict[str, tuple], family: Optional[str] = None, tails=None) -> dict:
    """A regression predictive recalibrated on held-out points and scored elsewhere: the factor
    ``c`` on the variance (:func:`ibaml.calibration.fit_variance_scale`, the model's own
    ``tails`` shape kept) or, with ``family`` (``"student_t"``, ``"lognormal"``), the factor and
    that family's shape fitted together (:func:`ibaml.calibration.fit_variance_scale_and_tails`).

    ``held_out`` and each value of ``evaluated`` (``{name: (μ, v, y)}``) are ``[T, N]``. Returns
    the metrics of ``N(μ, c v)`` (or of the family) on the first evaluated set at the top level
    and on each other set under its name, with ``variance_scale``, ``tails`` (the shape's
    description, ``None`` for the Gaussian) and ``validation_nll`` (the held-out NLL at the fit).

    >>> g = torch.Generator().manual_seed(0)
    >>> mu, var = torch.zeros(100, 5), torch.ones(100, 5)
    >>> held_out, test = [(mu, var, 2 * torch.randn(100, 5, generator=g)) for _ in range(2)]
    >>> fitted = recalibrated_metrics(held_out, {"test": test})
    >>> 3.5 < fitted["variance_scale"] < 4.5, abs(fitted["coverage_90"]["mean"] - 0.9) < 0.05
    (True, True)
    """
    if family is None:
        scale, shape = fit_variance_scale(*held_out, tails=tails), tails
    else:
        scale, shape = fit_variance_scale_and_tails(*held_out, family)
    validation, *scored = (CalibrationReport.regression(mu, scale * var, y, tails=shape).metrics
                           for mu, var, y in (held_out, *evaluated.values()))
    others = {name: dict(m) for name, m in zip(list(evaluated)[1:], scored[1:])}
    return dict(scored[0], **others, variance_scale=scale, tails=describe(shape), validation_nll=validation["nll"]["mean"])
