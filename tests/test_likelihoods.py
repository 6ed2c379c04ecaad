"""Likelihoods beyond the plain ones: the per-task noise Gaussian (its formulas, its Fisher
curvature) and the softmax with a learned logit scale, each with exact meta-gradients
(float64: dense implicit solve against central finite differences)."""

import dataclasses
import math

import pytest
import torch

import ibaml
import priors
from ibaml.core.implicit_function import implicit_vjp
from ibaml.core.inner_loop import newton_polish
from ibaml.core.linalg import Dense
from ibaml.core.nets import MLP
from ibaml.core.tree import tree_add

from conftest import DT, assert_matches_central_differences, tiny_task


def test_log_prob_is_the_gaussian_with_the_output_noise():
    lik = ibaml.TaskNoiseGaussianLikelihood(noise=0.5, max_log_ratio=3.0).to(DT)
    out = torch.tensor([[0.3, -0.7], [1.0, 2.0]], dtype=DT)
    y = torch.tensor([[0.1], [-0.4]], dtype=DT)
    log_std = 3.0 * torch.tanh(out[:, 1] / 3.0) + math.log(0.5)
    expected = -0.5 * ((y[:, 0] - out[:, 0]) ** 2 / torch.exp(2 * log_std) + 2 * log_std + math.log(2 * math.pi))
    assert torch.allclose(lik.log_prob_points(out, y), expected)
    with pytest.raises(ValueError, match="2d network outputs"):
        lik.log_prob_points(torch.zeros(2, 3, dtype=DT), torch.zeros(2, 1, dtype=DT))


@pytest.mark.parametrize("scale_mean", [False, True])
def test_output_curvature_is_the_fisher_information(scale_mean):
    """``E_y[−∂² log p / ∂f²]`` on the diagonal; the two points ``y = μ ± σ`` match the first two
    moments of ``y``, which is all the Hessian depends on."""
    lik = ibaml.TaskNoiseGaussianLikelihood(noise=0.8, max_log_ratio=2.0, scale_mean=scale_mean).to(DT)
    out = torch.tensor([[0.4, 0.9]], dtype=DT)
    sigma = 0.8 * math.exp(2.0 * math.tanh(0.9 / 2.0))
    mu = sigma * 0.4 if scale_mean else 0.4
    hessians = [torch.autograd.functional.hessian(
        lambda f: -lik.log_prob_points(f[None], torch.tensor([[mu + sign * sigma]], dtype=DT)).sum(), out[0])
        for sign in (1.0, -1.0)]
    fisher = 0.5 * (hessians[0] + hessians[1])
    assert torch.allclose(lik.output_curvature(out)[0], torch.diagonal(fisher), rtol=1e-8)
    if not scale_mean:
        assert abs(float(fisher[0, 1])) < 1e-12     # the mean and the scale are orthogonal


@pytest.mark.parametrize("scale_mean", [False, True])
def test_gaussian_outputs_reduce_to_the_point_likelihood_and_widen_with_variance(scale_mean):
    lik = ibaml.TaskNoiseGaussianLikelihood(noise=0.5, scale_mean=scale_mean).to(DT)
    mean = torch.tensor([[0.2, -0.3], [0.5, 0.1]], dtype=DT)
    y = torch.tensor([[1.5], [0.4]], dtype=DT)
    zero = torch.zeros_like(mean)
    assert torch.allclose(lik.log_prob_gaussian_outputs(mean, zero, y), lik.log_prob_points(mean, y))
    mu, var = lik.predictive(mean[None])
    assert torch.allclose(mu, lik._split(mean)[0]) and torch.allclose(var, torch.exp(2 * lik._split(mean)[1]))
    wider = lik.log_prob_gaussian_outputs(mean, torch.full_like(mean, 0.3), y)
    assert wider[0] > lik.log_prob_points(mean, y)[0]    # a residual of 1.3 is better explained


