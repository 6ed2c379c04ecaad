import math
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch.distributions import LowRankMultivariateNormal, Normal, StudentT as TStudentT, kl_divergence

import ibaml
import priors
from ibaml.core.linalg import Dense

from conftest import rel_err, sine_tasks

DT = torch.float64


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(DT)


def random_params(prior, seed=1):
    g = torch.Generator().manual_seed(seed)
    return prior.unflat(torch.randn(prior.dim, generator=g, dtype=DT))


def test_log_probs_match_torch_distributions():
    n = net()
    iso = priors.IsotropicGaussian.from_module(n, precision=2.5)
    diag = priors.DiagonalGaussian.from_module(n, init_scale=0.3)
    layer = priors.LayerwiseGaussian.from_module(n, init_scale=0.4)
    low = priors.LowRankGaussian.from_module(n, rank=2, init_scale=0.3, init_factor_scale=0.2)
    st = priors.StudentT.from_module(n, df=3.0, init_scale=0.2)
    w = random_params(iso)
    flat = iso.flat(w)
    assert torch.allclose(iso.log_prob(w), Normal(iso.loc, 1 / math.sqrt(2.5)).log_prob(flat).sum())
    assert torch.allclose(diag.log_prob(w), Normal(diag.loc, diag.scale).log_prob(flat).sum())
    assert torch.allclose(layer.log_prob(w), Normal(layer.loc, layer.variance().sqrt()).log_prob(flat).sum())
    ref = LowRankMultivariateNormal(low.loc, low.cov_factor, low.cov_diag).log_prob(flat)
    assert torch.allclose(low.log_prob(w), ref)
    assert torch.allclose(st.log_prob(w), TStudentT(3.0, st.loc, st.scale).log_prob(flat).sum())


def test_closed_form_kl_matches_torch_and_monte_carlo():
    n = net()
    g = torch.Generator().manual_seed(3)
    for prior in (priors.IsotropicGaussian.from_module(n, precision=3.0),
                  priors.DiagonalGaussian.from_module(n, init_scale=0.3),
                  priors.LayerwiseGaussian.from_module(n, init_scale=0.3),
                  priors.LowRankGaussian.from_module(n, rank=2, init_scale=0.3, init_factor_scale=0.2)):
        m = prior.location() + 0.1 * torch.randn(prior.dim, generator=g, dtype=DT)
        s = 0.01 + 0.05 * torch.rand(prior.dim, generator=g, dtype=DT)
        closed = prior.kl(m, s)
        if isinstance(prior, priors.LowRankGaussian):
            p = LowRankMultivariateNormal(prior.loc, prior.cov_factor, prior.cov_diag)
            q = LowRankMultivariateNormal(m, torch.zeros(prior.dim, 1, dtype=DT), s)
            ref = kl_divergence(q, p)
        else:
            ref = kl_divergence(Normal(m, s.sqrt()), Normal(prior.loc, prior.variance().sqrt())).sum()
        assert torch.allclose(closed, ref, rtol=1e-9), type(prior).__name__
        eps = torch.randn(200_000, prior.dim, generator=g, dtype=DT)
        mc = priors.Prior.kl(prior, m, s, eps)
        assert float(mc) == pytest.approx(float(closed), rel=0.02, abs=0.02), type(prior).__name__


def test_low_rank_precision_diag_is_diag_of_inverse_covariance():
    prior = priors.LowRankGaussian.from_module(net(), rank=3, init_scale=0.5, init_factor_scale=0.3)
    cov = torch.diag(prior.cov_diag) + prior.cov_factor @ prior.cov_factor.T
    assert torch.allclose(prior.precision_diag(), torch.linalg.inv(cov).diagonal(), rtol=1e-9)


def test_rsample_moments():
    prior = priors.DiagonalGaussian.from_module(net(), init_scale=0.3)
    draws = prior.rsample(40_000, torch.Generator().manual_seed(4))
    flat = torch.func.vmap(prior.flat)(draws)
    assert torch.allclose(flat.mean(0), prior.loc, atol=0.01)
    assert torch.allclose(flat.std(0), prior.scale, rtol=0.03)
    low = priors.LowRankGaussian.from_module(net(), rank=2, init_scale=0.3, init_factor_scale=0.3)
    flat = torch.func.vmap(low.flat)(low.rsample(40_000, torch.Generator().manual_seed(5)))
    cov = torch.diag(low.cov_diag) + low.cov_factor @ low.cov_factor.T
    assert torch.allclose(torch.cov(flat.T), cov, atol=0.01)


