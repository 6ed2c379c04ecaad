"""The training run: the loop of meta-steps with checkpoints and exact resume (:func:`fit`).

One meta-step on a batch of ``T`` tasks (:meth:`ibaml.MetaLearner.meta_step`, the update of
:mod:`ibaml.train.meta_update`)::

    g = (1/N) Σ_{t finite} g_t,   θ ← meta_optimizer.step(θ, g − hyper_weight · ∇_θ log p_hyper(θ))

:func:`fit` runs ``steps`` meta-steps on batches from ``sample_tasks()``. With a ``folder`` it
writes ``folder/last.pt`` atomically every ``checkpoint_every`` steps and at the end (the
learner's training state, every random source named in ``rng``, the validation history), so
that ``resume=True`` continues on exactly the trajectory of an uninterrupted run; with
``validate`` it evaluates every ``validate_every`` steps and keeps the best parameters in
``folder/best.pt``. A folder that already holds a run is not overwritten unless asked.

Example
-------
>>> import ibaml, tempfile
>>> from ibaml.data import SineTaskDistribution
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = ibaml.core.nets.MLP(1, (8,), 1)
>>> learner = ibaml.build_learner("imaml", net, ibaml.GaussianLikelihood(1.0), inner_steps=2)
>>> tasks, gen = SineTaskDistribution(shots=5, query=5), torch.Generator().manual_seed(0)
>>> folder = tempfile.mkdtemp()
>>> result = fit(learner, lambda: tasks.sample(4, gen), 3, folder=folder, rng={"tasks": gen}, progress=False)
>>> result.step, sorted(p.name for p in Path(folder).iterdir())
(3, ['last.pt'])
>>> learner.evaluate(tasks.sample(8, gen), chunk=4).metrics["mse"]["mean"] > 0
True
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch

from ibaml.train.checkpoint import CheckpointError, load_on_main, remove_stale_temporaries, restore_rng_state, rng_state, \
    save_checkpoint
from ibaml.train.progress import progress_bar

__all__ = ["fit", "FitResult", "TailMeans", "WindowMeans", "RunExistsError", "default_read_every", "GPU_READ_EVERY",
           "holds_run", "clean_folder"]

LAST, BEST = "last.pt", "best.pt"


class RunExistsError(CheckpointError):
    """A new run was started in a folder that already holds one (neither resumed nor overwritten)."""


@dataclass
class FitResult:
    """What :func:`fit` did: ``step`` meta-steps done in all (resumed runs included), of which
    ``steps_run`` in this call; training ``seconds`` in all and ``run_seconds`` in this call
    (checkpoint writing and validation excluded); the last step's ``stats``; the validation
    ``history`` and the ``best`` entry (``{"step", "score"}``); ``evaluated``: which parameters
    the learner holds now (``{"checkpoint": "best" | "last", "step"}``)."""

    step: int
    steps_run: int
    seconds: float
    run_seconds: float
    stats: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Optional[Dict[str, Any]] = None
    evaluated: Dict[str, Any] = field(default_factory=dict)
    resumed_from: Optional[int] = None


class TailMeans:
    """An ``on_step`` callback of :func:`fit`: the mean of each statistic named ``prefix + key``
    over the meta-steps after ``after`` (run in this call), ``{key: (1/n) Σ_{step > after} stats[prefix + key]}``
    from :meth:`means`; for example the stationarity ``||∇_b G||`` of the inner solutions per
    block over the last tenth of a run.

    >>> tail = TailMeans("inner_grad_norm.", after=8)
    >>> for step in range(1, 11):
    ...     tail(step, {"loss": 1.0, "inner_grad_norm.mean": float(step)})
    >>> tail.means()
    {'mean': 9.5}
    """

    def __init__(self, prefix: str, after: int = 0):
        self.prefix, self.after, self.count, self.totals = prefix, int(after), 0, {}

    def __call__(self, step: int, stats: Mapping[str, Any]) -> None:
        if step <= self.after:
            return
        self.count += 1
        for key, value in stats.items():
            if key.startswith(self.prefix):
                name = key[len(self.prefix):]
                self.totals[name] = self.totals.get(name, 0.0) + value

    def means(self) -> Dict[str, float]:
        return {name: float(total) / self.count for name, total in self.totals.items()}


class WindowMeans:
    """An ``on_step`` callback of :func:`fit`: the statistics named ``prefix + key`` averaged over
    consecutive windows of ``every`` meta-steps, ``[{"step": last step of the window, key: mean}]``
    from :meth:`trace`; for example the stationarity ``||∇_b G||`` of the inner solutions per
    block along a run. A window in progress is left out.

    >>> trace = WindowMeans("inner_grad_norm.", every=5)
    >>> for step in range(1, 13):
    ...     trace(step, {"inner_grad_norm.mean": float(step)})
    >>> trace.trace()
    [{'step': 5, 'mean': 3.0}, {'step': 10, 'mean': 8.0}]
    """

    def __init__(self, prefix: str, every: int):
        if int(every) < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.prefix, self.every, self.windows, self.current = prefix, int(every), [], TailMeans(prefix)

    def __call__(self, step: int, stats: Mapping[str, Any]) -> None:
        self.current(step, stats)
        if step % self.every == 0 and self.current.count:
            self.windows.append({"step": int(step), **self.current.means()})
            self.current = TailMeans(self.prefix)

    def trace(self) -> list:
        return list(self.windows)


#: :func:`fit`'s ``read_every`` on a GPU where none is given (:func:`default_read_every`)
GPU_READ_EVERY = 20


def default_read_every(learner, device, given: Optional[int] = None) -> int:
    """``given``, else :data:`GPU_READ_EVERY` for an :class:`ibaml.MetaLearner` on a CUDA
    device (where a host read waits for the GPU) and ``1`` elsewhere (on the CPU it costs nothing).

    >>> default_read_every(None, torch.device("cpu")), default_read_every(None, "cuda", 5)
    (1, 5)
    """
    if given:
        return int(given)
    defers = callable(getattr(learner, "task_gradients", None))   # a MetaLearner: steps that read nothing
    return GPU_READ_EVERY if torch.device(device).type == "cuda" and defers else 1


def holds_run(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` holds the checkpoints of a run (``last.pt`` or ``best.pt``)."""
    return any((Path(folder) / name).is_file() for name in (LAST, BEST))


