"""The full-network recipes (a prior over every weight, the papers' configuration): the
Hessian-free inner solver's line search, the recipes as ``build_learner`` builds them, and their
meta-gradients in float64 on a tiny tanh network against the dense implicit solve and central
finite differences of the re-solved outer loss (``tests/test_preset_gradients.py``)."""

import dataclasses

import pytest
import torch

import ibaml
import priors
from ibaml import recipes
from ibaml.core.nets import MLP
from ibaml.core.optim import Adam, NewtonCG, backtrack
from ibaml.recipes import presets

from conftest import DT, rel_err, sine_tasks
from test_preset_gradients import check_preset_gradient


def test_line_search_never_increases_the_objective_and_picks_the_best_candidate():
    G = lambda v: (v["x"] ** 4 - 3 * v["x"] ** 2 + v["x"]).sum()
    x = torch.tensor([0.3, -2.0, 1.5], dtype=DT)
    deltas = torch.tensor([5.0, 0.5, -40.0], dtype=DT)
    chosen = torch.func.vmap(lambda a, d: backtrack(G, {"x": a}, {"x": d}, 6)["x"])(x.view(3, 1), deltas.view(3, 1))
    for i in range(3):
        values = [float(G({"x": x[i:i + 1] + t * deltas[i:i + 1]})) for t in [0.5 ** j for j in range(6)] + [0.0]]
        assert float(G({"x": chosen[i]})) == pytest.approx(min(values), abs=1e-12)
        assert float(G({"x": chosen[i]})) <= float(G({"x": x[i:i + 1]}))
    nan_step = backtrack(lambda v: torch.log(v["x"]).sum() * 0 + (v["x"] - 1).pow(2).sum(),
                         {"x": torch.tensor([0.5], dtype=DT)}, {"x": torch.tensor([-2.0], dtype=DT)}, 1)
    assert float(nan_step["x"]) == 0.5           # log of a negative number: the step is refused


def test_hessian_free_steps_converge_where_full_newton_steps_diverge():
    """``G(x) = Σ sqrt(1 + x²)``: from |x| > 1 an exact Newton step ``x ← −x³`` diverges; with the
    line search every step descends and the iterate reaches the minimum at 0."""
    G = lambda v: torch.sqrt(1 + v["x"] ** 2).sum()
    start = {"x": torch.tensor([1.5, -3.0], dtype=DT)}
    plain, searched = ibaml.InnerLoop(NewtonCG(cg_iters=2), 3), ibaml.InnerLoop(NewtonCG(cg_iters=2, line_search=8), 30)
    assert float(plain.run(G, start)[0]["x"].abs().min()) > 100
    v, diag = searched.run(G, start)
    assert float(diag.grad_norm) < 1e-10


def test_line_search_is_validated():
    with pytest.raises(ValueError, match="line_search"):
        NewtonCG(line_search=-1)
    with pytest.raises(ValueError, match="line_search"):
        NewtonCG(line_search=1.5)


def test_adaptive_damping_follows_the_reduction_ratio():
    """The Levenberg–Marquardt rule: on a quadratic the model is exact (ρ = 1), so μ falls by ω at
    every step; where the damped Newton step overshoots (ρ < 1/4) the step is refused and μ rises
    by ω."""
    quadratic = lambda v: (torch.tensor([1.0, 3.0], dtype=DT) * (v["x"] - 1.0) ** 2).sum()
    opt = NewtonCG(cg_iters=1, prior_damping=2.0, adaptive_damping=4.0)
    v, state = {"x": torch.zeros(2, dtype=DT)}, opt.init({"x": torch.zeros(2, dtype=DT)})
    for k in range(3):
        v, state = opt.step(quadratic, v, state, curvature={"x": torch.ones(2, dtype=DT)})
        assert float(state["prior_damping"]) == pytest.approx(2.0 / 4.0 ** (k + 1))
    overshooting = lambda v: torch.sqrt(1 + v["x"] ** 2).sum()    # a Newton step from |x| > 1 overshoots
    opt, v = NewtonCG(cg_iters=1, prior_damping=1e-3, adaptive_damping=4.0), {"x": torch.tensor([3.0], dtype=DT)}
    v, state = opt.step(overshooting, v, opt.init(v), curvature={"x": torch.ones(1, dtype=DT)})
    assert float(state["prior_damping"]) == pytest.approx(4e-3) and float(v["x"]) == 3.0   # refused, μ raised