def test_name_filters():
    n = net()
    names = [k for k, _ in n.named_parameters()]
    assert priors.DiagonalGaussian.from_module(n, include=r"^2\.").names == ("2.weight", "2.bias")
    assert priors.DiagonalGaussian.from_module(n, include=["0.bias"]).names == ("0.bias",)
    assert priors.DiagonalGaussian.from_module(n, include=lambda k: k.endswith("weight")).names == ("0.weight", "2.weight")
    assert priors.DiagonalGaussian.from_module(n).names == tuple(names)
    with pytest.raises(ValueError, match="selects no parameter"):
        priors.DiagonalGaussian.from_module(n, include="nothing")
    with pytest.raises(ValueError, match="not parameters"):
        priors.DiagonalGaussian.from_module(n, include=["3.weight"])


@pytest.mark.parametrize("make, message", [
    (lambda n: priors.DiagonalGaussian.from_module(n, init_scale=0.0), "init_scale"),
    (lambda n: priors.DiagonalGaussian.from_module(n, init_scale=-1.0), "init_scale"),
    (lambda n: priors.IsotropicGaussian.from_module(n, precision=-2.0), "precision"),
    (lambda n: priors.LayerwiseGaussian.from_module(n, init_scale=float("nan")), "init_scale"),
    (lambda n: priors.LowRankGaussian.from_module(n, rank=0), "rank"),
    (lambda n: priors.StudentT.from_module(n, df=0.0), "df"),
    (lambda n: priors.GaussianHyperprior(rate=0.0), "rate"),
])
def test_bad_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make(net())


def test_scales_stay_positive_under_aggressive_meta_updates():
    n = net()
    for prior in (priors.DiagonalGaussian.from_module(n), priors.IsotropicGaussian.from_module(n, learn_precision=True),
                  priors.LowRankGaussian.from_module(n)):
        opt = torch.optim.Adam(prior.parameters(), lr=5.0)
        w = random_params(prior)
        for _ in range(20):
            opt.zero_grad()
            (-prior.log_prob(w) * 100).backward()
            opt.step()
        assert (prior.variance() > 0).all() and torch.isfinite(prior.variance()).all()


def test_hyperprior_is_finite_and_adds_gradient():
    n = net()
    plain = priors.DiagonalGaussian.from_module(n, init_scale=0.3)
    hyper = priors.DiagonalGaussian.from_module(n, init_scale=0.3,
                                                hyperprior=priors.GaussianHyperprior(loc_scale=1.0, concentration=2.0,
                                                                                     rate=0.1))
    assert plain.hyper_log_prob() == 0
    value = hyper.hyper_log_prob()
    assert torch.isfinite(value)
    value.backward()
    assert hyper.scale_unconstrained.grad.abs().sum() > 0 and hyper.loc_unconstrained.grad.abs().sum() > 0


def test_flat_prior_has_no_kl():
    prior = priors.Flat.from_module(net())
    assert prior.log_prob(random_params(prior)) == 0
    with pytest.raises(ValueError, match="improper"):
        prior.kl(prior.location(), torch.ones(prior.dim, dtype=DT))


def test_import_priors_on_its_own():
    # a custom prior module starts with ``from priors import Prior``, before ibaml is imported
    code = "from priors import Prior, DiagonalGaussian; import torch; DiagonalGaussian.from_module(torch.nn.Linear(2, 1))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("initial", [False, True])
