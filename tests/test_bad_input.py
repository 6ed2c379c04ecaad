"""Bad input: every case stops with one line that names the problem (no silent NaN, no deep
traceback as the only message), and non-finite tasks follow the documented policy.

``python tests/test_bad_input.py`` prints every case with its exact message."""

import contextlib
import io
import json
import math
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ibaml
import priors
from ibaml import NonFiniteError
from ibaml.core.linalg import CG, SolveResult
from ibaml.data import (DatasetError, EpisodeSampler, load_miniimagenet, load_omniglot, write_miniimagenet_fixture,
                        write_omniglot_fixture)
from ibaml.train.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]
import sine_regression  # noqa: E402
from conftest import sine_tasks  # noqa: E402

DT = torch.float64


def small_net(out=1, inp=1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(inp, 8), torch.nn.Tanh(), torch.nn.Linear(8, out)).to(DT)


def lik():
    return ibaml.GaussianLikelihood(1.0, learn_noise=True).to(DT)


def regression_step(mutate):
    batch = sine_tasks(3, torch.Generator().manual_seed(0))
    mutate(batch)
    ibaml.build_learner("imaml", small_net(), lik(), inner_steps=1).meta_step(batch)


def classification_step(support_y, query_y, num_classes=None):
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    net = small_net(out=3, inp=4)
    learner = ibaml.MetaLearner(net, priors.IsotropicGaussian.from_module(net), ibaml.CategoricalLikelihood(),
                                num_classes=num_classes, inner_steps=1)
    learner.meta_step({"support_x": x, "support_y": support_y, "query_x": x, "query_y": query_y})


LABELS = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)


def with_label(value, position=(1, 5)):
    y = LABELS.clone()
    y[position] = value
    return y


def set_item(key, index, value):
    return lambda b: b[key].__setitem__(index, value)


def swap_in(**tensors):
    return lambda b: b.update({k: f(b) for k, f in tensors.items()})


class CLIError(Exception):
    """The message of the error line that the example's argument parser wrote before exiting
    (after ``"<prog>: error: "``)."""


def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            sine_regression.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
            raise CLIError(err.getvalue().strip().splitlines()[-1].split(": error: ", 1)[1]) from None


@dataclass(frozen=True)
class BrokenCG:
    """Conjugate gradient whose residual comes back NaN when ``||b|| > limit``: a linear solver
    that broke down on some tasks (to check how the learner handles a non-finite residual)."""

    limit: float

    def __call__(self, matvec, b, x0=None, precond_diag=None):
        res = CG(max_iter=5, tol=1e-10)(matvec, b, x0, precond_diag)
        broken = torch.linalg.vector_norm(b) > self.limit
        return SolveResult(res.x, torch.where(broken, torch.full_like(res.residual_norm, math.nan), res.residual_norm),
                           res.iterations)


def broken_solver_learner(nonfinite):
    net = small_net()
    return ibaml.MetaLearner(net, priors.IsotropicGaussian.from_module(net, precision=100.0), lik(),
                             estimator=ibaml.Implicit(solver=BrokenCG(limit=1e3)), nonfinite=nonfinite,
                             inner_optimizer=ibaml.core.optim.Adam(lr=0.01), inner_steps=5)


def broken_solver_batch():
    """Four sine tasks; tasks 0 and 1 have query targets of 1e5, so that ``||∂F/∂v|| > 1e3``."""
    batch = sine_tasks(4, torch.Generator().manual_seed(3))
    batch["query_y"][:2] = 1e5
    return batch


def overflow(batch, tasks, key="support_y"):
    batch[key][tasks] = batch[key][tasks] * 1e200  # squared residuals overflow float64
    return batch


def nonfinite_step(batch, nonfinite="raise"):
    net = small_net()
    learner = ibaml.MetaLearner(net, priors.IsotropicGaussian.from_module(net, precision=100.0), lik(),
                                nonfinite=nonfinite, inner_optimizer=ibaml.core.optim.Adam(lr=0.01), inner_steps=5)
    learner.meta_step(batch)


def mini(tmp, fmt, name="mini"):
    return write_miniimagenet_fixture(tmp / f"{name}-{fmt}", fmt, (6, 3, 3), 5, seed=0)


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def truncated_pickle(tmp):
    root = mini(tmp, "pickle")
    truncate(root / "mini-imagenet-cache-train.pkl")
    load_miniimagenet(root, "train")


