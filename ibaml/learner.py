"""``MetaLearner``: meta-training, adaptation and prediction for a batch of tasks.

One meta-step on a batch of ``T`` tasks::

    g = (1/T) Σ_t estimator.task_gradient(problem, θ, task_t).grads     (vmapped over t)
      − hyper_weight · ∇_θ log p_hyper(θ)
    θ ← meta_optimizer.step(θ, g)

The per-task work (inner solve, hypergradient) runs under ``torch.func.vmap`` with an
optional ``chunk_size``; there is no Python loop over tasks.

Example
-------
>>> net = MLP(1, (40, 40), 1)
>>> learner = MetaLearner(net, DiagonalGaussian.from_module(net), GaussianLikelihood(0.5, learn_noise=True),
...                       method=Variational(), estimator=Implicit(), inner_optimizer=Adam(lr=0.01), inner_steps=10)
>>> stats = learner.meta_step(tasks.sample(25, generator))
>>> posterior = learner.adapt(test.support_x, test.support_y)
>>> mean, var = learner.predict(posterior, test.query_x)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from priors.base import Prior

from . import distributed
from .hypergrad import HypergradEstimator, Implicit
from .inference import MAP, InnerLoop, TaskProblem, Variational, task_noise_ratio
from .likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from .model import TaskModel
from .optim import SGD

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """Raised when inner solutions or meta-gradients are not finite and the policy is ``"raise"``."""


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


def _as_task_dict(batch) -> Dict[str, Tensor]:
    if isinstance(batch, dict):
        return dict(batch)
    return {k: getattr(batch, k) for k in ("support_x", "support_y", "query_x", "query_y")}


def validate_tasks(task: Dict[str, Tensor], likelihood: Likelihood, num_classes: Optional[int] = None) -> None:
    """Check a task batch before any work is done; raise ``ValueError`` with one line naming the
    problem: a missing support set, shapes that disagree (``[tasks, points, ...]`` for inputs
    and targets, the same tasks and point shape in support and query), an empty set, NaN or
    Inf in inputs or targets, and (classification, ``num_classes`` given) labels outside
    ``0..num_classes-1``.

    >>> validate_tasks({"support_x": torch.zeros(2, 3, 1), "support_y": torch.zeros(2, 4, 1)},
    ...                GaussianLikelihood())
    Traceback (most recent call last):
    ValueError: support_x has (2, 3) [tasks, points] but support_y has (2, 4)
    """
    for key in ("support_x", "support_y"):
        if key not in task:
            raise ValueError(f"task batch has no {key!r}")
    for key, value in task.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
    for side in ("support", "query"):
        if f"{side}_x" not in task:
            continue
        if f"{side}_y" not in task:
            raise ValueError(f"task batch has {side}_x but no {side}_y")
        x, y = task[f"{side}_x"], task[f"{side}_y"]
        if x.dim() < 2:
            raise ValueError(f"{side}_x must have shape [tasks, points, ...], got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{side} set is empty: {side}_x has shape {tuple(x.shape)}")
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"{side}_x has {tuple(x.shape[:2])} [tasks, points] but {side}_y has {tuple(y.shape[:2])}")
        for name, t in ((f"{side}_x", x), (f"{side}_y", y)):
            if t.is_floating_point():
                bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(1)
                if bad.any():
                    first = int(bad.nonzero()[0, 0])
                    raise ValueError(f"{name} contains NaN or Inf in {int(bad.sum())} of {t.shape[0]} tasks "
                                     f"(first: task {first})")
    if "query_x" in task and task["query_x"].shape[0] != task["support_x"].shape[0]:
        raise ValueError(f"support has {task['support_x'].shape[0]} tasks but query has {task['query_x'].shape[0]}")
    if "query_x" in task and task["query_x"].shape[2:] != task["support_x"].shape[2:]:
        raise ValueError(f"support_x points have shape {tuple(task['support_x'].shape[2:])} but query_x points "
                         f"have {tuple(task['query_x'].shape[2:])}")
    if isinstance(likelihood, CategoricalLikelihood) and num_classes is not None:
        validate_labels(task, num_classes)


def validate_labels(task: Dict[str, Tensor], num_classes: int) -> None:
    """Classification targets must be integer labels in ``0..num_classes-1``."""
    for key in ("support_y", "query_y"):
        if key not in task:
            continue
        y = task[key]
        if y.is_floating_point():
            raise ValueError(f"{key} must hold integer class labels, got dtype {y.dtype}")
        if (y < 0).any() or (y >= num_classes).any():
            raise ValueError(f"{key} has labels outside 0..{num_classes - 1} (min {int(y.min())}, max {int(y.max())})")


def nonfinite_causes(diagnostics: Dict[str, Tensor], losses: Tensor, finite: Tensor) -> Dict[str, int]:
    """Count the non-finite tasks (``~finite``) by the first stage that failed, in the order
    of the computation: ``inner`` (inner loss or gradient norm at the inner solution),
    ``query`` (the query loss ``F``), ``solver`` (the linear solver's residual norm, implicit
    estimators), ``gradient`` (the meta-gradient itself)."""
    left = ~finite
    counts = {}
    stages = (("inner", ("inner_loss", "inner_grad_norm")), ("query", None), ("solver", ("residual_norm",)))
    for stage, keys in stages:
        values = [losses] if keys is None else [diagnostics[k] for k in keys if k in diagnostics]
        failed = torch.zeros_like(left)
        for v in values:
            failed = failed | ~torch.isfinite(v)
        failed = failed & left
        counts[stage] = int(failed.sum())
        left = left & ~failed
    counts["gradient"] = int(left.sum())
    return counts


def meta_param_groups(params: Dict[str, Tensor], overrides: Optional[Dict[str, float]] = None):
    """``torch.optim`` parameter groups: one at the optimiser's learning rate, and one per
    override pattern (``re.search`` on the meta-parameter's name) at its own."""
    if not overrides:
        return [{"params": list(params.values())}]
    for pattern, lr in overrides.items():
        if not lr > 0:
            raise ValueError(f"meta_lr_overrides[{pattern!r}] must be positive, got {lr!r}")
    groups = {None: []}
    for name, p in params.items():
        key = next((pat for pat in overrides if re.search(pat, name)), None)
        groups.setdefault(key, []).append(p)
    return [{"params": ps} if key is None else {"params": ps, "lr": overrides[key]}
            for key, ps in groups.items() if ps]


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
    >>> learner = MetaLearner(net, IsotropicGaussian.from_module(net, precision=100.0),
    ...                       GaussianLikelihood(1.0), nonfinite="skip")          # doctest: +SKIP
    >>> learner.meta_step(batch)["skipped"], learner.skipped_tasks              # doctest: +SKIP
    (0, 0)
    """

    def __init__(self, net: nn.Module, prior: Prior, likelihood: Likelihood, method: Any = "map",
                 estimator: Optional[HypergradEstimator] = None, inner_optimizer: Any = None, inner_steps: int = 10,
                 eval_inner_steps: Optional[int] = None, meta_lr: float = 1e-3, meta_optimizer=None,
                 chunk_size: Optional[int] = None, num_predictive_samples: int = 20, hyper_weight: float = 1.0,
                 nonfinite: str = "raise", num_classes: Optional[int] = None, seed: int = 0,
                 process_group: Any = None, meta_lr_overrides: Optional[Dict[str, float]] = None):
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
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        self.model = TaskModel(net, prior, likelihood)
        self.method = method
        self.estimator = Implicit() if estimator is None else estimator
        self.inner_loop = InnerLoop(SGD(lr=0.01) if inner_optimizer is None else inner_optimizer, inner_steps)
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.problem = TaskProblem(self.model, self.method, self.inner_loop)
        self.chunk_size = chunk_size
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

    def _draws(self, num_tasks: int, num: int, like: Tensor) -> Tensor:
        gen = self.generator
        if hasattr(self.method, "draws"):   # the inference method owns its noise (antithetic pairs)
            eps = self.method.draws(num_tasks, num, self.prior.dim, gen, dtype=like.dtype)
        else:
            eps = torch.randn(num_tasks, num, self.prior.dim, generator=gen, device=gen.device, dtype=like.dtype)
        return eps.to(like.device)

    def _num_outputs(self, task: Dict[str, Tensor]) -> int:
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

    def _prepare(self, batch) -> Dict[str, Tensor]:
        task = _as_task_dict(batch)
        validate_tasks(task, self.likelihood, self.num_classes)
        if isinstance(self.likelihood, CategoricalLikelihood) and self.num_classes is None:
            validate_labels(task, self._num_outputs(task))
        dtype = self.prior.initial_weights.dtype
        device = self.prior.initial_weights.device
        task = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in task.items()}
        if isinstance(self.method, Variational):
            T = task["support_x"].shape[0]
            task["eps_inner"] = self._draws(T, self.method.num_samples, task["support_x"])
            task["eps_outer"] = self._draws(T, self.method.num_outer_samples, task["support_x"])
        return task

    def _vmap(self, fn, task):
        return torch.func.vmap(fn, chunk_size=self.chunk_size)(task)

    # ------------------------------------------------------------------ meta-training
    def meta_gradient(self, batch):
        """Mean meta-gradient over the finite tasks of ``batch`` (no update):

            g = (1/N) Σ_{t finite} g_t,    loss = (1/N) Σ_{t finite} F_t

        Returns ``(loss, grads, diagnostics, finite_mask)`` with per-task diagnostics ``[T]``.
        Non-finite tasks are handled by the ``nonfinite`` policy (class docstring). With a
        ``process_group``, this process computes ``g_t`` for its shard only; the sums over
        tasks are all-reduced and the per-task values gathered, so every process returns
        the whole batch's result."""
        task = self._prepare(batch)
        num_tasks = task["support_x"].shape[0]
        group = self.process_group
        if group is not None:
            rank, world = distributed.dist.get_rank(group), distributed.dist.get_world_size(group)
            task = distributed.shard_tasks(task, rank, world)
        meta = self.meta_params()
        out = self._vmap(lambda t: self.estimator.task_gradient(self.problem, meta, t), task)
        local_finite = out.diagnostics["finite"] & torch.isfinite(out.loss)
        per_task = dict(out.diagnostics, _loss=out.loss, _finite=local_finite)
        if group is not None:
            per_task = distributed.all_gather_tasks(per_task, num_tasks, group)
        losses, finite = per_task.pop("_loss"), per_task.pop("_finite")
        n_bad = int((~finite).sum())
        if n_bad and (self.nonfinite == "raise" or n_bad == finite.numel()):
            c = nonfinite_causes(per_task, losses, finite)
            raise NonFiniteError(
                f"{n_bad} of {finite.numel()} tasks gave non-finite values (inner solution: {c['inner']}, query loss: "
                f"{c['query']}, CG residual: {c['solver']}, meta-gradient: {c['gradient']}); lower the inner "
                f"learning rate, add CG damping, or use nonfinite='skip'"
                + (" (every task failed, so nothing is left to learn from)" if n_bad == finite.numel() else ""))

        def masked_sum(g, keep):
            mask = keep.view(-1, *([1] * (g.dim() - 1)))
            return torch.where(mask, g, torch.zeros_like(g)).sum(0)

        sums = {k: masked_sum(g, local_finite) for k, g in out.grads.items()}
        if group is not None:
            sums = distributed.all_reduce_sum(sums, group)
        n_keep = finite.to(losses.dtype).sum().clamp(min=1)
        grads = {k: s / n_keep for k, s in sums.items()}
        loss = masked_sum(losses, finite) / n_keep
        return loss, grads, per_task, finite

    def meta_step(self, batch) -> Dict[str, float]:
        """One meta-update on a batch of tasks; returns summary statistics: ``loss`` (mean
        query loss of the finite tasks), ``skipped`` (non-finite tasks dropped), the means of
        ``inner_grad_norm`` and ``residual_norm`` over the finite tasks, ``hyper``, and the
        stationarity of each block of the inner solution, ``inner_grad_norm.<block>``
        (``||∇_b G(v*, θ)||`` averaged over the finite tasks: ``w`` for MAP, ``mean`` and
        ``rho`` for a variational posterior), as 0-d tensors that are read from the device only
        when a caller converts them: the meta-gradient is exact only where these are small."""
        loss, grads, diagnostics, finite = self.meta_gradient(batch)
        n_bad = int((~finite).sum())
        self.skipped_tasks += n_bad
        self.meta_optimizer.zero_grad(set_to_none=True)
        params = self.model.meta_parameters()
        hyper = None
        if self.hyper_weight:
            hyper = -self.hyper_weight * self.model.prior_call(params, "hyper_log_prob")
            if hyper.requires_grad:
                hyper.backward()
        for k, p in params.items():
            p.grad = grads[k].to(p.dtype) if p.grad is None else p.grad + grads[k].to(p.dtype)
        self.meta_optimizer.step()
        self.step_count += 1
        stats = {"loss": float(loss), "skipped": n_bad}
        for key in ("inner_grad_norm", "residual_norm"):
            if key in diagnostics:
                stats[key] = float(diagnostics[key][finite].float().mean())
        keep = finite.to(loss.dtype)
        for key in diagnostics:
            if key.startswith("inner_grad_norm."):   # stationarity per block, kept on the device
                stats[key] = (torch.where(finite, diagnostics[key], 0.0).sum() / keep.sum().clamp(min=1)).detach()
        if hyper is not None:
            stats["hyper"] = float(hyper.detach())
        return stats

    # ------------------------------------------------------------------ adaptation and prediction
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> Posterior:
        """Task inference on support sets ``[T, S, ...]``: a :class:`Posterior` per task."""
        task = self._prepare({"support_x": support_x, "support_y": support_y})
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
        eps = self._draws(x.shape[0], S, x)

        def per_task(v, eps_t, x_t):
            return self.model.net_outputs(meta, posterior.method.weight_samples(v, eps_t), x_t)

        return torch.func.vmap(per_task, chunk_size=self.chunk_size)(posterior.params, eps, x)

    @torch.no_grad()
    def predict(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None):
        """Posterior predictive at ``x [T, N, ...]``.

        Regression (Gaussian likelihood): ``(mean, var)`` each ``[T, N, d]`` with
        ``var = Var_s f(x; w_s) + σ²`` (times the task's ``posterior.noise_ratio`` where the noise is
        inferred per task, :class:`ibaml.ConjugateNoiseGaussianLikelihood`); for a variational
        posterior over a linear head with the linearised expectation the outputs are Gaussian and
        the predictive is exact, ``var = φ(x)²ᵀ s + σ²``, with no draws (``num_samples`` unused). Classification: probabilities ``[T, N, C]``
        averaged over posterior draws."""
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

    def evaluate(self, batch, steps: Optional[int] = None, num_samples: Optional[int] = None, name: str = ""):
        """Adapt on each task's support set, predict its query set, and return a
        :class:`ibaml.calibration.CalibrationReport`."""
        from .calibration import CalibrationReport

        task = _as_task_dict(batch)
        posterior = self.adapt(task["support_x"], task["support_y"], steps=steps)
        prediction = self.predict(posterior, task["query_x"], num_samples)
        if isinstance(prediction, tuple):          # a Gaussian predictive: (mean, var)
            mean, var = prediction
            y = task["query_y"].to(mean)
            return CalibrationReport.regression(mean.reshape(mean.shape[0], -1), var.reshape(var.shape[0], -1),
                                                y.reshape(y.shape[0], -1), name=name)
        return CalibrationReport.classification(prediction, task["query_y"].to(prediction.device), name=name)

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
