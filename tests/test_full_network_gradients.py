"""benchmarks/full_network_gradients.py on a tiny full-network iMAML run (2 meta-iterations on
the stroke benchmark, kept as ``benchmarks.image_protocol final --keep-runs`` keeps it): the
three meta-gradients are measured at both points, the comparison is the cosine and relative
error it names, and a tighter solve with the recipe's own CG count is the recipe's gradient."""

import argparse
import json
import statistics

import pytest
import torch

from benchmarks import _protocol as P
from benchmarks import full_network_gradients as F
from benchmarks import image_protocol


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fn_gradients")
    data = image_protocol.data_options(argparse.Namespace(ways=5, meta_iters=2, val_tasks=4, data_seed=0), 1)
    options = ["--method", "imaml-gd", "--inner-steps", 3, "--cg-steps", 3, "--eval-tasks", 3, "--seed", 0, *data,
               "--channels", 8]
    P.run_example("miniimagenet.py", tmp / "protocol", options, keep=tmp / "runs" / "seed0" / "imaml-gd")
    return tmp


def test_compare_is_the_cosine_and_the_relative_error():
    g, ref = torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    out = F.compare(g, ref)
    assert out["cosine"] == pytest.approx([0.0, 1.0]) and out["relative_error"] == pytest.approx([5 ** 0.5 / 2, 0.0])
    assert out["batch_cosine"] == pytest.approx((2 * 1.5 + 2 * 3) / (8 ** 0.5 * 11.25 ** 0.5))   # means (2, 2), (1.5, 3)


def test_measures_three_gradients_at_both_points(run_root, tmp_path):
    torch.set_num_threads(1)
    payload = F.main(["--runs", str(run_root / "runs"), "--tasks", "2", "--cg-steps", "3", "--out", str(tmp_path)])
    (run,) = payload["runs"]
    assert run["method"] == "imaml-gd" and run["inner_steps"] == 3 and run["config"]["cg_steps"] == 3
    for point in ("initial", "meta-trained"):
        m = run["points"][point]
        assert not any(k.endswith("_error") for k in m), m
        assert len(m["inner_grad_norm"]) == 2 and all(n > 0 for n in m["explicit_norm"])
        cos = m["implicit vs explicit"]["cosine"]
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in cos)
        # the "tighter" solve with the recipe's own CG count is the recipe's gradient
        same = m["implicit vs implicit CG 3"]
        assert same["cosine"] == pytest.approx([1.0, 1.0], abs=1e-6)
        assert same["relative_error"] == pytest.approx([0.0, 0.0], abs=1e-6)
    saved = json.loads((tmp_path / "gradients.json").read_text())
    assert saved["settings"] == {"tasks": 2, "stream": 50_000, "cg_steps": 3}
    assert "| imaml-gd | 0 | meta-trained |" in F.markdown(payload["runs"], 3)


def test_measured_as_the_same_method_is_the_runs_own_gradient(run_root):
    """``--as`` with the run's own method rebuilds the same learner at both points (the
    meta-trained state loaded, the initial one from the same seed), so its implicit gradient is
    the run's own; as iMAML-HF it is another inner loop over the same prior."""
    torch.set_num_threads(1)
    args = ["--runs", str(run_root / "runs"), "--tasks", "2", "--cg-steps", "3"]
    (same,) = F.main(args + ["--as", "imaml-gd"])["runs"]
    (hf,) = F.main(args + ["--as", "imaml-hf"])["runs"]
    assert same["measured_as"] == "imaml-gd" and hf["measured_as"] == "imaml-hf" and hf["method"] == "imaml-gd"
    for point in ("initial", "meta-trained"):
        own = same["points"][point][F.OWN]
        assert own["cosine"] == pytest.approx([1.0, 1.0], abs=1e-6) and own["relative_error"] == pytest.approx([0, 0], abs=1e-5)
        assert hf["points"][point][F.OWN]["relative_error"][0] > 1e-3   # another inner loop, another gradient
    table = F.markdown([hf], 3)
    assert "| imaml-hf | imaml-gd | 0 | meta-trained |" in table and "cos(implicit, run's own)" in table
    assert same["points"]["initial"][F.OWN]["batch_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert F.OTHER_DRAWS not in same["points"]["initial"]     # no draws to change


def test_a_variational_run_is_measured_with_one_set_of_draws(tmp_path):
    """ABML over every weight measured as iBaML over every weight: every estimator sees the same
    Monte Carlo draws, so the recipe's implicit gradient and the "tighter" solve with the
    recipe's own CG count agree (with fresh draws at each call they would not)."""
    torch.set_num_threads(1)
    data = image_protocol.data_options(argparse.Namespace(ways=5, meta_iters=2, val_tasks=4, data_seed=0), 1)
    options = ["--method", "abml-all", "--inner-steps", 2, "--cg-steps", 3, "--eval-tasks", 3, "--seed", 0, *data,
               "--channels", 4, "--predictive-samples", 2]
    P.run_example("miniimagenet.py", tmp_path / "protocol", options, keep=tmp_path / "runs" / "seed0" / "abml-all")
    (run,) = F.main(["--runs", str(tmp_path / "runs"), "--methods", "abml-all", "--as", "ibaml-all", "--tasks", "2",
                     "--cg-steps", "3"])["runs"]
    assert run["method"] == "abml-all" and run["measured_as"] == "ibaml-all"
    for point in ("initial", "meta-trained"):
        m = run["points"][point]
        assert not any(k.endswith("_error") for k in m), m
        assert m["implicit vs implicit CG 3"]["cosine"] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in m[F.OWN]["cosine"])
        # the explicit gradient on other draws is another vector (the draws were fixed, then changed)
        assert all(e > 1e-3 for e in m[F.OTHER_DRAWS]["relative_error"])


