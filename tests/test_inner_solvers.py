"""The second-order and prior-preconditioned inner optimisers, a prior over the head only
(a shared body meta-learned through the implicit gradient), ABML's outer objective, and
the per-block stationarity diagnostics: solutions against closed forms, meta-gradients in
float64 against central finite differences."""

import pytest
import torch

import ibaml
import priors
from ibaml.core.implicit_function import implicit_gradient
from ibaml.core.inner_loop import newton_polish
from ibaml.core.linalg import Dense
from ibaml.core.nets import MLP
from ibaml.core.optim import SGD, NewtonCG, PriorPreconditioned

from conftest import DT, assert_matches_central_differences, sine_tasks, tiny_net, tiny_task

HEAD = ["2.weight", "2.bias"]


def head_net():
    """``tiny_net`` as an :class:`ibaml.core.nets.MLP` (same layers, same initial weights), which
    exposes ``head`` and ``embed``."""
    torch.manual_seed(0)
    return MLP(1, (6,), 1, activation=torch.nn.Tanh).to(DT)


def head_problem(method="map", optimizer=None, steps=3, outer="predictive", expectation="sampled",
                 variance_param="softplus", variance_start="prior", **prior_kw):
    net = head_net()
    if method == "map":
        prior = priors.IsotropicGaussian.from_module(net, include=HEAD, precision=prior_kw.pop("precision", 2.0),
                                                     learn_precision=True)
        inference = ibaml.MAP()
    else:
        prior = priors.DiagonalGaussian.from_module(net, include=HEAD, **prior_kw)
        inference = ibaml.Variational(num_samples=2, num_outer_samples=3, outer=outer, expectation=expectation,
                                      variance_param=variance_param, antithetic=variance_param == "std",
                                      variance_start=variance_start)
    model = ibaml.TaskModel(net, prior, ibaml.GaussianLikelihood(0.5, learn_noise=True).to(DT))
    problem = ibaml.TaskProblem(model, inference, ibaml.InnerLoop(optimizer or NewtonCG(cg_iters=12), steps))
    meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    task = tiny_task(dim=prior.dim if method != "map" else None)
    return problem, meta, task


def test_newton_cg_solves_a_linear_gaussian_head_in_one_step():
    """MAP of N(μ, λ⁻¹I) on a linear head over fixed features φ: the ridge solution
    w* = (ΦᵀΦ/σ² + λI)⁻¹ (Φᵀy/σ² + λμ), reached by one Newton step (rank ≤ 8 + 1 < 12 CG iterations)."""
    problem, meta, task = head_problem("map", NewtonCG(cg_iters=12), steps=1)
    v, diag = problem.solve(meta, task)
    body = torch.nn.Sequential(*list(tiny_net())[:2])
    phi = torch.cat([body(task["support_x"]), torch.ones(8, 1, dtype=DT)], 1)
    lam, sigma2 = float(meta["prior.precision_unconstrained"].exp()), 0.25
    mu = problem.model.prior_location(meta)
    A = phi.T @ phi / sigma2 + lam * torch.eye(phi.shape[1], dtype=DT)
    w_star = torch.linalg.solve(A, phi.T @ task["support_y"][:, 0] / sigma2 + lam * mu)
    assert torch.allclose(v["w"], w_star, atol=1e-10)
    assert float(diag.block_grad_norm["w"]) < 1e-9


def test_prior_preconditioned_step_is_the_proximal_step():
    """v' = (v − lr ∇NLL(v) + lr P μ)/(1 + lr P) for G = NLL + ½ P ||v − μ||²; plain SGD without curvature."""
    opt = PriorPreconditioned(lr=0.1)
    v, mu, P = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([100.0, 3.0])
    grad_nll = torch.tensor([0.3, -0.7])
    new, _ = opt.update({"w": v}, {"w": grad_nll + P * (v - mu)}, {}, curvature={"w": P})
    assert torch.allclose(new["w"], (v - 0.1 * grad_nll + 0.1 * P * mu) / (1 + 0.1 * P))
    plain, _ = opt.update({"w": v}, {"w": grad_nll}, {}, curvature=None)
    assert torch.allclose(plain["w"], SGD(lr=0.1).update({"w": v}, {"w": grad_nll}, {})[0]["w"])
    with pytest.raises(ValueError, match="lr=inf"):
        PriorPreconditioned(lr=float("inf")).update({"w": v}, {"w": grad_nll}, {}, curvature=None)
    with pytest.raises(ValueError, match="prior_step"):
        PriorPreconditioned(prior_step=2.0)


