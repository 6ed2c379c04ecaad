"""The lazy teacher–student estimator: the paper reading's special cases (one-step MAML,
first-order at the start, a quadratic inner problem in closed form), memory flat in the
student's horizon, the library's leap-then-step variant, finiteness on long horizons and
vmap over tasks."""

import weakref

import pytest
import torch
from conftest import assert_task_gradients_equal_plain_loop, sine_tasks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ibaml
import priors
from ibaml.core.hypergrad import Explicit, FirstOrder, Lazy
from ibaml.core.inference import MAP, Variational
from ibaml.core.inner_loop import InnerLoop, TaskProblem
from ibaml.core.optim import SGD, Adam
from ibaml.core.task_model import TaskModel

DT = torch.float64


def one_task(seed=0, **kwargs):
    return {k: v[0] for k, v in sine_tasks(1, torch.Generator().manual_seed(seed), **kwargs).items()}


def small_model(prior="diagonal", dtype=DT):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(dtype)
    if prior == "diagonal":
        p = priors.DiagonalGaussian.from_module(net, init_scale=0.5)
    else:
        p = priors.Flat.from_module(net)
    return TaskModel(net, p, ibaml.GaussianLikelihood(1.0, learn_noise=True).to(dtype))


def meta_of(model):
    return {k: p.detach().clone() for k, p in model.meta_parameters().items()}


def with_noise(task, model, seed=5):
    """The fixed draws ``ε`` of the variational objectives."""
    gen = torch.Generator().manual_seed(seed)
    D = model.prior.dim
    return dict(task, eps_inner=torch.randn(1, D, generator=gen, dtype=DT),
                eps_outer=torch.randn(3, D, generator=gen, dtype=DT))


def setup(method, prior="diagonal", seed=0):
    model = small_model(prior)
    task = one_task(seed)
    if method == "variational":
        return model, Variational(beta=1.0), with_noise(task, model)
    return model, MAP(), task


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


CASES = [("map", "flat"), ("map", "diagonal"), ("variational", "diagonal")]


# ----------------------------------------------------------------------------- paper reading (default)
@pytest.mark.parametrize("method, prior", CASES)
def test_one_step_full_leap_is_one_step_maml(method, prior):
    """``K = 1, γ = 1`` with an SGD(α) student: explicit differentiation through one step."""
    model, inference, task = setup(method, prior, seed=1)
    meta = meta_of(model)
    problem = TaskProblem(model, inference, InnerLoop(SGD(lr=0.02), 1))
    lazy = Lazy(leap=1.0).task_gradient(problem, meta, task)
    maml = Explicit().task_gradient(problem, meta, task)
    assert torch.allclose(lazy.loss, maml.loss, rtol=1e-12)
    assert_trees_close(lazy.grads, maml.grads)
    assert torch.allclose(lazy.diagnostics["student_loss"], maml.loss, rtol=1e-12)


@pytest.mark.parametrize("method, prior", CASES)
def test_zero_leap_is_first_order_gradient_at_start(method, prior):
    """``γ = 0``: ``∂_θF(v₀, θ) + (∂v₀/∂θ)ᵀ ∇_vF(v₀, θ)``, whatever the student did."""
    model, inference, task = setup(method, prior, seed=2)
    meta = meta_of(model)
    student = TaskProblem(model, inference, InnerLoop(Adam(lr=0.01), 7))
    lazy = Lazy(leap=0.0, teacher_lr=0.03).task_gradient(student, meta, task)
    at_start = TaskProblem(model, inference, InnerLoop(SGD(lr=0.03), 0))
    first_order = FirstOrder().task_gradient(at_start, meta, task)
    assert torch.allclose(lazy.loss, first_order.loss, rtol=1e-12)
    assert_trees_close(lazy.grads, first_order.grads)
    # independently: the total derivative of F(v₀(θ), θ)
    direct = torch.func.grad(lambda m: student.outer(student.init(m), m, task))(meta)
    assert_trees_close(lazy.grads, direct)


