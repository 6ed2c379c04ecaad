"""Calls go one way, packages too (data and calibration → core → train → recipes → experiments,
no import cycle): the trainer (:class:`ibaml.MetaLearner`, :mod:`ibaml.train.training`) calls the pure
problem (:class:`ibaml.core.meta_problem.MetaProblem`) and the update functions
(:mod:`ibaml.train.meta_update`), which never import or call the trainer; the draws travel as arguments
and the run state (step and skip counts, generator) stays with the trainer."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import sine_tasks

import ibaml
import priors
from ibaml.core.nets import MLP
from ibaml.train import meta_update

IBAML = Path(ibaml.__file__).resolve().parent

#: the packages from the bottom up: each may import those before it, never those after
LAYERS = (("data", "calibration"), ("core", "baselines"), ("train",), ("recipes",), ("experiments",))

#: module → the ibaml modules it must not import, inside the layers (the trainer side, seen from below)
FORBIDDEN = {
    "core.meta_problem": {"train", "recipes"},
    "train.meta_update": {"train.learner", "train.training", "train.evaluation"},
    "train.evaluation": {"train.learner", "train.training", "train.meta_update", "core.meta_problem"},
    "core.inner_loop": {"core.meta_problem"},
    "core.inference": {"core.meta_problem", "core.inner_loop"},
}


def module_names() -> list:
    """Every module of the ``ibaml`` package, dotted below ``ibaml`` (``core.linalg``,
    ``core.hypergrad``, ``core.hypergrad.base``, ...)."""
    names = []
    for path in sorted(IBAML.rglob("*.py")):
        parts = list(path.relative_to(IBAML).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return names


def module_path(module: str) -> Path:
    path = IBAML.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def ibaml_imports(module: str) -> set:
    """The ``ibaml`` modules that ``module`` (dotted below ``ibaml``) imports, dotted below
    ``ibaml``, relative or absolute, a name imported from a package counted as its module where
    it is one."""
    path = module_path(module)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    known = set(module_names())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + ((node.module or "").split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "ibaml":
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(base)
            subs = {f"{target}.{a.name}".strip(".") for a in node.names} & known
            found |= subs or ({target} if target else set())
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("ibaml.")}
    return found - {module, ""}


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module.split(".")[0] in names)


def within(module: str, prefixes: set) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", [m for m in module_names() if "." in m or m in {n for l in LAYERS for n in l}])
def test_a_package_imports_only_the_layers_below_it(module):
    above = {m for m in ibaml_imports(module) if layer(m) > layer(module)}
    assert not above, f"ibaml.{module} imports {sorted(above)}, from a layer above its own"


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_lower_modules_do_not_import_the_trainer(module):
    bad = {m for m in ibaml_imports(module) if within(m, FORBIDDEN[module])}
    assert not bad, (module, bad)


def find_cycle(graph: dict):
    """A cycle of ``graph`` (node → the nodes it imports) as a list that starts and ends at the
    same node, or ``None``."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = {m: ibaml_imports(m) for m in module_names()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_detector_sees_relative_and_absolute_imports():
    assert {"core.task_model", "core.hypergrad", "core.inner_loop"} <= ibaml_imports("core.meta_problem")
    assert {"core.meta_problem", "train.meta_update", "train.evaluation"} <= ibaml_imports("train.learner")
    assert {"core.hypergrad.base"} <= ibaml_imports("core.hypergrad.explicit")
    assert {"train.training", "train.learner"} <= ibaml_imports("train")


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
    """:func:`ibaml.train.meta_update.meta_step` with the problem, the optimiser and the draws given:
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
                                inner_optimizer=ibaml.core.optim.PriorPreconditioned(lr=0.01))
    batch = sine_tasks(3, torch.Generator().manual_seed(4))
    assert learner.meta_problem.noise_draws(3, learner.generator) == {}
    assert MeanOnly().curvature({"w": torch.zeros(2)}, torch.ones(2)) is None
    stats = learner.meta_step(batch)
    mean, var = learner.predict(learner.adapt(batch["support_x"], batch["support_y"]), batch["query_x"])
    assert stats["skipped"] == 0 and mean.shape == batch["query_y"].shape and bool((var > 0).all())
    with pytest.raises(TypeError, match="method must be"):
        ibaml.MetaLearner(net, priors.DiagonalGaussian.from_module(net), ibaml.GaussianLikelihood(0.5), method=object())
