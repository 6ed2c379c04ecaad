"""Linear solvers for ``A x = b`` given only the matrix-vector product ``x -> A x``.

Pure tensor code on flat vectors ``[D]``: no model, no prior, no dataset. None of the
solvers synchronises with the host (no ``.item()``, no Python ``if`` on tensor values),
so they run unchanged under ``torch.func.vmap`` (one system per task) and inside CUDA
graphs: the conjugate gradient runs a fixed number of iterations and freezes converged
systems with masked updates.

Every solver is a callable ``solver(matvec, b, x0=None, precond_diag=None) -> SolveResult``.

Example
-------
>>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
>>> res = CG(max_iter=10, tol=1e-8)(lambda v: A @ v, torch.tensor([1.0, 2.0]))
>>> torch.allclose(A @ res.x, torch.tensor([1.0, 2.0]), atol=1e-6)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


class SolveResult(NamedTuple):
    """Solution ``x``, final residual norm ``||b - (A + δI) x||`` and iterations used (tensors).

    (:class:`CG` reports the norm of its recurrence residual, which equals ``b − (A + δI) x``
    up to rounding, so that the report costs no extra matrix-vector product.)"""

    x: Tensor
    residual_norm: Tensor
    iterations: Tensor


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping == 0.0:
        return matvec
    return lambda v: matvec(v) + damping * v


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a_i b_i`` in the vectors' own precision. Not ``torch.dot``: under ``vmap`` that
    becomes a batched matrix product, which ``torch.autocast`` runs in float16/bfloat16, and
    CG's curvature test ``p·Ap > 0`` then fails by rounding."""
    return (a * b).sum()


def _check_positive(name: str, value, allow_zero: bool = True) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")


@dataclass(frozen=True)
class CG:
    """Preconditioned conjugate gradient on the damped system ``(A + δI) x = b``.

    With preconditioner ``M = diag(precond_diag) + δ`` (``z = M⁻¹ r``), iteration ``k``:

        α_k = (r_k·z_k) / (p_k·(A+δI) p_k)
        x_{k+1} = x_k + α_k p_k,    r_{k+1} = r_k − α_k (A+δI) p_k
        z_{k+1} = M⁻¹ r_{k+1},      β_k = (r_{k+1}·z_{k+1}) / (r_k·z_k)
        p_{k+1} = z_{k+1} + β_k p_k

    Runs exactly ``max_iter`` iterations; a system stops moving (masked update) once
    ``||r|| <= tol · ||b||`` or when a direction of non-positive curvature
    ``p·(A+δI)p <= 0`` is met (then the iterate so far is kept, which stays finite;
    raise ``damping`` when the Hessian may be indefinite). ``x0`` warm-starts.

    The reported residual norm is ``||r_k||`` from the recurrence above (equal to
    ``||b − (A+δI) x_k||`` up to rounding; a frozen system keeps both ``x`` and ``r``), so
    a solve costs exactly ``max_iter`` matrix-vector products (one more with ``x0``).

    Args:
        max_iter: number of iterations (the cost is ``max_iter`` matrix-vector products).
        tol: relative residual tolerance.
        damping: ``δ >= 0`` added to the diagonal.
    """

    max_iter: int = 10
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self):
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"CG max_iter must be a positive integer, got {self.max_iter!r}")
        _check_positive("CG tol", self.tol)
        _check_positive("CG damping", self.damping)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None,
                 precond_diag: Optional[Tensor] = None) -> SolveResult:
        A = _damped(matvec, self.damping)
        if precond_diag is None:
            apply_minv = lambda r: r
        else:
            inv_diag = 1.0 / (precond_diag + self.damping)
            apply_minv = lambda r: inv_diag * r
        x = torch.zeros_like(b) if x0 is None else x0
        r = b - A(x) if x0 is not None else b.clone()
        z = apply_minv(r)
        p = z
        rz = _dot(r, z)
        threshold = self.tol * torch.linalg.vector_norm(b)
        active = torch.linalg.vector_norm(r) > threshold
        iterations = torch.zeros((), dtype=torch.long, device=b.device)
        tiny = torch.finfo(b.dtype).tiny
        for _ in range(int(self.max_iter)):
            Ap = A(p)
            pAp = _dot(p, Ap)
            active = active & (pAp > 0)
            alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
            x = x + alpha * p
            r = r - alpha * Ap
            z = apply_minv(r)
            rz_new = _dot(r, z)
            beta = torch.where(active, rz_new / torch.clamp(rz.abs(), min=tiny), torch.zeros_like(rz))
            p = torch.where(active, z + beta * p, p)
            rz = torch.where(active, rz_new, rz)
            iterations = iterations + active.long()
            active = active & (torch.linalg.vector_norm(r) > threshold)
        return SolveResult(x, torch.linalg.vector_norm(r), iterations)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series for ``(A + δI)⁻¹ b``:

        x = α Σ_{k=0}^{K} (I − α (A + δI))^k b

    which converges when all eigenvalues of ``α (A + δI)`` lie in (0, 2). ``α`` is the
    step size (an inner learning rate is the usual choice). ``precond_diag`` and ``x0``
    are accepted for interface compatibility and ignored.
    """

    max_iter: int = 10
    alpha: float = 0.01
    damping: float = 0.0

    def __post_init__(self):
        if int(self.max_iter) != self.max_iter or self.max_iter < 0:
            raise ValueError(f"Neumann max_iter must be a non-negative integer, got {self.max_iter!r}")
        _check_positive("Neumann alpha", self.alpha, allow_zero=False)
        _check_positive("Neumann damping", self.damping)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None,
                 precond_diag: Optional[Tensor] = None) -> SolveResult:
        A = _damped(matvec, self.damping)
        term = b
        total = b
        for _ in range(int(self.max_iter)):
            term = term - self.alpha * A(term)
            total = total + term
        x = self.alpha * total
        residual = torch.linalg.vector_norm(b - A(x))
        return SolveResult(x, residual, torch.full((), int(self.max_iter), dtype=torch.long, device=b.device))


def dense_matrix(matvec: MatVec, size: int, like: Tensor) -> Tensor:
    """The matrix ``[A e_1, ..., A e_D]`` built with one batched matvec over the identity."""
    eye = torch.eye(size, dtype=like.dtype, device=like.device)
    return torch.func.vmap(matvec)(eye).transpose(0, 1)


@dataclass(frozen=True)
class Dense:
    """Exact solve: forms ``A + δI`` column by column (``D`` matvecs) and calls
    ``torch.linalg.solve_ex`` (no error check, so no host synchronisation on CUDA: a singular
    system gives non-finite values, which the learner's non-finite policy catches). For tests
    and tiny networks only (memory ``O(D²)``)."""

    damping: float = 0.0

    def __post_init__(self):
        _check_positive("Dense damping", self.damping)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Optional[Tensor] = None,
                 precond_diag: Optional[Tensor] = None) -> SolveResult:
        A = _damped(matvec, self.damping)
        M = dense_matrix(A, b.shape[0], b)
        x = torch.linalg.solve_ex(M, b)[0]
        residual = torch.linalg.vector_norm(b - M @ x)
        return SolveResult(x, residual, torch.ones((), dtype=torch.long, device=b.device))
