"""The sine-wave regression task family (Finn et al., 2017).

Task: ``y = A sin(x − φ)`` with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``; inputs ``x ~ U[−5, 5]``
(the query range can be moved, e.g. to ``[5, 10]`` for out-of-range evaluation).

Example
-------
>>> tasks = SineTaskDistribution(shots=10, query=10)
>>> batch = tasks.sample(25, torch.Generator().manual_seed(0))
>>> batch.support_x.shape, batch.query_y.shape
(torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .tasks import TaskBatch


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
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_range("amp_range", self.amp_range)
        _check_range("phase_range", self.phase_range)
        _check_range("x_range", self.x_range)
        if self.query_x_range is not None:
            _check_range("query_x_range", self.query_x_range)
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"noise_std must be non-negative, got {self.noise_std!r}")

    def sample(self, num_tasks: int, generator: Optional[torch.Generator] = None, device=None,
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        """``num_tasks`` tasks; all randomness from ``generator`` (vectorised over tasks)."""
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        g = generator

        def uniform(shape, r):
            lo, hi = r
            return torch.rand(shape, generator=g, dtype=dtype) * (hi - lo) + lo

        amp = uniform((num_tasks, 1, 1), self.amp_range)
        phase = uniform((num_tasks, 1, 1), self.phase_range)
        sx = uniform((num_tasks, self.shots, 1), self.x_range)
        qx = uniform((num_tasks, self.query, 1), self.query_x_range or self.x_range)
        sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)
        if self.noise_std > 0:
            sy = sy + self.noise_std * torch.randn(sy.shape, generator=g, dtype=dtype)
            qy = qy + self.noise_std * torch.randn(qy.shape, generator=g, dtype=dtype)
        info = {"amplitude": amp.view(-1), "phase": phase.view(-1)}
        return TaskBatch(sx, sy, qx, qy, info).to(device=device)

    def out_of_range(self, low: float = 5.0, high: float = 10.0) -> "SineTaskDistribution":
        """The same family with query inputs in ``[low, high]`` (support unchanged)."""
        return SineTaskDistribution(self.shots, self.query, self.amp_range, self.phase_range, self.x_range,
                                    (low, high), self.noise_std)
