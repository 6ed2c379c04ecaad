"""``MetaLearner``: the trainer of a meta-learning problem.

It owns what a run changes: the meta-optimiser, the step count (``step_count``), the skipped
tasks (:attr:`MetaLearner.skipped_tasks`), the random generator of the Monte Carlo draws, the
non-finite policy and the process group, and it calls the pure problem
(:class:`ibaml.core.meta_problem.MetaProblem`: network, prior, likelihood, inference method, inner
loop and estimator as functions of θ, the tasks and their draws), never the reverse::

    task, draws = prepare(batch), problem.noise_draws(T, generator)       once per step
    (F_t, g_t, diagnostics_t) = problem.task_gradients(θ, task, draws)    mapped over t
    θ ← meta_update.meta_step(problem, meta_optimizer, task, draws, ...)  step_count += 1

:meth:`MetaLearner.adapt` and :meth:`MetaLearner.predict` infer and predict new tasks with
draws from the learner's generator; :meth:`MetaLearner.evaluate`, :meth:`MetaLearner.task_outputs`
and :meth:`MetaLearner.fit_noise_prior` do it a chunk of tasks at a time
(:mod:`ibaml.train.evaluation`); the training loop with checkpoints is :func:`ibaml.train.training.fit`.

Example
-------
>>> import ibaml, priors
>>> from ibaml.data import SineTaskDistribution
>>> _ = torch.manual_seed(0)
>>> net = ibaml.core.nets.MLP(1, (8,), 1)
>>> learner = MetaLearner(net, priors.IsotropicGaussian.from_module(net, precision=10.0),
...                       ibaml.GaussianLikelihood(0.5), inner_optimizer=ibaml.core.optim.SGD(lr=0.01), inner_steps=3)
>>> batch = SineTaskDistribution(shots=5, query=5).sample(4, torch.Generator().manual_seed(0))
>>> out = learner.task_gradients(batch)
>>> out.loss.shape, out.grads["prior.loc_unconstrained"].shape     # [tasks], [tasks, D]
(torch.Size([4]), torch.Size([4, 25]))
>>> stats = learner.meta_step(batch)
>>> mean, var = learner.predict(learner.adapt(batch.support_x, batch.support_y), batch.query_x)
>>> mean.shape, bool((var > 0).all())
(torch.Size([4, 5, 1]), True)
"""

from __future__ import annotations

import copy
import re
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from priors.base import Prior

from ibaml.calibration import CalibrationReport
from ibaml.core.conjugate_noise import ConjugateNoiseGaussianLikelihood
from ibaml.core.hypergrad import HypergradEstimator, Implicit, TaskGradient
from ibaml.core.inference import MAP, InferenceMethod, Variational
from ibaml.core.inner_loop import InnerLoop
from ibaml.core.likelihoods import Likelihood
from ibaml.core.meta_problem import TASK_BATCHING, MetaProblem, Posterior
from ibaml.core.optim import SGD
from ibaml.core.task_model import TaskModel
from ibaml.data.tasks import as_task_dict
from ibaml.train import distributed, meta_update
from ibaml.train.evaluation import noise_prior_refit, over_chunks, prediction_report, query_outputs
from ibaml.train.nonfinite import NONFINITE_POLICIES

Task = Dict[str, Tensor]


def meta_param_groups(params: Dict[str, Tensor], overrides: Optional[Dict[str, float]] = None):
    """``torch.optim`` parameter groups: one at the optimiser's learning rate, and one per
    override pattern (``re.search`` on the meta-parameter's name, the first that matches) at its
    own; a rate of 0 holds the matching parameters at their values."""
    if not overrides:
        return [{"params": list(params.values())}]
    for pattern, lr in overrides.items():
        if not lr >= 0:
            raise ValueError(f"meta_lr_overrides[{pattern!r}] must be non-negative, got {lr!r}")
    groups = {None: []}
    for name, p in params.items():
        key = next((pat for pat in overrides if re.search(pat, name)), None)
        groups.setdefault(key, []).append(p)
    return [{"params": ps} if key is None else {"params": ps, "lr": overrides[key]}
            for key, ps in groups.items() if ps]


