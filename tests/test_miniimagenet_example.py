"""examples/miniimagenet.py end to end on small fixtures in every miniImageNet layout and the
Omniglot layout: metrics, reports, checkpoints, resumption, and the one-line errors."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibaml.data import DatasetError, write_miniimagenet_fixture, write_omniglot_fixture
from ibaml.recipes.image_presets import image_learner_from_config
from ibaml.train.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "miniimagenet.py"
_spec = importlib.util.spec_from_file_location("miniimagenet_example", SCRIPT)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

# 3-way 1-shot tasks, Conv4 with 8 channels on 32x32 images, a few meta-iterations
TINY = ["--ways", "3", "--shots", "1", "--query", "2", "--channels", "8", "--inner-steps", "2", "--cg-steps", "2",
        "--meta-batch", "2", "--val-tasks", "4", "--eval-tasks", "6", "--eval-chunk", "4", "--no-progress"]
RANGES = {"accuracy": (0, 1), "nll": (0, math.inf), "ece": (0, 1), "ece_pooled": (0, 1), "ece_floor": (0, 1),
          "ece_pooled_floor": (0, 1), "mce": (0, 1), "brier": (0, 2), "confidence": (0, 1)}


@pytest.fixture(scope="module")
def mini_roots(tmp_path_factory):
    """A dozen miniImageNet classes (6 / 3 / 3) of 5 images in each layout."""
    return {fmt: write_miniimagenet_fixture(tmp_path_factory.mktemp(fmt), fmt, (6, 3, 3), 5, seed=0)
            for fmt in ("pickle", "csv", "folder")}


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    return write_omniglot_fixture(tmp_path_factory.mktemp("omniglot"), n_alphabets=2, chars_per_alphabet=6,
                                  images_per_char=4, seed=0)


def run(*argv):
    return example.main([str(a) for a in argv])


def check_outputs(out: Path, result: dict, eval_tasks: int = 6):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    for key, (low, high) in RANGES.items():
        assert set(metrics[key]) == {"mean", "ci95"}, key
        assert low <= metrics[key]["mean"] <= high and metrics[key]["ci95"] >= 0, (key, metrics[key])
    assert metrics["num_test_tasks"] == eval_tasks
    fit = metrics["calibrated"]
    assert fit["logit_scale"] > 0 and set(fit) == set(RANGES) | {"logit_scale"}
    for key, (low, high) in RANGES.items():
        assert low <= fit[key]["mean"] <= high, (key, fit[key])
    if metrics["config"]["method"] in ("maml", "imaml", "fomaml"):   # one point estimate: τ keeps the argmax
        assert fit["accuracy"] == metrics["accuracy"]
    report = (out / "report.md").read_text()
    assert "| accuracy |" in report and "| brier |" in report and "![reliability diagram](reliability.png)" in report
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    return metrics


@pytest.mark.parametrize("fmt,format_arg,method,extra", [
    ("pickle", "auto", "ibaml", []), ("csv", "csv", "imaml", ["--inner-optimizer", "sgd", "--precision", "2"]),
    ("folder", "auto", "maml", []), ("pickle", "pickle", "abml", ["--kl-weight", "0.5", "--init-scale", "0.05"]), ("folder", "folder", "fomaml", [])])
def test_example_runs_end_to_end_from_each_format(mini_roots, tmp_path, fmt, format_arg, method, extra):
    out = tmp_path / "run"
    result = run("--data-root", mini_roots[fmt], "--format", format_arg, "--method", method, "--image-size", 32,
                 "--meta-iters", 3, "--val-every", 2, "--checkpoint-every", 2, "--out", out, *TINY, *extra)
    metrics = check_outputs(out, result)
    assert metrics["classes"] == {"train": 6, "val": 3, "test": 3} and metrics["image_shape"] == [3, 32, 32]
    assert [h["step"] for h in metrics["validation"]] == [2, 3]  # every 2 and at the end
    best_step = max(metrics["validation"], key=lambda h: (h["accuracy"]["mean"], -h["step"]))["step"]
    assert metrics["evaluated"] == {"checkpoint": "best", "step": best_step}
    assert metrics["config"]["method"] == method and metrics["skipped_tasks"] == 0
    best = load_checkpoint(out / "best.pt", config={"method": method})
    assert best["step"] == best_step and "net.head.weight" in "".join(best["learner"])
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 3 and last["training"]["learner"]["step_count"] == 3


def test_example_on_omniglot_with_rotations(omni_root, tmp_path):
    split_file = tmp_path / "split.json"
    out = tmp_path / "run"
    result = run("--dataset", "omniglot", "--data-root", omni_root, "--split-sizes", "0.5,0.25", "--split-file",
                 split_file, "--meta-iters", 2, "--val-every", 0, "--checkpoint-every", 0, "--out", out, *TINY)
    metrics = check_outputs(out, result)
    # 12 characters split 6 / 3 / 3, each in four rotations; 28x28 grayscale
    assert metrics["classes"] == {"train": 24, "val": 12, "test": 12} and metrics["image_shape"] == [1, 28, 28]
    assert split_file.is_file() and metrics["evaluated"] == {"checkpoint": "last", "step": 2}
    assert not (out / "best.pt").exists() and metrics["validation"] == []
    assert load_checkpoint(out / "last.pt")["step"] == 2   # written at the end even with --checkpoint-every 0


def test_resume_continues_the_same_trajectory(mini_roots, tmp_path):
    common = ["--data-root", mini_roots["pickle"], "--method", "ibaml", "--image-size", 32, *TINY]
    whole = run(*common, "--meta-iters", 4, "--val-every", 2, "--checkpoint-every", 2, "--out", tmp_path / "a")
    # interrupted after 2 iterations (validating every iteration, which must not matter), then resumed
    run(*common, "--meta-iters", 2, "--val-every", 1, "--checkpoint-every", 2, "--out", tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2
    resumed = run("--resume", tmp_path / "b", "--meta-iters", 4, "--val-every", 2, "--out", tmp_path / "c",
                  "--no-progress")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "c" / "last.pt")
    assert a["step"] == b["step"] == 4 and b["config"]["meta_iters"] == 4
    for key, value in a["training"]["learner"].items():
        assert torch.equal(value, b["training"]["learner"][key]), key
    assert torch.equal(a["training"]["generator"], b["training"]["generator"])
    assert torch.equal(a["rng"]["sources"]["sampler"], b["rng"]["sources"]["sampler"])
    # validation at steps 2 and 4 in both runs (b also at 1) gives the same numbers
    steps_b = {h["step"]: h for h in resumed["validation"]}
    assert sorted(steps_b) == [1, 2, 4] and (tmp_path / "c" / "best.pt").is_file()
    for h in whole["validation"]:
        assert steps_b[h["step"]] == h


def test_a_finished_run_evaluated_again_keeps_the_record_of_its_training(mini_roots, tmp_path):
    """``--resume`` on a finished run trains nothing and evaluates again: the same test metrics,
    and the timing and stationarity of the meta-training that produced them, not blanks."""
    out = tmp_path / "run"
    first = run("--data-root", mini_roots["pickle"], "--image-size", 32, "--meta-iters", 2, "--val-every", 0,
                "--out", out, *TINY)
    again = run("--resume", out, "--no-progress")
    assert again["accuracy"] == first["accuracy"] and again["ece_floor"] == first["ece_floor"]
    assert first["ms_per_meta_iter"] is not None and first["inner_grad_norm"]
    for key in example.TRAINED:
        assert again[key] == first[key], key
    assert json.loads((out / "metrics.json").read_text())["inner_grad_norm"] == first["inner_grad_norm"]


def test_a_run_trained_to_choose_on_validation_is_evaluated_on_the_test_classes(mini_roots, tmp_path):
    """``--eval-split test --resume DIR`` on a finished ``--eval-split val`` run trains nothing and
    evaluates the same model on the test classes: the numbers a fresh test run gives."""
    common = ["--data-root", mini_roots["pickle"], "--image-size", 32, "--meta-iters", 2, "--val-every", 0, *TINY]
    chosen = run(*common, "--eval-split", "val", "--out", tmp_path / "val")
    again = run("--resume", tmp_path / "val", "--eval-split", "test", "--no-progress")
    fresh = run(*common, "--eval-split", "test", "--out", tmp_path / "test")
    assert again["config"]["eval_split"] == "test" and again["splits"]["evaluated"].startswith("test classes")
    assert again["accuracy"] == fresh["accuracy"] and again["nll"] == fresh["nll"]
    assert again["accuracy"] != chosen["accuracy"] or again["nll"] != chosen["nll"]
    for key in example.TRAINED:
        assert again[key] == chosen[key], key


def test_resume_checks_the_configuration(mini_roots, tmp_path):
    out = tmp_path / "run"
    run("--data-root", mini_roots["pickle"], "--image-size", 32, "--meta-iters", 1, "--val-every", 0,
        "--checkpoint-every", 1, "--out", out, *TINY)
    with pytest.raises(CheckpointError, match=r"incompatible configuration \(ways: saved 3, now 4\)"):
        run("--resume", out, "--ways", 4)
    # a fresh run into a folder that holds a run is refused in one line; --overwrite replaces it
    with pytest.raises(SystemExit):
        run("--data-root", mini_roots["pickle"], "--image-size", 32, "--meta-iters", 1, "--val-every", 0, "--out", out,
            *TINY)
    before = load_checkpoint(out / "last.pt")["training"]["learner"]
    run("--data-root", mini_roots["pickle"], "--image-size", 32, "--meta-iters", 1, "--val-every", 0, "--seed", 3,
        "--out", out, "--overwrite", *TINY)
    after = load_checkpoint(out / "last.pt")
    assert after["config"]["seed"] == 3 and not all(torch.equal(v, after["training"]["learner"][k])
                                                    for k, v in before.items())


def test_resume_without_a_checkpoint_starts_from_scratch(mini_roots, tmp_path, capsys):
    # a run killed before its first checkpoint: the same command with --resume starts it afresh
    common = ["--data-root", mini_roots["pickle"], "--image-size", 32, "--meta-iters", 1, "--val-every", 0, *TINY]
    fresh = run(*common, "--out", tmp_path / "a")
    resumed = run(*common, "--resume", tmp_path / "b")
    assert "no checkpoint in" in capsys.readouterr().out
    assert resumed["accuracy"] == fresh["accuracy"] and resumed["nll"] == fresh["nll"]


@pytest.mark.parametrize("extra,message", [
    (["--ways", "4"], r"miniImageNet/val: ways=4 exceeds the number of classes \(3\)"),
    (["--shots", "4"], r"shots \+ query = 4 \+ 2 = 6 exceeds the 5 images of the smallest class"),
])
def test_tasks_larger_than_the_data(mini_roots, tmp_path, extra, message):
    with pytest.raises(DatasetError, match=message):
        run("--data-root", mini_roots["folder"], "--out", tmp_path, *TINY, *extra)


def test_data_errors_are_one_line(mini_roots, tmp_path, capsys):
    root = write_miniimagenet_fixture(tmp_path / "bad", "csv", (2, 2, 2), 3)
    victim = root / "images" / "n9000000000000002.jpg"
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SystemExit) as exit_info:
        example.cli(["--data-root", str(root), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: miniImageNet: image ") and str(victim) in err and "cannot decode" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no dataset under"):
        run("--data-root", tmp_path / "empty", "--out", tmp_path / "run", *TINY)


@pytest.mark.parametrize("argv,message", [
    (["--ways", "1"], "--ways must be at least 2"),
    (["--meta-iters", "0"], "--meta-iters must be at least 1"),
    (["--image-size", "8"], "--image-size must be at least 16"),
    (["--split-sizes", "0.5"], "--split-sizes must be two counts"),
    ([], "--data-root DIR is required"),
    (["--method", "reptile"], "invalid choice: 'reptile'"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv + (["--fixture"] if argv else []))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--fixture", "--device", "cuda"])
    assert "--device cuda given but CUDA is not available" in capsys.readouterr().err


def test_fixture_flag_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--fixture", "--format", "folder", "--image-size", "16", "--meta-iters", "2",
           "--val-every", "1", "--checkpoint-every", "0", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_outputs(out, json.loads((out / "metrics.json").read_text()))
    assert metrics["classes"] == {"train": 6, "val": 3, "test": 3} and metrics["image_shape"] == [3, 16, 16]
    assert "| accuracy |" in proc.stdout


def test_learner_options_reach_the_preset():
    args, _ = example.parse_args(["--fixture", "--method", "ibaml", "--ways", "3", "--shots", "2", "--channels", "8",
                                  "--init-scale", "0.05", "--kl-weight", "0.5", "--inner-optimizer", "sgd",
                                  "--inner-steps", "3", "--predictive-samples", "7"])
    learner = image_learner_from_config(vars(args), (3, 32, 32), torch.device("cpu"), torch.float32)
    assert torch.allclose(learner.prior.scale, torch.tensor(0.05)) and learner.method.beta == 0.5
    optimizer = learner.inner_loop.optimizer
    assert type(optimizer).__name__ == "SGD" and optimizer.lr == pytest.approx(0.01 / 6)  # MAML's step / (ways·shots)
    assert learner.inner_loop.steps == learner.eval_inner_steps == 3 and learner.num_predictive_samples == 7
    assert learner.num_classes == 3 and learner.model.net.head.out_features == 3
    assert learner.model.net.features[0][0].out_channels == 8
    maml, _ = example.parse_args(["--fixture", "--method", "maml", "--dataset", "omniglot", "--ways", "5", "--shots", "1"])
    learner = image_learner_from_config(vars(maml), (1, 28, 28), torch.device("cpu"), torch.float64)
    assert learner.inner_loop.optimizer.lr == pytest.approx(0.4 / 5) and learner.eval_inner_steps == 10
    assert learner.prior.initial_weights.dtype == torch.float64
