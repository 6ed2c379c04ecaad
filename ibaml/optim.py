"""Functional optimisers for the inner loop, on parameter dicts.

An optimiser is an object with ``init(params) -> state`` and
``update(params, grads, state) -> (new_params, new_state)``. Both are pure tensor
functions, so they can be

* run without a graph (the implicit and first-order estimators detach every step),
* differentiated through (explicit unrolled estimators: MAML, ABML),
* vmapped over the tasks of a meta-batch.

Any object with these two methods works as an inner optimiser.

Example
-------
>>> opt = Adam(lr=0.1)
>>> params = {"w": torch.ones(3)}
>>> state = opt.init(params)
>>> params, state = opt.update(params, {"w": 2 * params["w"]}, state)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from .tree import ParamDict


def _check_lr(name: str, lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"{name} learning rate must be positive, got {lr!r}")


@dataclass(frozen=True)
class SGD:
    """Gradient descent with optional heavy-ball momentum:

        b ← μ b + g,    v ← v − lr · b      (μ = 0: plain ``v ← v − lr · g``)
    """

    lr: float = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        _check_lr("SGD", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1), got {self.momentum!r}")

    def init(self, params: ParamDict) -> Dict[str, Any]:
        if self.momentum == 0.0:
            return {}
        return {"buf": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(self, params: ParamDict, grads: ParamDict, state: Dict[str, Any]) -> Tuple[ParamDict, Dict[str, Any]]:
        if self.momentum == 0.0:
            return {k: params[k] - self.lr * grads[k] for k in params}, state
        buf = {k: self.momentum * state["buf"][k] + grads[k] for k in params}
        return {k: params[k] - self.lr * buf[k] for k in params}, {"buf": buf}


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba), with bias correction:

        m ← β₁ m + (1 − β₁) g,   s ← β₂ s + (1 − β₂) g²
        v ← v − lr · (m / (1 − β₁ᵗ)) / sqrt(s / (1 − β₂ᵗ) + ε²)

    (ε inside the square root keeps the update differentiable where a gradient entry is
    exactly zero, as unrolled differentiation through the inner loop requires.)
    """

    lr: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        _check_lr("Adam", self.lr)
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam betas must lie in [0, 1), got {self.betas!r}")

    def init(self, params: ParamDict) -> Dict[str, Any]:
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return {"step": 0, "m": zeros, "s": dict(zeros)}

    def update(self, params: ParamDict, grads: ParamDict, state: Dict[str, Any]) -> Tuple[ParamDict, Dict[str, Any]]:
        b1, b2 = self.betas
        t = state["step"] + 1
        m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in params}
        s = {k: b2 * state["s"][k] + (1 - b2) * grads[k] * grads[k] for k in params}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new = {k: params[k] - self.lr * (m[k] / c1) / torch.sqrt(s[k] / c2 + self.eps ** 2) for k in params}
        return new, {"step": t, "m": m, "s": s}


def make_optimizer(name: str, lr: float, **kwargs):
    """Build an inner optimiser by name (``"sgd"`` or ``"adam"``)."""
    table = {"sgd": SGD, "adam": Adam}
    try:
        cls = table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown inner optimizer {name!r}; expected one of {sorted(table)}") from None
    return cls(lr=lr, **kwargs)