def _problem_setting(name: str, writable: bool = True) -> property:
    """A property of :class:`MetaLearner` that reads (and, if ``writable``, sets) ``meta_problem.<name>``."""
    getter = lambda self: getattr(self.meta_problem, name)
    setter = (lambda self, value: setattr(self.meta_problem, name, value)) if writable else None
    return property(getter, setter, doc=f"``meta_problem.{name}`` (:class:`ibaml.core.meta_problem.MetaProblem`).")


class MetaLearner(nn.Module):
    r"""Network + learnable prior + likelihood + inference method + hypergradient estimator.

    Args:
        net: the network (an ``nn.Module`` usable with ``torch.func.functional_call``).
        prior: a :class:`priors.Prior` over (some of) ``net``'s parameters.
        likelihood: :class:`GaussianLikelihood` (regression) or :class:`CategoricalLikelihood`.
        method: :class:`MAP` or :class:`Variational` (or ``"map"`` / ``"variational"``).
        estimator: a :class:`ibaml.core.hypergrad.HypergradEstimator` (default :class:`Implicit`).
        inner_optimizer: functional optimiser of :mod:`ibaml.core.optim`.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps in :meth:`adapt` (default ``inner_steps``).
        meta_lr: learning rate of the default meta-optimiser (Adam).
        meta_optimizer: a ``torch.optim`` class (default ``torch.optim.Adam``).
        chunk_size: tasks per vmap chunk (``None``: all at once).
        task_batching: ``"vmap"``, ``"loop"`` (the same per-task function, one task at a time)
            or ``"auto"`` (default): ``"loop"`` for a network with convolutions on the CPU,
            where a vmapped convolution becomes a grouped one that is slower than one
            convolution per task (measured: ``benchmarks/scaling.py``, Conv4), else ``"vmap"``.
        num_predictive_samples: posterior draws in :meth:`predict`.
        inner_support_size: the support size ``N₀`` the inner step was chosen at: on tasks with
            more support points the inner optimiser sees its objective scaled by ``N₀/N``, so
            that a gradient step on the summed loss does not grow with the support size
            (:class:`ibaml.core.inner_loop.InnerLoop`; the solution and the implicit
            meta-gradient are unchanged). Default ``None``: no scaling.
        hyper_weight: weight of the hyperprior term in the meta-objective.
        nonfinite: what to do with a task whose values are not finite (see below):
            ``"raise"`` (default) or ``"skip"``.
        num_classes: for classification, the number of classes (label validation; default:
            the network's output width).
        seed: seed of the learner's generator (posterior draws).
        meta_lr_overrides: ``{regular expression: learning rate}`` for the meta-parameters
            whose names match (first match wins), e.g. ``{r"prior\.scale": 1e-2}`` to move
            prior scales, which the meta-optimiser sees in log coordinates, faster than the
            network weights.
        process_group: a ``torch.distributed`` process group (e.g. ``ibaml.train.distributed.init_from_env().group``):
            each process solves its shard of every meta-batch and the meta-gradients are
            summed across processes (:mod:`ibaml.train.distributed`); the result is the one-process
            meta-gradient. ``None`` (default): one process.

    **Non-finite policy.** A task is *non-finite* when its inner solution (the iterate, the
    inner loss or its gradient), the linear solver's residual norm (implicit estimators: CG
    that met an overflow returns a NaN residual), its meta-gradient or its query loss is NaN
    or Inf. Every meta-step checks all tasks (no host synchronisation inside the per-task
    work; one check per batch):

    * ``nonfinite="raise"``: :class:`NonFiniteError` with one line giving the count and the
      stage that failed (inner solution, solver residual, meta-gradient), e.g.
      ``"2 of 25 tasks gave non-finite values (inner solution: 0, query loss: 0, CG residual: 2, meta-gradient: 0); ..."``.
    * ``nonfinite="skip"``: those tasks are dropped; the meta-gradient is the mean over the
      ``N`` finite tasks, ``g = (1/N) Σ_{t finite} g_t``, their count is returned in
      ``meta_step(...)["skipped"]`` and accumulated in :attr:`skipped_tasks` (saved with
      :meth:`training_state`). A batch in which *every* task is non-finite raises even so.

    Statistics (``inner_grad_norm``, ``residual_norm``) are means over the finite tasks.

    Example
    -------
    >>> import ibaml, priors
    >>> from ibaml.data import SineTaskDistribution
    >>> net = ibaml.core.nets.MLP(1, (8,), 1)
    >>> learner = MetaLearner(net, priors.IsotropicGaussian.from_module(net, precision=100.0),
    ...                       ibaml.GaussianLikelihood(1.0), nonfinite="skip")
    >>> batch = SineTaskDistribution(shots=5, query=5).sample(4, torch.Generator().manual_seed(0))
    >>> int(learner.meta_step(batch)["skipped"]), learner.skipped_tasks
    (0, 0)
    """

    def __init__(self, net: nn.Module, prior: Prior, likelihood: Likelihood, method: Any = "map",
                 estimator: Optional[HypergradEstimator] = None, inner_optimizer: Any = None, inner_steps: int = 10,
                 eval_inner_steps: Optional[int] = None, meta_lr: float = 1e-3, meta_optimizer=None,
                 chunk_size: Optional[int] = None, num_predictive_samples: int = 20, hyper_weight: float = 1.0,
                 nonfinite: str = "raise", num_classes: Optional[int] = None, seed: int = 0,
                 process_group: Any = None, meta_lr_overrides: Optional[Dict[str, float]] = None,
                 task_batching: str = "auto", inner_support_size: Optional[int] = None):
        super().__init__()
        if isinstance(method, str):
            table = {"map": MAP, "variational": Variational}
            if method not in table:
                raise ValueError(f"unknown inference method {method!r}; expected one of {sorted(table)}")
            method = table[method]()
        if not isinstance(method, InferenceMethod):
            raise TypeError(f"method must be MAP(), Variational(), 'map' or 'variational', got {type(method).__name__}")
        if estimator is not None and not isinstance(estimator, HypergradEstimator):
            raise TypeError(f"estimator must be a HypergradEstimator (Implicit(), Explicit(), FirstOrder(), Lazy()), "
                            f"got {estimator!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not meta_lr > 0:
            raise ValueError(f"meta_lr must be positive, got {meta_lr!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if task_batching not in TASK_BATCHING:
            raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {task_batching!r}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        self.model = TaskModel(net, prior, likelihood)
        self.meta_problem = MetaProblem(
            self.model, method, Implicit() if estimator is None else estimator,
            InnerLoop(SGD(lr=0.01) if inner_optimizer is None else inner_optimizer, inner_steps, inner_support_size),
            eval_inner_steps=eval_inner_steps, chunk_size=chunk_size, task_batching=task_batching,
            num_predictive_samples=num_predictive_samples, hyper_weight=hyper_weight, num_classes=num_classes)
        self.nonfinite = nonfinite
        optimizer_cls = torch.optim.Adam if meta_optimizer is None else meta_optimizer
        self.meta_optimizer = optimizer_cls(meta_param_groups(self.model.meta_parameters(), meta_lr_overrides),
                                            lr=meta_lr)
        self.generator = torch.Generator(device=prior.initial_weights.device).manual_seed(seed)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.skipped_tasks = 0
        self.process_group = process_group
        if process_group is not None:
            distributed.broadcast_state(self, self.generator, group=process_group)

    method = _problem_setting("method", writable=False)
    inner_loop = _problem_setting("inner_loop", writable=False)
    problem = _problem_setting("task_problem", writable=False)
    estimator = _problem_setting("estimator")
    chunk_size = _problem_setting("chunk_size")
    task_batching = _problem_setting("task_batching")
    eval_inner_steps = _problem_setting("eval_inner_steps")
    num_predictive_samples = _problem_setting("num_predictive_samples")
    hyper_weight = _problem_setting("hyper_weight")
    num_classes = _problem_setting("num_classes")

    @property
    def prior(self) -> Prior:
        return self.model.prior

    @property
    def likelihood(self) -> Likelihood:
        return self.model.likelihood

    def meta_params(self, detach: bool = True) -> Dict[str, Tensor]:
        """The meta-parameter dict θ (detached by default)."""
        return self.meta_problem.meta_params(detach)

    def batching(self) -> str:
        """``"vmap"`` or ``"loop"``: :attr:`task_batching`, with ``"auto"`` resolved for the
        network and its device."""
        return self.meta_problem.batching()

    # ------------------------------------------------------------------ tasks and their draws
    def task_and_draws(self, batch, validate: bool = True) -> Tuple[Task, Task]:
        """``(task, draws)``: the batch as a dict on the learner's device and dtype (integer
        labels keep theirs), checked first (:meth:`ibaml.core.meta_problem.MetaProblem.check_tasks`,
        which reads values on the host) unless ``validate=False``, and the inference method's
        draws of this step: those the batch carries (a dict from :meth:`prepare`), else new ones
        from the learner's generator."""
        task = as_task_dict(batch)
        if validate:
            self.meta_problem.check_tasks(task)
        task = self.meta_problem.to_device(task)
        draw_keys = [key for key in task if key.startswith("eps_")]
        if draw_keys:
            return {k: v for k, v in task.items() if k not in draw_keys}, {k: task[k] for k in draw_keys}
        return task, self.meta_problem.noise_draws(task["support_x"].shape[0], self.generator)

    def prepare(self, batch, validate: bool = True) -> Task:
        """The task dict of :meth:`task_and_draws` with its draws merged in: a batch whose
        draws are fixed, so that :meth:`task_gradients` on it is a pure function of θ."""
        task, draws = self.task_and_draws(batch, validate)
        return dict(task, **draws)

    # ------------------------------------------------------------------ meta-training
    def task_gradients(self, batch, meta: Optional[Dict[str, Tensor]] = None) -> TaskGradient:
        """Per-task losses ``F_t [T]``, meta-gradients ``g_t`` (each leaf ``[T, ...]``) and
        diagnostics (each ``[T]``) of the estimator at ``θ = meta`` (default: the current
        meta-parameters), with no host synchronisation and no update
        (:meth:`ibaml.core.meta_problem.MetaProblem.task_gradients`). ``batch`` is not validated here;
        a dict from :meth:`prepare` keeps its draws."""
        task, draws = self.task_and_draws(batch, validate=False)
        return self.meta_problem.task_gradients(self.meta_params() if meta is None else meta, task, draws)

    def meta_gradient(self, batch, *, validate: bool = True, check: bool = True) -> meta_update.MetaGradient:
        """The mean meta-gradient over the finite tasks, :func:`ibaml.train.meta_update.meta_gradient`
        with this learner's draws, non-finite policy and process group."""
        task, draws = self.task_and_draws(batch, validate)
        return meta_update.meta_gradient(self.meta_problem, task, draws, nonfinite=self.nonfinite,
                                         process_group=self.process_group, check=check)

    def meta_step(self, batch, *, validate: bool = True, check: bool = True) -> Dict[str, Any]:
        """One meta-update (:func:`ibaml.train.meta_update.meta_step` with the learner's meta-optimiser),
        counted in ``step_count`` and, with ``check``, its skipped tasks in :attr:`skipped_tasks`;
        returns its statistics. ``validate=False, check=False`` reads nothing on the host
        (:meth:`read_stats` applies the policy later)."""
        task, draws = self.task_and_draws(batch, validate)
        stats = meta_update.meta_step(self.meta_problem, self.meta_optimizer, task, draws, nonfinite=self.nonfinite,
                                      process_group=self.process_group, check=check)
        self.step_count += 1
        if check:
            self.skipped_tasks += int(stats["skipped"])
        return stats

    def read_stats(self, stats: Dict[str, Any]) -> Dict[str, Any]:
        """The statistics of a ``meta_step(..., check=False)`` read on the host (numbers), with the
        learner's non-finite policy applied: the skipped tasks are added to :attr:`skipped_tasks`,
        and :class:`ibaml.NonFiniteError` is raised if any task failed under ``"raise"`` or every
        task failed under ``"skip"`` (the parameters were not moved by them)."""
        values, causes, num_tasks = meta_update.read_stats(stats)
        self.skipped_tasks += values["skipped"]
        meta_update.apply_nonfinite_policy(self.nonfinite, values["skipped"], causes, num_tasks)
        return values

    # ------------------------------------------------------------------ adaptation and prediction
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> Posterior:
        """Task inference on support sets ``[T, S, ...]``: a :class:`Posterior` per task
        (:meth:`ibaml.core.meta_problem.MetaProblem.adapt` with draws from the learner's generator)."""
        task, draws = self.task_and_draws({"support_x": support_x, "support_y": support_y})
        return self.meta_problem.adapt(self.meta_params(), task, draws, steps)

    def posterior_outputs(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None) -> Tensor:
        """Network outputs at posterior draws: ``[T, S, N, ...]`` for inputs ``x [T, N, ...]``."""
        eps = self.meta_problem.predictive_draws(posterior, x.shape[0], self.generator, num_samples)
        return self.meta_problem.posterior_outputs(self.meta_params(), posterior, x, eps)

    @torch.no_grad()
    def predict(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None):
        """Posterior predictive at ``x [T, N, ...]`` (:meth:`ibaml.core.meta_problem.MetaProblem.predict`,
        with ``num_samples`` draws from the learner's generator where the predictive needs them):
        regression ``(mean, var)`` each ``[T, N, d]``, classification probabilities ``[T, N, C]``."""
        eps = None
        if not self.meta_problem.exact_predictive(posterior):
            eps = self.meta_problem.predictive_draws(posterior, x.shape[0], self.generator, num_samples)
        return self.meta_problem.predict(self.meta_params(), posterior, x, eps)

    # ------------------------------------------------------------------ chunked evaluation
    def _over_chunks(self, per_chunk, tasks, num_tasks, chunk, seed, generators, progress, desc, steps):
        """:func:`ibaml.train.evaluation.over_chunks` of ``per_chunk(posterior, batch)`` after adapting to
        each chunk's support sets, with the learner's generator reseeded too."""
        def adapted(batch):
            return per_chunk(self.adapt(batch["support_x"], batch["support_y"], steps=steps), batch)

        return over_chunks(adapted, tasks, num_tasks, chunk=chunk, seed=seed, generators=(self.generator, *generators),
                           progress=progress, desc=desc)

    def evaluate(self, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
                 seed: Optional[int] = None, generators=(), steps: Optional[int] = None,
                 num_samples: Optional[int] = None, name: str = "", progress: bool = False) -> CalibrationReport:
        """Adapt on each task's support set, predict its query set, ``chunk`` tasks at a time, and
        return a :class:`ibaml.calibration.CalibrationReport` over all of them (regression: the
        predictive mean and variance, or squared scale where the likelihood's predictive is
        heavy-tailed, ``likelihood.tails``; classification: the predictive class probabilities).
        Tasks whose predictions are not finite raise :class:`ibaml.NonFiniteError` naming them.
        ``tasks``, ``num_tasks``, ``seed`` and ``generators`` as in :meth:`task_outputs`.

        >>> learner = ibaml.build_learner("imaml", MLP(1, (8,), 1), ibaml.GaussianLikelihood(1.0), inner_steps=2)
        >>> report = learner.evaluate(tasks.sample(8, generator), chunk=4)
        >>> sorted(report.metrics)[:3], report.metrics["mse"]["mean"] > 0
        (['calibration_error', 'coverage_50', 'coverage_90'], True)
        """
        results = self._over_chunks(lambda post, b: self.predict(post, b["query_x"], num_samples), tasks, num_tasks,
                                    chunk, seed, generators, progress, name or "evaluate", steps)
        return prediction_report(results, name, getattr(self.likelihood, "tails", None))

    def task_outputs(self, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
                     seed: Optional[int] = None, generators=(), progress: bool = False, desc: str = "evaluate"):
        """Adapt to the tasks ``chunk`` at a time and return the network's query outputs at the
        posterior draws ``[T, S, N, ...]`` (``S = 1`` for a point estimate, on the CPU in float64)
        and the query targets ``[T, N, ...]``.

        ``tasks`` is a batch or a sampler ``tasks(n)`` (then ``num_tasks`` is needed). With
        ``seed``, the learner's generator and ``generators`` (e.g. the sampler's) start from
        ``seed``, so every call sees the same tasks and draws, and are restored afterwards."""
        results = self._over_chunks(
            lambda post, b: self.posterior_outputs(post, b["query_x"]).detach().double().cpu(),
            tasks, num_tasks, chunk, seed, generators, progress, desc, None)
        return query_outputs(results)

    def fit_noise_prior(self, tasks, num_tasks: Optional[int] = None, *, chunk: Optional[int] = None,
                        seed: Optional[int] = None, generators=(), steps: Optional[int] = None,
                        progress: bool = False, tails: Optional[str] = None) -> dict:
        """Fit the predictive's noise to held-out tasks: adapt to their support sets, predict their
        query sets, and set the prior noise ``s₀`` and evidence scale ``γ`` of the learner's
        :class:`ibaml.ConjugateNoiseGaussianLikelihood` to the maximisers of the query
        log-likelihood (:func:`ibaml.calibration.recalibration.refit_noise_prior`; the network,
        the prior and ``a₀`` unchanged, so the predictive means do not move); with
        ``tails="lognormal"`` or ``"student_t"`` the predictive becomes that heavy-tailed family,
        its shape fitted too (``likelihood.tails``). Returns ``{"prior_noise": (before, after),
        "evidence_scale": (before, after), "tails": (before, after), "tasks": T}`` (a family as
        ``{"family", ...}``, ``None`` for the Gaussian). ``tasks``, ``num_tasks``, ``seed`` and
        ``generators`` as in :meth:`task_outputs`.

        Meta-training learns ``s₀`` and ``γ`` too, but slowly (their meta learning rate is that of
        the network) and under an objective in which they also weigh the tasks against each other;
        this is the closed-loop step that makes the predictive's width match the held-out errors.

        >>> likelihood = ibaml.recipes.regression_likelihood("conjugate", 5.0, False)
        >>> learner = ibaml.build_learner("ibaml", MLP(1, (8,), 1), likelihood, inner_steps=2)
        >>> held_out = tasks.sample(50, torch.Generator().manual_seed(0))
        >>> fitted = learner.fit_noise_prior(held_out, tails="lognormal")
        >>> fitted["tails"][1]["family"], learner.likelihood.tails.sd > 0
        ('lognormal_scale', True)
        """
        likelihood = self.likelihood
        if not isinstance(likelihood, ConjugateNoiseGaussianLikelihood):
            raise TypeError(f"fit_noise_prior needs a ConjugateNoiseGaussianLikelihood, the learner has "
                            f"{type(likelihood).__name__}")
        results = self._over_chunks(lambda post, b: (self.predict(post, b["query_x"]), post.noise_ratio,
                                                     b["support_y"][0].numel()),
                                    tasks, num_tasks, chunk, seed, generators, progress, "fit noise prior", steps)
        return noise_prior_refit(likelihood, results, tails)

    # ------------------------------------------------------------------ state
    def training_state(self) -> Dict[str, Any]:
        """Everything needed to continue meta-training: parameters and buffers, the
        meta-optimiser's state, the step, the generator's state (a deep copy)."""
        return copy.deepcopy({"learner": self.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "generator": self.generator.get_state(), "skipped_tasks": self.skipped_tasks})

    def load_training_state(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state["learner"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.generator.set_state(state["generator"])
        self.skipped_tasks = int(state.get("skipped_tasks", 0))
