"""The library pieces the example scripts are made of: run and image-data options, resumable
parsing, one-line errors, image presets, samplers over a run's splits, likelihood summaries,
the deep-kernel GP's report, the statistics of a run's last steps, the data-parallel block."""

import argparse
import json

import pytest
import torch

import ibaml
from ibaml.baselines.dkt import DeepKernelGP
from ibaml.calibration import CalibrationReport
from ibaml.core.conjugate_noise import ConjugateNoiseGaussianLikelihood
from ibaml.core.nets import Conv4
from ibaml.data import EpisodeSampler, SineTaskDistribution, load_splits, write_fixture
from ibaml.experiments import cli
from ibaml.recipes import image_presets
from ibaml.train import distributed, training
from ibaml.train.checkpoint import CheckpointError


def run_parser(**defaults):
    p = argparse.ArgumentParser(prog="script.py")
    cli.add_run_options(p, meta_iters=defaults.get("meta_iters", 10), meta_batch=defaults.get("meta_batch", 4),
                        nonfinite=True, distributed=True)
    return p


def error_of(capsys, fn):
    with pytest.raises(SystemExit) as exc:
        fn()
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1]


def test_run_options_defaults_and_out(tmp_path):
    p = run_parser(meta_iters=7)
    args = p.parse_args([])
    assert (args.meta_iters, args.meta_batch, args.cg_steps, args.nonfinite, args.distributed) == (7, 4, 20, "skip", False)
    cli.check_run_options(p, args, str(tmp_path / "default"))
    assert args.out == str(tmp_path / "default")
    args = p.parse_args(["--resume", str(tmp_path / "r")])
    cli.check_run_options(p, args, "unused")
    assert args.out == str(tmp_path / "r")


@pytest.mark.parametrize("argv, message", [
    (["--meta-iters", "0"], "--meta-iters must be at least 1, got 0"),
    (["--meta-lr", "-1"], "--meta-lr must be a positive number, got -1.0"),
    (["--cg-damping", "-0.5"], "--cg-damping must be 0 or more, got -0.5"),
    (["--read-every", "-1"], "--read-every must be 0 or more, got -1"),
    (["--distributed"], "--distributed needs the torchrun environment: torchrun --nproc_per_node N script.py ..."),
])
def test_run_options_refused(capsys, tmp_path, argv, message):
    p = run_parser()
    assert error_of(capsys, lambda: cli.check_run_options(p, p.parse_args(argv + ["--out", str(tmp_path)]), "x")) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_run_options_refuse_missing_cuda(capsys, tmp_path):
    p = run_parser()
    args = p.parse_args(["--device", "cuda", "--out", str(tmp_path)])
    assert "CUDA is not available" in error_of(capsys, lambda: cli.check_run_options(p, args, "x"))


def test_run_options_never_overwrite_silently(capsys, tmp_path):
    (tmp_path / "maml").mkdir()
    torch.save({}, tmp_path / "maml" / training.LAST)
    p = run_parser()
    message = error_of(capsys, lambda: cli.check_run_options(p, p.parse_args(["--out", str(tmp_path)]), "x",
                                                             runs=("imaml", "maml")))
    assert message == (f"{tmp_path} already holds a run of maml: continue it with --resume {tmp_path} "
                       f"or replace it with --overwrite")
    for extra in (["--overwrite"], ["--resume", str(tmp_path)]):
        cli.check_run_options(p, p.parse_args(["--out", str(tmp_path)] + extra), "x", runs=("imaml", "maml"))


def test_parse_resumable_merges_saved_options(tmp_path):
    p = run_parser()
    p.add_argument("--ways", type=int, default=5)
    args, state = cli.parse_resumable(p, ["--resume", str(tmp_path)], may_change=cli.RUN_MAY_CHANGE)
    assert state is None and args.ways == 5                      # no checkpoint yet: the options as given
    ibaml.train.checkpoint.save_checkpoint(tmp_path / training.LAST, {"config": {"ways": 3, "seed": 7, "meta_iters": 9}})
    args, state = cli.parse_resumable(p, ["--resume", str(tmp_path), "--meta-iters", "20"], cli.RUN_MAY_CHANGE)
    assert (args.ways, args.seed, args.meta_iters) == (3, 7, 20) and state["config"]["ways"] == 3
    with pytest.raises(CheckpointError, match="ways"):
        cli.parse_resumable(p, ["--resume", str(tmp_path), "--ways", "4"], cli.RUN_MAY_CHANGE)


def test_exit_on_reports_one_line(capsys):
    with pytest.raises(SystemExit) as exc, cli.exit_on(CheckpointError):
        raise CheckpointError("run/last.pt: checkpoint from an incompatible configuration")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: run/last.pt: checkpoint from an incompatible configuration\n"
    with pytest.raises(KeyError), cli.exit_on(CheckpointError):
        raise KeyError("other errors propagate")