def clean_folder(folder: Union[str, Path]) -> int:
    """Remove leftover temporary checkpoint files (an interrupted atomic write) of ``last.pt``
    and ``best.pt`` in ``folder``; returns how many."""
    return sum(remove_stale_temporaries(Path(folder) / name) for name in (LAST, BEST))


def _as_stats(value) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {"loss": float(value)}


def fit(learner, sample_tasks: Callable[[], Any], steps: int, *, folder: Union[str, Path, None] = None,
        config: Optional[Mapping[str, Any]] = None, must_match: Optional[Iterable[str]] = None,
        checkpoint_every: int = 0,
        resume: Union[bool, str, Path] = False, overwrite: bool = False,
        validate: Optional[Callable[[int], Dict[str, Any]]] = None, validate_every: int = 0,
        select_best: Optional[Callable[[Dict[str, Any]], float]] = None, restore_best: bool = True,
        on_step: Optional[Callable[[int, Dict[str, Any]], None]] = None,
        on_checkpoint: Optional[Callable[[int, Optional[Path], Dict[str, Any]], None]] = None,
        rng: Optional[Mapping[str, Any]] = None,
        progress: bool = True, desc: str = "meta-train", is_main: bool = True, read_every: int = 1) -> FitResult:
    """Meta-train ``learner`` for ``steps`` meta-steps on batches ``sample_tasks()``.

    Args:
        learner: a :class:`ibaml.MetaLearner` (or any object with ``meta_step(batch)`` (and
            ``read_stats(stats)`` where ``read_every > 1``),
            ``training_state()``, ``load_training_state(state)``, ``state_dict()`` and
            ``load_state_dict(state)``).
        sample_tasks: draws the next meta-batch; its random sources must be named in ``rng``
            for an exact resume.
        steps: meta-steps in all (a resumed run continues up to ``steps``).
        folder: where ``last.pt`` and ``best.pt`` go (``None``: no checkpoints).
        config: the run's settings, saved in checkpoints; a checkpoint whose ``config``
            differs from this one on a key of ``must_match`` (default: every key of
            ``config``) is refused (:class:`ibaml.train.checkpoint.CheckpointError`).
        checkpoint_every: also write ``last.pt`` every ``N`` steps (it is always written at the end).
        resume: ``True``: continue from ``folder/last.pt``; a folder path: continue from
            that folder's ``last.pt`` (and ``best.pt``), writing to ``folder``. Where there is
            no checkpoint yet (a run killed before its first one), start from scratch with a
            one-line notice, so the command that started a run also restarts it. Resuming
            from another folder into a ``folder`` that holds a run of its own needs ``overwrite``.
        overwrite: replace the run that ``folder`` holds. Without ``resume`` or ``overwrite``
            a folder that holds a run raises :class:`RunExistsError`.
        validate: ``validate(step) → dict`` of metrics, called every ``validate_every``
            steps and at the last one; the entries (with ``"step"``) make the history.
        select_best: ``entry → score`` (higher is better): the parameters of the best
            validation go to ``folder/best.pt`` and, with ``restore_best``, back into the
            learner at the end.
        on_step: ``on_step(step, stats)`` after each meta-step (``stats`` read on the host:
            numbers, at the steps where they are read, see ``read_every``; 0-d tensors between).
        on_checkpoint: ``on_checkpoint(step, path, metrics)`` after each write of ``last.pt``
            (every ``checkpoint_every`` steps and at the end), on every process: ``path`` is the
            file written (``None`` on the processes that write nothing, distributed ranks other
            than 0) and ``metrics`` the step's statistics with ``"step"`` and, once there is one,
            the latest validation entry under ``"validation"``. A reporter for Ray Train, or any
            logger; for example, one that records where each checkpoint went::

                written = []
                fit(learner, sample, 100, folder="runs/a", checkpoint_every=10,
                    on_checkpoint=lambda step, path, metrics: written.append((step, path, metrics["loss"])))

            Under Ray Train every worker reports and rank 0 attaches the checkpoint::

                def report(step, path, metrics):
                    ray.train.report(metrics, checkpoint=path and Checkpoint.from_directory(path.parent))
        read_every: read the statistics on the host every ``N`` meta-steps (and at every
            checkpoint, validation and the last step). ``1`` (the default): every step checks its
            batch and applies the non-finite policy at once. ``N > 1``: the steps between reads
            are :meth:`ibaml.MetaLearner.meta_step` with ``validate=False, check=False``, which read nothing on the
            host, so that a GPU is never waited for; the tasks that fail are masked out at once
            and counted, and the policy (``"raise"`` or ``"skip"``) is applied to them at the
            next read, up to ``N − 1`` steps late. Only the first batch is validated
            (:func:`ibaml.data.tasks.validate_tasks`); the trajectory is the same as with ``1``.
        rng: ``{name: source}`` (``torch.Generator``, an :class:`ibaml.data.EpisodeSampler`)
            checkpointed with torch's global generators.
        progress: a tqdm bar (redrawn once a minute when the output is not a terminal).
        is_main: whether this process writes files and prints (distributed runs: rank 0).
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if checkpoint_every < 0 or validate_every < 0:
        raise ValueError("checkpoint_every and validate_every must be 0 or positive")
    if int(read_every) != read_every or read_every < 1:
        raise ValueError(f"read_every must be a positive integer, got {read_every!r}")
    if folder is None and (resume or checkpoint_every or select_best is not None):
        raise ValueError("resume, checkpoint_every and select_best need a folder for the checkpoints")
    rng = dict(rng or {})
    config = dict(config or {})
    group = getattr(learner, "process_group", None)   # a data-parallel MetaLearner's; other learners have none
    folder = None if folder is None else Path(folder)
    start, seconds, history, best, resumed_from = 0, 0.0, [], None, None
    if folder is not None:
        source = folder if resume is True or not resume else Path(resume)
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
            clean_folder(folder)
        continues_here = bool(resume) and source.resolve() == folder.resolve()
        if holds_run(folder) and not overwrite and not continues_here:
            # only the run being continued, or an explicit overwrite, may replace what folder holds
            raise RunExistsError(f"{folder} already holds a run ({LAST} or {BEST}): resume it or overwrite it")
        if is_main and (overwrite or resume) and not (continues_here and (folder / LAST).is_file()):
            for name in (LAST, BEST):   # a fresh run: no checkpoint of an earlier run may be mistaken for this one's
                (folder / name).unlink(missing_ok=True)
        keys = list(config) if must_match is None else list(must_match)
        state = load_on_main(source / LAST, group, missing_ok=True, config=config, keys=keys,
                             map_location="cpu") if resume else None   # rank 0 reads, every rank gets it
        if state is not None:
            if not 0 <= int(state.get("step", -1)) <= steps:
                raise CheckpointError(f"{source / LAST}: checkpoint at step {state.get('step')!r}, "
                                      f"beyond the {steps} steps of this run")
            try:
                learner.load_training_state(state["training"])
            except (RuntimeError, KeyError, ValueError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CheckpointError(f"{source / LAST}: does not fit this model ({first})") from None
            restore_rng_state(state["rng"], **rng)
            start = resumed_from = int(state["step"])
            seconds, history, best = float(state["train_seconds"]), list(state["validation"]), state["best"]
            if is_main and best is not None and not continues_here:
                shutil.copy2(source / BEST, folder / BEST)
            if is_main:
                done = "finished, not retrained" if start == steps else "resuming"
                print(f"{desc}: checkpoint at step {start} of {steps} ({done})", flush=True)
        elif resume and is_main:
            print(f"{desc}: no checkpoint in {source} yet, starting from scratch", flush=True)

    def save(done: int, stats: Dict[str, Any]) -> None:
        if folder is not None and is_main:
            save_checkpoint(folder / LAST, {"config": config, "step": done, "training": learner.training_state(),
                                            "rng": rng_state(**rng), "validation": history, "best": best,
                                            "train_seconds": seconds})
        if folder is not None and on_checkpoint is not None:
            latest = {"validation": history[-1]} if history else {}
            on_checkpoint(done, folder / LAST if is_main else None, {"step": done, **stats, **latest})

    def validates(done: int) -> bool:
        return validate is not None and bool(validate_every) and (done % validate_every == 0 or done == steps)

    def reads(done: int) -> bool:
        return (read_every == 1 or done % read_every == 0 or done == steps or validates(done)
                or bool(checkpoint_every and done % checkpoint_every == 0))

    stats: Dict[str, Any] = {}
    pending: List[Dict[str, Any]] = []   # statistics of the steps not yet read on the host (read_every > 1)
    bar = progress_bar(range(start, steps), progress and is_main, initial=start, total=steps, desc=desc)
    clock = run_seconds = 0.0
    for i in bar:
        clock = time.perf_counter()
        if read_every == 1:
            stats = _as_stats(learner.meta_step(sample_tasks()))
        else:
            stats = learner.meta_step(sample_tasks(), validate=i == start, check=False)
        done = i + 1
        if read_every > 1:
            pending.append(stats)
            if reads(done):
                for raw in pending:   # the policy applied in step order: the first failing step raises
                    stats = learner.read_stats(raw)
                pending = []
        elapsed = time.perf_counter() - clock
        seconds, run_seconds = seconds + elapsed, run_seconds + elapsed
        if on_step is not None:
            on_step(done, stats)
        if not reads(done):
            continue
        postfix = {"loss": f"{stats['loss']:.3f}"}
        if validates(done):
            entry = {"step": done, **validate(done)}
            history.append(entry)
            if select_best is not None:
                score = float(select_best(entry))
                postfix["val"] = f"{score:.3f}"
                if best is None or score > best["score"]:
                    best = {"step": done, "score": score}
                    if is_main:
                        save_checkpoint(folder / BEST, {"config": config, "step": done,
                                                        "learner": learner.state_dict(), "validation": entry})
        if done == steps or (checkpoint_every and done % checkpoint_every == 0):
            save(done, stats)
        bar.set_postfix(postfix)
    bar.close()
    evaluated = {"checkpoint": "last", "step": steps}
    if best is not None and restore_best:
        learner.load_state_dict(load_on_main(folder / BEST, group, map_location="cpu")["learner"])
        evaluated = {"checkpoint": "best", "step": int(best["step"])}
    return FitResult(step=steps, steps_run=steps - start, seconds=seconds, run_seconds=run_seconds, stats=stats,
                     history=history, best=best, evaluated=evaluated, resumed_from=resumed_from)