@pytest.mark.parametrize("gamma", [0.25, 0.6, 1.0])
def test_loss_is_the_teacher_on_the_segment(gamma):
    model, inference, task = setup("map", seed=3)
    meta = meta_of(model)
    problem = TaskProblem(model, inference, InnerLoop(SGD(lr=0.01), 7))
    out = Lazy(leap=gamma).task_gradient(problem, meta, task)
    v_k, _ = problem.solve(meta, task)
    v0 = problem.init(meta)
    phi_t = {k: v0[k] + gamma * (v_k[k] - v0[k]) for k in v0}
    assert torch.allclose(out.loss, problem.outer(phi_t, meta, task), rtol=1e-12)
    assert torch.allclose(out.diagnostics["student_loss"], problem.outer(v_k, meta, task), rtol=1e-12)


class Quadratic(ibaml.core.inference.InferenceMethod):
    """``G(w, θ) = ½ (w − c)ᵀ A (w − c) + (λ/2) ‖w − θ‖²``, ``w₀ = θ``,
    ``F(w, θ) = ½ ‖w − b‖² + κ ⟨d, θ⟩``: ``∇²_vv G = A + λI`` and ``∇²_vθ G = −λI``, so the
    teacher's Jacobian is ``I − γα A`` and the lazy gradient ``κ d + (I − γαA)(φ_T − b)``."""

    name = "quadratic"

    def __init__(self, n=5, lam=0.7, kappa=0.3, seed=0):
        g = torch.Generator().manual_seed(seed)
        Q = torch.randn(n, n, generator=g, dtype=DT)
        self.A = Q @ Q.T / n + 0.5 * torch.eye(n, dtype=DT)
        self.c, self.b, self.d = (torch.randn(n, generator=g, dtype=DT) for _ in range(3))
        self.lam, self.kappa, self.n = lam, kappa, n

    def init(self, model, meta):
        return {"w": meta["theta"]}

    def inner_objective(self, model, v, meta, task):
        r = v["w"] - self.c
        return 0.5 * r @ self.A @ r + 0.5 * self.lam * ((v["w"] - meta["theta"]) ** 2).sum()

    def outer_objective(self, model, v, meta, task):
        return 0.5 * ((v["w"] - self.b) ** 2).sum() + self.kappa * (self.d * meta["theta"]).sum()

    def preconditioner(self, model, v, meta):
        return None

    def student(self, theta, alpha, K):
        """``v_K = v* + Mᴷ (θ − v*)``, ``M = I − α(A + λI)``, ``v* = (A + λI)⁻¹ (A c + λ θ)``."""
        H = self.A + self.lam * torch.eye(self.n, dtype=DT)
        v_star = torch.linalg.solve(H, self.A @ self.c + self.lam * theta)
        M = torch.eye(self.n, dtype=DT) - alpha * H
        return v_star + torch.linalg.matrix_power(M, K) @ (theta - v_star)


@pytest.mark.parametrize("K", [1, 4, 30])
@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_quadratic_inner_problem_closed_form(K, gamma):
    quad, alpha = Quadratic(), 0.1
    theta = torch.randn(quad.n, generator=torch.Generator().manual_seed(1), dtype=DT)
    problem = TaskProblem(None, quad, InnerLoop(SGD(lr=alpha), K))
    out = Lazy(leap=gamma).task_gradient(problem, {"theta": theta}, {})
    phi_t = theta + gamma * (quad.student(theta, alpha, K) - theta)
    J = torch.eye(quad.n, dtype=DT) - gamma * alpha * quad.A
    expected = quad.kappa * quad.d + J.T @ (phi_t - quad.b)
    assert torch.allclose(out.grads["theta"], expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.loss, quad.outer_objective(None, {"w": phi_t}, {"theta": theta}, {}), rtol=1e-12)