def test_adaptive_damping_without_line_search_never_increases_the_objective():
    G = lambda v: torch.sqrt(1 + v["x"] ** 2).sum()
    opt = NewtonCG(cg_iters=2, prior_damping=1e-3, adaptive_damping=3.0)
    v = {"x": torch.tensor([1.5, -3.0], dtype=DT)}
    state = opt.init(v)
    values = [float(G(v))]
    for _ in range(25):
        v, state = opt.step(G, v, state, curvature={"x": torch.ones(2, dtype=DT)})
        values.append(float(G(v)))
    assert all(b <= a for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(2.0, abs=1e-8)
    with pytest.raises(ValueError, match="adaptive_damping"):
        NewtonCG(adaptive_damping=0.5)
    with pytest.raises(ValueError, match="prior_damping"):
        NewtonCG(adaptive_damping=3.0)


def shared_noise_learner(name, **options):
    torch.manual_seed(0)
    net = MLP(1, (5, 5), 1, activation=torch.nn.Tanh).to(DT)
    return ibaml.build_learner(name, net, recipes.regression_likelihood("shared").to(DT), **options)


@pytest.mark.parametrize("name", sorted(n for n, (_, r) in presets.RECIPES.items() if r.get("include") == "all"))
def test_recipes_put_the_prior_on_every_weight(name):
    learner = shared_noise_learner(name)
    net_names = {k for k, _ in learner.model.net.named_parameters()}
    assert set(learner.model.prior.names) == net_names
    optimizer = learner.inner_loop.optimizer
    hessian_free = name.endswith("-hf")
    if hessian_free:
        assert isinstance(optimizer, NewtonCG) and optimizer.line_search > 0 and optimizer.cg_iters == 5
        assert learner.inner_loop.steps == 10
    if name == "imaml-hf":
        assert isinstance(learner.model.prior, priors.IsotropicGaussian)
    elif name == "imaml-gd":
        assert isinstance(optimizer, Adam) and learner.inner_loop.steps == 20
        assert float(learner.model.prior.precision) == pytest.approx(2.0)
    else:
        assert isinstance(learner.model.prior, priors.DiagonalGaussian)
        assert learner.method.expectation == "sampled" and learner.method.num_samples == 4
        assert learner.method.beta == pytest.approx(2e-4)
    # the same learner as the base method with include="all"
    base, _ = presets.RECIPES[name]
    assert type(shared_noise_learner(base, include="all").inner_loop.optimizer) is type(optimizer) or hessian_free
    assert presets.inner_steps(name) == (learner.inner_loop.steps, learner.eval_inner_steps)


def test_an_option_given_overrides_the_recipe():
    learner = shared_noise_learner("imaml-hf", inner_steps=3, precision=5.0)
    assert learner.inner_loop.steps == 3 and float(learner.model.prior.precision) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="imaml-hf"):
        shared_noise_learner("imaml-xx")


def test_imaml_hf_meta_gradient_is_exact():
    """iMAML over every weight, its inner problem solved by Hessian-free steps with the line search:
    60 steps of 20 CG iterations rather than the recipe's 10 of 5, for the tight solution the check
    needs (with 5 CG iterations a step is an inexact Newton step, and one task still had
    ||∇G|| ≈ 10⁻⁹ after 100)."""
    learner = shared_noise_learner("imaml-hf", inner_optimizer=recipes.hessian_free(cg_iters=20), inner_steps=60,
                                   cg_steps=80)
    check_preset_gradient(learner, sine_tasks(2, torch.Generator().manual_seed(0)), per_entry=False)


def test_ibaml_over_every_weight_meta_gradient_is_exact():
    """iBaML over every weight (fixed antithetic draws per meta-step; the ``ibaml-hf`` recipe), the
    inner problem solved by 100 Hessian-free steps (20 CG iterations each) instead of the recipe's
    10 of 5, for the tight solution the check needs. At β = 1 and σ = 0.3 they reach ||∇G|| < 10⁻¹¹; with a KL
    weighted 0.05 one task's fixed-draw problem still had ||∇G|| ≈ 1 after 60 such steps (its
    variance block is not convex)."""
    undamped = recipes.hessian_free(cg_iters=20, initial_damping=0.0, damping_factor=0.0)
    learner = shared_noise_learner("ibaml-hf", inner_optimizer=undamped, inner_steps=100, cg_steps=150, kl_weight=1.0,
                                   init_scale=0.3)
    check_preset_gradient(learner, sine_tasks(2, torch.Generator().manual_seed(0)), per_entry=False)