def test_prior_preconditioned_converges_where_sgd_at_the_same_step_diverges():
    """A stiff prior (λ = 1000) limits plain SGD to lr < 2/λ; the proximal step is stable at lr = 0.01."""
    net = tiny_net()
    prior = priors.IsotropicGaussian.from_module(net, precision=1000.0)
    model = ibaml.TaskModel(net, prior, ibaml.GaussianLikelihood(0.5).to(DT))
    meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    task = tiny_task()
    norms = {}
    for name, opt in (("sgd", SGD(lr=0.01)), ("prior", PriorPreconditioned(lr=0.01))):
        problem = ibaml.TaskProblem(model, ibaml.MAP(), ibaml.InnerLoop(opt, 60))
        norms[name] = float(problem.solve(meta, task)[1].grad_norm)
    assert not norms["sgd"] < 1e3
    assert norms["prior"] < 1e-6


def ift_gradient(problem, meta, task, v):
    return implicit_gradient(lambda vv, m: problem.outer(vv, m, task), lambda vv, m: problem.inner(vv, m, task),
                             v, meta, solver=Dense())[0]


CASES = [("map", "predictive", {}), ("variational", "predictive", dict(init_scale=0.5)),
         ("variational", "elbo", dict(init_scale=0.5)),
         ("variational", "predictive", dict(init_scale=0.5, expectation="linearized")),
         ("variational", "elbo", dict(init_scale=0.5, expectation="linearized")),
         ("variational", "predictive", dict(init_scale=0.5, variance_param="std")),
         ("variational", "expected", dict(init_scale=0.5)),
         ("variational", "expected", dict(init_scale=0.5, expectation="linearized"))]


@pytest.mark.parametrize("method, outer, kw", CASES, ids=["map", "variational", "variational-elbo", "linearized",
                                                         "linearized-elbo", "std-antithetic", "variational-expected",
                                                         "linearized-expected"])
def test_head_prior_meta_gradient_matches_finite_differences(method, outer, kw):
    """The body is shared (meta-parameters ``net.0.*``): its gradient flows through ``B = ∇²_vθ G``."""
    problem, meta, task = head_problem(method, NewtonCG(cg_iters=12), steps=6, outer=outer, **kw)
    assert {"net.0.weight", "net.0.bias"} <= set(meta)

    def solution(m):
        v, _ = problem.solve(m, task)
        return newton_polish(lambda vv: problem.inner(vv, m, task), v, steps=4)

    grads = ift_gradient(problem, meta, task, solution(meta))
    assert_matches_central_differences(grads, lambda m: problem.outer(solution(m), m, task), meta, index=2)


def test_newton_cg_reaches_a_stationary_variational_head_posterior():
    problem, meta, task = head_problem("variational", NewtonCG(cg_iters=12, max_step={"rho": 1.0}), steps=8,
                                       init_scale=1.0)
    _, diag = problem.solve(meta, task)
    assert float(diag.block_grad_norm["mean"]) < 1e-8 and float(diag.block_grad_norm["rho"]) < 1e-8


@pytest.mark.parametrize("variance_param", ["softplus", "std"])
def test_fixed_point_variance_start_solves_the_variance_block_of_a_linear_gaussian_head(variance_param):
    """For the linearised expectation of a linear-Gaussian head ``∂E_q[NLL]/∂s = ½h`` is constant, so
    one fixed-point step ``1/s = 1/s₀ + (2/β) ∂G/∂s`` lands on the stationary variances
    ``1/s = 1/σ² + h/β``; from the prior the variance block is far from stationary."""
    block = "rho" if variance_param == "softplus" else "std"
    norms = {}
    for start in ("prior", "fixed_point"):
        problem, meta, task = head_problem("variational", steps=0, expectation="linearized", init_scale=1.0,
                                           variance_param=variance_param, variance_start=start)
        v, diag = problem.solve(meta, task)
        norms[start] = float(diag.block_grad_norm[block])
    assert norms["prior"] > 1e-2
    assert norms["fixed_point"] < 1e-10
    problem, meta, task = head_problem("variational", steps=4, expectation="linearized", init_scale=1.0,
                                       variance_start="fixed_point")
    _, diag = problem.solve(meta, task)
    assert float(diag.grad_norm) < 1e-8


def test_fixed_point_variance_start_is_differentiated_through_by_unrolling():
    """ABML differentiates the inner loop, its start included (a gradient of ``G`` inside the
    graph): the unrolled meta-gradient equals central differences of the same computation."""
    problem, meta, task = head_problem("variational", PriorPreconditioned(lr={"rho": float("inf")}, default_lr=0.02,
                                                                          prior_step=0.5),
                                       steps=3, expectation="sampled", init_scale=0.5, variance_start="fixed_point")
    outer = lambda m: problem.outer(problem.solve(m, task, differentiable=True)[0], m, task)
    grads = torch.func.grad(outer)(meta)
    assert_matches_central_differences(grads, outer, meta, index=2)