def test_quadratic_leap_then_step_closed_form():
    """The library's variant: ``v_T = u − α∇G(u)``, ``u = θ + γ(v_K − θ)``, Jacobian ``I − αA``."""
    quad, alpha, gamma, K = Quadratic(seed=3), 0.1, 0.5, 6
    theta = torch.randn(quad.n, generator=torch.Generator().manual_seed(2), dtype=DT)
    problem = TaskProblem(None, quad, InnerLoop(SGD(lr=alpha), K))
    out = Lazy(leap=gamma, variant="leap_then_step").task_gradient(problem, {"theta": theta}, {})
    u = theta + gamma * (quad.student(theta, alpha, K) - theta)
    v_t = u - alpha * (quad.A @ (u - quad.c) + quad.lam * (u - theta))
    expected = quad.kappa * quad.d + (torch.eye(quad.n, dtype=DT) - alpha * quad.A).T @ (v_t - quad.b)
    assert torch.allclose(out.grads["theta"], expected, rtol=1e-10, atol=1e-12)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that the dispatched operators create and that are
    alive at the same time (the autograd graph keeps its saved tensors alive)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.seen:
                    self.seen.add(key)
                    self.live += nbytes
                    weakref.finalize(t, self._free, key, nbytes)
                    self.peak = max(self.peak, self.live)
        return out


def peak_bytes(estimator, problem, meta, task):
    mode = LiveBytes()
    with mode:
        estimator.task_gradient(problem, meta, task)
    return mode.peak


@pytest.mark.parametrize("variant", ["paper", "leap_then_step"])
def test_memory_flat_in_student_steps(variant):
    model, inference, task = setup("map")
    meta = meta_of(model)
    problem = lambda K: TaskProblem(model, inference, InnerLoop(SGD(lr=0.01), K))
    lazy = [peak_bytes(Lazy(variant=variant), problem(K), meta, task) for K in (1, 50)]
    explicit = [peak_bytes(Explicit(), problem(K), meta, task) for K in (1, 50)]
    assert explicit[1] > 10 * explicit[0]  # the measure sees a growing graph
    assert lazy[1] <= 1.05 * lazy[0], lazy  # equal in practice


def test_student_steps_override_the_inner_loop():
    model, inference, task = setup("map", seed=4)
    meta = meta_of(model)
    long_loop = TaskProblem(model, inference, InnerLoop(SGD(lr=0.01), 40))
    short_loop = TaskProblem(model, inference, InnerLoop(SGD(lr=0.01), 3))
    a = Lazy(leap=0.8, student_steps=3).task_gradient(long_loop, meta, task)
    b = Lazy(leap=0.8).task_gradient(short_loop, meta, task)
    assert torch.allclose(a.loss, b.loss, rtol=1e-12)
    assert_trees_close(a.grads, b.grads, rtol=1e-12, atol=1e-14)


def test_non_sgd_student_needs_the_step_size():
    model, inference, task = setup("map")
    meta = meta_of(model)
    problem = TaskProblem(model, inference, InnerLoop(Adam(lr=0.01), 5))
    with pytest.raises(ValueError, match="teacher_lr .*Adam, not SGD"):
        Lazy().task_gradient(problem, meta, task)
    out = Lazy(teacher_lr=0.01).task_gradient(problem, meta, task)
    assert bool(out.diagnostics["finite"])


# ----------------------------------------------------------------------------- the library's variant
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("method", ["map", "variational"])
def test_leap_then_step_zero_leap_is_one_step_explicit(steps, method):
    model, inference, task = setup(method)
    alpha = 0.03
    meta = meta_of(model)
    # the student may use any optimiser and any K: with γ = 0 it does not matter
    student = TaskProblem(model, inference, InnerLoop(Adam(lr=0.01), steps))
    lazy = Lazy(leap=0.0, teacher_lr=alpha, variant="leap_then_step").task_gradient(student, meta, task)
    one_step = TaskProblem(model, inference, InnerLoop(SGD(lr=alpha), 1))
    explicit = Explicit().task_gradient(one_step, meta, task)
    assert torch.allclose(lazy.loss, explicit.loss, rtol=1e-12)
    assert_trees_close(lazy.grads, explicit.grads)


