"""iBaML's presets as the examples build them, in float64 on tiny networks: the meta-gradient the
learner computes (implicit, CG) is the derivative of the outer loss through the solved inner
problem, against central finite differences whose every evaluation re-solves each task's inner
problem, and against the dense implicit solve.

* image classification (``examples/miniimagenet.py``): a variational head prior at the
  classification settings (σ = 0.01, β = 3·10⁻³), Newton inner steps from the fixed-point
  variances, the linearised expectation, and a softmax whose logit scale is a meta-parameter of
  the predictions only (:data:`ibaml.recipes.image_presets.LOGIT_SCALE`);
* sine regression (``examples/sine_regression.py``): the same inference with the conjugate task
  noise, its pseudo-count held at 5 (:data:`ibaml.recipes.NOISE_PRIOR_COUNT`).

The networks use ``tanh`` (the examples' MLP uses ReLU): a finite difference across a kink is not
a derivative, and a tiny ReLU body leaves dead units whose gradients are exactly zero. Conv4 keeps
its ReLU and max-pooling, so its difference step is 10⁻⁷: along the test's direction a kink lies
about 2·10⁻⁶ away, and steps of 3·10⁻⁶ to 10⁻⁴ are off by 2–3 % (forward differences converge
linearly below it, as for a smooth function).

CG runs to convergence (``cg_steps=40``): the claim is exactness at a solved linear system; what
the examples' 5 iterations cost in accuracy is ``benchmarks/hypergrad_accuracy.py``'s subject.
"""

import dataclasses

import torch

import ibaml
from ibaml import recipes
from ibaml.core.inner_loop import newton_polish
from ibaml.core.linalg import Dense
from ibaml.core.nets import MLP, Conv4
from ibaml.recipes import image_presets

from conftest import DT, assert_matches_central_differences, rel_err, sine_tasks

WAYS = 3


def image_learner(net):
    learner = image_presets.image_learner("ibaml", net, dataset="miniimagenet", ways=WAYS, shots=1, cg_steps=40)
    assert not learner.likelihood.scale_inner           # τ enters the predictions only
    assert learner.likelihood.scale.dtype == DT
    return learner


def sine_learner():
    torch.manual_seed(0)
    likelihood = recipes.regression_likelihood("conjugate", *recipes.noise_prior_count("ibaml")).to(DT)
    return ibaml.build_learner("ibaml", MLP(1, (5, 5), 1, activation=torch.nn.Tanh).to(DT), likelihood, cg_steps=40)


def image_tasks(shape, tasks=2, shots=2, query=3, seed=0):
    """``tasks`` ``WAYS``-way tasks of Gaussian inputs shifted by their class."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side, n in (("support", shots), ("query", query)):
        y = (torch.arange(WAYS * n) % WAYS).expand(tasks, -1).clone()
        x = torch.randn(tasks, WAYS * n, *shape, generator=g, dtype=DT)
        batch[f"{side}_x"] = x + 0.5 * y.to(DT).view(tasks, -1, *[1] * len(shape))
        batch[f"{side}_y"] = y
    return batch


def solved_outer(learner, task):
    """``θ ↦ mean_t F_t(v_t*(θ), θ)``: each task's inner problem solved afresh at ``θ`` by the
    preset's inner loop, then polished by Newton steps on the dense Hessian."""
    problem = learner.problem

    def outer_at(meta):
        losses = []
        for t in range(task["support_x"].shape[0]):
            task_t = {k: v[t] for k, v in task.items()}
            v, _ = problem.solve(meta, task_t)
            v = newton_polish(lambda vv: problem.inner(vv, meta, task_t), v, steps=2)
            losses.append(problem.outer(v, meta, task_t))
        return torch.stack(losses).mean()
    return outer_at


