"""``MetaLearner``: the per-task mathematics of meta-learning for a batch of tasks.

The per-task work (inner solve, hypergradient) runs under ``torch.func.vmap`` with an
optional ``chunk_size``::

    (F_t, g_t, diagnostics_t) = estimator.task_gradient(problem, θ, task_t)     vmapped over t

(``task_batching="loop"`` runs the same per-task function in a Python loop instead, which is
the default only for convolutional networks on the CPU, where ``vmap`` turns each convolution
into a slower grouped one.)

:meth:`MetaLearner.task_gradients` returns them per task, as tensors, with no host
synchronisation. The policy around them (input checks, non-finite tasks, distributed
reduction, the meta-optimiser's step) is in :mod:`ibaml.meta_update`, the training run
(loop, checkpoints, evaluation) in :mod:`ibaml.training`. :meth:`MetaLearner.adapt` and
:meth:`MetaLearner.predict` infer and predict new tasks.

Example
-------
>>> import ibaml, priors
>>> from ibaml.data import SineTaskDistribution
>>> _ = torch.manual_seed(0)
>>> net = ibaml.nets.MLP(1, (8,), 1)
>>> learner = MetaLearner(net, priors.IsotropicGaussian.from_module(net, precision=10.0),
...                       ibaml.GaussianLikelihood(0.5), inner_optimizer=ibaml.optim.SGD(lr=0.01), inner_steps=3)
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
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from priors.base import Prior

from . import distributed, evaluation, meta_update
from .data.tasks import as_task_dict, validate_labels, validate_tasks
from .hypergrad import HypergradEstimator, Implicit, TaskGradient
from .inference import MAP, Variational, task_noise_ratio
from .inner_loop import InnerLoop, TaskProblem
from .likelihoods import CategoricalLikelihood, Likelihood
from .task_model import TaskModel
from .optim import SGD
from .nonfinite import NONFINITE_POLICIES, NonFiniteError


@dataclass
class Posterior:
    """Adapted task parameters ``v`` (each leaf ``[T, ...]``) and the inference method that made them."""

    params: Dict[str, Tensor]
    method: Any
    diagnostics: Dict[str, Tensor]
    #: per task ``[T]``: ``σ_t²/σ²`` of a :class:`ibaml.ConjugateNoiseGaussianLikelihood`, else ``None``
    noise_ratio: Optional[Tensor] = None

    @property
    def num_tasks(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def mean(self) -> Tensor:
        """Posterior mean (MAP: the mode) of the task weights ``[T, D]``."""
        return self.params["w"] if "w" in self.params else self.params["mean"]

    def variance(self) -> Optional[Tensor]:
        """Mean-field variances ``[T, D]`` (``None`` for MAP)."""
        return self.method.variance(self.params) if isinstance(self.method, Variational) else None


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


TASK_BATCHING = ("auto", "vmap", "loop")


def loop_over_tasks(fn, *args):
    """``fn`` applied to each task's slice of ``args`` (pytrees of tensors with a leading task
    dimension) in a Python loop, the outputs stacked: what ``torch.func.vmap(fn)(*args)``
    computes, one task at a time."""
    leaves = [x for x in tree_flatten(args)[0] if isinstance(x, Tensor)]
    outputs = [fn(*tree_map(lambda x: x[t] if isinstance(x, Tensor) else x, args)) for t in range(leaves[0].shape[0])]
    return tree_map(lambda *xs: torch.stack(xs) if isinstance(xs[0], Tensor) else xs[0], *outputs)


class MetaLearner(nn.Module):
    r"""Network + learnable prior + likelihood + inference method + hypergradient estimator.

    Args:
        net: the network (an ``nn.Module`` usable with ``torch.func.functional_call``).
        prior: a :class:`priors.Prior` over (some of) ``net``'s parameters.
        likelihood: :class:`GaussianLikelihood` (regression) or :class:`CategoricalLikelihood`.
        method: :class:`MAP` or :class:`Variational` (or ``"map"`` / ``"variational"``).
        estimator: a :class:`ibaml.hypergrad.HypergradEstimator` (default :class:`Implicit`).
        inner_optimizer: functional optimiser of :mod:`ibaml.optim`.
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
        process_group: a ``torch.distributed`` process group (e.g. ``ibaml.distributed.init_from_env().group``):
            each process solves its shard of every meta-batch and the meta-gradients are
            summed across processes (:mod:`ibaml.distributed`); the result is the one-process
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
    >>> net = ibaml.nets.MLP(1, (8,), 1)
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
                 task_batching: str = "auto"):
        super().__init__()
        if isinstance(method, str):
            table = {"map": MAP, "variational": Variational}
            if method not in table:
                raise ValueError(f"unknown inference method {method!r}; expected one of {sorted(table)}")
            method = table[method]()
        if not all(hasattr(method, a) for a in ("init", "inner_objective", "outer_objective")):
            raise TypeError(f"method must be MAP(), Variational(), 'map' or 'variational', got {type(method).__name__}")
        if estimator is not None and not isinstance(estimator, HypergradEstimator):
            raise TypeError(f"estimator must be a HypergradEstimator (Implicit(), Explicit(), FirstOrder(), Lazy()), "
                            f"got {estimator!r}")
        if inner_optimizer is not None and not (hasattr(inner_optimizer, "init") and (
                hasattr(inner_optimizer, "update") or hasattr(inner_optimizer, "step"))):
            raise TypeError(f"inner_optimizer must be an ibaml.optim optimiser (SGD(lr=...), Adam(lr=...), NewtonCG()), "
                            f"got {inner_optimizer!r}")
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
        self.method = method
        self.estimator = Implicit() if estimator is None else estimator
        self.inner_loop = InnerLoop(SGD(lr=0.01) if inner_optimizer is None else inner_optimizer, inner_steps)
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.problem = TaskProblem(self.model, self.method, self.inner_loop)
        self.chunk_size = chunk_size
        self.task_batching = task_batching
        self.num_predictive_samples = int(num_predictive_samples)
        self.hyper_weight = float(hyper_weight)
        self.nonfinite = nonfinite
        self.num_classes = num_classes
        optimizer_cls = torch.optim.Adam if meta_optimizer is None else meta_optimizer
        self.meta_optimizer = optimizer_cls(meta_param_groups(self.model.meta_parameters(), meta_lr_overrides),
                                            lr=meta_lr)
        self.generator = torch.Generator(device=prior.initial_weights.device).manual_seed(seed)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.skipped_tasks = 0
        self._output_width: Optional[int] = None
        self.process_group = process_group
        if process_group is not None:
            distributed.broadcast_state(self, self.generator, group=process_group)

    # ------------------------------------------------------------------ helpers
    @property
    def prior(self) -> Prior:
        return self.model.prior

    @property
    def likelihood(self) -> Likelihood:
        return self.model.likelihood

    def meta_params(self, detach: bool = True) -> Dict[str, Tensor]:
        """The meta-parameter dict θ (detached by default)."""
        return {k: (p.detach() if detach else p) for k, p in self.model.meta_parameters().items()}

    def num_outputs(self, task: Dict[str, Tensor]) -> int:
        """Width of the network's output (classification: the number of classes), found by one
        forward pass on one example the first time and kept: the architecture does not change."""
        if self._output_width is None:
            meta = self.meta_params()
            x = task["support_x"][0, :1].to(device=self.prior.initial_weights.device,
                                            dtype=self.prior.initial_weights.dtype)
            with torch.no_grad():
                self._output_width = int(self.model.net_output(meta, self.model.prior_call(meta, "location"),
                                                               x).shape[-1])
        return self._output_width

    def check_tasks(self, batch) -> None:
        """:func:`ibaml.data.tasks.validate_tasks` with this learner's number of classes
        (classification: ``num_classes``, else the network's output width)."""
        task = as_task_dict(batch)
        num_classes = None
        if isinstance(self.likelihood, CategoricalLikelihood):
            num_classes = self.num_classes
        validate_tasks(task, num_classes)
        if isinstance(self.likelihood, CategoricalLikelihood) and num_classes is None:
            validate_labels(task, self.num_outputs(task))

    def prepare(self, batch, validate: bool = True) -> Dict[str, Tensor]:
        """The batch as a dict on the learner's device and dtype (integer labels keep theirs),
        checked first (:meth:`check_tasks`, which reads values on the host) unless
        ``validate=False``, with the inference method's noise of this step
        (``method.task_noise``, drawn from the learner's generator) unless already present."""
        task = as_task_dict(batch)
        if validate:
            self.check_tasks(task)
        dtype, device = self.prior.initial_weights.dtype, self.prior.initial_weights.device
        task = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in task.items()}
        if not any(key.startswith("eps_") for key in task):   # this step's draws, once
            noise = self.method.task_noise(task["support_x"].shape[0], self.prior.dim, self.generator, dtype=dtype)
            task.update({key: eps.to(device) for key, eps in noise.items()})
        return task

    # ------------------------------------------------------------------ meta-training
    def task_gradients(self, batch, meta: Optional[Dict[str, Tensor]] = None) -> TaskGradient:
        """Per-task losses ``F_t [T]``, meta-gradients ``g_t`` (each leaf ``[T, ...]``) and
        diagnostics (each ``[T]``) of the estimator at ``θ = meta`` (default: the current
        meta-parameters), vmapped over the tasks, with no host synchronisation and no update::

            (F_t, g_t, diagnostics_t) = estimator.task_gradient(problem, θ, task_t)

        ``batch`` is a :class:`ibaml.data.TaskBatch` or a dict; it is not validated here (see
        :meth:`prepare`, :func:`ibaml.meta_update.meta_gradient`), and a dict from :meth:`prepare`
        keeps its noise draws, so the same call is a pure function of ``(meta, batch)``."""
        task = self.prepare(batch, validate=False)
        meta = self.meta_params() if meta is None else meta
        return self._vmap(lambda t: self.estimator.task_gradient(self.problem, meta, t), task)

    def batching(self) -> str:
        """``"vmap"`` or ``"loop"``: :attr:`task_batching`, with ``"auto"`` resolved for the
        network and its device."""
        if self.task_batching != "auto":
            return self.task_batching
        on_cpu = self.prior.initial_weights.device.type == "cpu"
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.net.modules())
        return "loop" if on_cpu and convolutional else "vmap"

    def _vmap(self, fn, *args):
        if self.batching() == "loop":
            return loop_over_tasks(fn, *args)
        return torch.func.vmap(fn, chunk_size=self.chunk_size)(*args)

    def meta_gradient(self, batch, *, validate: bool = True, check: bool = True) -> meta_update.MetaGradient:
        """The mean meta-gradient over the finite tasks, :func:`ibaml.meta_update.meta_gradient`."""
        return meta_update.meta_gradient(self, batch, validate=validate, check=check)

    def meta_step(self, batch, *, validate: bool = True, check: bool = True) -> Dict[str, Any]:
        """One meta-update, :func:`ibaml.meta_update.meta_step` (its statistics are returned);
        ``validate=False, check=False`` reads nothing on the host (:func:`ibaml.meta_update.read_stats`)."""
        return meta_update.meta_step(self, batch, validate=validate, check=check)

    # ------------------------------------------------------------------ adaptation and prediction
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> Posterior:
        """Task inference on support sets ``[T, S, ...]``: a :class:`Posterior` per task."""
        task = self.prepare({"support_x": support_x, "support_y": support_y})
        meta = self.meta_params()
        steps = self.eval_inner_steps if steps is None else int(steps)

        conjugate_noise = hasattr(self.likelihood, "noise_ratio")

        def solve(t):
            v, diag = self.problem.solve(meta, t, differentiable=False, steps=steps)
            extra = {"noise_ratio": task_noise_ratio(self.model, meta, self.method.point(v), t)} if conjugate_noise else {}
            return v, diag._asdict(), extra

        params, diagnostics, extra = self._vmap(solve, task)
        ratio = extra.get("noise_ratio")
        return Posterior(params, self.method, diagnostics, None if ratio is None else ratio.detach())

    def posterior_outputs(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None) -> Tensor:
        """Network outputs at posterior draws: ``[T, S, N, ...]`` for inputs ``x [T, N, ...]``."""
        meta = self.meta_params()
        dtype = self.prior.initial_weights.dtype
        x = x.to(device=self.prior.initial_weights.device, dtype=dtype)
        S = 1 if isinstance(posterior.method, MAP) else (num_samples or self.num_predictive_samples)
        eps = posterior.method.draws(x.shape[0], S, self.prior.dim, self.generator, dtype=dtype).to(x.device)

        def per_task(v, eps_t, x_t):
            return self.model.net_outputs(meta, posterior.method.weight_samples(v, eps_t), x_t)

        return self._vmap(per_task, posterior.params, eps, x)

    @torch.no_grad()
    def predict(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None):
        """Posterior predictive at ``x [T, N, ...]``.

        Regression (Gaussian likelihood): ``(mean, var)`` each ``[T, N, d]`` with
        ``var = Var_s f(x; w_s) + σ²`` (times the task's ``posterior.noise_ratio`` where the noise is
        inferred per task, :class:`ibaml.ConjugateNoiseGaussianLikelihood`); for a variational
        posterior over a linear head with the linearised expectation the outputs are Gaussian and
        the predictive is exact, ``var = φ(x)²ᵀ s + σ²``, with no draws (``num_samples`` unused).
        Where the likelihood's predictive is heavy-tailed (``likelihood.tails`` not ``None``, after
        :func:`ibaml.training.fit_noise_prior` with ``tails``), ``var`` is its squared scale.
        Classification: probabilities ``[T, N, C]`` averaged over posterior draws."""
        meta = self.meta_params()
        method = posterior.method
        extra = () if posterior.noise_ratio is None else (posterior.noise_ratio,)
        if (isinstance(method, Variational) and method.expectation == "linearized"
                and hasattr(self.likelihood, "predictive_gaussian_outputs")):
            x = x.to(device=self.prior.initial_weights.device, dtype=self.prior.initial_weights.dtype)

            def exact(v, x_t, *ratio):   # a linear-Gaussian head: the outputs are Gaussian, no draws needed
                out_mean, out_var = self.model.head_outputs(meta, method.point(v), method.variance(v), x_t)
                return self.model.likelihood_call(meta, "predictive_gaussian_outputs", out_mean, out_var, *ratio)

            return torch.func.vmap(exact, chunk_size=self.chunk_size)(posterior.params, x, *extra)
        outputs = self.posterior_outputs(posterior, x, num_samples)
        if posterior.noise_ratio is not None:   # each task's inferred noise (ConjugateNoiseGaussianLikelihood)
            return torch.func.vmap(lambda o, r: self.model.likelihood_call(meta, "predictive", o, r))(
                outputs, posterior.noise_ratio)
        return torch.func.vmap(lambda o: self.model.likelihood_call(meta, "predictive", o))(outputs)

    def evaluate(self, batch, steps: Optional[int] = None, num_samples: Optional[int] = None, name: str = "",
                 chunk: Optional[int] = None):
        """Adapt on each task's support set, predict its query set, and return a
        :class:`ibaml.calibration.CalibrationReport` (:func:`ibaml.evaluation.evaluate`)."""
        return evaluation.evaluate(self, batch, chunk=chunk, steps=steps, num_samples=num_samples, name=name)

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