@pytest.mark.parametrize("prior", ["diagonal", "flat"])
def test_leap_then_step_one_step_full_leap_is_two_step_loop_with_first_order_first_step(prior):
    model = small_model(prior)
    task = one_task(seed=1)
    alpha = 0.02
    meta = meta_of(model)
    problem = TaskProblem(model, MAP(), InnerLoop(SGD(lr=alpha), 1))
    lazy = Lazy(leap=1.0, variant="leap_then_step").task_gradient(problem, meta, task)

    # independent computation with torch.autograd
    theta = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
    v0 = problem.init(theta)["w"]
    (g0,) = torch.autograd.grad(problem.inner({"w": v0}, theta, task), v0, create_graph=False)
    v1 = v0 - alpha * g0.detach()                      # first step, first-order
    (g1,) = torch.autograd.grad(problem.inner({"w": v1}, theta, task), v1, create_graph=True)
    v2 = v1 - alpha * g1                               # second step, differentiated
    loss = problem.outer({"w": v2}, theta, task)
    names = list(theta)
    grads = torch.autograd.grad(loss, [theta[k] for k in names], allow_unused=True)
    reference = {k: (torch.zeros_like(theta[k]) if g is None else g) for k, g in zip(names, grads)}
    assert torch.allclose(lazy.loss, loss.detach(), rtol=1e-12)
    assert_trees_close(lazy.grads, reference)


def test_leap_then_step_full_leap_value_is_the_student_and_teacher_step():
    model = small_model()
    task = one_task(seed=2)
    meta = meta_of(model)
    problem = TaskProblem(model, MAP(), InnerLoop(SGD(lr=0.01), 7))
    out = Lazy(leap=1.0, teacher_lr=0.05, variant="leap_then_step").task_gradient(problem, meta, task)
    v_k, _ = problem.solve(meta, task)
    g = torch.func.grad(problem.inner)(v_k, meta, task)
    expected = problem.outer({"w": v_k["w"] - 0.05 * g["w"]}, meta, task)
    assert torch.allclose(out.loss, expected, rtol=1e-12)
    assert torch.allclose(out.diagnostics["student_loss"], problem.outer(v_k, meta, task), rtol=1e-12)


# ----------------------------------------------------------------------------- both
@pytest.mark.parametrize("steps", [1, 10, 100])
def test_gradients_finite_on_sine_mlp_long_horizons(steps):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1))
    learner = ibaml.build_learner("lazy", net, ibaml.GaussianLikelihood(1.0, learn_noise=True), inner_steps=steps)
    assert isinstance(learner.estimator, Lazy) and learner.estimator.variant == "paper"
    batch = sine_tasks(4, torch.Generator().manual_seed(3), shots=10, query=10, dtype=torch.float32)
    loss, grads, diagnostics, finite = learner.meta_gradient(batch)
    assert bool(finite.all()) and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("variant", ["paper", "leap_then_step"])
def test_vmap_over_tasks_equals_a_plain_loop(variant):
    model = small_model()
    learner = ibaml.MetaLearner(model.net, model.prior, model.likelihood, method="map",
                                estimator=Lazy(leap=0.7, teacher_lr=0.02, variant=variant),
                                inner_optimizer=SGD(lr=0.01), inner_steps=6)
    assert_task_gradients_equal_plain_loop(learner, sine_tasks(4, torch.Generator().manual_seed(4)))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="leap"):
        Lazy(leap=1.5)
    with pytest.raises(ValueError, match="teacher_lr"):
        Lazy(teacher_lr=0.0)
    with pytest.raises(ValueError, match="student_steps"):
        Lazy(student_steps=-1)
    with pytest.raises(ValueError, match="variant must be one of paper, leap_then_step"):
        Lazy(variant="leap")

    class NoLr:
        def init(self, params):
            return {}

        def update(self, params, grads, state):
            return params, state

    problem = TaskProblem(small_model(), MAP(), InnerLoop(NoLr(), 1))
    with pytest.raises(ValueError, match="teacher_lr"):
        Lazy().task_gradient(problem, meta_of(problem.model), one_task())
