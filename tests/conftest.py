import math

import pytest
import torch

import ibaml
import priors

DT = torch.float64


def tiny_net(hidden=6, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).to(DT)


def tiny_task(seed=0, n=8, draws=(2, 3), dim=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2.5, 2.5, n, dtype=DT)[:, None]
    amp = 1.0 + torch.rand((), generator=g, dtype=DT)
    task = {"support_x": x, "support_y": amp * torch.sin(x), "query_x": x + 0.2, "query_y": amp * torch.sin(x + 0.2)}
    if dim is not None:
        task["eps_inner"] = torch.randn(draws[0], dim, generator=g, dtype=DT)
        task["eps_outer"] = torch.randn(draws[1], dim, generator=g, dtype=DT)
    return task


def sine_tasks(T, gen, shots=5, query=5, dtype=torch.float64):
    """A batch of T sine tasks as a dict of [T, points, 1] tensors."""
    amp = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * math.pi
    x = torch.rand(T, shots + query, 1, generator=gen, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x - phase)
    return {"support_x": x[:, :shots], "support_y": y[:, :shots], "query_x": x[:, shots:], "query_y": y[:, shots:]}


def rel_err(a, b):
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))
    den = math.sqrt(sum(float((b[k] ** 2).sum()) for k in b))
    return num / den


def assert_matches_central_differences(grads, outer_at, meta, index=3, h=1e-5):
    """Each meta-parameter's entry ``min(index, numel − 1)`` of ``grads`` against the central
    difference ``(F(θ + h e_i) − F(θ − h e_i)) / 2h`` of ``outer_at(θ)``."""
    for name in meta:
        i = min(index, meta[name].numel() - 1)
        plus = {k: t.clone() for k, t in meta.items()}
        minus = {k: t.clone() for k, t in meta.items()}
        plus[name].view(-1)[i] += h
        minus[name].view(-1)[i] -= h
        fd = (outer_at(plus) - outer_at(minus)) / (2 * h)
        assert float(grads[name].view(-1)[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8), name


@pytest.fixture
def make_problem():
    def make(prior_cls=priors.DiagonalGaussian, method="map", steps=3000, lr=0.003, optimizer="sgd", **prior_kw):
        net = tiny_net()
        prior = prior_cls.from_module(net, **prior_kw)
        model = ibaml.TaskModel(net, prior, ibaml.GaussianLikelihood(0.5, learn_noise=True).to(DT))
        inference = ibaml.MAP() if method == "map" else ibaml.Variational(num_samples=2, num_outer_samples=3)
        opt = ibaml.core.optim.SGD(lr=lr) if optimizer == "sgd" else ibaml.core.optim.Adam(lr=lr)
        problem = ibaml.TaskProblem(model, inference, ibaml.InnerLoop(opt, steps))
        meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
        task = tiny_task(dim=prior.dim if method != "map" else None)
        return problem, meta, task
    return make


def assert_task_gradients_equal_plain_loop(learner, batch, rtol=1e-9, atol=1e-12):
    """``learner.task_gradients`` (vmapped over tasks) against a plain Python loop of single-task
    estimator calls on unbatched tensors, which never enters ``vmap``: losses, meta-gradients
    and diagnostics per task."""
    task = learner.prepare(batch)
    meta = learner.meta_params()
    out = learner.task_gradients(task, meta)
    T = task["support_x"].shape[0]
    assert out.loss.shape == (T,)
    for t in range(T):
        ref = learner.estimator.task_gradient(learner.problem, meta, {k: v[t] for k, v in task.items()})
        assert torch.allclose(out.loss[t], ref.loss, rtol=rtol, atol=atol), t
        for k, g in ref.grads.items():
            assert torch.allclose(out.grads[k][t], g, rtol=rtol, atol=atol), (t, k)
        for k, d in ref.diagnostics.items():
            if d.is_floating_point():
                assert torch.allclose(out.diagnostics[k][t], d, rtol=1e-6, atol=1e-10), (t, k)
            else:
                assert torch.equal(out.diagnostics[k][t], d), (t, k)
    return out