def task_noise_problem(scale_mean=False):
    torch.manual_seed(0)
    net = MLP(1, (5,), 1, activation=torch.nn.Tanh, noise_head=True).to(DT)
    prior = priors.DiagonalGaussian.from_module(net, include=priors.last_layer(net), init_scale=0.7)
    model = ibaml.TaskModel(net, prior, ibaml.TaskNoiseGaussianLikelihood(0.5, scale_mean=scale_mean).to(DT))
    inference = ibaml.Variational(expectation="linearized")
    problem = ibaml.TaskProblem(model, inference, ibaml.InnerLoop(ibaml.core.optim.NewtonCG(cg_iters=30, max_step={"mean": 1.0, "rho": 1.0}), 30))
    meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    return problem, meta, tiny_task(n=8)


def solution(problem, meta, task):
    v, _ = problem.solve(meta, task)
    return newton_polish(lambda vv: problem.inner(vv, meta, task), v, steps=8)


def implicit_meta_gradient(problem, meta, task, v):
    """``(dF/dθ, its direct part ∂θF, its implicit part)`` at the solution ``v``, by a dense solve."""
    (g_v, g_m), _ = torch.func.grad_and_value(problem.outer, argnums=(0, 1))(v, meta, task)
    cross, _ = implicit_vjp(lambda vv, m: problem.inner(vv, m, task), v, meta, g_v, solver=Dense())
    return tree_add(g_m, cross), g_m, cross


def assert_matches_finite_differences_of_polished_solutions(grads, problem, meta, task, v):
    """The perturbed problems are solved by Newton steps from the base solution (continuation): a
    fresh solve from the prior can stop on a different, less polished iterate."""
    def outer_at(m):
        return problem.outer(newton_polish(lambda vv: problem.inner(vv, m, task), v, steps=6), m, task)

    assert_matches_central_differences(grads, outer_at, meta)


@pytest.mark.parametrize("scale_mean", [False, True])
def test_implicit_gradient_with_task_noise_matches_finite_differences(scale_mean):
    problem, meta, task = task_noise_problem(scale_mean)
    v = solution(problem, meta, task)
    gv = torch.func.grad(lambda vv: problem.inner(vv, meta, task))(v)
    assert max(float(g.abs().max()) for g in gv.values()) < 1e-9
    grads, _, _ = implicit_meta_gradient(problem, meta, task, v)
    assert_matches_finite_differences_of_polished_solutions(grads, problem, meta, task, v)


def test_logit_scale_applies_to_the_inner_objective_only_when_asked():
    out = torch.tensor([[0.0, 1.0, -1.0]], dtype=DT)
    y = torch.tensor([1])
    both = ibaml.CategoricalLikelihood(scale=2.0).to(DT)
    outer_only = ibaml.CategoricalLikelihood(scale=2.0, scale_inner=False).to(DT)
    plain = ibaml.CategoricalLikelihood().to(DT)
    assert torch.allclose(both.log_prob_points(out, y), torch.log_softmax(2 * out, -1)[:, 1])
    assert torch.allclose(outer_only.log_prob_points(out, y), plain.log_prob_points(out, y))
    assert torch.allclose(outer_only.predictive_log_prob_points(out, y), both.log_prob_points(out, y))
    assert torch.allclose(outer_only.predictive(out[None]), torch.softmax(2 * out, -1))
    p = torch.softmax(2 * out, -1)
    assert torch.allclose(both.output_curvature(out), 4 * p * (1 - p))