def misformatted_pickle(tmp):
    root = tmp / "misformatted"
    root.mkdir()
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    load_miniimagenet(root, "train")


def truncated_csv(tmp):
    root = mini(tmp, "csv")
    text = (root / "train.csv").read_text()
    (root / "train.csv").write_text(text[: text.index("\n", 100) + 6])  # cut inside a file name
    load_miniimagenet(root, "train")


def truncated_jpeg(tmp):
    root = mini(tmp, "csv")
    truncate(root / "images" / "n9000000600000002.jpg")
    load_miniimagenet(root, "val")


def missing_csv(tmp):
    root = mini(tmp, "csv")
    (root / "test.csv").unlink()
    load_miniimagenet(root, "test", format="csv")


def corrupt_split_file(tmp):
    root = write_omniglot_fixture(tmp / "omniglot", 2, 4, 3)
    (root / "ibaml_split.json").write_text('{"train": ["images_background/Alphabet_01/character01"')
    load_omniglot(root, "train", split_sizes=(4, 2))


def sampler(tmp, ways, shots, query):
    EpisodeSampler(load_miniimagenet(mini(tmp, "pickle", "sampler"), "train"), ways=ways, shots=shots, query=query)


RUN = ["--method", "imaml", "--meta-iters", "2", "--meta-batch", "4", "--inner-steps", "1", "--train-only",
       "--no-progress"]


def example_checkpoint(tmp):
    out = tmp / "run"
    if not (out / "imaml" / "last.pt").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            sine_regression.main(RUN + ["--out", str(out)])
    return out


