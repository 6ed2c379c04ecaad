"""ibaml.train.training: fit (checkpoints, exact resume, refusal to overwrite a run), meta_step, chunked evaluation."""

import pytest
import torch
from conftest import sine_tasks

import ibaml
from ibaml.train import training
from ibaml.train.checkpoint import CheckpointError, load_checkpoint


def make_learner(method="imaml", seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    options = {"precision": 1.0} if method == "imaml" else {}   # the tests' own λ, apart from the preset's
    return ibaml.build_learner(method, net, ibaml.GaussianLikelihood(1.0, learn_noise=True).double(), inner_steps=2,
                               meta_lr=1e-2, **options)


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


def test_resuming_from_another_folder_does_not_replace_a_run_held_here(tmp_path, capsys):
    sample, gen = sampler()
    training.fit(make_learner(), sample, 2, folder=tmp_path / "held", rng={"tasks": gen}, progress=False)
    kept = (tmp_path / "held" / "last.pt").read_bytes()
    training.fit(make_learner(), sample, 1, folder=tmp_path / "source", rng={"tasks": gen}, progress=False)
    for source in (tmp_path / "empty", tmp_path / "source"):      # without and with a checkpoint to continue
        with pytest.raises(training.RunExistsError, match="already holds a run"):
            training.fit(make_learner(), sample, 3, folder=tmp_path / "held", resume=source, rng={"tasks": gen},
                         progress=False)
        assert (tmp_path / "held" / "last.pt").read_bytes() == kept
    result = training.fit(make_learner(), sample, 3, folder=tmp_path / "held", resume=tmp_path / "source",
                          overwrite=True, rng={"tasks": gen}, progress=False)
    assert result.resumed_from == 1 and load_checkpoint(tmp_path / "held" / "last.pt")["step"] == 3


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
    whole = learner.evaluate(batch).metrics
    chunked = learner.evaluate(batch, chunk=3).metrics
    for key in ("mse", "nll", "coverage_90"):
        assert abs(whole[key]["mean"] - chunked[key]["mean"]) < 1e-10, key
    # a sampler, reseeded: the same tasks and the same numbers on every call, the generator restored
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    draw = lambda n: sine_tasks(n, gen)
    a = learner.evaluate(draw, 5, chunk=2, seed=11, generators=(gen,)).metrics
    b = learner.evaluate(draw, 5, chunk=2, seed=11, generators=(gen,)).metrics
    assert abs(a["mse"]["mean"] - b["mse"]["mean"]) < 1e-10 and torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError, match="num_tasks"):
        learner.evaluate(draw)