@pytest.mark.parametrize("scale_inner", [True, False])
def test_implicit_gradient_with_learned_logit_scale_matches_finite_differences(scale_inner):
    torch.manual_seed(0)
    net = MLP(2, (5,), 3, activation=torch.nn.Tanh).to(DT)
    prior = priors.IsotropicGaussian.from_module(net, include=priors.last_layer(net), precision=2.0)
    lik = ibaml.CategoricalLikelihood(scale=1.5, learn_scale=True, scale_inner=scale_inner).to(DT)
    model = ibaml.TaskModel(net, prior, lik)
    problem = ibaml.TaskProblem(model, ibaml.MAP(), ibaml.InnerLoop(ibaml.core.optim.NewtonCG(cg_iters=30), 10))
    meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    assert "likelihood.scale_unconstrained" in meta
    g = torch.Generator().manual_seed(1)
    task = {"support_x": torch.randn(6, 2, generator=g, dtype=DT), "support_y": torch.arange(6) % 3,
            "query_x": torch.randn(9, 2, generator=g, dtype=DT), "query_y": torch.arange(9) % 3}
    v = solution(problem, meta, task)
    grads, _, cross = implicit_meta_gradient(problem, meta, task, v)
    if not scale_inner:   # τ enters the query loss only: no path through the inner solution
        assert float(cross["likelihood.scale_unconstrained"].abs()) < 1e-12
    assert_matches_finite_differences_of_polished_solutions(grads, problem, meta, task, v)


def test_task_noise_presets_start_the_log_noise_prior_narrow_and_bound_newton():
    net = MLP(1, (8,), 1, noise_head=True)
    learner = ibaml.build_learner("ibaml", net, ibaml.TaskNoiseGaussianLikelihood(1.0), seed=0)
    scale = learner.prior.unflat(learner.prior.scale.detach())
    assert torch.allclose(scale["2.log_noise"], torch.tensor([0.1]))
    assert torch.allclose(scale["2.weight"], torch.ones(1, 8))
    optimizer = learner.problem.inner_loop.optimizer
    assert optimizer.max_step == {"rho": 3.0, "mean": 1.0, "w": 1.0} and optimizer.prior_damping == 1.0


# ---------------------------------------------------------------------- conjugate task noise

def conjugate_problem(method):
    torch.manual_seed(0)
    net = MLP(1, (5,), 1, activation=torch.nn.Tanh).to(DT)
    prior = priors.DiagonalGaussian.from_module(net, include=priors.last_layer(net), init_scale=0.7)
    lik = ibaml.ConjugateNoiseGaussianLikelihood(0.5, prior_count=1.5, prior_noise=0.7).to(DT)
    model = ibaml.TaskModel(net, prior, lik)
    inference = ibaml.MAP() if method == "map" else ibaml.Variational(expectation="linearized")
    problem = ibaml.TaskProblem(model, inference, ibaml.InnerLoop(ibaml.core.optim.NewtonCG(cg_iters=30), 10))
    meta = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    return problem, meta, tiny_task(n=8)


def test_conjugate_noise_ratio_is_the_normal_inverse_gamma_posterior():
    """For a linear model with prior ``w | σ_t² ~ N(μ, (σ_t²/σ²) Σ)``, ``σ_t² ~ IG(a₀, a₀s₀²)``, the
    noise's exact posterior is ``IG(a₀ + N/2, b_N)``: ``b_N`` from the closed form against the ratio
    that :func:`ibaml.core.inference.task_noise_ratio` computes at the solved posterior mean."""
    problem, meta, task = conjugate_problem("map")
    model = problem.model
    v = solution(problem, meta, task)
    ratio = ibaml.core.inference.task_noise_ratio(model, meta, v["w"], task)
    # the textbook NIG update on the head's features (weights then bias)
    phi = torch.cat([model.net.embed(task["support_x"]), torch.ones(8, 1, dtype=DT)], 1)
    y = task["support_y"][:, 0]
    sigma2 = float(model.likelihood.noise) ** 2
    a0, s0 = float(model.likelihood.prior_count.detach()), float(model.likelihood.prior_noise.detach())
    prior_var = 1.0 / model.prior_precision_diag(meta)            # Σ (diagonal) at σ_t = σ
    mu0 = model.prior_location(meta)
    V0_inv = torch.diag(sigma2 / prior_var)                                 # Σ = σ² V0
    Vn = torch.linalg.inv(V0_inv + phi.T @ phi)
    mun = Vn @ (V0_inv @ mu0 + phi.T @ y)
    assert torch.allclose(mun, v["w"], atol=1e-8)                           # the mean does not depend on σ_t
    bn = a0 * s0 ** 2 + 0.5 * (y @ y + mu0 @ V0_inv @ mu0 - mun @ (V0_inv + phi.T @ phi) @ mun)
    assert float(ratio) == pytest.approx(float(bn) / ((a0 + 4) * sigma2), rel=1e-10)


