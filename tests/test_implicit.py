import pytest
import torch

from ibaml import implicit_diff
from ibaml.core.linalg import CG, Dense

DT = torch.float64


def ridge_setup(seed=0, n=7, d=4, lam=0.7):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT)
    return A, b, lam


def ridge_objective(A, lam):
    return lambda v, m: 0.5 * ((A @ v["x"] - m["b"]) ** 2).sum() + 0.5 * lam * (v["x"] ** 2).sum()


@pytest.mark.parametrize("solver", [None, CG(max_iter=50, tol=1e-14), Dense()], ids=["default", "cg", "dense"])
@pytest.mark.parametrize("hvp_mode", ["rev", "fwd"])
def test_ridge_jacobian_matches_closed_form(solver, hvp_mode):
    A, b, lam = ridge_setup()
    M = A.T @ A + lam * torch.eye(A.shape[1], dtype=DT)
    theta = {"b": b.clone().requires_grad_()}
    solution = {"x": torch.linalg.solve(M, A.T @ b)}
    out = implicit_diff(ridge_objective(A, lam), solution, theta, solver=solver, hvp_mode=hvp_mode)
    assert torch.equal(out["x"], solution["x"])
    c = torch.arange(1.0, 5.0, dtype=DT)
    (out["x"] * c).sum().backward()
    expected = A @ torch.linalg.solve(M, c)  # d(cᵀ x*)/db = A M⁻¹ c
    assert torch.allclose(theta["b"].grad, expected, rtol=1e-10)


def test_composes_with_vmap_over_tasks():
    A, _, lam = ridge_setup()
    M = A.T @ A + lam * torch.eye(4, dtype=DT)
    B = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=DT)
    G = ridge_objective(A, lam)

    def loss(b):
        x = torch.linalg.solve(M, A.T @ b)
        return (implicit_diff(G, {"x": x}, {"b": b})["x"] ** 2).sum()

    batched = torch.func.vmap(torch.func.grad(loss))(B)
    for i in range(3):
        b = B[i].clone().requires_grad_()
        loss(b).backward()
        assert torch.allclose(batched[i], b.grad, rtol=1e-10)


def test_non_gaussian_inner_objective():
    # G(v, θ) = Σ log cosh(v − θ) + ½ a v²  →  tanh(v − θ) + a v = 0; dv/dθ = sech² / (sech² + a)
    a = 0.8
    theta = torch.tensor([0.3, -1.2, 2.0], dtype=DT, requires_grad=True)
    v = torch.zeros(3, dtype=DT)
    for _ in range(60):  # Newton on the scalar equations
        r = torch.tanh(v - theta.detach()) + a * v
        v = v - r / (1 - torch.tanh(v - theta.detach()) ** 2 + a)
    G = lambda vv, m: (torch.log(torch.cosh(vv["v"] - m["t"])) + 0.5 * a * vv["v"] ** 2).sum()
    out = implicit_diff(G, {"v": v}, {"t": theta})
    out["v"].sum().backward()
    sech2 = 1 - torch.tanh(v - theta.detach()) ** 2
    assert torch.allclose(theta.grad, sech2 / (sech2 + a), rtol=1e-10)


def test_bad_arguments():
    with pytest.raises(TypeError):
        implicit_diff(lambda v, m: v, [torch.zeros(1)], {})
    with pytest.raises(ValueError, match="empty"):
        implicit_diff(lambda v, m: v, {}, {})
    with pytest.raises(ValueError, match="hvp_mode"):
        A, b, lam = ridge_setup()
        implicit_diff(ridge_objective(A, lam), {"x": torch.zeros(4, dtype=DT)}, {"b": b.requires_grad_()},
                      hvp_mode="bad")["x"].sum().backward()