def test_examples_run_the_recipes_and_report_stationarity_along_training(tmp_path):
    """``--method imaml-hf`` and ``--method ibaml --prior all`` in the sine example, ``--method
    imaml-gd`` in the image example: the prior over every weight, and ``||∇G||`` per block at
    the returned points along training in ``metrics.json``."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sine = [sys.executable, str(root / "examples" / "sine_regression.py"), "--compare", "imaml-hf,ibaml",
            "--prior", "all", "--meta-iters", "4", "--meta-batch", "3", "--eval-tasks", "10",
            "--recalibration-tasks", "10", "--no-progress", "--out", str(tmp_path / "sine")]
    proc = subprocess.run(sine, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = json.loads((tmp_path / "sine" / "metrics.json").read_text())["methods"]
    assert [e["step"] for e in methods["imaml-hf"]["inner_grad_norm"]] == [1, 2, 3, 4]
    assert set(methods["imaml-hf"]["inner_grad_norm"][0]) == {"step", "w"}
    assert set(methods["ibaml"]["inner_grad_norm"][0]) == {"step", "mean", "rho"}
    image = [sys.executable, str(root / "examples" / "miniimagenet.py"), "--fixture", "--image-size", "16",
             "--channels", "4", "--ways", "3", "--shots", "1", "--query", "2", "--method", "imaml-gd",
             "--inner-steps", "2", "--meta-iters", "2", "--meta-batch", "2", "--val-every", "0", "--val-tasks", "4",
             "--eval-tasks", "4", "--eval-chunk", "2", "--no-progress", "--out", str(tmp_path / "image")]
    proc = subprocess.run(image, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "image" / "metrics.json").read_text())
    assert [e["step"] for e in result["inner_grad_norm_trace"]] == [1, 2] and "w" in result["inner_grad_norm"]


def test_per_point_inner_objective_keeps_the_solution_and_the_implicit_gradient():
    """``MAP(per_point=True)``: ``G/N``, with the same minimiser and the same implicit
    meta-gradient as ``G`` (float64, dense solve), and an SGD step ``η N`` on it equal to the
    step ``η`` on ``G``; with a 3× larger support it is the step that the summed objective
    would take at the original size, where the summed step is three times as long."""
    from ibaml.core.linalg import Dense
    batch = sine_tasks(2, torch.Generator().manual_seed(0), shots=10)
    summed = shared_noise_learner("imaml", inner_steps=4, cg_steps=60)
    mean = shared_noise_learner("imaml", inner_steps=4, cg_steps=60, per_point=True)
    assert mean.method.per_point and not summed.method.per_point
    meta = summed.meta_params()
    task = {k: v[0] for k, v in batch.items()}
    v0 = summed.problem.init(meta)
    assert float(mean.problem.inner(v0, meta, task)) == pytest.approx(float(summed.problem.inner(v0, meta, task)) / 10,
                                                                      rel=1e-12)
    g_sum, g_mean = (summed.task_gradients(batch), mean.task_gradients(batch))
    assert rel_err(g_mean.grads, g_sum.grads) < 1e-8          # CG's tolerance is relative: 10⁻¹⁰
    for learner in (summed, mean):
        learner.estimator = dataclasses.replace(learner.estimator, solver=Dense())
    dense_sum, dense_mean = summed.task_gradients(batch), mean.task_gradients(batch)
    assert rel_err(dense_mean.grads, dense_sum.grads) < 1e-10
    # an SGD step of size 10 η on the mean is the step η on the sum
    maml_sum = shared_noise_learner("maml", inner_lr=0.002, inner_steps=1)
    maml_mean = shared_noise_learner("maml", inner_lr=0.02, inner_steps=1, per_point=True)
    v_sum, _ = maml_sum.problem.solve(maml_sum.meta_params(), task)
    v_mean, _ = maml_mean.problem.solve(maml_mean.meta_params(), task)
    assert torch.allclose(v_sum["w"], v_mean["w"], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="per_point applies to MAP"):
        shared_noise_learner("ibaml", per_point=True)