def test_conjugate_noise_scales_the_predictive():
    lik = ibaml.ConjugateNoiseGaussianLikelihood(1.0, prior_count=2.0, prior_noise=0.5).to(DT)
    outputs = torch.randn(6, 4, 1, dtype=DT)
    mean, var = lik.predictive(outputs)
    mean2, var2 = lik.predictive(outputs, torch.tensor(3.0, dtype=DT))
    assert torch.equal(mean, mean2) and torch.allclose(var2, 3 * var)
    assert float(lik.noise_ratio(torch.tensor(0.0), torch.tensor(0.0), 10)) == pytest.approx(2 * 0.25 / 7)
    with pytest.raises(ValueError, match="prior_count"):
        ibaml.ConjugateNoiseGaussianLikelihood(0.5, prior_count=0.0)


@pytest.mark.parametrize("method", ["map", "variational"])
def test_implicit_gradient_with_conjugate_noise_matches_finite_differences(method):
    """The outer objective reads the support set through the task's noise ratio; the meta-gradient
    (dense implicit solve) still matches central differences of the polished solution's loss."""
    problem, meta, task = conjugate_problem(method)
    v = solution(problem, meta, task)
    grads, direct, _ = implicit_meta_gradient(problem, meta, task, v)
    assert float(direct["likelihood.prior_count_unconstrained"].abs()) > 1e-6     # a₀ is learned from the query
    assert_matches_finite_differences_of_polished_solutions(grads, problem, meta, task, v)


def test_learner_predicts_with_each_tasks_noise():
    torch.manual_seed(0)
    net = MLP(1, (8,), 1).to(DT)
    lik = ibaml.ConjugateNoiseGaussianLikelihood(1.0, prior_count=1.0, prior_noise=0.3).to(DT)
    learner = ibaml.build_learner("ibaml", net, lik)
    x = torch.linspace(-3, 3, 10, dtype=DT)[None, :, None].expand(2, -1, -1)
    y = torch.stack([0.1 * torch.sin(x[0]), 4.0 * torch.sin(x[1])])        # an easy and a hard task
    posterior = learner.adapt(x, y)
    assert posterior.noise_ratio.shape == (2,) and posterior.noise_ratio[1] > posterior.noise_ratio[0]
    _, var = learner.predict(posterior, x)
    _, plain = learner.predict(dataclasses.replace(posterior, noise_ratio=None), x)
    assert torch.allclose(var, posterior.noise_ratio[:, None, None] * plain)
    stats = learner.meta_step({"support_x": x, "support_y": y, "query_x": x, "query_y": y})
    assert math.isfinite(stats["loss"])
    assert all(torch.isfinite(p.grad).all() for p in lik.parameters())    # a₀ and s₀ are meta-learned


def test_linearized_head_predictive_is_exact():
    """The predictive of a variational head with the linearised expectation is computed in closed
    form (no draws); it agrees with the moments of many posterior draws."""
    torch.manual_seed(0)
    net = MLP(1, (8,), 1).to(DT)
    learner = ibaml.build_learner("ibaml", net, ibaml.GaussianLikelihood(0.3).to(DT), init_scale=0.5)
    x = torch.linspace(-3, 3, 6, dtype=DT)[None, :, None].expand(2, -1, -1)
    posterior = learner.adapt(x, torch.sin(x))
    mean, var = learner.predict(posterior, x)
    mean2, var2 = learner.predict(posterior, x)
    assert torch.equal(var, var2)                                            # deterministic
    outputs = learner.posterior_outputs(posterior, x, num_samples=20000)     # [T, S, N, 1]
    assert torch.allclose(mean, outputs.mean(1), atol=0.02)
    assert torch.allclose(var, outputs.var(1) + 0.09, rtol=0.05)