def check_preset_gradient(learner, batch, per_entry=True, h=1e-5):
    """The learner's mean meta-gradient (:meth:`ibaml.MetaLearner.meta_gradient`) against (a) central
    differences of the re-solved outer loss, per meta-parameter tensor (``per_entry``) and along a
    random direction in all of them, and (b) the dense implicit solve per task."""
    task = learner.prepare(batch)                       # fixes this step's draws
    meta = learner.meta_params()
    out = learner.task_gradients(task)
    assert float(out.diagnostics["inner_grad_norm"].max()) < 1e-10           # the inner problem is solved
    assert float(out.diagnostics["residual_norm"].max()) < 1e-8              # and so is the linear system
    reduced = learner.meta_gradient(task)
    outer_at = solved_outer(learner, task)
    assert abs(float(reduced.loss - outer_at(meta))) < 1e-12                # the loss at the solution

    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in meta.items()}
    shifted = lambda s: {k: p + s * h * direction[k] for k, p in meta.items()}
    fd = float((outer_at(shifted(1)) - outer_at(shifted(-1))) / (2 * h))
    along = float(sum((reduced.grads[k] * direction[k]).sum() for k in meta))
    assert abs(along - fd) <= 1e-6 * abs(fd), (along, fd)
    if per_entry:
        assert_matches_central_differences(reduced.grads, outer_at, meta, h=h)

    learner.estimator = dataclasses.replace(learner.estimator, solver=Dense())
    dense = learner.task_gradients(task)
    for t in range(task["support_x"].shape[0]):
        assert rel_err({k: v[t] for k, v in out.grads.items()}, {k: v[t] for k, v in dense.grads.items()}) < 1e-8, t
    return out, meta


def test_image_preset_meta_gradient_is_exact_on_an_mlp():
    torch.manual_seed(0)
    learner = image_learner(MLP(4, (6,), WAYS, activation=torch.nn.Tanh).to(DT))
    assert (learner.method.beta, learner.method.expectation, learner.method.variance_start) == \
        (3e-3, "linearized", "fixed_point")
    out, meta = check_preset_gradient(learner, image_tasks((4,)))
    assert {"net.0.weight", "likelihood.scale_unconstrained"} <= set(meta)
    assert float(out.grads["likelihood.scale_unconstrained"].abs().min()) > 1e-3   # τ is learned


def test_image_preset_meta_gradient_is_exact_on_conv4():
    """Batch norm with batch statistics, one task at a time (``task_batching`` ``"loop"`` on the CPU)."""
    torch.manual_seed(0)
    learner = image_learner(Conv4(in_channels=1, hidden=3, out_dim=WAYS, image_size=16).to(DT))
    assert learner.batching() == "loop"
    check_preset_gradient(learner, image_tasks((1, 16, 16)), per_entry=False, h=1e-7)


def test_sine_preset_meta_gradient_is_exact():
    learner = sine_learner()
    assert (learner.method.beta, learner.method.expectation, learner.method.variance_start) == \
        (1.0, "linearized", "fixed_point")
    assert not any("prior_count" in k for k in learner.meta_params())             # a₀ = 5 is held
    out, meta = check_preset_gradient(learner, sine_tasks(2, torch.Generator().manual_seed(0)))
    assert float(out.grads["likelihood.evidence_scale_unconstrained"].abs().min()) > 1e-3


def test_full_covariance_head_meta_gradient_is_exact():
    """``ibaml-fullcov`` (a full-covariance Gaussian posterior over a random-feature head, a
    low-rank prior): the implicit gradient through the mean with the closed-form covariance in
    the outer loss, against central differences and the dense solve; the covariance is the
    Bayesian linear regression posterior's."""
    torch.manual_seed(0)
    net = MLP(1, (5,), 1, activation=torch.nn.Tanh, random_features=6).to(DT)
    likelihood = recipes.regression_likelihood("shared").to(DT)
    learner = ibaml.build_learner("ibaml-fullcov", net, likelihood, cg_steps=40)
    assert isinstance(learner.method, ibaml.core.inference.FullCovariance)
    batch = sine_tasks(2, torch.Generator().manual_seed(0))
    check_preset_gradient(learner, batch)
    # the posterior is Bayesian linear regression's: Σ = (Σ₀⁻¹ + ΦᵀΦ/σ²)⁻¹, m = Σ (Σ₀⁻¹ μ + Φᵀy/σ²)
    posterior = learner.adapt(batch["support_x"], batch["support_y"])
    phi = torch.cat([net.embed(batch["support_x"][0]), torch.ones(batch["support_x"].shape[1], 1, dtype=DT)], -1)
    noise2 = float(likelihood.noise.detach()) ** 2
    prior = learner.prior
    precision = prior.precision_matrix()
    cov = torch.linalg.inv(precision + phi.T @ phi / noise2)
    mean = cov @ (precision @ prior.location() + phi.T @ batch["support_y"][0, :, 0] / noise2)
    assert torch.allclose(posterior.mean()[0], mean, atol=1e-10)
    factor = posterior.params["covariance_factor"][0]
    assert torch.allclose(factor @ factor.T, cov, atol=1e-10)
