"""The sine-wave regression task family (Finn et al., 2017).

Task: ``y = A sin(x − φ) + σ ε`` with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, inputs ``x ~ U[−5, 5]``
and ``ε ~ N(0, 1)`` (``σ = noise_std``, 0 by default). The query range can be moved, e.g. to
``[5, 10]`` for out-of-range evaluation (:meth:`SineTaskDistribution.out_of_range`).

Example
-------
>>> tasks = SineTaskDistribution(shots=10, query=10)
>>> batch = tasks.sample(25, torch.Generator().manual_seed(0))
>>> batch.support_x.shape, batch.query_y.shape
(torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))
>>> far = tasks.out_of_range().sample(25, torch.Generator().manual_seed(0))   # query x in [5, 10]
>>> bool(far.query_x.min() >= 5)
True
"""

from __future__ import annotations

import math
import operator
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .tasks import TaskBatch


def _check_count(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be a positive integer (at least 1), got {value!r}")
    return n


def _check_range(name: str, r) -> Tuple[float, float]:
    try:
        lo, hi = float(r[0]), float(r[1])
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {r!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must satisfy low < high (finite), got {r!r}")
    return lo, hi


@dataclass(frozen=True)
class SineTaskDistribution:
    """Sine tasks with ``shots`` support and ``query`` query points each.

    Args:
        shots, query: points per task in the support and query sets.
        amp_range, phase_range: ranges of ``A`` and ``φ`` (uniform).
        x_range: range of support inputs (and of query inputs unless ``query_x_range``).
        query_x_range: range of query inputs (default ``x_range``).
        noise_std: standard deviation of Gaussian observation noise (default none).
    """

    shots: int = 10
    query: int = 10
    amp_range: Tuple[float, float] = (0.1, 5.0)
    phase_range: Tuple[float, float] = (0.0, math.pi)
    x_range: Tuple[float, float] = (-5.0, 5.0)
    query_x_range: Optional[Tuple[float, float]] = None
    noise_std: float = 0.0

    def __post_init__(self):
        for name in ("shots", "query"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name)))
        for name in ("amp_range", "phase_range", "x_range"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))
        if self.query_x_range is not None:
            object.__setattr__(self, "query_x_range", _check_range("query_x_range", self.query_x_range))
        try:
            noise_ok = float(self.noise_std) >= 0 and math.isfinite(float(self.noise_std))
        except (TypeError, ValueError):
            noise_ok = False
        if not noise_ok:
            raise ValueError(f"noise_std must be non-negative, got {self.noise_std!r}")

    def sample(self, num_tasks: int, generator: Optional[torch.Generator] = None, device=None,
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        """``num_tasks`` tasks; all randomness from ``generator`` (vectorised over tasks).

        Draw order (fixed, so a seed gives the same tasks on every device): amplitudes ``[T]``,
        phases ``[T]``, support inputs ``[T, S]``, query inputs ``[T, Q]``, then, with noise,
        support and query noise. Sampling happens in ``dtype`` on the generator's device (the CPU
        without a generator); the batch is then moved to ``device``. ``info`` holds ``amplitude [T]`` and ``phase [T]``.
        """
        num_tasks = _check_count("num_tasks", num_tasks)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        g = generator
        where = g.device if g is not None else torch.device("cpu")

        def uniform(shape, r):
            lo, hi = r
            return torch.rand(shape, generator=g, dtype=dtype, device=where) * (hi - lo) + lo

        amp = uniform((num_tasks, 1, 1), self.amp_range)
        phase = uniform((num_tasks, 1, 1), self.phase_range)
        sx = uniform((num_tasks, self.shots, 1), self.x_range)
        qx = uniform((num_tasks, self.query, 1), self.query_x_range or self.x_range)
        sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)
        if self.noise_std > 0:
            sy = sy + self.noise_std * torch.randn(sy.shape, generator=g, dtype=dtype, device=where)
            qy = qy + self.noise_std * torch.randn(qy.shape, generator=g, dtype=dtype, device=where)
        info = {"amplitude": amp.view(-1), "phase": phase.view(-1)}
        return TaskBatch(sx, sy, qx, qy, info).to(device=device)

    def out_of_range(self, low: float = 5.0, high: float = 10.0) -> "SineTaskDistribution":
        """The same family with query inputs in ``[low, high]`` (support unchanged), the
        standard extrapolation test: ``SineTaskDistribution().out_of_range()`` has support
        ``x ∈ [−5, 5]`` and query ``x ∈ [5, 10]``."""
        return dataclasses.replace(self, query_x_range=(low, high))

    @staticmethod
    def curve(info: dict, x: torch.Tensor) -> torch.Tensor:
        """The noiseless curves ``A_t sin(x − φ_t)`` ``[T, X]`` of the tasks that ``info`` (a
        sampled batch's ``info``) describes, at the inputs ``x [X]``."""
        return info["amplitude"].reshape(-1, 1) * torch.sin(x.reshape(1, -1) - info["phase"].reshape(-1, 1))