def test_conjugate_noise_prior_count_can_be_held_fixed_while_the_rest_is_learned():
    from ibaml import recipes
    fixed = ibaml.ConjugateNoiseGaussianLikelihood(noise=1.0, prior_count=5.0, learn_prior_count=False)
    learned = {n for n, _ in fixed.named_parameters()}
    assert not any("prior_count" in n for n in learned)
    assert any("prior_noise" in n for n in learned) and any("evidence_scale" in n for n in learned)
    assert float(fixed.prior_count) == 5.0 and "prior_count" in dict(fixed.named_buffers())
    # held or learned, the same a0 gives the same noise ratio
    free = ibaml.ConjugateNoiseGaussianLikelihood(noise=1.0, prior_count=5.0)
    args = (torch.tensor(12.0), torch.tensor(3.0), 10)
    assert float(fixed.noise_ratio(*args)) == pytest.approx(float(free.noise_ratio(*args).detach()), rel=1e-6)
    # iBaML's preset holds it, the others learn it
    lik = recipes.regression_likelihood("conjugate", *recipes.noise_prior_count("ibaml"))
    assert not any("prior_count" in n for n, _ in lik.named_parameters())
    lik = recipes.regression_likelihood("conjugate", *recipes.noise_prior_count("abml"))
    assert any("prior_count" in n for n, _ in lik.named_parameters())


def test_linear_noise_ratio_fit_recovers_the_generating_coefficients():
    """Query errors drawn from N(0, (c₁ + c₂ D_t) v) give back (c₁, c₂), from any start."""
    from ibaml.calibration import fit_linear_noise_ratio
    g = torch.Generator().manual_seed(0)
    D = torch.rand(2000, generator=g, dtype=DT) * 5
    v = 0.5 + torch.rand(2000, 50, generator=g, dtype=DT)
    e2 = ((0.3 + 0.7 * D)[:, None] * v) * torch.randn(2000, 50, generator=g, dtype=DT) ** 2
    for start in ((1.0, 1.0), (1e-3, 10.0)):
        c1, c2 = fit_linear_noise_ratio(D, e2, v, start)
        assert c1 == pytest.approx(0.3, rel=0.1) and c2 == pytest.approx(0.7, rel=0.03)
    with pytest.raises(ValueError, match="evidence must be"):
        fit_linear_noise_ratio(D[:3], e2, v)
    with pytest.raises(ValueError, match="positive"):
        fit_linear_noise_ratio(D, e2, -v)


def test_fit_prior_noise_sets_the_maximiser_of_the_held_out_likelihood():
    """``refit_noise_prior`` keeps a₀ and the parameters' identity, inverts ``noise_ratio`` exactly,
    and leaves the held-out NLL at a stationary point in (s₀, γ) no worse than before."""
    lik = ibaml.ConjugateNoiseGaussianLikelihood(1.0, prior_count=5.0, prior_noise=0.3, evidence_scale=0.5,
                                                 learn_prior_count=False).to(DT)
    D = torch.tensor([0.1, 1.0, 3.0, 8.0], dtype=DT)
    ratio = lik.noise_ratio(D, torch.zeros((), dtype=DT), 10).detach()
    assert torch.allclose(lik.evidence(ratio, 10), D)
    g = torch.Generator().manual_seed(1)
    unit = torch.ones(4, 50, dtype=DT)
    e2 = ((0.01 + 0.2 * D)[:, None] * unit) * torch.randn(4, 50, generator=g, dtype=DT) ** 2
    var = ratio[:, None] * unit

    def held_out_nll(s0, gamma):
        r = lik.noise_ratio(D, torch.zeros((), dtype=DT), 10) if s0 is None else \
            (5.0 * s0 ** 2 + 0.5 * gamma * D) / 10.0
        return float((0.5 * (e2 / (r[:, None] * unit) + torch.log(r[:, None] * unit))).mean().detach())

    before = held_out_nll(None, None)
    params = {n: p for n, p in lik.named_parameters()}
    from ibaml.calibration import refit_noise_prior
    s0, gamma = refit_noise_prior(lik, ratio, e2, var, 10)
    assert {n: p for n, p in lik.named_parameters()} == params and float(lik.prior_count) == 5.0
    assert float(lik.prior_noise.detach()) == pytest.approx(s0) and float(lik.evidence_scale.detach()) == pytest.approx(gamma)
    after = held_out_nll(s0, gamma)
    assert after < before
    for ds0, dg in ((1.05, 1.0), (0.95, 1.0), (1.0, 1.05), (1.0, 0.95)):   # a local minimum in (s₀, γ)
        assert held_out_nll(s0 * ds0, gamma * dg) >= after - 1e-9