def test_importing_and_using_priors_leaves_the_pyro_setting_as_it_was(initial):
    # module-local parameters are scoped to the priors' and likelihoods' own construction and
    # calls; the process-wide setting stays the user's
    code = (f"import pyro; pyro.settings.set(module_local_params={initial}); "
            "import torch, priors, ibaml; "
            f"assert pyro.settings.get('module_local_params') is {initial}, 'import changed it'; "
            "net = torch.nn.Linear(2, 1); prior = priors.DiagonalGaussian.from_module(net); "
            "lik = ibaml.GaussianLikelihood(0.5, learn_noise=True); "
            "prior('log_prob', dict(net.named_parameters())); "
            "lik('log_prob_points', torch.zeros(3, 1), torch.ones(3, 1)); "
            f"assert pyro.settings.get('module_local_params') is {initial}, 'a call changed it'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]


def test_priors_and_likelihoods_read_their_own_parameters_in_pyro_global_mode():
    """With Pyro's default (global param store) mode set, two priors keep their own values and
    ``functional_call`` evaluates and differentiates at the meta-parameters it is given."""
    with pyro.settings.context(module_local_params=False):
        nets = [net(), net()]
        with torch.no_grad():
            for p in nets[1].parameters():
                p.add_(1.0)
        a, b = (priors.DiagonalGaussian.from_module(n) for n in nets)
        w = random_params(a)
        assert a("log_prob", w) == a.log_prob(w)
        assert b("log_prob", w) == b.log_prob(w) != a.log_prob(w)
        meta = {k: v.detach() + 0.5 for k, v in a.named_parameters()}
        moved = priors.DiagonalGaussian.from_module(nets[0])
        moved.load_state_dict({**a.state_dict(), **meta})
        value = torch.func.functional_call(a, meta, ("log_prob", w))
        torch.testing.assert_close(value, moved.log_prob(w))
        g = torch.func.grad(lambda m: torch.func.functional_call(a, m, ("log_prob", w)))(meta)
        assert all(v.abs().sum() > 0 for v in g.values())
        lik = ibaml.GaussianLikelihood(0.5, learn_noise=True)
        noise = {k: v.detach() + 1.0 for k, v in lik.named_parameters()}
        f, y = torch.zeros(3, 1, dtype=DT), torch.ones(3, 1, dtype=DT)
        moved_lik = ibaml.GaussianLikelihood(0.5 * math.e, learn_noise=True)
        torch.testing.assert_close(torch.func.functional_call(lik, noise, ("log_prob_points", f, y)),
                                   moved_lik.log_prob_points(f, y).to(DT))
        assert not {"loc", "scale", "noise"} & set(pyro.get_param_store().keys())   # nothing went global


class LogProbOnlyGaussian(priors.Prior):
    """The documented minimum: ``__init__`` and ``log_prob`` (here ``Σ log N(w; μ, σ²)``)."""

    def __init__(self, template, init_scale=0.5):
        super().__init__(template)
        self.loc = PyroParam(self.initial_weights.clone())
        self.scale = PyroParam(torch.full_like(self.initial_weights, init_scale), constraint=constraints.positive)

    def log_prob(self, params):
        z = (self.flat(params) - self.loc) / self.scale
        return (-0.5 * z ** 2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)).sum()


def test_log_prob_alone_gives_the_map_meta_gradient(make_problem):
    # same objective and start as the built-in family, so the dense implicit meta-gradients agree
    estimator = ibaml.Implicit(solver=Dense())
    mine = estimator.task_gradient(*make_problem(LogProbOnlyGaussian, "map", steps=200, init_scale=0.5))
    builtin = estimator.task_gradient(*make_problem(priors.DiagonalGaussian, "map", steps=200, init_scale=0.5))
    assert set(mine.grads) == set(builtin.grads)
    assert rel_err(mine.grads, builtin.grads) < 1e-10
    assert all(float(g.abs().sum()) > 0 for g in mine.grads.values())


@pytest.mark.parametrize("method", ["map", "variational"])
def test_log_prob_alone_meta_trains(method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DT)
    learner = ibaml.MetaLearner(net, LogProbOnlyGaussian.from_module(net, init_scale=0.3),
                                ibaml.GaussianLikelihood(0.5).to(DT), method=method,
                                estimator=ibaml.Implicit(), inner_optimizer=ibaml.core.optim.Adam(lr=0.01), inner_steps=20)
    before = {k: v.clone() for k, v in learner.meta_params().items()}
    gen = torch.Generator().manual_seed(0)
    losses = [learner.meta_step(sine_tasks(4, gen))["loss"] for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    after = learner.meta_params()
    assert all(not torch.equal(before[k], after[k]) for k in ("prior.loc_unconstrained", "prior.scale_unconstrained"))


def test_init_scale_per_entry_tensor():
    net = torch.nn.Linear(3, 2)
    per_entry = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    prior = priors.DiagonalGaussian.from_module(net, init_scale={"weight": per_entry, "bias": 0.7})
    scale = prior.unflat(prior.scale.detach())
    assert torch.allclose(scale["weight"], per_entry) and torch.allclose(scale["bias"], torch.full((2,), 0.7))
    with pytest.raises(ValueError, match="shape"):
        priors.DiagonalGaussian.from_module(net, init_scale={"weight": torch.ones(3), "bias": 0.7})
    with pytest.raises(ValueError, match="positive"):
        priors.DiagonalGaussian.from_module(net, init_scale={"weight": -per_entry, "bias": 0.7})