def test_measured_with_other_inner_steps_one_record_each(run_root):
    """``--inner-steps`` and ``--set``: one record per number of steps, each beside the run's own
    gradient; with the run's own options and steps it is the run's gradient, with more steps of the
    same descent the returned point is closer to stationary."""
    torch.set_num_threads(1)
    args = ["--runs", str(run_root / "runs"), "--tasks", "2", "--cg-steps", "3"]
    runs = F.main(args + ["--inner-steps", "3,40", "--set", "inner_optimizer=sgd", "--set", "inner_lr=0.001"])["runs"]
    assert [r["inner_steps"] for r in runs] == [3, 40]
    assert runs[0]["overrides"] == {"inner_optimizer": "sgd", "inner_lr": 0.001, "inner_steps": 3, "eval_inner_steps": 3}
    for point in ("initial", "meta-trained"):
        short, long = (statistics.median(r["points"][point]["inner_grad_norm"]) for r in runs)
        assert long < 0.5 * short, (point, short, long)
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in runs[1]["points"][point][F.OWN]["cosine"])
    (own,) = F.main(args + ["--inner-steps", "3"])["runs"]    # the run's own recipe, its own 3 steps
    for point in ("initial", "meta-trained"):
        assert own["points"][point][F.OWN]["cosine"] == pytest.approx([1.0, 1.0], abs=1e-6)
    table = F.markdown(runs, 3)
    assert "| imaml-gd | imaml-gd | 0 | initial | inner_optimizer sgd, inner_lr 0.001 | 40 |" in table


def test_a_run_of_another_family_is_measured_at_its_meta_parameters(tmp_path):
    """A MAML run measured as iMAML over every weight: MAML's state has no prior precision, so its
    meta-parameters are loaded alone and iMAML's λ kept (recorded), and at the meta-trained point
    the measured learner's weights are the run's, not an initialisation."""
    torch.set_num_threads(1)
    data = image_protocol.data_options(argparse.Namespace(ways=5, meta_iters=2, val_tasks=4, data_seed=0), 1)
    options = ["--method", "maml", "--inner-steps", 2, "--eval-tasks", 3, "--seed", 0, *data, "--channels", 4]
    P.run_example("miniimagenet.py", tmp_path / "protocol", options, keep=tmp_path / "runs" / "seed0" / "maml")
    (run,) = F.main(["--runs", str(tmp_path / "runs"), "--methods", "maml", "--tasks", "2", "--cg-steps", "3",
                     "--as", "imaml-gd", "--inner-steps", "2"])["runs"]
    assert run["loaded_from_another_method"] == {"kept": ["model.prior.precision"], "ignored": []}
    assert not any(k.endswith("_error") for k in run["points"]["meta-trained"])
    from ibaml.recipes.image_presets import image_learner_from_config
    from ibaml.train.checkpoint import load_checkpoint
    state = load_checkpoint(str(tmp_path / "runs" / "seed0" / "maml" / "last.pt"), map_location="cpu")
    learner = image_learner_from_config({**state["config"], "method": "imaml-gd"}, (3, 32, 32), torch.device("cpu"))
    F.load_meta_parameters(learner, state["training"])
    trained = {k: v for k, v in state["training"]["learner"].items() if k.startswith("model.net.")}
    assert trained and all(torch.equal(learner.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(ValueError, match="has no"):
        F.load_meta_parameters(learner, {"learner": {}, "generator": state["training"]["generator"]})