def test_fit_noise_prior_on_held_out_tasks_keeps_the_means_and_fits_the_widths():
    from ibaml.data.sine import SineTaskDistribution
    torch.manual_seed(0)
    lik = ibaml.ConjugateNoiseGaussianLikelihood(1.0, prior_count=5.0, prior_noise=1.0,
                                                 learn_prior_count=False).to(DT)
    learner = ibaml.build_learner("ibaml", MLP(1, (8,), 1).to(DT), lik, inner_steps=3)
    tasks = SineTaskDistribution(shots=5, query=10).sample(40, torch.Generator().manual_seed(0), dtype=DT)
    before = learner.evaluate(tasks).metrics
    fitted = learner.fit_noise_prior(tasks, chunk=16)
    after = learner.evaluate(tasks).metrics
    assert fitted["tasks"] == 40 and fitted["prior_noise"][0] == 1.0
    assert after["mse"]["mean"] == pytest.approx(before["mse"]["mean"], rel=1e-9)   # the means do not move
    assert after["nll"]["mean"] < before["nll"]["mean"]
    with pytest.raises(TypeError, match="ConjugateNoiseGaussianLikelihood"):
        ibaml.build_learner("imaml", MLP(1, (8,), 1).to(DT), ibaml.GaussianLikelihood(1.0).to(DT)).fit_noise_prior(tasks)


def test_student_t_noise_ratio_fit_recovers_the_coefficients_and_the_tails():
    """Errors drawn from t_ν(0, (c₁ + c₂ D_t) v) give back (c₁, c₂, ν); Gaussian errors give a large ν."""
    from ibaml.calibration import fit_linear_noise_ratio_student_t
    g = torch.Generator().manual_seed(0)
    D = torch.rand(3000, generator=g, dtype=DT) * 5
    v = 0.5 + torch.rand(3000, 20, generator=g, dtype=DT)
    chi2 = torch.distributions.Chi2(torch.tensor(3.0, dtype=DT))
    torch.manual_seed(0)
    t3 = torch.randn(3000, 20, generator=g, dtype=DT) / (chi2.sample((3000, 20)) / 3).sqrt()
    scale2 = (0.3 + 0.7 * D)[:, None] * v
    c1, c2, nu = fit_linear_noise_ratio_student_t(D, scale2 * t3 ** 2, v)
    assert c1 == pytest.approx(0.3, rel=0.15) and c2 == pytest.approx(0.7, rel=0.05) and nu == pytest.approx(3.0, rel=0.1)
    gauss = scale2 * torch.randn(3000, 20, generator=g, dtype=DT) ** 2
    assert fit_linear_noise_ratio_student_t(D, gauss, v)[2] > 50
    with pytest.raises(ValueError, match="df_bounds"):
        fit_linear_noise_ratio_student_t(D, gauss, v, df_bounds=(0.5, 10.0))


