"""Figures of predictive distributions: predictive bands of regression tasks, one panel or a
grid. Matplotlib is imported where a figure is drawn (it is the slowest import of the library)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .metrics import _as_float64, central_quantile


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
                          title=None, level: float = 0.9, tails=None):
    """One regression task: predictive mean over ``x_grid``, the central ``level`` band
    ``mean ± z √var`` (``z = Φ⁻¹((1 + level)/2)``, 1.645 for the default 90%; with ``tails``
    that family's quantile, ``var`` the squared scale), the support points and, if given, the true
    curve ``(x_true, y_true)``. Returns the axes.

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
    z = float(central_quantile(torch.tensor([float(level)]), tails)[0])
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
                         cols: int = 3, level: float = 0.9, titles: Optional[Sequence[str]] = None,
                         tails=None):
    """Several tasks in a grid of :func:`plot_predictive_bands` panels (``level``, ``tails`` as there); returns the Figure.

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
                              title=None if titles is None else titles[i], level=level, tails=tails)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