def reference_adam_steps(batches, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """The meta-gradient of each batch as the plain mean of per-task estimator calls (one
    task at a time, outside ``vmap``, no masks), and Adam written out by hand:
    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``θ ← θ − lr·m̂/(√v̂ + ε)``. Returns the
    mean losses, the last mean gradient and the parameters after each step."""
    learner = make_learner()
    theta = {k: v.clone() for k, v in learner.meta_params().items()}
    assert not learner.model.prior_hyper_log_prob(learner.model.meta_parameters()).requires_grad
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v2 = {k: torch.zeros_like(v) for k, v in theta.items()}
    losses, grads, thetas = [], None, []
    for step, batch in enumerate(batches, 1):
        T = batch["support_x"].shape[0]
        outs = [learner.estimator.task_gradient(learner.problem, theta, {k: x[t] for k, x in batch.items()})
                for t in range(T)]
        losses.append(sum(float(o.loss) for o in outs) / T)
        grads = {k: sum(o.grads[k] for o in outs) / T for k in theta}
        for k, g in grads.items():
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g
            v2[k] = betas[1] * v2[k] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[k] / (1 - betas[0] ** step), v2[k] / (1 - betas[1] ** step)
            theta[k] = theta[k] - lr * m_hat / (v_hat.sqrt() + eps)
        thetas.append({k: t.clone() for k, t in theta.items()})
    return losses, grads, thetas


def test_meta_step_is_the_learner_s_and_counts_steps():
    """``MetaLearner.meta_step`` and :func:`ibaml.train.meta_update.meta_step` (the learner's problem and
    optimiser given explicitly, the step counted by the caller) against :func:`reference_adam_steps`:
    the gradient handed to the optimiser is the mean of the per-task meta-gradients, and two
    steps move θ as Adam does (the second step depends on the gradients' sizes, not only
    their signs)."""
    gen = torch.Generator().manual_seed(1)
    batches = [sine_tasks(3, gen), sine_tasks(3, gen)]
    losses, last_grad, thetas = reference_adam_steps(batches)
    a, b = make_learner(), make_learner()
    for step, batch in enumerate(batches):
        sa = a.meta_step(batch)
        sb = ibaml.train.meta_update.meta_step(b.meta_problem, b.meta_optimizer, *b.task_and_draws(batch))
        b.step_count += 1
        assert sa["loss"] == sb["loss"] and sa["loss"] == pytest.approx(losses[step], rel=1e-10)
        for learner in (a, b):
            for k, p in learner.model.meta_parameters().items():
                torch.testing.assert_close(p.detach(), thetas[step][k], rtol=1e-9, atol=1e-12, msg=k)
    for learner in (a, b):
        for k, p in learner.model.meta_parameters().items():
            torch.testing.assert_close(p.grad, last_grad[k], rtol=1e-9, atol=1e-12, msg=k)
    assert int(a.step_count) == int(b.step_count) == 2
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ---------------------------------------------------------------------------------- no host synchronisation
class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value on the host, except inside ``torch.optim``, whose
    step counter is a host scalar by design (non-capturable optimisers):

    * the operators that copy a value to the host (``.item()``, ``bool()``, ``int()``,
      ``float()``, ``torch.equal``, boolean indexing's size), seen by dispatch;
    * the tensor methods that hand values to Python or NumPy, which dispatch nothing the mode
      sees on the CPU (``.tolist()``, ``.numpy()``, ``.cpu()``, ``repr``/``str``/``format``,
      ``__array__``) and the conversions themselves (``.item()``, ``bool``, ``int``,
      ``float``, ``complex``, ``__index__``), patched on ``torch.Tensor`` while the mode is on."""

    READS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero")
    METHODS = ("tolist", "numpy", "cpu", "__repr__", "__str__", "__format__", "__array__", "item", "__bool__",
               "__int__", "__float__", "__complex__", "__index__")

    def __init__(self):
        super().__init__()
        self.count = 0
        self.methods = {}

    def _count(self):
        import traceback
        if not any("/torch/optim/" in f.filename for f in traceback.extract_stack()):
            self.count += 1

    def _patched(self, name):
        original = self.methods[name][0]

        def read(tensor, *args, **kwargs):
            self._count()
            return original(tensor, *args, **kwargs)
        return read

    def __enter__(self):
        for name in self.METHODS:
            self.methods[name] = (getattr(torch.Tensor, name), name in vars(torch.Tensor))
            setattr(torch.Tensor, name, self._patched(name))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, (original, own) in self.methods.items():
                if own:
                    setattr(torch.Tensor, name, original)
                else:                                        # inherited from the C base class
                    delattr(torch.Tensor, name)
            self.methods = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self._count()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("read", [
    lambda t: t.tolist(), lambda t: t.numpy(), lambda t: t.cpu(), repr, str, lambda t: f"{t}",
    lambda t: format(t, ".3f"), lambda t: t.item(), bool, int, float, complex, lambda t: [1, 2][t.long()],
    lambda t: __import__("numpy").asarray(t), lambda t: torch.equal(t, t), lambda t: (t > 0).nonzero()],
    ids=["tolist", "numpy", "cpu", "repr", "str", "fstring", "format", "item", "bool", "int", "float", "complex",
         "index", "asarray", "equal", "nonzero"])
def test_host_read_counter_sees_every_way_of_reading_a_value(read):
    t = torch.tensor(0.5, dtype=torch.float64)
    before = {name: vars(torch.Tensor).get(name) for name in HostReads.METHODS}
    with HostReads() as reads:
        (t * 2 + 1).sin().sum()                       # computing reads nothing
        assert reads.count == 0
        read(t)
    assert reads.count > 0
    assert {name: vars(torch.Tensor).get(name) for name in HostReads.METHODS} == before   # restored on exit


def sync_learner(method, nonfinite="raise", dtype=torch.float64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    return ibaml.build_learner(method, net, ibaml.GaussianLikelihood(1.0, learn_noise=True).to(dtype), inner_steps=3,
                               cg_steps=3, meta_lr=1e-2, nonfinite=nonfinite)


@pytest.mark.parametrize("method", ["imaml", "ibaml", "maml", "abml", "lazy"])
def test_meta_step_without_checks_reads_nothing_on_the_host_and_equals_the_checked_step(method):
    batch = sine_tasks(4, torch.Generator().manual_seed(0))
    checked, free = sync_learner(method), sync_learner(method)
    with HostReads() as reads:
        checked.meta_step(batch)
    assert reads.count > 0                      # the detector sees the checked step's reads
    with HostReads() as reads:
        stats = free.meta_step(batch, validate=False, check=False)
    assert reads.count == 0
    assert all(torch.is_tensor(v) for k, v in stats.items() if k != "tasks")
    for k, v in checked.state_dict().items():
        torch.testing.assert_close(free.state_dict()[k], v, rtol=0, atol=0, msg=k)
    values = free.read_stats(stats)
    assert values["skipped"] == 0 and isinstance(values["loss"], float)


def overflowing(batch, tasks):
    batch["support_y"][tasks] = batch["support_y"][tasks] * 1e200    # squared residuals overflow float64
    return batch


def test_meta_step_without_checks_masks_failed_tasks_and_read_stats_applies_the_policy():
    bad = overflowing(sine_tasks(4, torch.Generator().manual_seed(0)), [1, 3])
    good = {k: v[[0, 2]] for k, v in bad.items()}
    skipping, reference = sync_learner("imaml", "skip"), sync_learner("imaml", "skip")
    with pytest.raises(ibaml.NonFiniteError) as checked_error:
        sync_learner("imaml", "raise").meta_step(bad)
    stats = skipping.meta_step(bad, validate=False, check=False)
    reference.meta_step(good)
    for k, v in reference.state_dict().items():       # the step of the finite tasks alone
        torch.testing.assert_close(skipping.state_dict()[k], v, msg=k)
    assert skipping.read_stats(stats)["skipped"] == 2 and skipping.skipped_tasks == 2

    raising = sync_learner("imaml", "raise")
    stats = raising.meta_step(bad, validate=False, check=False)
    assert all(torch.isfinite(p).all() for p in raising.meta_params().values())
    with pytest.raises(ibaml.NonFiniteError) as deferred_error:
        raising.read_stats(stats)
    assert str(deferred_error.value) == str(checked_error.value)

    every = sync_learner("imaml", "skip")
    before = {k: v.detach().clone() for k, v in every.meta_params().items()}
    stats = every.meta_step(overflowing(sine_tasks(4, torch.Generator().manual_seed(0)), [0, 1, 2, 3]),
                            validate=False, check=False)
    for k, v in every.meta_params().items():            # no finite task: the parameters stay
        assert torch.equal(v.detach(), before[k]), k
    with pytest.raises(ibaml.NonFiniteError, match="every task failed"):
        every.read_stats(stats)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_meta_gradient_and_update_compile_with_fullgraph_and_match_eager(backend):
    """``torch.compile(fullgraph=True)`` fails on any graph break, and so on any host read or
    data-dependent Python branch: the per-task gradients (vmapped inner solve, implicit
    gradient by CG), their masked mean and an SGD update compile as one graph (float32),
    traced only (``aot_eager``) and compiled to kernels by Inductor (a minute or two on the CPU).
    The loss, the meta-gradient itself and the updated parameters each match eager within
    1e-6 (absolute; the gradients' entries are up to 0.5 in size)."""
    learner = sync_learner("ibaml", dtype=torch.float32)
    task = learner.prepare(sine_tasks(4, torch.Generator().manual_seed(0), dtype=torch.float32), validate=False)
    meta = {k: v.detach() for k, v in learner.meta_params().items()}

    def step(meta, task):
        reduced = ibaml.train.meta_update.reduce_task_gradients(learner.task_gradients(task, meta))
        return reduced.loss, reduced.grads, {k: meta[k] - 0.01 * reduced.grads[k] for k in meta}

    torch._dynamo.reset()
    loss, grads, updated = torch.compile(step, fullgraph=True, backend=backend)(meta, task)
    eager_loss, eager_grads, eager_updated = step(meta, task)
    assert max(float(g.abs().max()) for g in eager_grads.values()) > 0.1     # a gradient worth comparing
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-6)
    for k in meta:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(updated[k], eager_updated[k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------- vmap or a loop over tasks
def test_task_batching_auto_loops_for_convolutions_on_the_cpu_and_both_agree():
    from ibaml.core.nets import Conv4
    from ibaml.core.meta_problem import loop_over_tasks

    def conv_learner(batching):
        torch.manual_seed(0)
        net = Conv4(in_channels=1, hidden=4, out_dim=3, image_size=16).double()
        return ibaml.build_learner("imaml", net, ibaml.CategoricalLikelihood().double(), inner_steps=2,
                                   num_classes=3, task_batching=batching)

    gen = torch.Generator().manual_seed(0)
    batch = {"support_x": torch.randn(3, 3, 1, 16, 16, generator=gen, dtype=torch.float64),
             "support_y": torch.arange(3).repeat(3, 1),
             "query_x": torch.randn(3, 6, 1, 16, 16, generator=gen, dtype=torch.float64),
             "query_y": torch.arange(3).repeat(3, 2)}
    auto, vmapped = conv_learner("auto"), conv_learner("vmap")
    assert auto.batching() == "loop" and vmapped.batching() == "vmap"
    assert make_learner().batching() == "vmap"                         # an MLP keeps vmap
    task = auto.prepare(batch)
    looped, batched = auto.task_gradients(task), vmapped.task_gradients(task)
    torch.testing.assert_close(looped.loss, batched.loss, rtol=1e-9, atol=1e-12)
    for k in batched.grads:
        torch.testing.assert_close(looped.grads[k], batched.grads[k], rtol=1e-8, atol=1e-10, msg=k)
    probs_loop = auto.predict(auto.adapt(task["support_x"], task["support_y"]), task["query_x"])
    probs_vmap = vmapped.predict(vmapped.adapt(task["support_x"], task["support_y"]), task["query_x"])
    torch.testing.assert_close(probs_loop, probs_vmap, rtol=1e-8, atol=1e-10)
    stacked = loop_over_tasks(lambda a, b: {"sum": a + b["x"], "n": 2}, torch.ones(4, 2), {"x": torch.arange(4.0)})
    assert stacked["n"] == 2 and torch.equal(stacked["sum"], torch.ones(4, 2) + torch.arange(4.0)[:, None])
    with pytest.raises(ValueError, match="task_batching must be one of"):
        conv_learner("threads")


@pytest.mark.parametrize("method", ["ibaml", "maml"])
def test_fit_reading_every_n_steps_reads_nothing_between_reads_and_follows_the_same_trajectory(tmp_path, method):
    every_step, deferred = sync_learner(method), sync_learner(method)
    sample, gen = sampler()
    training.fit(every_step, sample, 7, progress=False)
    sample, gen = sampler()
    seen = []
    with HostReads() as reads:
        result = training.fit(deferred, sample, 7, folder=tmp_path, checkpoint_every=5, read_every=3, progress=False,
                              on_step=lambda step, stats: seen.append((reads.count, torch.is_tensor(stats["loss"]))))
    counts, unread = zip(*seen)
    # read at steps 3, 5 (a checkpoint), 6 and 7; steps 2 and 4 read nothing (step 1 validates its batch)
    assert counts[1] == counts[0] and counts[3] == counts[2] and counts[2] > counts[1] and counts[4] > counts[3]
    assert unread == (True, True, False, True, False, False, False)
    assert isinstance(result.stats["loss"], float) and load_checkpoint(tmp_path / "last.pt")["step"] == 7
    for k, v in every_step.state_dict().items():
        assert torch.equal(deferred.state_dict()[k], v), k


def test_fit_reading_every_n_steps_applies_the_nonfinite_policy_at_the_next_read():
    def sample_with_failures():
        batch = sine_tasks(4, gen)
        calls.append(1)
        return overflowing(batch, [1]) if len(calls) == 2 else batch

    for policy in ("skip", "raise"):
        gen, calls = torch.Generator().manual_seed(0), []
        learner = sync_learner("imaml", policy)
        if policy == "skip":
            training.fit(learner, sample_with_failures, 4, read_every=4, progress=False)
            assert learner.skipped_tasks == 1
        else:
            seen = []
            with pytest.raises(ibaml.NonFiniteError, match="1 of 4 tasks"):
                training.fit(learner, sample_with_failures, 6, read_every=3, progress=False,
                             on_step=lambda step, stats: seen.append(step))
            assert seen == [1, 2]          # raised at the read of step 3, which reported step 2's failure
            assert all(torch.isfinite(p).all() for p in learner.meta_params().values())