@pytest.mark.parametrize("family", ["lognormal", "student_t"])
def test_fit_noise_prior_with_tails_makes_the_predictive_heavy_tailed(family):
    """With ``tails`` the held-out fit sets the family's shape, the reports score that family (its
    NLL, not the Gaussian's), the means do not move, the shape travels with the state dict (one
    saved without it loads as the Gaussian), a plain refit resets it, and an unknown family is refused."""
    from ibaml.calibration import LogNormalScale, StudentTTails
    from ibaml.data.sine import SineTaskDistribution
    torch.manual_seed(0)
    lik = ibaml.ConjugateNoiseGaussianLikelihood(1.0, prior_count=5.0, prior_noise=1.0,
                                                 learn_prior_count=False).to(DT)
    learner = ibaml.build_learner("ibaml", MLP(1, (8,), 1).to(DT), lik, inner_steps=3)
    tasks = SineTaskDistribution(shots=5, query=10).sample(40, torch.Generator().manual_seed(0), dtype=DT)
    before = learner.evaluate(tasks)
    assert lik.tails is None and "tails" not in before.extra
    fitted = learner.fit_noise_prior(tasks, chunk=16, tails=family)
    tails = lik.tails
    assert isinstance(tails, {"lognormal": LogNormalScale, "student_t": StudentTTails}[family])
    assert fitted["tails"] == (None, tails.describe())
    after = learner.evaluate(tasks)
    assert after.extra["tails"] == tails.describe()
    assert after.metrics["mse"]["mean"] == pytest.approx(before.metrics["mse"]["mean"], rel=1e-9)
    post = learner.adapt(tasks.support_x, tasks.support_y)
    mean, scale2 = learner.predict(post, tasks.query_x)
    expected = tails.nll(mean[..., 0], scale2[..., 0], tasks.query_y[..., 0]).mean()
    assert after.metrics["nll"]["mean"] == pytest.approx(float(expected), rel=1e-12)
    own = {k[len("model.likelihood."):]: v for k, v in learner.state_dict().items() if k.startswith("model.likelihood.")}
    fresh = ibaml.ConjugateNoiseGaussianLikelihood(1.0, prior_count=5.0, prior_noise=1.0, learn_prior_count=False).to(DT)
    fresh.load_state_dict(own)
    assert fresh.tails == tails
    fresh.load_state_dict({k: v for k, v in own.items() if k not in ("predictive_df", "predictive_scale_sd")})
    assert fresh.tails is None
    learner.fit_noise_prior(tasks, chunk=16)
    assert lik.tails is None
    with pytest.raises(ValueError, match="tails must be one of"):
        learner.fit_noise_prior(tasks, chunk=16, tails="cauchy")


def test_lognormal_noise_ratio_fit_recovers_the_coefficients_and_the_spread():
    """Errors N(0, (c₁ + c₂ D_t) v e^{2τu}) with u ~ N(0, 1) per point give back (c₁, c₂, τ);
    Gaussian errors give a τ near 0."""
    from ibaml.calibration import fit_linear_noise_ratio_lognormal
    g = torch.Generator().manual_seed(0)
    D = torch.rand(3000, generator=g, dtype=DT) * 5
    v = 0.5 + torch.rand(3000, 20, generator=g, dtype=DT)
    scale2 = (0.3 + 0.7 * D)[:, None] * v
    e = torch.randn(3000, 20, generator=g, dtype=DT) * torch.exp(0.6 * torch.randn(3000, 20, generator=g, dtype=DT))
    c1, c2, tau = fit_linear_noise_ratio_lognormal(D, scale2 * e ** 2, v)
    assert c1 == pytest.approx(0.3, rel=0.15) and c2 == pytest.approx(0.7, rel=0.05) and tau == pytest.approx(0.6, rel=0.05)
    gauss = scale2 * torch.randn(3000, 20, generator=g, dtype=DT) ** 2
    assert fit_linear_noise_ratio_lognormal(D, gauss, v)[2] < 0.1
    with pytest.raises(ValueError, match="sd_bounds"):
        fit_linear_noise_ratio_lognormal(D, gauss, v, sd_bounds=(0.5, 0.1))
