"""Checkpoints: the file format (ibaml.train.checkpoint) and resuming the sine example after SIGKILL,
between checkpoints and in the middle of writing one, on exactly the uninterrupted trajectory."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ibaml.train.checkpoint import (CheckpointError, load_checkpoint, remove_stale_temporaries, restore_rng_state,
                                    rng_state, save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sine_regression.py"
ITERS, EVERY = 16, 4
RUN = ["--meta-iters", str(ITERS), "--meta-batch", "4", "--inner-steps", "3", "--checkpoint-every", str(EVERY),
       "--train-only", "--no-progress", "--threads", "1"]

# Runs the example with one stall injected, then sleeps until killed: STALL=sample:N stops on the
# N-th task batch drawn (between two checkpoints), STALL=replace:N stops inside the N-th
# save_checkpoint of a last.pt after its temporary file is written and before the rename.
# STALL_MARK names a file written when the stall begins.
WRAPPER = r"""
import os, sys, time
sys.path.insert(0, os.path.join(os.environ["IBAML_ROOT"], "examples"))
import sine_regression
from ibaml.data.sine import SineTaskDistribution

mode, at = os.environ["STALL"].split(":")
at, calls = int(at), [0]

def stall():
    open(os.environ["STALL_MARK"], "w").close()
    time.sleep(600)

if mode == "sample":
    sample = SineTaskDistribution.sample
    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            stall()
        return sample(self, *args, **kwargs)
    SineTaskDistribution.sample = counted
else:
    replace = os.replace
    def counted(src, dst, *args, **kwargs):
        if str(dst).endswith("last.pt"):
            calls[0] += 1
            if calls[0] == at:
                stall()
        return replace(src, dst, *args, **kwargs)
    os.replace = counted
