"""ibaml.training: fit (checkpoints, exact resume, refusal to overwrite a run), meta_step, chunked evaluation."""

import pytest
import torch
from conftest import sine_tasks

import ibaml
from ibaml import training
from ibaml.checkpoint import CheckpointError, load_checkpoint


def make_learner(method="imaml", seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    return ibaml.build_learner(method, net, ibaml.GaussianLikelihood(1.0, learn_noise=True).double(), inner_steps=2,
                               meta_lr=1e-2)


def sampler(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (lambda: sine_tasks(3, gen)), gen


def test_fit_then_resume_equals_one_uninterrupted_run(tmp_path):
    whole = make_learner("ibaml")
    sample, gen = sampler()
    training.fit(whole, sample, 6, folder=tmp_path / "a", rng={"tasks": gen}, progress=False)

    first = make_learner("ibaml")
    sample, gen = sampler()
    training.fit(first, sample, 3, folder=tmp_path / "b", rng={"tasks": gen}, progress=False)
    second = make_learner("ibaml", seed=1)            # built differently: the checkpoint decides
    sample, gen = sampler(seed=7)
    result = training.fit(second, sample, 6, folder=tmp_path / "b", resume=True, rng={"tasks": gen}, progress=False)
    assert result.resumed_from == 3 and result.steps_run == 3 and result.step == 6
    for k, v in whole.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k
    assert torch.equal(whole.generator.get_state(), second.generator.get_state())


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    sample, gen = sampler()
    training.fit(make_learner(), sample, 2, folder=tmp_path, rng={"tasks": gen}, progress=False)
    with pytest.raises(training.RunExistsError, match="already holds a run"):
        training.fit(make_learner(), sample, 2, folder=tmp_path, rng={"tasks": gen}, progress=False)
    (tmp_path / ".last.pt.x1.tmp").write_bytes(b"torn")                    # an interrupted write
    result = training.fit(make_learner(), sample, 1, folder=tmp_path, overwrite=True, rng={"tasks": gen},
                          progress=False)
    assert result.resumed_from is None and load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, capsys):
    sample, gen = sampler()
    result = training.fit(make_learner(), sample, 2, folder=tmp_path / "new", resume=True, rng={"tasks": gen},
                          progress=False)
    assert result.resumed_from is None and result.steps_run == 2
    assert "no checkpoint in" in capsys.readouterr().out


def test_resume_refuses_another_configuration(tmp_path):
    sample, gen = sampler()
    training.fit(make_learner(), sample, 2, folder=tmp_path, config={"seed": 0}, rng={"tasks": gen}, progress=False)
    with pytest.raises(CheckpointError, match="seed: saved 0, now 1"):
        training.fit(make_learner(), sample, 3, folder=tmp_path, config={"seed": 1}, resume=True, rng={"tasks": gen},
                     progress=False)


def test_validation_keeps_and_restores_the_best(tmp_path):
    learner = make_learner()
    sample, gen = sampler()
    scores = iter([0.2, 0.9, 0.1])
    seen = []
    result = training.fit(learner, sample, 6, folder=tmp_path, validate=lambda step: {"score": next(scores)},
                          validate_every=2, select_best=lambda e: e["score"], on_step=lambda s, st: seen.append(s),
                          rng={"tasks": gen}, progress=False)
    assert seen == list(range(1, 7)) and [h["step"] for h in result.history] == [2, 4, 6]
    assert result.best == {"step": 4, "score": 0.9} and result.evaluated == {"checkpoint": "best", "step": 4}
    best = load_checkpoint(tmp_path / "best.pt")["learner"]
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in best.items())


def test_chunked_evaluation_equals_one_batch():
    learner = make_learner()
    batch = sine_tasks(7, torch.Generator().manual_seed(3))
    whole = training.evaluate(learner, batch).metrics
    chunked = training.evaluate(learner, batch, chunk=3).metrics
    for key in ("mse", "nll", "coverage_90"):
        assert abs(whole[key]["mean"] - chunked[key]["mean"]) < 1e-10, key
    # a sampler, reseeded: the same tasks and the same numbers on every call, the generator restored
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    draw = lambda n: sine_tasks(n, gen)
    a = training.evaluate(learner, draw, 5, chunk=2, seed=11, generators=(gen,)).metrics
    b = training.evaluate(learner, draw, 5, chunk=2, seed=11, generators=(gen,)).metrics
    assert abs(a["mse"]["mean"] - b["mse"]["mean"]) < 1e-10 and torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError, match="num_tasks"):
        training.evaluate(learner, draw)


def test_meta_step_is_the_learner_s_and_counts_steps():
    a, b = make_learner(), make_learner()
    batch = sine_tasks(3, torch.Generator().manual_seed(1))
    sa, sb = a.meta_step(batch), training.meta_step(b, batch)
    assert sa["loss"] == sb["loss"] and int(a.step_count) == int(b.step_count) == 1
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