def resume(tmp, *extra, damage=None):
    out = example_checkpoint(tmp)
    if damage:
        damage(out / "imaml" / "last.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        sine_regression.main(RUN + ["--resume", str(out), "--out", str(tmp / "again")] + list(extra))


def other_method_checkpoint(tmp):
    out = example_checkpoint(tmp)
    (out / "ibaml").mkdir(exist_ok=True)
    (out / "ibaml" / "last.pt").write_bytes((out / "imaml" / "last.pt").read_bytes())
    with contextlib.redirect_stdout(io.StringIO()):
        sine_regression.main(RUN + ["--method", "ibaml", "--noise", "shared", "--resume", str(out), "--out", str(tmp / "again")])


NONFINITE_HINT = "; lower the inner learning rate, add CG damping, or use nonfinite='skip'"

# (case, action(tmp), exception, exact message or pattern; {tmp} stands for the temporary folder)
CASES = [
    # --- task batches
    ("support/query shape mismatch: points", lambda t: regression_step(swap_in(support_y=lambda b: b["support_y"][:, :3])),
     ValueError, "support_x has (3, 5) [tasks, points] but support_y has (3, 3)"),
    ("support/query shape mismatch: point shape",
     lambda t: regression_step(swap_in(query_x=lambda b: b["query_x"].expand(-1, -1, 2))),
     ValueError, "support_x points have shape (1,) but query_x points have (2,)"),
    ("support/query shape mismatch: tasks",
     lambda t: regression_step(swap_in(query_x=lambda b: b["query_x"][:2], query_y=lambda b: b["query_y"][:2])),
     ValueError, "support has 3 tasks but query has 2"),
    ("labels out of range (num_classes given)", lambda t: classification_step(with_label(3), LABELS, num_classes=3),
     ValueError, "support_y has labels outside 0..2 (min 0, max 3)"),
    ("labels out of range (classes from the network's output)", lambda t: classification_step(LABELS, with_label(-1)),
     ValueError, "query_y has labels outside 0..2 (min -1, max 2)"),
    ("float labels for classification", lambda t: classification_step(LABELS.double(), LABELS),
     ValueError, "support_y must hold integer class labels, got dtype torch.float64"),
    ("NaN in inputs", lambda t: regression_step(set_item("support_x", (1, 2, 0), math.nan)),
     ValueError, "support_x contains NaN or Inf in 1 of 3 tasks (first: task 1)"),
    ("Inf in targets", lambda t: regression_step(set_item("query_y", (2, 0, 0), -math.inf)),
     ValueError, "query_y contains NaN or Inf in 1 of 3 tasks (first: task 2)"),
    ("empty tasks: no query points",
     lambda t: regression_step(swap_in(query_x=lambda b: b["query_x"][:, :0], query_y=lambda b: b["query_y"][:, :0])),
     ValueError, "query set is empty: query_x has shape (3, 0, 1)"),
    ("empty batch: no tasks",
     lambda t: regression_step(lambda b: b.update({k: v[:0] for k, v in b.items()})),
     ValueError, "support set is empty: support_x has shape (0, 5, 1)"),
    ("missing support targets", lambda t: regression_step(lambda b: b.pop("support_y")),
     ValueError, "task batch has no 'support_y'"),
    # --- the episodic sampler on image data
    ("more ways than classes", lambda t: sampler(t, 7, 1, 1),
     DatasetError, "miniImageNet/train: ways=7 exceeds the number of classes (6)"),
    ("more shots than images", lambda t: sampler(t, 5, 4, 2),
     DatasetError, "miniImageNet/train: shots + query = 4 + 2 = 6 exceeds the 5 images of the smallest class "
                   "('n90000000')"),
    # --- priors and likelihoods at construction
    ("zero prior scale", lambda t: priors.DiagonalGaussian.from_module(small_net(), init_scale=0.0),
     ValueError, "DiagonalGaussian init_scale must be a positive finite number, got 0.0"),
    ("negative prior precision", lambda t: priors.IsotropicGaussian.from_module(small_net(), precision=-1.0),
     ValueError, "IsotropicGaussian precision must be a positive finite number, got -1.0"),
    ("negative layer-wise scale", lambda t: priors.LayerwiseGaussian.from_module(small_net(), init_scale=-0.1),
     ValueError, "LayerwiseGaussian init_scale must be a positive finite number, got -0.1"),
    ("zero low-rank scale", lambda t: priors.LowRankGaussian.from_module(small_net(), init_scale=0),
     ValueError, "LowRankGaussian init_scale must be a positive finite number, got 0"),
    ("zero Student-t scale", lambda t: priors.StudentT.from_module(small_net(), init_scale=0.0),
     ValueError, "StudentT init_scale must be a positive finite number, got 0.0"),
    ("infinite Student-t scale", lambda t: priors.StudentT.from_module(small_net(), init_scale=float("inf")),
     ValueError, "StudentT init_scale must be a positive finite number, got inf"),
    ("non-positive scale through build_learner", lambda t: ibaml.build_learner("ibaml", small_net(), lik(), init_scale=-1.0),
     ValueError, "DiagonalGaussian init_scale must be a positive finite number, got -1.0"),
    ("zero likelihood noise", lambda t: ibaml.GaussianLikelihood(noise=0.0),
     ValueError, "GaussianLikelihood noise must be a positive finite number, got 0.0"),
    # --- unknown names
    ("unknown method (build_learner)", lambda t: ibaml.build_learner("reptile", small_net(), lik()),
     ValueError, "unknown method 'reptile'; expected one of maml, anil, fomaml, imaml, abml, ibaml, lazy, imaml-gd, imaml-hf, ibaml-all, ibaml-hf, abml-all, ibaml-fullcov"),
    ("unknown option (build_learner)", lambda t: ibaml.build_learner("imaml", small_net(), lik(), cg_iters=5),
     TypeError, "build_learner got unknown option(s) ['cg_iters']; MetaLearner options it passes on are "
                "['chunk_size', 'eval_inner_steps', 'hyper_weight', 'inner_support_size', 'meta_lr', 'meta_lr_overrides', 'meta_optimizer', 'nonfinite', "
                "'num_classes', 'num_predictive_samples', 'process_group', 'seed', 'task_batching']"),
    ("unknown inner optimizer (build_learner)",
     lambda t: ibaml.build_learner("imaml", small_net(), lik(), inner_optimizer="lbfgs"),
     ValueError, "unknown inner optimizer 'lbfgs'; expected one of ['adam', 'hf', 'newton', 'prior', 'sgd']"),
    ("inner optimizer of neither shape (MetaLearner)",
     lambda t: ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), inner_optimizer=object()),
     TypeError, re.compile(r"inner_optimizer must be an ibaml.core.optim optimiser .* or have init\(params\) and "
                           r"step\(objective, params, state\) or update\(params, grads, state\), got <object object at \w+>")),
    ("unknown inference method (MetaLearner)",
     lambda t: ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), method="laplace"),
     ValueError, "unknown inference method 'laplace'; expected one of ['map', 'variational']"),
    ("unknown non-finite policy (MetaLearner)",
     lambda t: ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), nonfinite="ignore"),
     ValueError, "nonfinite must be one of ('raise', 'skip'), got 'ignore'"),
    ("estimator given by name (MetaLearner)",
     lambda t: ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), estimator="implicit"),
     TypeError, "estimator must be a HypergradEstimator (Implicit(), Explicit(), FirstOrder(), Lazy()), got 'implicit'"),
    ("unknown keyword (MetaLearner)",
     lambda t: ibaml.MetaLearner(small_net(), priors.Flat.from_module(small_net()), lik(), inner_lr=0.1),
     TypeError, "MetaLearner.__init__() got an unexpected keyword argument 'inner_lr'"),
    ("unknown method (example CLI)", lambda t: cli(["--method", "reptile"]),
     CLIError, re.compile(r"argument --method: invalid choice: 'reptile' \(choose from '?maml'?, .*'?dkt'?\)")),
    ("unknown method in --compare (example CLI)", lambda t: cli(["--compare", "maml,reptile"]),
     CLIError, "unknown method(s) ['reptile']; choose from maml, anil, fomaml, imaml, abml, "
               "ibaml, lazy, imaml-gd, imaml-hf, ibaml-all, ibaml-hf, abml-all, ibaml-fullcov, dkt"),
    ("unknown option (example CLI)", lambda t: cli(["--meta-iter", "5", "--bogus"]),
     CLIError, "unrecognized arguments: --bogus"),
    ("--distributed without torchrun (example CLI)", lambda t: cli(["--distributed"]),
     CLIError, re.compile(r"--distributed needs the torchrun environment: torchrun --nproc_per_node N \S+ \.\.\.$")),
    ("a new run into a folder that holds one (example CLI)",
     lambda t: cli(RUN + ["--out", str(example_checkpoint(t))]),
     CLIError, "{tmp}/run already holds a run of imaml: continue it with --resume {tmp}/run or replace it with "
               "--overwrite"),
    ("resuming another run into a folder that holds one (example CLI)",
     lambda t: cli(RUN + ["--resume", str(t / "empty"), "--out", str(example_checkpoint(t))]),
     CLIError, "{tmp}/run already holds a run of imaml: continue it with --resume {tmp}/run or replace it with "
               "--overwrite"),
    # --- dataset files
    ("missing dataset file", lambda t: load_miniimagenet(t, "test", format="pickle"),
     DatasetError, "miniImageNet: {tmp}/mini-imagenet-cache-test.pkl: file missing"),
    ("missing csv file", missing_csv, DatasetError, "miniImageNet: {tmp}/mini-csv/test.csv: file missing"),
    ("truncated pickle", truncated_pickle,
     DatasetError, "miniImageNet: {tmp}/mini-pickle/mini-imagenet-cache-train.pkl: not a readable pickle "
                   "(pickle data was truncated)"),
    ("misformatted pickle", misformatted_pickle,
     DatasetError, "miniImageNet: {tmp}/misformatted/mini-imagenet-cache-train.pkl: expected a dict with "
                   "'image_data' and 'class_dict', got list"),
    ("truncated csv (inside a file name)", truncated_csv,
     DatasetError, "miniImageNet: {tmp}/mini-csv/train.csv: line 5: expected 'filename,label', got 'n9000'"),
    ("truncated image file", truncated_jpeg,
     DatasetError, re.compile(r"miniImageNet: image \{tmp\}/mini-csv/images/n9000000600000002\.jpg: cannot decode "
                              r"\(image file is truncated.*\)")),
    ("corrupt Omniglot split file", corrupt_split_file,
     DatasetError, "Omniglot: split file {tmp}/omniglot/ibaml_split.json: unreadable (Expecting ',' delimiter: line 1 "
                   "column 55 (char 54)); delete it to draw a new split"),
    ("missing Omniglot folders", lambda t: load_omniglot(t / "nothing"),
     DatasetError, "Omniglot: no images_background/ or images_evaluation/ folder under {tmp}/nothing"),
    # --- checkpoints (through the sine example's --resume)
    ("checkpoint from an incompatible configuration", lambda t: resume(t, "--shots", "5", "--meta-batch", "8"),
     CheckpointError, "{tmp}/run/imaml/last.pt: checkpoint from an incompatible configuration "
                      "(shots: saved 10, now 5, meta_batch: saved 4, now 8)"),
    ("checkpoint of another method", other_method_checkpoint,
     CheckpointError, "{tmp}/run/ibaml/last.pt: checkpoint from an incompatible configuration (method: saved 'imaml', "
                      "now 'ibaml', kl_weight: saved None, now 0.2)"),
    ("checkpoint with other inner steps", lambda t: resume(t, "--inner-steps", "2"),
     CheckpointError, "{tmp}/run/imaml/last.pt: checkpoint from an incompatible configuration "
                      "(inner_steps: saved 1, now 2, eval_inner_steps: saved 1, now 2)"),
    ("checkpoint past --meta-iters", lambda t: resume(t, "--meta-iters", "1"),
     CheckpointError, "{tmp}/run/imaml/last.pt: checkpoint at step 2, beyond the 1 steps of this run"),
    ("truncated checkpoint", lambda t: resume(t, damage=truncate),
     CheckpointError, "{tmp}/run/imaml/last.pt: not a readable checkpoint (truncated or corrupt?): not a complete "
                      "torch.save archive"),
    ("not a checkpoint", lambda t: resume(t, damage=lambda p: torch.save({"weights": torch.zeros(2)}, p)),
     CheckpointError, "{tmp}/run/imaml/last.pt: not an ibaml checkpoint (no 'format' entry)"),
    # --- non-finite values during meta-training (policy "raise")
    ("non-finite inner solution", lambda t: nonfinite_step(overflow(sine_tasks(4, torch.Generator()), [0, 2])),
     NonFiniteError, "2 of 4 tasks gave non-finite values (inner solution: 2, query loss: 0, CG residual: 0, "
                     "meta-gradient: 0)" + NONFINITE_HINT),
    ("non-finite CG residual", lambda t: broken_solver_learner("raise").meta_step(broken_solver_batch()),
     NonFiniteError, "2 of 4 tasks gave non-finite values (inner solution: 0, query loss: 0, CG residual: 2, "
                     "meta-gradient: 0)" + NONFINITE_HINT),
    ("non-finite query loss", lambda t: nonfinite_step(overflow(sine_tasks(4, torch.Generator()), [3], "query_y")),
     NonFiniteError, "1 of 4 tasks gave non-finite values (inner solution: 0, query loss: 1, CG residual: 0, "
                     "meta-gradient: 0)" + NONFINITE_HINT),
    ("every task non-finite under skip",
     lambda t: nonfinite_step(overflow(sine_tasks(4, torch.Generator()), slice(None)), nonfinite="skip"),
     NonFiniteError, "4 of 4 tasks gave non-finite values (inner solution: 4, query loss: 0, CG residual: 0, "
                     "meta-gradient: 0)" + NONFINITE_HINT + " (every task failed, so nothing is left to learn from)"),
]