sine_regression.main(sys.argv[1:])
"""


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", IBAML_ROOT=str(ROOT), PYTHONPATH=str(ROOT), **extra)


def _start(args, out, stall=None, mark=None):
    log = open(out.parent / f"{out.name}.log", "ab")
    if stall is None:
        cmd = [sys.executable, str(EXAMPLE)] + args + ["--out", str(out)]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
    cmd = [sys.executable, "-c", WRAPPER] + args + ["--out", str(out)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=_env(STALL=stall, STALL_MARK=str(mark)))


def _finish(proc, out, timeout=240):
    rc = proc.wait(timeout=timeout)
    text = (out.parent / f"{out.name}.log").read_text()
    assert rc == 0, text[-3000:]
    return text


def _kill_when_stalled(proc, mark, out, timeout=240):
    deadline = time.monotonic() + timeout
    while not mark.exists():
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached its stall point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_identical(a, b, where="state"):
    """Nested dicts / lists of tensors and numbers equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_trajectory(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"] == ITERS
    learner_a, learner_b = a["training"]["learner"], b["training"]["learner"]
    meta = [k for k in learner_a if k.startswith(("model.prior.", "model.likelihood."))]
    assert meta, sorted(learner_a)
    for k in meta:  # the meta-parameters, then everything else that continues the run
        assert torch.equal(learner_a[k], learner_b[k]), k
    for key in ("training", "rng", "config", "validation", "best"):
        assert_identical(a[key], b[key], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of maml and imaml (started in the background, awaited on first use)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _start(["--compare", "maml,imaml"] + RUN, out)

    def wait():
        if proc.returncode is None:
            _finish(proc, out)
        return out
    yield wait
    if proc.poll() is None:
        proc.kill()


def test_resume_after_kill_between_checkpoints_is_bit_identical(reference, tmp_path):
    out, mark = tmp_path / "run", tmp_path / "stalled"
    # the reference run goes on beside this one. Task batch ITERS + 15 is imaml's 15th: it has made
    # 14 steps, saved at step 12, and is killed while drawing the batch of step 15
    proc = _start(["--compare", "maml,imaml"] + RUN, out, stall=f"sample:{ITERS + 15}", mark=mark)
    _kill_when_stalled(proc, mark, out)
    assert load_checkpoint(out / "maml" / "last.pt")["step"] == ITERS
    assert load_checkpoint(out / "imaml" / "last.pt")["step"] == 12
    maml_file = out / "maml" / "last.pt"
    before = (maml_file.stat().st_mtime_ns, maml_file.read_bytes())

    log = _finish(_start(["--compare", "maml,imaml"] + RUN + ["--resume", str(out)], out), out)
    assert f"maml: checkpoint at step {ITERS} of {ITERS} (finished, not retrained)" in log
    assert f"imaml: checkpoint at step 12 of {ITERS} (resuming)" in log
    assert (maml_file.stat().st_mtime_ns, maml_file.read_bytes()) == before  # not retrained, not rewritten
    ref = reference()
    for method in ("maml", "imaml"):
        assert_same_trajectory(out / method / "last.pt", ref / method / "last.pt")


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    out, mark = tmp_path / "run", tmp_path / "stalled"
    # the 4th save of last.pt, the final one at step 16 (every 4), stops after its temporary file is written
    proc = _start(["--method", "imaml"] + RUN, out, stall="replace:4", mark=mark)
    _kill_when_stalled(proc, mark, out)
    temporaries = list((out / "imaml").glob(".last.pt.*.tmp"))
    assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
    previous = load_checkpoint(out / "imaml" / "last.pt")
    assert previous["step"] == 12 and previous["config"]["method"] == "imaml"

    _finish(_start(["--method", "imaml"] + RUN + ["--resume", str(out)], out), out)
    assert not list((out / "imaml").glob(".last.pt.*.tmp"))
    assert_same_trajectory(out / "imaml" / "last.pt", reference() / "imaml" / "last.pt")


# ------------------------------------------------------------------ the file format
def test_save_load_round_trip_and_config_check(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    state = {"config": {"method": "imaml", "meta_batch": 4, "shots": 10}, "step": 7,
             "model": {"w": torch.arange(3.0), "nested": [torch.ones(2), 3]}}
    save_checkpoint(path, state)
    back = load_checkpoint(path, config={"method": "imaml", "meta_batch": 4, "shots": 10})
    assert back["step"] == 7 and back["format"] == 1
    assert_identical(back["model"], state["model"])
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, config={"method": "ibaml", "meta_batch": 8, "shots": 10})
    assert str(err.value) == (f"{path}: checkpoint from an incompatible configuration "
                              f"(method: saved 'imaml', now 'ibaml', meta_batch: saved 4, now 8)")
    with pytest.raises(CheckpointError, match=r"\(seed: saved None, now 0\)"):
        load_checkpoint(path, config={"method": "imaml", "seed": 0}, keys=["method", "seed"])


def test_unreadable_checkpoints_are_refused_in_one_line(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match="no checkpoint file there"):
        load_checkpoint(path)
    save_checkpoint(path, {"step": 1, "x": torch.zeros(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "not a readable checkpoint (truncated or corrupt?)" in str(err.value) and "\n" not in str(err.value)
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match="not an ibaml checkpoint"):
        load_checkpoint(path)
    torch.save({"format": 99}, path)
    with pytest.raises(CheckpointError, match="checkpoint format 99, this version reads 1"):
        load_checkpoint(path)


def test_rng_state_restores_every_source(tmp_path):
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    torch.rand(3, generator=gen_a)
    snapshot = rng_state(tasks=gen_a, learner=gen_b)
    save_checkpoint(tmp_path / "r.pt", {"rng": snapshot})
    first = (torch.rand(4, generator=gen_a), torch.randn(4, generator=gen_b), torch.rand(4))
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"], tasks=gen_a, learner=gen_b)
    again = (torch.rand(4, generator=gen_a), torch.randn(4, generator=gen_b), torch.rand(4))
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    with pytest.raises(CheckpointError, match=r"no random state for \['sampler'\]"):
        restore_rng_state(snapshot, sampler=gen_a)
    with pytest.raises(TypeError, match="get_state"):
        rng_state(tasks=object())


def test_stale_temporaries_are_removed(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"someone else's")
    assert remove_stale_temporaries(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp", "last.pt"]
    assert load_checkpoint(path)["step"] == 1
