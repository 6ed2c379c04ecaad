"""``MetaProblem``: the meta-learning problem of a batch of tasks as pure functions of the
meta-parameters θ, the tasks and their Monte Carlo draws.

It binds a :class:`ibaml.core.task_model.TaskModel`, an inference method, an inner loop and a
hypergradient estimator, and maps the per-task work over the tasks (``torch.func.vmap`` with an
optional ``chunk_size``, or a Python loop, :func:`loop_over_tasks`)::

    (F_t, g_t, diagnostics_t) = estimator.task_gradient(problem, θ, task_t ∪ draws_t)     for every t
    v_t* = argmin_v G(v, θ; S_t, draws_t)                                                  (adapt)
    p(y | x, S_t) ≈ likelihood.predictive(f(x; w_j)),  w_j = weight_samples(v_t*, ε_j)       (predict)

Nothing here holds run state: the random draws come in as arguments (:meth:`MetaProblem.noise_draws`
and :meth:`MetaProblem.predictive_draws` make them from a generator the caller owns), and the
meta-optimiser, the step and skip counters, the non-finite policy and the process group belong
to the trainer (:class:`ibaml.MetaLearner`), which calls this object and is never called by it.

Example
-------
>>> import ibaml, priors
>>> from ibaml.data import SineTaskDistribution
>>> net = ibaml.core.nets.MLP(1, (8,), 1)
>>> model = ibaml.TaskModel(net, priors.IsotropicGaussian.from_module(net, precision=10.0), ibaml.GaussianLikelihood(0.5))
>>> problem = MetaProblem(model, ibaml.MAP(), ibaml.Implicit(), ibaml.InnerLoop(ibaml.core.optim.SGD(lr=0.01), 3))
>>> task = problem.to_device(SineTaskDistribution(shots=5, query=5).sample(4, torch.Generator().manual_seed(0)))
>>> draws = problem.noise_draws(4, torch.Generator().manual_seed(0))    # none for a point estimate
>>> out = problem.task_gradients(problem.meta_params(), task, draws)
>>> out.loss.shape, out.grads["prior.loc_unconstrained"].shape     # [tasks], [tasks, D]
(torch.Size([4]), torch.Size([4, 25]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ibaml.core.hypergrad import HypergradEstimator, TaskGradient
from ibaml.core.inference import MAP, Variational, task_noise_ratio
from ibaml.core.inner_loop import InnerLoop, TaskProblem
from ibaml.core.likelihoods import CategoricalLikelihood
from ibaml.core.task_model import TaskModel
from ibaml.data.tasks import as_task_dict, validate_labels, validate_tasks

__all__ = ["MetaProblem", "Posterior", "TASK_BATCHING", "loop_over_tasks"]

Task = Dict[str, Tensor]


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
        return self.method.point(self.params)

    def variance(self) -> Optional[Tensor]:
        """Mean-field variances ``[T, D]`` (``None`` for MAP)."""
        return self.method.variance(self.params) if isinstance(self.method, Variational) else None


TASK_BATCHING = ("auto", "vmap", "loop")


def loop_over_tasks(fn, *args):
    """``fn`` applied to each task's slice of ``args`` (pytrees of tensors with a leading task
    dimension) in a Python loop, the outputs stacked: what ``torch.func.vmap(fn)(*args)``
    computes, one task at a time."""
    leaves = [x for x in tree_flatten(args)[0] if isinstance(x, Tensor)]
    outputs = [fn(*tree_map(lambda x: x[t] if isinstance(x, Tensor) else x, args)) for t in range(leaves[0].shape[0])]
    return tree_map(lambda *xs: torch.stack(xs) if isinstance(xs[0], Tensor) else xs[0], *outputs)


class MetaProblem:
    """Model, inference method, inner loop and estimator of a batch of tasks; see the module docstring.

    Args:
        model: the :class:`ibaml.core.task_model.TaskModel` (network, prior, likelihood).
        method: :class:`ibaml.MAP` or :class:`ibaml.Variational`.
        estimator: a :class:`ibaml.core.hypergrad.HypergradEstimator`.
        inner_loop: the :class:`ibaml.InnerLoop` of meta-training.
        eval_inner_steps: inner steps in :meth:`adapt` (default the inner loop's).
        chunk_size: tasks per vmap chunk (``None``: all at once).
        task_batching: ``"vmap"``, ``"loop"`` or ``"auto"`` (``"loop"`` for a network with
            convolutions on the CPU, where a vmapped convolution becomes a slower grouped one).
        num_predictive_samples: posterior draws in :meth:`predictive_draws`.
        hyper_weight: weight of the hyperprior term of the meta-objective (:meth:`hyper_objective`).
        num_classes: for classification, the number of classes that labels are checked
            against (default: the network's output width).
    """

    def __init__(self, model: TaskModel, method: Any, estimator: HypergradEstimator, inner_loop: InnerLoop,
                 eval_inner_steps: Optional[int] = None, chunk_size: Optional[int] = None,
                 task_batching: str = "auto", num_predictive_samples: int = 20, hyper_weight: float = 1.0,
                 num_classes: Optional[int] = None):
        self.model = model
        self.method = method
        self.estimator = estimator
        self.inner_loop = inner_loop
        self.task_problem = TaskProblem(model, method, inner_loop)
        self.eval_inner_steps = inner_loop.steps if eval_inner_steps is None else int(eval_inner_steps)
        self.chunk_size = chunk_size
        self.task_batching = task_batching
        self.num_predictive_samples = int(num_predictive_samples)
        self.hyper_weight = float(hyper_weight)
        self.num_classes = num_classes
        self._output_width: Optional[int] = None

    # ------------------------------------------------------------------ tensors and tasks
    @property
    def reference(self) -> Tensor:
        """The tensor whose device and dtype the tasks are moved to: the prior's initial weights."""
        return self.model.prior.initial_weights

    def meta_params(self, detach: bool = True) -> Dict[str, Tensor]:
        """The meta-parameter dict θ (detached by default)."""
        return {k: (p.detach() if detach else p) for k, p in self.model.meta_parameters().items()}

    def to_device(self, batch) -> Task:
        """The batch as a dict on the problem's device and dtype (integer labels keep theirs)."""
        dtype, device = self.reference.dtype, self.reference.device
        return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                for k, v in as_task_dict(batch).items()}

    def num_outputs(self, task: Task) -> int:
        """Width of the network's output (classification: the number of classes), found by one
        forward pass on one example the first time and kept: the architecture does not change."""
        if self._output_width is None:
            meta = self.meta_params()
            x = task["support_x"][0, :1].to(device=self.reference.device, dtype=self.reference.dtype)
            with torch.no_grad():
                self._output_width = int(self.model.net_output(meta, self.model.prior_location(meta),
                                                               x).shape[-1])
        return self._output_width

    def check_tasks(self, batch) -> None:
        """:func:`ibaml.data.tasks.validate_tasks` with the number of classes (classification:
        ``num_classes``, else the network's output width); reads values on the host."""
        task = as_task_dict(batch)
        classification = isinstance(self.model.likelihood, CategoricalLikelihood)
        num_classes = self.num_classes if classification else None
        validate_tasks(task, num_classes)
        if classification and num_classes is None:
            validate_labels(task, self.num_outputs(task))

    def noise_draws(self, num_tasks: int, generator: torch.Generator) -> Task:
        """The inference method's fixed draws for ``num_tasks`` tasks (``method.task_noise``:
        ``eps_inner``, ``eps_outer`` for a variational posterior, none for MAP), from ``generator``,
        on the problem's device."""
        noise = self.method.task_noise(num_tasks, self.model.prior.dim, generator, dtype=self.reference.dtype)
        return {key: eps.to(self.reference.device) for key, eps in noise.items()}

    # ------------------------------------------------------------------ mapping over tasks
    def batching(self) -> str:
        """``"vmap"`` or ``"loop"``: ``task_batching`` with ``"auto"`` resolved for the network and its device."""
        if self.task_batching != "auto":
            return self.task_batching
        on_cpu = self.reference.device.type == "cpu"
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.net.modules())
        return "loop" if on_cpu and convolutional else "vmap"

    def map_tasks(self, fn, *args):
        """``fn`` over the leading task dimension of ``args``: ``vmap`` (chunked) or :func:`loop_over_tasks`."""
        if self.batching() == "loop":
            return loop_over_tasks(fn, *args)
        return torch.func.vmap(fn, chunk_size=self.chunk_size)(*args)

    # ------------------------------------------------------------------ meta-gradients
    def task_gradients(self, meta: Dict[str, Tensor], task: Task, draws: Task) -> TaskGradient:
        """Per-task losses ``F_t [T]``, meta-gradients ``g_t`` (each leaf ``[T, ...]``) and
        diagnostics (each ``[T]``) at ``θ = meta``, with no host synchronisation::

            (F_t, g_t, diagnostics_t) = estimator.task_gradient(problem, θ, task_t ∪ draws_t)

        ``task`` on the problem's device (:meth:`to_device`), ``draws`` from :meth:`noise_draws`."""
        return self.map_tasks(lambda t: self.estimator.task_gradient(self.task_problem, meta, t), dict(task, **draws))

    def hyper_objective(self, params: Dict[str, Tensor]) -> Optional[Tensor]:
        """``−hyper_weight · log p_hyper(θ)`` at ``params`` (``None`` when ``hyper_weight`` is 0)."""
        if not self.hyper_weight:
            return None
        return -self.hyper_weight * self.model.prior_hyper_log_prob(params)

    # ------------------------------------------------------------------ adaptation and prediction
    def adapt(self, meta: Dict[str, Tensor], task: Task, draws: Task, steps: Optional[int] = None) -> Posterior:
        """Task inference on the support sets of ``task`` (``[T, S, ...]``, on the problem's
        device) with the fixed ``draws``: a :class:`Posterior` per task, after ``steps`` inner
        steps (default ``eval_inner_steps``)."""
        steps = self.eval_inner_steps if steps is None else int(steps)
        conjugate_noise = self.model.likelihood.infers_task_noise

        def solve(t):
            v, diag = self.task_problem.solve(meta, t, differentiable=False, steps=steps)
            extra = {"noise_ratio": task_noise_ratio(self.model, meta, self.method.point(v), t)} if conjugate_noise else {}
            v = dict(v, **self.method.posterior_extras(self.model, v, meta, t))
            return v, diag._asdict(), extra

        params, diagnostics, extra = self.map_tasks(solve, dict(task, **draws))
        ratio = extra.get("noise_ratio")
        return Posterior(params, self.method, diagnostics, None if ratio is None else ratio.detach())

    def exact_predictive(self, posterior: Posterior) -> bool:
        """Whether :meth:`predict` is exact with no draws: a posterior whose outputs are Gaussian
        (the method's ``exact_outputs``: a variational posterior over a linear head with the
        linearised expectation, :class:`~ibaml.core.inference.FullCovariance`) and a likelihood with a
        Gaussian-outputs predictive."""
        return posterior.method.exact_outputs and self.model.likelihood.gaussian_outputs_predictive

    def predictive_draws(self, posterior: Posterior, num_tasks: int, generator: torch.Generator,
                         num_samples: Optional[int] = None) -> Tensor:
        """Standard-normal draws ``ε [T, S, D]`` for :meth:`posterior_outputs` from ``generator``:
        ``S = 1`` for a point estimate, else ``num_samples`` (default ``num_predictive_samples``)."""
        num = 1 if isinstance(posterior.method, MAP) else (num_samples or self.num_predictive_samples)
        eps = posterior.method.draws(num_tasks, num, self.model.prior.dim, generator, dtype=self.reference.dtype)
        return eps.to(self.reference.device)

    def posterior_outputs(self, meta: Dict[str, Tensor], posterior: Posterior, x: Tensor, eps: Tensor) -> Tensor:
        """Network outputs at the posterior draws ``w_j = weight_samples(v, ε_j)``: ``[T, S, N, ...]``
        for inputs ``x [T, N, ...]`` and draws ``eps [T, S, D]``."""
        x = x.to(device=self.reference.device, dtype=self.reference.dtype)

        def per_task(v, eps_t, x_t):
            return self.model.net_outputs(meta, posterior.method.weight_samples(v, eps_t), x_t)

        return self.map_tasks(per_task, posterior.params, eps, x)

    def predict(self, meta: Dict[str, Tensor], posterior: Posterior, x: Tensor, eps: Optional[Tensor] = None):
        """Posterior predictive at ``x [T, N, ...]`` from the draws ``eps`` (unused, and may be
        ``None``, where :meth:`exact_predictive`).

        Regression (Gaussian likelihood): ``(mean, var)`` each ``[T, N, d]`` with
        ``var = Var_s f(x; w_s) + σ²`` (times the task's ``posterior.noise_ratio`` where the noise is
        inferred per task, :class:`ibaml.ConjugateNoiseGaussianLikelihood`); for a variational
        posterior over a linear head with the linearised expectation the outputs are Gaussian and
        the predictive is exact, ``var = φ(x)²ᵀ s + σ²``. Where the likelihood's predictive is
        heavy-tailed (``likelihood.tails`` not ``None``), ``var`` is its squared scale.
        Classification: probabilities ``[T, N, C]`` averaged over posterior draws."""
        method = posterior.method
        extra = () if posterior.noise_ratio is None else (posterior.noise_ratio,)
        if self.exact_predictive(posterior):
            x = x.to(device=self.reference.device, dtype=self.reference.dtype)

            def exact(v, x_t, *ratio):   # a linear-Gaussian head: the outputs are Gaussian, no draws needed
                out_mean, out_var = method.head_outputs(self.model, v, meta, x_t)
                return self.model.likelihood_predictive_gaussian_outputs(meta, out_mean, out_var, *ratio)

            return torch.func.vmap(exact, chunk_size=self.chunk_size)(posterior.params, x, *extra)
        outputs = self.posterior_outputs(meta, posterior, x, eps)
        return torch.func.vmap(lambda o, *ratio: self.model.likelihood_predictive(meta, o, *ratio))(
            outputs, *extra)
