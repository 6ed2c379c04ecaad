import pytest
import torch

from ibaml.core.linalg import CG, Dense, Neumann

DT = torch.float64


def spd(n, seed=0, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return Q @ torch.diag(eig) @ Q.T


def test_cg_solves_spd_with_and_without_preconditioner_and_warm_start():
    A = spd(12)
    b = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=DT)
    exact = torch.linalg.solve(A, b)
    for kwargs in ({}, {"precond_diag": torch.diag(A)}, {"x0": exact + 0.1}):
        res = CG(max_iter=50, tol=1e-13)(lambda v: A @ v, b, **kwargs)
        assert torch.allclose(res.x, exact, atol=1e-10)
        assert res.residual_norm < 1e-10
    warm = CG(max_iter=50, tol=1e-13)(lambda v: A @ v, b, x0=exact)
    assert warm.iterations == 0


def test_cg_iteration_cap_and_vmap_equals_loop():
    A = spd(20, cond=1e4)
    B = torch.randn(4, 20, generator=torch.Generator().manual_seed(2), dtype=DT)
    solver = CG(max_iter=3, tol=1e-14)
    batched = torch.func.vmap(lambda b: solver(lambda v: A @ v, b))(B)
    assert batched.residual_norm.shape == (4,) and (batched.iterations <= 3).all()
    for i in range(4):
        single = solver(lambda v: A @ v, B[i])
        assert torch.allclose(batched.x[i], single.x, rtol=1e-12, atol=1e-14)
        assert torch.allclose(batched.residual_norm[i], single.residual_norm)
    assert (batched.residual_norm > 1e-6).all()  # 3 iterations cannot solve a condition-1e4 system


def test_cg_indefinite_is_finite_and_damping_solves_shifted_system():
    A = torch.diag(torch.tensor([2.0, -0.5, 1.0, 3.0], dtype=DT))
    b = torch.ones(4, dtype=DT)
    res = CG(max_iter=10)(lambda v: A @ v, b)
    assert torch.isfinite(res.x).all() and torch.isfinite(res.residual_norm)
    damped = CG(max_iter=10, tol=1e-14, damping=1.0)(lambda v: A @ v, b)
    assert torch.allclose((A + torch.eye(4, dtype=DT)) @ damped.x, b, atol=1e-12)


def test_neumann_and_dense():
    A = spd(6, cond=3.0)
    b = torch.ones(6, dtype=DT)
    exact = torch.linalg.solve(A, b)
    neu = Neumann(max_iter=200, alpha=1 / 3.5)(lambda v: A @ v, b)
    assert torch.allclose(neu.x, exact, atol=1e-8)
    short = Neumann(max_iter=2, alpha=1 / 3.5)(lambda v: A @ v, b)
    assert short.residual_norm > neu.residual_norm
    dense = Dense(damping=0.5)(lambda v: A @ v, b)
    assert torch.allclose(dense.x, torch.linalg.solve(A + 0.5 * torch.eye(6, dtype=DT), b))


@pytest.mark.parametrize("make, message", [
    (lambda: CG(max_iter=0), "max_iter"),
    (lambda: CG(damping=-1.0), "damping"),
    (lambda: CG(tol=-1.0), "tol"),
    (lambda: Neumann(alpha=0.0), "alpha"),
    (lambda: Dense(damping=-0.1), "damping"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