def test_variance_start_is_validated():
    with pytest.raises(ValueError, match="variance_start"):
        ibaml.Variational(variance_start="posterior")


def test_meta_step_reports_stationarity_per_block():
    net = tiny_net()
    learner = ibaml.build_learner("ibaml", net, ibaml.GaussianLikelihood(0.5, learn_noise=True).to(DT),
                                  include=HEAD, init_scale=1.0, inner_optimizer="newton", inner_steps=4)
    stats = learner.meta_step(sine_tasks(4, torch.Generator().manual_seed(0)))
    for block in ("mean", "rho"):
        value = stats[f"inner_grad_norm.{block}"]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value)
    stats = ibaml.build_learner("maml", tiny_net(), ibaml.GaussianLikelihood(0.5).to(DT)).meta_step(
        sine_tasks(4, torch.Generator().manual_seed(0)))
    assert "inner_grad_norm.w" in stats


def test_relative_and_per_tensor_initial_scales():
    net = tiny_net()
    prior = priors.DiagonalGaussian.from_module(net, relative_scale=0.5)
    for i, (name, p) in enumerate(net.named_parameters()):
        scale = prior.scale.detach()[prior.spec.segment_ids() == i]
        assert torch.allclose(scale, 0.5 * p.detach().pow(2).mean().sqrt().expand_as(scale)), name
    per = priors.DiagonalGaussian.from_module(net, include=HEAD, init_scale={"2.weight": 0.1, "2.bias": 1.0})
    assert torch.allclose(per.scale.detach(), torch.tensor([0.1] * 6 + [1.0], dtype=DT))
    with pytest.raises(ValueError, match="2.bias"):
        priors.DiagonalGaussian.from_module(net, include=HEAD, init_scale={"2.weight": 0.1})
    with pytest.raises(ValueError, match="outer"):
        ibaml.Variational(outer="query")


def test_head_prior_computes_features_once_and_agrees_with_the_full_network():
    """``net_outputs`` of a head-only prior (features once, the head per draw) equals the
    network evaluated at each draw, for the MLP and Conv4, in value and meta-gradient."""
    from ibaml.core.nets import MLP, Conv4

    for net, x in ((MLP(1, (8, 8), 1).to(DT), torch.randn(5, 1, dtype=DT)),
                   (Conv4(in_channels=1, hidden=4, out_dim=3, image_size=16).to(DT), torch.randn(6, 1, 16, 16, dtype=DT))):
        prior = priors.DiagonalGaussian.from_module(net, include=priors.last_layer(net))
        model = ibaml.TaskModel(net, prior, ibaml.GaussianLikelihood(0.5).to(DT))
        assert model._head_keys is not None
        meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
        weights = prior.initial_weights + 0.1 * torch.randn(4, prior.dim, dtype=DT)
        fast = lambda m: model.net_outputs(m, weights, x)
        slow = lambda m: torch.func.vmap(lambda w: model.net_output(m, w, x))(weights)
        assert torch.allclose(fast(meta), slow(meta), atol=1e-12)
        g_fast = torch.func.grad(lambda m: fast(m).sin().sum())(meta)
        g_slow = torch.func.grad(lambda m: slow(m).sin().sum())(meta)
        for k in meta:
            assert torch.allclose(g_fast[k], g_slow[k], atol=1e-10), k
    full = ibaml.TaskModel(tiny_net(), priors.DiagonalGaussian.from_module(tiny_net()), ibaml.GaussianLikelihood())
    assert full._head_keys is None