def run_case(action, tmp):
    """The exception an action raises, or ``None``."""
    try:
        action(Path(tmp))
    except Exception as e:  # noqa: BLE001 -- the test inspects whatever comes out
        return e
    return None


@pytest.mark.parametrize("name, action, kind, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(name, action, kind, message, tmp_path):
    error = run_case(action, tmp_path)
    assert error is not None, f"{name}: no error"
    assert isinstance(error, kind), f"{name}: {type(error).__name__}: {error}"
    text = str(error).replace(str(tmp_path), "{tmp}")
    assert "\n" not in text, text
    if isinstance(message, re.Pattern):
        assert message.fullmatch(text), text
    else:
        assert text == message, text


def test_truncated_csv_inside_a_label_is_detected(tmp_path):
    root = mini(tmp_path, "csv")
    text = (root / "train.csv").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    cut = text[: text.rindex(last) + last.index(",") + 4]
    (root / "train.csv").write_text(cut)
    with pytest.raises(DatasetError, match=r"line \d+: label 'n90' appears nowhere else and the file ends without a "
                                           r"line break: it looks truncated"):
        load_miniimagenet(root, "train")
    # the same rows, complete but for the final line break, load
    (root / "train.csv").write_text(text.rstrip("\n"))
    assert load_miniimagenet(root, "train").num_classes == 6


def test_nonfinite_cg_residual_is_skipped_counted_and_excluded():
    learner = broken_solver_learner("skip")
    batch = broken_solver_batch()
    loss, grads, diagnostics, finite = learner.meta_gradient(batch)
    assert finite.tolist() == [False, False, True, True]
    assert torch.isnan(diagnostics["residual_norm"][:2]).all() and torch.isfinite(diagnostics["residual_norm"][2:]).all()
    kept = broken_solver_learner("skip").meta_gradient({k: v[2:] for k, v in batch.items()})
    assert torch.equal(loss, kept[0])
    for k in grads:  # the mean over the two finite tasks only
        assert torch.allclose(grads[k], kept[1][k], rtol=1e-12, atol=1e-15), k
    stats = learner.meta_step(batch)
    assert stats["skipped"] == 2 and learner.skipped_tasks == 2
    assert math.isfinite(stats["residual_norm"]) and math.isfinite(stats["loss"])
    assert all(torch.isfinite(v).all() for v in learner.meta_params().values())
    learner.meta_step(batch)
    assert learner.skipped_tasks == 4 and learner.training_state()["skipped_tasks"] == 4


def test_example_reports_skipped_tasks(tmp_path, monkeypatch, capsys):
    """One task of every training batch overflows: the run goes on, and metrics.json and the
    printed summary count the skipped tasks."""
    sample = sine_regression.SineTaskDistribution.sample
    monkeypatch.setattr(sine_regression.SineTaskDistribution, "sample",
                        lambda self, *a, **k: overflow_batch(sample(self, *a, **k)))
    sine_regression.main(RUN + ["--meta-iters", "3", "--dtype", "float64", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_tasks"] == 3
    assert "non-finite tasks skipped in meta-training: imaml 3" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["sine_regression.py"] + RUN + ["--meta-iters", "3", "--dtype", "float64",
                                                                    "--nonfinite", "raise", "--out", str(tmp_path / "r")])
    with pytest.raises(NonFiniteError, match=r"^1 of 4 tasks gave non-finite values \(inner solution: 1,"):
        sine_regression.main()


def overflow_batch(batch):
    batch.support_y[0] = batch.support_y[0] * 1e200
    return batch


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name, action, kind, _ in CASES:
            case_dir = Path(tmp) / re.sub(r"\W+", "_", name)
            case_dir.mkdir()
            error = run_case(action, case_dir)
            shown = "no error" if error is None else f"{type(error).__name__}: {str(error).replace(str(case_dir), '<tmp>')}"
            print(f"- {name}\n    {shown}")


def test_a_diverged_adaptation_is_reported_as_such_not_as_a_metric_error():
    """MAML with a step far too large for 30-shot tasks (its inner step is on the summed support
    loss) predicts NaN; evaluation names the tasks and what to change instead of failing inside
    the calibration metrics."""
    from ibaml.data.sine import SineTaskDistribution
    from ibaml.core.nets import MLP

    torch.manual_seed(0)
    learner = ibaml.build_learner("maml", MLP(1, (16,), 1), ibaml.GaussianLikelihood(1.0), inner_lr=5.0, inner_steps=5)
    tasks = SineTaskDistribution(shots=30).sample(6, torch.Generator().manual_seed(0))
    with pytest.raises(ibaml.NonFiniteError, match=r"30-shot: \d of 6 tasks have non-finite predictions \(tasks \["
                                                   r".*lower the inner step"):
        learner.evaluate(tasks, name="30-shot")


def test_sine_example_defaults_are_sine_run_configs():
    """The example's command-line defaults of every run option are sine_run_config's, held there only."""
    from ibaml.recipes.sine_presets import sine_run_defaults
    args = sine_regression.parse_args([])
    assert {k: getattr(args, k) for k in sine_run_defaults()} == sine_run_defaults()
