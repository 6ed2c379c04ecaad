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
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from priors.base import Prior

from .hypergrad import HypergradEstimator, Implicit
from .inference import MAP, InnerLoop, TaskProblem, Variational
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
    """Check a task batch before any work is done; raise ``ValueError`` naming the problem."""
    for key in ("support_x", "support_y"):
        if key not in task:
            raise ValueError(f"task batch has no {key!r}")
    for side in ("support", "query"):
        if f"{side}_x" not in task:
            continue
        x, y = task[f"{side}_x"], task[f"{side}_y"]
        if x.dim() < 2:
            raise ValueError(f"{side}_x must have shape [tasks, points, ...], got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{side} set is empty: {side}_x has shape {tuple(x.shape)}")
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"{side}_x has {tuple(x.shape[:2])} [tasks, points] but {side}_y has {tuple(y.shape[:2])}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{side}_x contains NaN or Inf")
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError(f"{side}_y contains NaN or Inf")
        if isinstance(likelihood, CategoricalLikelihood) and num_classes is not None:
            if y.is_floating_point():
                raise ValueError(f"{side}_y must hold integer class labels, got dtype {y.dtype}")
            if (y < 0).any() or (y >= num_classes).any():
                raise ValueError(f"{side}_y has labels outside 0..{num_classes - 1} "
                                 f"(min {int(y.min())}, max {int(y.max())})")
    if "query_x" in task and task["query_x"].shape[0] != task["support_x"].shape[0]:
        raise ValueError(f"support has {task['support_x'].shape[0]} tasks but query has {task['query_x'].shape[0]}")
    if "query_x" in task and task["query_x"].shape[2:] != task["support_x"].shape[2:]:
        raise ValueError(f"support_x points have shape {tuple(task['support_x'].shape[2:])} but query_x points "
                         f"have {tuple(task['query_x'].shape[2:])}")