def test_image_data_options_and_loading(capsys):
    p = argparse.ArgumentParser()
    cli.add_image_data_options(p)
    for name, value in (("ways", 3), ("shots", 1), ("query", 2), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=value)
    args = p.parse_args(["--fixture", "--image-size", "16", "--workers", "0"])
    cli.check_image_data_options(p, args)
    splits = cli.load_image_data(args)
    assert {s: d.num_classes for s, d in splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert splits["test"].image_shape == (3, 16, 16)
    assert "--data-root DIR is required" in error_of(capsys, lambda: cli.check_image_data_options(p, p.parse_args([])))
    bad = p.parse_args(["--fixture", "--dataset", "omniglot", "--fixture-kind", "strokes"])
    assert "is a miniImageNet layout" in error_of(capsys, lambda: cli.check_image_data_options(p, bad))


def test_fixture_and_splits_refuse_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        write_fixture(tmp_path, "cifar", ways=2, shots=1, query=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        write_fixture(tmp_path, "miniimagenet", ways=2, shots=1, query=1, kind="noise")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_splits(tmp_path, "cifar")
    root = write_fixture(tmp_path, "omniglot", ways=5, shots=1, query=2, rotations=False)
    splits = load_splits(root, "omniglot", rotations=False, split_sizes=(0.5, 0.25))
    assert splits["train"].image_shape == (1, 28, 28) and splits["train"].num_classes >= 5


def test_samplers_for_splits_share_training_statistics():
    root_images = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8)
    data = {s: ibaml.data.ImageClassDataset(root_images[i::3], torch.arange(20) % 5, [str(k) for k in range(5)])
            for i, s in enumerate(("train", "val", "test"))}
    samplers = EpisodeSampler.for_splits(data, ways=3, shots=1, query=2, seed=4)
    mean, std = data["train"].channel_stats()
    by_hand = EpisodeSampler(data["val"], 3, 1, 2, seed=4, mean=mean, std=std)
    assert torch.equal(samplers["val"].sample(2).query_x, by_hand.sample(2).query_x)
    assert set(samplers) == {"train", "val", "test"}


def test_image_learner_applies_the_presets():
    torch.manual_seed(0)
    net = Conv4(in_channels=1, hidden=4, out_dim=5, image_size=16).double()
    maml = image_presets.image_learner("maml", net, dataset="miniimagenet", ways=5, shots=2, prior_meta_lr=0.5,
                                       num_outer_samples=None)
    assert maml.inner_loop.optimizer.lr == pytest.approx(0.01 / 10)       # MAML's step on the summed NLL
    assert maml.likelihood.scale.dtype == torch.float64 and not maml.likelihood.scale_inner
    assert maml.num_classes == 5 and maml.num_predictive_samples == 20
    lrs = {g["lr"] for g in maml.meta_optimizer.param_groups}
    assert image_presets.LOGIT_SCALE["maml"]["meta_lr"] in lrs
    imaml = image_presets.image_learner("imaml", Conv4(in_channels=1, hidden=4, out_dim=5, image_size=16),
                                        dataset="omniglot", ways=5, shots=1, logit_scale_mode="fixed", precision=None)
    assert float(imaml.model.prior.precision) == pytest.approx(30.0)     # the classification preset's λ
    assert not imaml.likelihood.scale.requires_grad


def test_likelihood_summaries():
    assert ibaml.CategoricalLikelihood().summary() == {}
    assert ibaml.GaussianLikelihood(0.3).summary() == {"noise_std": pytest.approx(0.3)}
    summary = ConjugateNoiseGaussianLikelihood(prior_count=5.0, prior_noise=0.5).summary()
    assert summary["noise_prior"]["count"] == pytest.approx(5.0)
    assert summary["noise_prior"]["scale"] == pytest.approx(0.5) and summary["noise_prior"]["tails"] is None
    assert json.loads(json.dumps(summary)) == summary


def test_dkt_evaluate_is_the_report_of_its_predictive():
    torch.manual_seed(0)
    gp = DeepKernelGP(hidden=(8, 4))
    batch = SineTaskDistribution(shots=5, query=7).sample(6, torch.Generator().manual_seed(1))
    mean, var = gp.predict(batch.support_x, batch.support_y, batch.query_x)
    expected = CalibrationReport.regression(mean, var, batch.query_y.reshape(mean.shape)).metrics
    assert gp.evaluate(batch, name="dkt").metrics == expected


def test_sine_curve_is_the_noiseless_task():
    tasks = SineTaskDistribution(shots=4, query=3)
    batch = tasks.sample(5, torch.Generator().manual_seed(0))
    assert torch.allclose(tasks.curve(batch.info, batch.query_x[:, :, 0].reshape(-1)).reshape(5, 5, 3)
                          [torch.arange(5), torch.arange(5)], batch.query_y[..., 0])


def test_report_from_logits_matches_the_probabilities():
    outputs, labels = torch.randn(4, 3, 6, 5), torch.randint(0, 5, (4, 6))
    expected = CalibrationReport.classification(torch.softmax(2.5 * outputs, -1).mean(1), labels).metrics
    assert CalibrationReport.from_logits(outputs, labels, 2.5).metrics == expected


def test_tail_means_average_the_last_steps():
    tail = training.TailMeans("g.", after=3)
    for step in range(1, 7):
        tail(step, {"loss": 0.0, "g.a": float(step), "g.b": torch.tensor(2.0 * step)})
    assert tail.means() == {"a": pytest.approx(5.0), "b": pytest.approx(10.0)}
    assert training.TailMeans("g.", after=10).means() == {}


def test_data_parallel_disabled_joins_nothing():
    with distributed.data_parallel("cpu", enabled=False) as ctx:
        assert ctx is None
    assert not torch.distributed.is_initialized()