def test_linearized_expectation_is_exact_for_a_linear_gaussian_head():
    """E_q Σ_n (y_n − φ_nᵀw)²/(2σ²) = Σ_n (y_n − φ_nᵀm)²/(2σ²) + ½ Σ_i s_i Σ_n φ_ni²/σ² (+ log-normaliser):
    the linearised objective against a large antithetic Monte Carlo estimate, and its
    stationary variances against s = 1/(1/σ² + h/β)."""
    problem, meta, task = head_problem("variational", NewtonCG(cg_iters=12, max_step={"rho": 3.0}), steps=12,
                                       expectation="linearized", init_scale=0.5)
    method, model = problem.method, problem.model
    v = problem.init(meta)
    v = {"mean": v["mean"] + 0.3, "rho": v["rho"] - 0.5}
    linear = method.expected_nll(model, v, meta, task["support_x"], task["support_y"], None)
    sampled = ibaml.Variational(num_samples=2, antithetic=True)
    eps = sampled.draws(1, 200_000, model.prior.dim, torch.Generator().manual_seed(0), dtype=DT)[0]
    mc = sampled.expected_nll(model, v, meta, task["support_x"], task["support_y"], eps)
    assert float(linear) == pytest.approx(float(mc), rel=2e-3)
    solution, diag = problem.solve(meta, task)
    assert float(diag.grad_norm) < 1e-8
    body = torch.nn.Sequential(*list(tiny_net())[:2])
    phi = torch.cat([body(task["support_x"]), torch.ones(8, 1, dtype=DT)], 1)
    h = (phi ** 2).sum(0) / 0.25
    prior_var = model.prior.variance().detach()
    assert torch.allclose(method.variance(solution), 1 / (1 / prior_var + h / method.beta), rtol=1e-8)


def test_every_inner_optimiser_takes_one_step_on_the_objective():
    """The one shape: a gradient method's step is its rule applied to ∇G, an init/update object
    is taken as one, and NewtonCG on a quadratic lands on its minimiser."""
    from ibaml.core.optim import SGD, Adam, GradientOptimizer, NewtonCG, PriorPreconditioned, as_inner_optimizer
    target = torch.tensor([1.0, -2.0], dtype=torch.float64)
    objective = lambda v: 0.5 * ((v["w"] - target) ** 2 * torch.tensor([1.0, 4.0], dtype=torch.float64)).sum()
    v = {"w": torch.zeros(2, dtype=torch.float64)}
    grads = torch.func.grad(objective)(v)
    for opt in (SGD(lr=0.1), SGD(lr=0.1, momentum=0.5), Adam(lr=0.1)):
        assert isinstance(opt, GradientOptimizer)
        stepped, _ = opt.step(objective, v, opt.init(v))
        ruled, _ = opt.update(v, grads, opt.init(v))
        assert torch.equal(stepped["w"], ruled["w"])
    prior = PriorPreconditioned(lr=0.1)
    curvature = {"w": torch.ones(2, dtype=torch.float64)}
    stepped, _ = prior.step(objective, v, prior.init(v), curvature=curvature)
    assert torch.equal(stepped["w"], prior.update(v, grads, {}, curvature=curvature)[0]["w"])

    class Rule:   # init/update only
        def init(self, params):
            return {}

        def update(self, params, grads, state):
            return {k: params[k] - 0.5 * grads[k] for k in params}, state

    wrapped = as_inner_optimizer(Rule())
    assert torch.allclose(wrapped.step(objective, v, {})[0]["w"], -0.5 * grads["w"])
    newton = NewtonCG(cg_iters=2)
    assert torch.allclose(newton.step(objective, v, newton.init(v))[0]["w"], target)


@pytest.mark.parametrize("noise", ["shared", "conjugate"])
def test_expected_outer_objective_is_the_posterior_average_of_the_query_nll(noise):
    """``outer="expected"``: the closed form over a linear-Gaussian head's outputs (``log N(y; μ_f, R)
    − v_f/(2R)``, with the weights' spread under the task noise for a conjugate one) against the
    sampled form on a large antithetic set of draws, and below the log predictive density's loss
    by Jensen's inequality (``E_q[−log p] ≥ −log E_q[p]``)."""
    problem, meta, task = head_problem("variational", NewtonCG(cg_iters=12, max_step={"rho": 3.0}), steps=6,
                                       outer="expected", expectation="linearized", init_scale=0.5)
    model = problem.model
    if noise == "conjugate":
        model = ibaml.TaskModel(model.net, model.prior,
                                ibaml.ConjugateNoiseGaussianLikelihood(0.5, prior_count=2.0, prior_noise=0.3).to(DT))
        meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    v, _ = ibaml.TaskProblem(model, problem.method, problem.inner_loop).solve(meta, task)
    exact = problem.method.outer_objective(model, v, meta, task)
    sampled = ibaml.Variational(num_outer_samples=2, antithetic=True, outer="expected")
    draws = dict(task, eps_outer=sampled.draws(1, 200_000, model.prior.dim, torch.Generator().manual_seed(1), dtype=DT)[0])
    mc = sampled.outer_objective(model, v, meta, draws)
    assert float(exact) == pytest.approx(float(mc), rel=2e-3)
    predictive = ibaml.Variational(outer="predictive", expectation="linearized").outer_objective(model, v, meta, task)
    assert float(exact) > float(predictive)
