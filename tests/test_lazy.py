"""The lazy teacher–student estimator: its special cases, finiteness on long horizons,
and vmap over tasks."""

import math

import pytest
import torch
from conftest import sine_tasks

import ibaml
import priors
from ibaml.hypergrad import Explicit, Lazy
from ibaml.inference import MAP, InnerLoop, TaskProblem, Variational
from ibaml.model import TaskModel
from ibaml.optim import SGD, Adam


def one_task(seed=0, **kwargs):
    return {k: v[0] for k, v in sine_tasks(1, torch.Generator().manual_seed(seed), **kwargs).items()}


def small_model(prior="diagonal", dtype=torch.float64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(dtype)
    if prior == "diagonal":
        p = priors.DiagonalGaussian.from_module(net, init_scale=0.5)
    else:
        p = priors.Flat.from_module(net)
    return TaskModel(net, p, ibaml.GaussianLikelihood(1.0, learn_noise=True).to(dtype))


def meta_of(model):
    return {k: p.detach().clone() for k, p in model.meta_parameters().items()}


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("method", ["map", "variational"])
def test_zero_leap_is_one_step_explicit(steps, method):
    model = small_model()
    inference = MAP() if method == "map" else Variational(beta=1.0)
    task = one_task()
    if method == "variational":
        gen = torch.Generator().manual_seed(5)
        D = model.prior.dim
        task["eps_inner"] = torch.randn(1, D, generator=gen, dtype=torch.float64)
        task["eps_outer"] = torch.randn(3, D, generator=gen, dtype=torch.float64)
    alpha = 0.03
    meta = meta_of(model)
    # the student may use any optimiser and any K: with γ = 0 it does not matter
    student = TaskProblem(model, inference, InnerLoop(Adam(lr=0.01), steps))
    lazy = Lazy(leap=0.0, teacher_lr=alpha).task_gradient(student, meta, task)
    one_step = TaskProblem(model, inference, InnerLoop(SGD(lr=alpha), 1))
    explicit = Explicit().task_gradient(one_step, meta, task)
    assert torch.allclose(lazy.loss, explicit.loss, rtol=1e-12)
    assert_trees_close(lazy.grads, explicit.grads)


@pytest.mark.parametrize("prior", ["diagonal", "flat"])
def test_one_step_full_leap_is_two_step_loop_with_first_order_first_step(prior):
    model = small_model(prior)
    task = one_task(seed=1)
    alpha = 0.02
    meta = meta_of(model)
    problem = TaskProblem(model, MAP(), InnerLoop(SGD(lr=alpha), 1))
    lazy = Lazy(leap=1.0).task_gradient(problem, meta, task)

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


def test_full_leap_value_is_the_student_and_teacher_step():
    model = small_model()
    task = one_task(seed=2)
    meta = meta_of(model)
    problem = TaskProblem(model, MAP(), InnerLoop(SGD(lr=0.01), 7))
    out = Lazy(leap=1.0, teacher_lr=0.05).task_gradient(problem, meta, task)
    v_k, _ = problem.solve(meta, task)
    g = torch.func.grad(problem.inner)(v_k, meta, task)
    expected = problem.outer({"w": v_k["w"] - 0.05 * g["w"]}, meta, task)
    assert torch.allclose(out.loss, expected, rtol=1e-12)
    assert torch.allclose(out.diagnostics["student_loss"], problem.outer(v_k, meta, task), rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_gradients_finite_on_sine_mlp_long_horizons(steps):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1))
    learner = ibaml.build_learner("lazy", net, ibaml.GaussianLikelihood(1.0, learn_noise=True), inner_steps=steps)
    assert isinstance(learner.estimator, Lazy)
    batch = sine_tasks(4, torch.Generator().manual_seed(3), shots=10, query=10, dtype=torch.float32)
    loss, grads, diagnostics, finite = learner.meta_gradient(batch)
    assert bool(finite.all()) and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_vmap_over_tasks_equals_loop():
    model = small_model()
    learner = ibaml.MetaLearner(model.net, model.prior, model.likelihood, method="map",
                                estimator=Lazy(leap=0.7, teacher_lr=0.02), inner_optimizer=SGD(lr=0.01),
                                inner_steps=6)
    batch = sine_tasks(4, torch.Generator().manual_seed(4))
    loss, grads, _, _ = learner.meta_gradient(batch)
    per_task = [learner.meta_gradient({k: v[i:i + 1] for k, v in batch.items()}) for i in range(4)]
    assert torch.allclose(loss, sum(p[0] for p in per_task) / 4, rtol=1e-10)
    for k in grads:
        assert torch.allclose(grads[k], sum(p[1][k] for p in per_task) / 4, rtol=1e-9, atol=1e-12), k


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="leap"):
        Lazy(leap=1.5)
    with pytest.raises(ValueError, match="teacher_lr"):
        Lazy(teacher_lr=0.0)

    class NoLr:
        def init(self, params):
            return {}

        def update(self, params, grads, state):
            return params, state

    problem = TaskProblem(small_model(), MAP(), InnerLoop(NoLr(), 1))
    with pytest.raises(ValueError, match="teacher_lr"):
        Lazy().task_gradient(problem, meta_of(problem.model), one_task())
