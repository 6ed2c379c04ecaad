"""Calls go one way: the trainer (:class:`ibaml.MetaLearner`, :mod:`ibaml.training`) calls the pure
problem (:class:`ibaml.meta_problem.MetaProblem`) and the update functions
(:mod:`ibaml.meta_update`), which never import or call the trainer; the draws travel as arguments
and the run state (step and skip counts, generator) stays with the trainer."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import sine_tasks

import ibaml
import priors
from ibaml import meta_update
from ibaml.nets import MLP

IBAML = Path(ibaml.__file__).resolve().parent

#: module → the ibaml modules it must not import (the trainer side, seen from below)
FORBIDDEN = {
    "meta_problem": {"learner", "training", "meta_update", "evaluation", "distributed", "checkpoint", "presets"},
    "meta_update": {"learner", "training", "evaluation", "presets"},
    "evaluation": {"learner", "training", "meta_update", "meta_problem", "presets"},
    "inner_loop": {"learner", "training", "meta_update", "meta_problem", "evaluation"},
    "inference": {"learner", "training", "meta_update", "meta_problem", "evaluation"},
}


def ibaml_imports(module: str) -> set:
    """The first-level ``ibaml`` modules that ``ibaml/<module>.py`` imports (relative or absolute)."""
    tree = ast.parse((IBAML / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1 and node.module:
                found.add(parts[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif parts[0] == "ibaml" and len(parts) > 1:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ibaml."))
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_lower_modules_do_not_import_the_trainer(module):
    assert not ibaml_imports(module) & FORBIDDEN[module], (module, ibaml_imports(module) & FORBIDDEN[module])


def test_import_detector_sees_relative_and_absolute_imports():
    assert {"task_model", "hypergrad", "inner_loop"} <= ibaml_imports("meta_problem")
    assert {"meta_problem", "meta_update", "evaluation"} <= ibaml_imports("learner")


def variational_learner():
    torch.manual_seed(0)
    net = MLP(1, (8,), 1).double()
    return ibaml.MetaLearner(net, priors.DiagonalGaussian.from_module(net, init_scale=0.3), ibaml.GaussianLikelihood(0.5).double(),
                             method=ibaml.Variational(beta=0.5, num_samples=2, num_outer_samples=2), inner_steps=3)


def test_the_problem_is_a_function_of_theta_tasks_and_draws():
    """The same draws give the same per-task gradients; new draws from the trainer's generator
    give others; the problem keeps no generator and moves nothing."""
    learner = variational_learner()
    problem = learner.meta_problem
    task, draws = learner.task_and_draws(sine_tasks(3, torch.Generator().manual_seed(0)))
    meta = learner.meta_params()
    a, b = problem.task_gradients(meta, task, draws), problem.task_gradients(meta, task, draws)
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
    other = problem.noise_draws(3, torch.Generator().manual_seed(1))
    assert sorted(other) == sorted(draws) == ["eps_inner", "eps_outer"]
    c = problem.task_gradients(meta, task, other)
    assert not torch.equal(a.loss, c.loss)
    assert all(torch.equal(meta[k], v) for k, v in learner.meta_params().items())
    assert not any(isinstance(v, torch.Generator) for v in vars(problem).values())


def test_meta_update_moves_theta_and_leaves_the_counting_to_the_trainer():
    """:func:`ibaml.meta_update.meta_step` with the problem, the optimiser and the draws given:
    θ moves as ``MetaLearner.meta_step`` moves it, and the step and skip counts stay the
    caller's (the learner counts its own steps only)."""
    batch = sine_tasks(3, torch.Generator().manual_seed(2))
    trainer, functional = variational_learner(), variational_learner()
    trainer.meta_step(batch)
    stats = meta_update.meta_step(functional.meta_problem, functional.meta_optimizer, *functional.task_and_draws(batch))
    assert int(functional.step_count) == 0 and functional.skipped_tasks == 0 and stats["skipped"] == 0
    assert int(trainer.step_count) == 1
    for k, v in trainer.meta_params().items():
        assert torch.equal(functional.meta_params()[k], v), k


def test_prepared_batch_keeps_its_draws_and_a_plain_batch_takes_new_ones():
    learner = variational_learner()
    batch = sine_tasks(2, torch.Generator().manual_seed(3))
    prepared = learner.prepare(batch)
    state = learner.generator.get_state()
    task, draws = learner.task_and_draws(prepared)
    assert torch.equal(learner.generator.get_state(), state)
    assert all(torch.equal(draws[k], prepared[k]) for k in draws) and not set(draws) & set(task)
    _, fresh = learner.task_and_draws(batch)
    assert not torch.equal(learner.generator.get_state(), state) and not torch.equal(fresh["eps_inner"], draws["eps_inner"])


class MeanOnly(ibaml.InferenceMethod):
    """The required pieces only: ``G = ½‖w − μ‖² / σ² + ½ Σ_n (y_n − f(x_n; w))²``, ``F`` the query's
    squared error; ``task_init``, ``curvature``, ``preconditioner`` and ``task_noise`` are the defaults."""

    def init(self, model, meta):
        return {"w": model.prior_location(meta)}

    def inner_objective(self, model, v, meta, task):
        return -model.log_likelihood(meta, v["w"], task["support_x"], task["support_y"]).sum() \
            - model.prior_log_prob(meta, v["w"])

    def outer_objective(self, model, v, meta, task):
        return -model.log_likelihood(meta, v["w"], task["query_x"], task["query_y"]).mean()

    def point(self, v):
        return v["w"]

    def weight_samples(self, v, eps):
        return v["w"].expand_as(eps)


def test_an_inference_method_with_the_required_pieces_only_trains_and_predicts():
    torch.manual_seed(0)
    net = MLP(1, (8,), 1).double()
    learner = ibaml.MetaLearner(net, priors.DiagonalGaussian.from_module(net, init_scale=0.3),
                                ibaml.GaussianLikelihood(0.5).double(), method=MeanOnly(), inner_steps=3,
                                inner_optimizer=ibaml.optim.PriorPreconditioned(lr=0.01))
    batch = sine_tasks(3, torch.Generator().manual_seed(4))
    assert learner.meta_problem.noise_draws(3, learner.generator) == {}
    assert MeanOnly().curvature({"w": torch.zeros(2)}, torch.ones(2)) is None
    stats = learner.meta_step(batch)
    mean, var = learner.predict(learner.adapt(batch["support_x"], batch["support_y"]), batch["query_x"])
    assert stats["skipped"] == 0 and mean.shape == batch["query_y"].shape and bool((var > 0).all())
    with pytest.raises(TypeError, match="method must be"):
        ibaml.MetaLearner(net, priors.DiagonalGaussian.from_module(net), ibaml.GaussianLikelihood(0.5), method=object())
