"""Inner steps whose size does not grow with the support size: the inner objective scaled by
``min(1, N₀/N)`` (``InnerLoop(support_size=N₀)``, ``MetaLearner(inner_support_size=N₀)``) and
the backtracking safeguard of any inner optimiser (:class:`ibaml.core.optim.Backtracking`)."""

import pytest
import torch

import ibaml
from ibaml.core.inner_loop import InnerLoop, step_scale
from ibaml.core.nets import MLP
from ibaml.core.optim import SGD, Backtracking
from ibaml.data import SineTaskDistribution

DT = torch.float64


def sine_learner(method="maml", **kw):
    torch.manual_seed(0)
    net = MLP(1, (16, 16), 1).to(DT)
    return ibaml.build_learner(method, net, ibaml.GaussianLikelihood(1.0).to(DT), **kw)


def support(shots, seed=3):
    tasks = SineTaskDistribution(shots=shots, query=5).sample(4, torch.Generator().manual_seed(seed), dtype=DT)
    return tasks.support_x, tasks.support_y


def adapted(learner, shots):
    """Every adapted parameter of 4 tasks of ``shots`` support points, ``[4, D]``."""
    posterior = learner.adapt(*support(shots))
    return torch.cat([t.reshape(4, -1) for t in posterior.params.values()], dim=1)


def test_step_scale_is_one_up_to_the_reference_size_then_the_ratio():
    assert [step_scale(10, n) for n in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert step_scale(10, 40) == 0.25 and step_scale(None, 40) == 1.0
    with pytest.raises(ValueError, match="support_size must be a positive integer or None"):
        InnerLoop(SGD(lr=0.1), 3, support_size=0)


@pytest.mark.parametrize("method", ["maml", "abml"])
def test_at_or_below_the_reference_size_the_adaptation_is_unchanged_bit_for_bit(method):
    plain, scaled = sine_learner(method), sine_learner(method, inner_support_size=10)
    for shots in (1, 10):
        assert torch.equal(adapted(plain, shots), adapted(scaled, shots))


def test_above_it_an_sgd_step_is_the_step_times_the_ratio():
    """Scaling G by N₀/N is, for SGD, the step η·N₀/N: the same adaptation to rounding."""
    scaled = sine_learner("maml", inner_support_size=10, inner_lr=0.002)
    shortened = sine_learner("maml", inner_lr=0.002 * 10 / 40)
    torch.testing.assert_close(adapted(scaled, 40), adapted(shortened, 40), rtol=1e-10, atol=1e-12)
    assert not torch.equal(adapted(scaled, 40), adapted(sine_learner("maml", inner_lr=0.002), 40))


def test_scaling_moves_no_solution_and_no_implicit_meta_gradient():
    """iMAML's Newton steps are invariant to the scale of G: the meta-gradient at 40 points is
    the same with and without the reference size."""
    tasks = SineTaskDistribution(shots=40, query=5).sample(4, torch.Generator().manual_seed(1), dtype=DT)
    grads = [sine_learner("imaml", **kw).meta_gradient(tasks).grads for kw in ({}, {"inner_support_size": 10})]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-8, atol=1e-10)


def stiff(v):
    """A quadratic of curvature 200 along x and 2 along y: SGD with step 0.015 diverges along x."""
    return 100.0 * (v["x"] ** 2).sum() + (v["y"] ** 2).sum()


def run(optimizer, objective, v, steps):
    state, values = optimizer.init(v), [float(objective(v))]
    for _ in range(steps):
        v, state = optimizer.step(objective, v, state)
        values.append(float(objective(v)))
    return v, values


def test_backtracking_keeps_steps_that_lower_the_objective_whole():
    v0 = {"x": torch.ones(3, dtype=DT), "y": torch.ones(2, dtype=DT)}
    gentle = lambda v: (v["x"] ** 2).sum() + (v["y"] ** 2).sum()
    plain, _ = run(SGD(lr=0.1), gentle, v0, 5)
    safe, _ = run(Backtracking(SGD(lr=0.1)), gentle, v0, 5)
    assert all(torch.equal(plain[k], safe[k]) for k in v0)


def test_backtracking_never_raises_the_objective_where_the_plain_step_diverges():
    v0 = {"x": torch.ones(3, dtype=DT), "y": torch.ones(2, dtype=DT)}
    _, plain = run(SGD(lr=0.015), stiff, v0, 20)
    v, safe = run(Backtracking(SGD(lr=0.015), halvings=6), stiff, v0, 20)
    assert plain[-1] > 1e6 * plain[0]
    assert all(b <= a for a, b in zip(safe, safe[1:])) and safe[-1] < 1e-2 * safe[0]


def test_backtracking_is_vmappable_and_differentiable_through_the_chosen_step():
    """Two tasks of curvature 200·s along x: at s = 1 the step (−3x) is halved, at s = ½ it is
    taken whole; both land at −0.5, and the gradient through each is its own step's."""
    opt = Backtracking(SGD(lr=0.015), halvings=4)

    def one(scale):
        v0 = {"x": torch.ones(1, dtype=DT), "y": torch.zeros(1, dtype=DT)}
        v, _ = opt.step(lambda v: scale * stiff(v), v0, {})
        return v["x"].sum()

    scale = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    out = torch.vmap(one)(scale)
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5], dtype=DT))
    (g,) = torch.autograd.grad(out.sum(), scale)
    # d/ds of x − t·lr·200·s·x at x = 1: −3t, with t = ½ for the first task and 1 for the second
    torch.testing.assert_close(g, torch.tensor([-1.5, -3.0], dtype=DT))


def test_backtracking_is_validated_and_passed_through_build_learner():
    with pytest.raises(ValueError, match="halvings must be a positive integer"):
        Backtracking(SGD(lr=0.1), halvings=0)
    learner = sine_learner("abml", inner_backtracking=5)
    optimizer = learner.inner_loop.optimizer
    assert isinstance(optimizer, Backtracking) and optimizer.halvings == 5 and optimizer.needs_curvature
    assert torch.isfinite(adapted(learner, 10)).all()


def test_the_image_and_sine_run_configurations_carry_the_reference_size():
    from ibaml.recipes.image_presets import image_learner_from_config
    from ibaml.recipes.sine_presets import sine_learner_from_config, sine_run_config
    config = {"method": "maml", "dataset": "omniglot", "ways": 5, "shots": 1, "channels": 8, "dtype": "float64",
              "seed": 0, "inner_support_size": 5}
    assert image_learner_from_config(config, (1, 28, 28)).inner_loop.support_size == 5
    assert image_learner_from_config(dict(config, inner_support_size=None), (1, 28, 28)).inner_loop.support_size is None
    sine = sine_run_config("abml", inner_support_size=10)
    assert sine["inner_support_size"] == 10 and "inner_support_size" not in sine_run_config("abml")
    assert sine_learner_from_config(sine).inner_loop.support_size == 10
