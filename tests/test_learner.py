import math

import pytest
import torch
from conftest import assert_task_gradients_equal_plain_loop, sine_tasks

import ibaml
import priors
from ibaml import NonFiniteError


def small_net(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def lik(dtype=torch.float64):
    return ibaml.GaussianLikelihood(1.0, learn_noise=True).to(dtype)


@pytest.mark.parametrize("method", ibaml.METHODS)
def test_presets_learn_on_sine(method):
    # ABML's proximal steps on the head need a longer step than the SGD methods to move it in five steps
    inner_lr = 0.05 if method == "abml" else 0.01
    learner = ibaml.build_learner(method, small_net(), lik(), inner_steps=5, meta_lr=1e-2, inner_lr=inner_lr)
    gen = torch.Generator().manual_seed(0)
    fixed = sine_tasks(8, torch.Generator().manual_seed(1))
    before = learner.meta_gradient(fixed)[0].item()
    for _ in range(40):
        stats = learner.meta_step(sine_tasks(8, gen))
    assert math.isfinite(stats["loss"])
    after = learner.meta_gradient(fixed)[0].item()
    assert after < before, (method, before, after)


@pytest.mark.parametrize("method", ["map", "variational"])
def test_vmapped_task_gradients_equal_a_plain_loop(method):
    net = small_net()
    kwargs = {"method": ibaml.Variational(beta=0.5, num_samples=3, num_outer_samples=2)} if method == "variational" \
        else {"method": "map"}
    learner = ibaml.MetaLearner(net, priors.DiagonalGaussian.from_module(net, init_scale=0.3), lik(),
                                estimator=ibaml.Implicit(), inner_steps=5, **kwargs)
    batch = sine_tasks(4, torch.Generator().manual_seed(2))
    out = assert_task_gradients_equal_plain_loop(learner, batch)
    # the reduced meta-gradient is the mean of the per-task ones
    prepared = learner.prepare(batch)
    loss, grads, _, finite = learner.meta_gradient(prepared)
    again = learner.task_gradients(prepared)
    assert bool(finite.all()) and torch.allclose(loss, again.loss.mean(), rtol=1e-12)
    for k in grads:
        assert torch.allclose(grads[k], again.grads[k].mean(0), rtol=1e-10, atol=1e-14), k
    assert out.loss.shape == (4,)


def test_task_gradients_is_pure_and_leaves_the_learner_alone():
    net = small_net()
    learner = ibaml.build_learner("ibaml", net, lik(), inner_steps=3)
    task = learner.prepare(sine_tasks(3, torch.Generator().manual_seed(5)))
    before = {k: v.clone() for k, v in learner.meta_params().items()}
    state = learner.generator.get_state()
    a, b = learner.task_gradients(task), learner.task_gradients(task)
    assert torch.equal(learner.generator.get_state(), state)      # a prepared batch keeps its draws
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
    assert all(torch.equal(before[k], v) for k, v in learner.meta_params().items())
    assert int(learner.step_count) == 0


def test_chunked_vmap_matches_unchunked():
    batch = sine_tasks(6, torch.Generator().manual_seed(3))
    results = []
    for chunk in (None, 4):
        net = small_net()
        learner = ibaml.build_learner("imaml", net, lik(), inner_steps=3, chunk_size=chunk)
        results.append(learner.meta_gradient(batch)[1])
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], rtol=1e-10, atol=1e-13)


def test_adapt_and_predict_shapes_and_variance():
    net = small_net()
    learner = ibaml.build_learner("ibaml", net, lik(), inner_steps=3, num_predictive_samples=7)
    batch = sine_tasks(3, torch.Generator().manual_seed(4), shots=4, query=6)
    posterior = learner.adapt(batch["support_x"], batch["support_y"])
    assert posterior.num_tasks == 3
    assert posterior.variance().shape == posterior.mean().shape == (3, learner.prior.dim)
    mean, var = learner.predict(posterior, batch["query_x"])
    assert mean.shape == var.shape == (3, 6, 1)
    noise_var = learner.likelihood.noise.detach() ** 2
    assert (var > noise_var).all()  # epistemic variance adds to the noise


def test_map_predictive_variance_is_the_noise():
    net = small_net()
    learner = ibaml.build_learner("imaml", net, lik(), inner_steps=2)
    batch = sine_tasks(2, torch.Generator().manual_seed(5))
    mean, var = learner.predict(learner.adapt(batch["support_x"], batch["support_y"]), batch["query_x"])
    assert torch.allclose(var, torch.full_like(var, float(learner.likelihood.noise.detach()) ** 2))