class MetaLearner(nn.Module):
    """Network + learnable prior + likelihood + inference method + hypergradient estimator.

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
        nonfinite: ``"raise"`` (stop with :class:`NonFiniteError`) or ``"skip"`` (drop
            non-finite tasks from the meta-gradient and count them in ``stats`` and
            ``skipped_tasks``; a batch in which every task is non-finite still raises).
        num_classes: for classification, the number of classes (label validation).
        seed: seed of the learner's generator (posterior draws).
    """

    def __init__(self, net: nn.Module, prior: Prior, likelihood: Likelihood, method: Any = "map",
                 estimator: Optional[HypergradEstimator] = None, inner_optimizer: Any = None, inner_steps: int = 10,
                 eval_inner_steps: Optional[int] = None, meta_lr: float = 1e-3, meta_optimizer=None,
                 chunk_size: Optional[int] = None, num_predictive_samples: int = 20, hyper_weight: float = 1.0,
                 nonfinite: str = "raise", num_classes: Optional[int] = None, seed: int = 0):
        super().__init__()
        if isinstance(method, str):
            table = {"map": MAP, "variational": Variational}
            if method not in table:
                raise ValueError(f"unknown inference method {method!r}; expected one of {sorted(table)}")
            method = table[method]()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not meta_lr > 0:
            raise ValueError(f"meta_lr must be positive, got {meta_lr!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
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
        self.meta_optimizer = optimizer_cls(list(self.model.meta_parameters().values()), lr=meta_lr)
        self.generator = torch.Generator(device=prior.initial_weights.device).manual_seed(seed)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.skipped_tasks = 0

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
        eps = torch.randn(num_tasks, num, self.prior.dim, generator=gen, device=gen.device, dtype=like.dtype)
        return eps.to(like.device)

    def _prepare(self, batch) -> Dict[str, Tensor]:
        task = _as_task_dict(batch)
        validate_tasks(task, self.likelihood, self.num_classes)
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
        """Mean meta-gradient over the tasks of ``batch`` (no update). Returns
        ``(loss, grads, diagnostics, finite_mask)`` with per-task diagnostics ``[T]``."""
        task = self._prepare(batch)
        meta = self.meta_params()
        out = self._vmap(lambda t: self.estimator.task_gradient(self.problem, meta, t), task)
        finite = out.diagnostics["finite"] & torch.isfinite(out.loss)
        n_bad = int((~finite).sum())
        if n_bad and (self.nonfinite == "raise" or n_bad == finite.numel()):
            raise NonFiniteError(
                f"{n_bad} of {finite.numel()} tasks gave a non-finite inner solution or meta-gradient; "
                f"lower the inner learning rate, add CG damping, or use nonfinite='skip'")
        keep = finite.to(out.loss.dtype)
        n_keep = keep.sum().clamp(min=1)

        def masked_mean(g):
            mask = keep.view(-1, *([1] * (g.dim() - 1)))
            return torch.where(mask > 0, g, torch.zeros_like(g)).sum(0) / n_keep

        grads = {k: masked_mean(g) for k, g in out.grads.items()}
        loss = masked_mean(out.loss)
        return loss, grads, out.diagnostics, finite

    def meta_step(self, batch) -> Dict[str, float]:
        """One meta-update on a batch of tasks; returns summary statistics."""
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
                stats[key] = float(diagnostics[key].float().mean())
        if hyper is not None:
            stats["hyper"] = float(hyper.detach())
        return stats

    # ------------------------------------------------------------------ adaptation and prediction
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> Posterior:
        """Task inference on support sets ``[T, S, ...]``: a :class:`Posterior` per task."""
        task = self._prepare({"support_x": support_x, "support_y": support_y})
        meta = self.meta_params()
        steps = self.eval_inner_steps if steps is None else int(steps)

        def solve(t):
            v, diag = self.problem.solve(meta, t, differentiable=False, steps=steps)
            return v, diag._asdict()

        params, diagnostics = self._vmap(solve, task)
        return Posterior(params, self.method, diagnostics)

    def posterior_outputs(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None) -> Tensor:
        """Network outputs at posterior draws: ``[T, S, N, ...]`` for inputs ``x [T, N, ...]``."""
        meta = self.meta_params()
        dtype = self.prior.initial_weights.dtype
        x = x.to(device=self.prior.initial_weights.device, dtype=dtype)
        S = 1 if isinstance(posterior.method, MAP) else (num_samples or self.num_predictive_samples)
        eps = self._draws(x.shape[0], S, x)

        def per_task(v, eps_t, x_t):
            w = posterior.method.weight_samples(v, eps_t)
            return torch.func.vmap(lambda wi: self.model.net_output(meta, wi, x_t))(w)

        return torch.func.vmap(per_task, chunk_size=self.chunk_size)(posterior.params, eps, x)

    @torch.no_grad()
    def predict(self, posterior: Posterior, x: Tensor, num_samples: Optional[int] = None):
        """Posterior predictive at ``x [T, N, ...]``.

        Regression (Gaussian likelihood): ``(mean, var)`` each ``[T, N, d]`` with
        ``var = Var_s f(x; w_s) + σ²``. Classification: probabilities ``[T, N, C]``
        averaged over posterior draws."""
        outputs = self.posterior_outputs(posterior, x, num_samples)
        meta = self.meta_params()
        return torch.func.vmap(lambda o: self.model.likelihood_call(meta, "predictive", o))(outputs)

    def evaluate(self, batch, steps: Optional[int] = None, num_samples: Optional[int] = None, name: str = ""):
        """Adapt on each task's support set, predict its query set, and return a
        :class:`ibaml.calibration.CalibrationReport`."""
        from .calibration import CalibrationReport

        task = _as_task_dict(batch)
        posterior = self.adapt(task["support_x"], task["support_y"], steps=steps)
        prediction = self.predict(posterior, task["query_x"], num_samples)
        if isinstance(self.likelihood, GaussianLikelihood):
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