def test_scales_stay_positive_after_meta_updates():
    net = small_net()
    learner = ibaml.build_learner("ibaml", net, lik(), inner_steps=3, meta_lr=0.5)
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        learner.meta_step(sine_tasks(4, gen))
    assert (learner.prior.scale > 0).all()
    assert learner.likelihood.noise > 0


def test_nonfinite_policy_raise_and_skip():
    net = small_net()
    batch = sine_tasks(4, torch.Generator().manual_seed(7))
    batch["support_y"][:2] = batch["support_y"][:2] * 1e200  # the squared residual overflows in two tasks
    common = dict(method="map", estimator=ibaml.Implicit(), inner_optimizer=ibaml.core.optim.SGD(lr=10.0), inner_steps=20)
    learner = ibaml.MetaLearner(net, priors.IsotropicGaussian.from_module(net), lik(), nonfinite="raise", **common)
    with pytest.raises(NonFiniteError, match="non-finite"):
        learner.meta_step(batch)
    learner = ibaml.MetaLearner(small_net(), priors.IsotropicGaussian.from_module(small_net()), lik(),
                                nonfinite="skip", **common)
    before = {k: v.detach().clone() for k, v in learner.meta_params().items()}
    stats = learner.meta_step(batch)
    assert stats["skipped"] == 2 and learner.skipped_tasks == 2
    for k, v in learner.meta_params().items():
        assert torch.isfinite(v).all(), k
    batch["support_y"][2:] = batch["support_y"][2:] * 1e200  # now every task: nothing to learn from
    with pytest.raises(NonFiniteError, match="4 of 4"):
        learner.meta_step(batch)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.update(support_y=b["support_y"][:, :3]), "support_y"),
    (lambda b: b["support_x"].__setitem__((0, 0, 0), float("nan")), "NaN or Inf"),
    (lambda b: b.update(query_x=b["query_x"][:, :0], query_y=b["query_y"][:, :0]), "empty"),
    (lambda b: b.update(query_x=b["query_x"][:2], query_y=b["query_y"][:2]), "tasks"),
])
def test_bad_task_batches_are_rejected(mutate, message):
    learner = ibaml.build_learner("imaml", small_net(), lik(), inner_steps=1)
    batch = sine_tasks(3, torch.Generator().manual_seed(8))
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        learner.meta_step(batch)


def test_classification_labels_out_of_range():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).double()
    learner = ibaml.MetaLearner(net, priors.IsotropicGaussian.from_module(net), ibaml.CategoricalLikelihood(),
                                num_classes=3, inner_steps=1)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, 0, 1, 3]] * 2)
    with pytest.raises(ValueError, match="outside 0..2"):
        learner.meta_step({"support_x": x, "support_y": y, "query_x": x, "query_y": y.clamp(max=2)})
    probs = learner.predict(learner.adapt(x, y.clamp(max=2)), x)
    assert probs.shape == (2, 6, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 6, dtype=torch.float64))


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        ibaml.build_learner("reptile", small_net(), lik())
    with pytest.raises(ValueError, match="unknown inference method"):
        ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), method="laplace")
    with pytest.raises(ValueError, match="nonfinite"):
        ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), nonfinite="ignore")


def test_build_learner_takes_a_prior_of_ones_own():
    net = small_net()
    own = priors.StudentT.from_module(net, df=4.0, init_scale=0.3)
    learner = ibaml.build_learner("ibaml", net, lik(), prior=own, inner_steps=3)
    assert learner.prior is own and isinstance(learner.method, ibaml.Variational)
    assert isinstance(learner.estimator, ibaml.Implicit)
    before = {k: v.clone() for k, v in learner.meta_params().items()}
    learner.meta_step(sine_tasks(3, torch.Generator().manual_seed(0)))
    assert any(not torch.equal(before[k], v) for k, v in learner.meta_params().items() if k.startswith("prior."))
    with pytest.raises(TypeError, match="prior must be a priors.Prior"):
        ibaml.build_learner("imaml", small_net(), lik(), prior="student-t")


def test_training_state_round_trip_continues_identically():
    batches = [sine_tasks(3, torch.Generator().manual_seed(10 + i)) for i in range(4)]
    a = ibaml.build_learner("ibaml", small_net(), lik(), inner_steps=2)
    for b in batches[:2]:
        a.meta_step(b)
    state = a.training_state()
    b_learner = ibaml.build_learner("ibaml", small_net(), lik(), inner_steps=2)
    b_learner.load_training_state(state)
    for b in batches[2:]:
        a.meta_step(b)
        b_learner.meta_step(b)
    for k, v in a.meta_params().items():
        assert torch.equal(v, b_learner.meta_params()[k]), k
