"""The sine regression models of ``examples/sine_regression.py`` as data: the configuration
that fixes a run (:func:`sine_run_config`, the ``config`` its checkpoints hold), the learner
(or deep-kernel GP, method ``"dkt"``) built from such a configuration
(:func:`sine_learner_from_config`), and the predictive mean and variance of either on query
points (:func:`predictive_mean_var`). A script that reloads a run's ``last.pt`` rebuilds its
model with these and loads the saved state.

The network is an :class:`ibaml.core.nets.MLP` ``1 → hidden → 1`` (with a
:class:`~ibaml.core.nets.NoiseHead` for a per-task noise in the head), named in the configuration
by :func:`sine_network` (``"MLP(1, (40, 40), 1)"``); the likelihood is the noise model's
(:func:`ibaml.recipes.noise_presets.regression_likelihood`) and the learner the method's recipe
(:func:`ibaml.recipes.presets.build_learner`) with the options the configuration records.

Example
-------
>>> config = sine_run_config("imaml", seed=3, precision=0.5)
>>> config["network"], config["noise"], config["inner_steps"]
('MLP(1, (40, 40), 1)', 'shared', 2)
>>> learner = sine_learner_from_config(config)
>>> x = torch.linspace(-5, 5, 20).reshape(2, 10, 1)
>>> mean, var = predictive_mean_var(learner, x[:, :5], torch.sin(x[:, :5]), x[:, 5:])
>>> mean.shape, bool((var > 0).all())
(torch.Size([2, 5]), True)
"""

from __future__ import annotations

import ast
import inspect
import re
from typing import Optional, Tuple

import torch

from ibaml.baselines.dkt import DeepKernelGP
from ibaml.core.nets import MLP
from ibaml.recipes.noise_presets import REGRESSION_NOISE, regression_likelihood
from ibaml.recipes.noise_presets import noise_prior_count as preset_noise_prior_count
from ibaml.recipes.presets import build_learner, inner_steps as preset_inner_steps

__all__ = ["SINE_HIDDEN", "SINE_KL_WEIGHT", "RUN_OPTIONS", "sine_run_defaults", "sine_network", "hidden_widths", "random_features", "sine_run_config",
           "sine_learner_from_config", "predictive_mean_var"]

#: the hidden widths of the sine network (MAML's 40 × 40)
SINE_HIDDEN = (40, 40)

#: the weight β of the KL term of a head method's variational objective on sine, per noise model
#: (``(method, noise)``; the library's default elsewhere, β = 1, the exact posterior), as the
#: results protocol chose it on validation tasks (``benchmarks/sine_protocol.py``,
#: ``docs/results/sine/protocol/selection.json``): at β = 1 the prior held iBaML's posterior
#: mean so tightly that at three of five seeds it extrapolated the support's last slope to the
#: ends of [−5, 5] (``docs/results/sine.md``, "Where iBaML's error sits with a noise per task");
#: ABML, the same model differentiated through its steps, had its β chosen the same way
SINE_KL_WEIGHT = {("ibaml", "conjugate"): 0.05, ("ibaml", "shared"): 0.2,
                  ("abml", "conjugate"): 0.05, ("abml", "shared"): 0.05}

#: the options of :func:`sine_run_config` that ``examples/sine_regression.py`` takes from its
#: command line under the same names (``--learn-noise-prior-count`` apart: a yes/no there)
RUN_OPTIONS = ("shots", "train_shots", "random_features", "noise_init", "query", "meta_batch", "dtype", "seed", "noise", "noise_prior_count", "inner_steps",
               "eval_inner_steps", "inner_lr", "precision", "prior", "inner_optimizer", "kl_weight", "cg_steps",
               "cg_damping", "meta_lr", "nonfinite", "outer", "inner_support_size")


def sine_network(method: str, noise: Optional[str] = None, hidden: Tuple[int, ...] = SINE_HIDDEN,
                 random_features: int = 0) -> str:
    """The name of a sine model's network as a run configuration records it: the deep-kernel
    GP's for ``"dkt"``, else the MLP's, with a noise head for the per-task noise models
    (``"task"``, ``"task-scaled"``).

    >>> sine_network("ibaml", "conjugate"), sine_network("ibaml", "task", (8,))
    ('MLP(1, (40, 40), 1)', 'MLP(1, (8,), 1, noise_head=True)')
    >>> sine_network("dkt"), sine_network("ibaml-fullcov", "shared", random_features=20)
    ('DeepKernelGP(in_dim=1, hidden=(40, 40))', 'MLP(1, (40, 40), 1, random_features=20)')
    """
    hidden = tuple(hidden)
    if method == "dkt":
        return f"DeepKernelGP(in_dim=1, hidden={hidden})"
    options = (", noise_head=True" if (noise or "").startswith("task") else "") + \
        (f", random_features={int(random_features)}" if random_features else "")
    return f"MLP(1, {hidden}, 1{options})"


def random_features(network: str) -> int:
    """The random Fourier features under the head in a network name of :func:`sine_network` (0: none).

    >>> random_features("MLP(1, (40, 40), 1, random_features=20)"), random_features("MLP(1, (40, 40), 1)")
    (20, 0)
    """
    found = re.search(r"random_features=([0-9]+)", network)
    return int(found.group(1)) if found else 0


def hidden_widths(network: str) -> tuple:
    """The hidden widths in a network name of :func:`sine_network`.

    >>> hidden_widths("MLP(1, (40, 40), 1)"), hidden_widths("DeepKernelGP(in_dim=1, hidden=(8,))")
    ((40, 40), (8,))
    """
    found = re.search(r"\((?:1, |in_dim=1, hidden=)(\([0-9, ]*\))", network)
    if found is None:
        raise ValueError(f"network {network!r}: not a sine network (ibaml.recipes.sine_presets.sine_network)")
    return tuple(ast.literal_eval(found.group(1)))


def sine_run_config(method: str, *, shots: int = 10, train_shots: Optional[Tuple[int, int]] = None,
                    random_features: int = 0, noise_init: Optional[float] = None, query: int = 10, meta_batch: int = 25, dtype: str = "float32",
                    seed: int = 0, noise: Optional[str] = None, noise_prior_count: Optional[float] = None,
                    learn_noise_prior_count: Optional[bool] = None, inner_steps: Optional[int] = None,
                    eval_inner_steps: Optional[int] = None, inner_lr: Optional[float] = None,
                    precision: Optional[float] = None, prior: Optional[str] = None, inner_optimizer=None,
                    kl_weight: Optional[float] = None, cg_steps: int = 20, cg_damping: float = 0.0,
                    meta_lr: float = 1e-3, nonfinite: str = "skip", outer: Optional[str] = None,
                    inner_support_size: Optional[int] = None, hidden: Tuple[int, ...] = SINE_HIDDEN) -> dict:
    """The settings that fix a sine run's meta-training trajectory (a checkpoint must match them
    all), the defaults those of ``examples/sine_regression.py``: the task shape and seed, the
    network (:func:`sine_network`) and, but for ``"dkt"``, the noise model (default the method's,
    :data:`ibaml.recipes.noise_presets.REGRESSION_NOISE`), the conjugate noise's pseudo-count
    (:func:`ibaml.recipes.noise_presets.noise_prior_count`), the inner steps of meta-training and
    evaluation (:func:`ibaml.recipes.presets.inner_steps`) and the options of
    :func:`ibaml.recipes.presets.build_learner`; ``kl_weight`` where given, else on the head
    :data:`SINE_KL_WEIGHT`'s for the method and noise where it has one; ``prior`` (its
    ``include``), ``inner_optimizer``, ``outer`` (the variational outer objective,
    :class:`ibaml.Variational`) and ``inner_support_size`` (:class:`ibaml.MetaLearner`'s) only where given; ``train_shots = (low, high)`` (meta-training on support
    sizes drawn uniformly from ``low..high`` per meta-batch), ``random_features`` (the network's,
    :func:`sine_network`) and ``noise_init`` (the likelihood's initial noise, default 1) only
    where given.

    >>> sorted(sine_run_config("dkt", seed=1))
    ['dtype', 'meta_batch', 'method', 'network', 'query', 'seed', 'shots']
    >>> config = sine_run_config("ibaml")
    >>> config["noise"], config["noise_prior_count"], config["learn_noise_prior_count"], "prior" in config
    ('conjugate', 1.0, False, False)
    >>> config["kl_weight"], sine_run_config("ibaml", noise="shared")["kl_weight"], "kl_weight" in sine_run_config("imaml")
    (0.05, 0.2, False)
    """
    common = {"method": method, "shots": shots, "query": query, "meta_batch": meta_batch, "dtype": dtype, "seed": seed}
    if method == "dkt":
        return dict(common, network=sine_network(method, hidden=hidden))
    steps, eval_steps = preset_inner_steps(method, inner_steps, eval_inner_steps, prior)
    noise = noise or REGRESSION_NOISE.get(method, "shared")
    if kl_weight is None and prior in (None, "head"):
        kl_weight = SINE_KL_WEIGHT.get((method, noise))
    if noise == "conjugate":
        common["noise_prior_count"], common["learn_noise_prior_count"] = preset_noise_prior_count(
            method, noise_prior_count, learn_noise_prior_count)
    chosen = {k: v for k, v in (("prior", prior), ("inner_optimizer", inner_optimizer),
                                ("kl_weight", kl_weight), ("noise_init", noise_init), ("outer", outer),
                                ("inner_support_size", inner_support_size))
              if v is not None}
    if train_shots is not None:
        common["train_shots"] = [int(train_shots[0]), int(train_shots[1])]
    return dict(common, network=sine_network(method, noise, hidden, random_features), noise=noise, inner_steps=steps,
                eval_inner_steps=eval_steps, inner_lr=inner_lr, precision=precision, cg_steps=cg_steps,
                cg_damping=cg_damping, meta_lr=meta_lr, nonfinite=nonfinite, **chosen)


def sine_run_defaults() -> dict:
    """The defaults of :func:`sine_run_config` for the options of :data:`RUN_OPTIONS`: the
    command-line defaults of ``examples/sine_regression.py``, held here only.

    >>> defaults = sine_run_defaults()
    >>> defaults["shots"], defaults["meta_batch"], defaults["cg_steps"], defaults["inner_steps"]
    (10, 25, 20, None)
    """
    parameters = inspect.signature(sine_run_config).parameters
    return {name: parameters[name].default for name in RUN_OPTIONS}


def sine_learner_from_config(config: dict, *, device=None, dtype: Optional[torch.dtype] = None,
                             process_group=None, **overrides):
    """The model of a sine run configuration (:func:`sine_run_config`, a checkpoint's
    ``config``), its parameters drawn from ``config["seed"]`` (the global torch generator
    seeded with it), in ``dtype`` (default the configuration's) on ``device``: a
    :class:`~ibaml.baselines.dkt.DeepKernelGP` for ``"dkt"``, else the method's
    :class:`~ibaml.MetaLearner` on :func:`sine_network`'s MLP with the noise model's likelihood
    and the options recorded. ``overrides`` (``per_point``, ``inner_lr``, ...) go to
    :func:`ibaml.recipes.presets.build_learner` over those; ``process_group`` too (data-parallel
    meta-training). A network name other than :func:`sine_network`'s for the method and noise
    raises ``ValueError``.

    >>> model = sine_learner_from_config(sine_run_config("dkt", dtype="float64"))
    >>> type(model).__name__, next(model.parameters()).dtype
    ('DeepKernelGP', torch.float64)
    """
    method, network = config["method"], config["network"]
    dtype = dtype or getattr(torch, config["dtype"])
    hidden = hidden_widths(network)
    expected = sine_network(method, config.get("noise"), hidden, random_features(network))
    if network != expected:
        raise ValueError(f"network {network!r}: expected {expected!r} for method {method!r}")
    torch.manual_seed(config["seed"])
    if method == "dkt":
        return DeepKernelGP(in_dim=1, hidden=hidden).to(device=device, dtype=dtype)
    noise = config["noise"]
    likelihood = regression_likelihood(noise, config.get("noise_prior_count", 1.0),
                                       config.get("learn_noise_prior_count", True), config.get("noise_init", 1.0))
    likelihood = likelihood.to(device=device, dtype=dtype)
    net = MLP(1, hidden, 1, noise_head=noise.startswith("task"), random_features=random_features(network),
              seed=config["seed"]).to(device=device, dtype=dtype)
    options = dict(inner_steps=config["inner_steps"], eval_inner_steps=config["eval_inner_steps"],
                   inner_lr=config.get("inner_lr"), precision=config.get("precision"), cg_steps=config["cg_steps"],
                   include=config.get("prior"), inner_optimizer=config.get("inner_optimizer"),
                   kl_weight=config.get("kl_weight"), cg_damping=config["cg_damping"], meta_lr=config["meta_lr"],
                   seed=config["seed"], nonfinite=config.get("nonfinite", "raise"), process_group=process_group)
    if "outer" in config:
        options["outer"] = config["outer"]
    if "inner_support_size" in config:
        options["inner_support_size"] = config["inner_support_size"]
    return build_learner(method, net, likelihood, **{**options, **overrides})


def predictive_mean_var(model, support_x: torch.Tensor, support_y: torch.Tensor,
                        query_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predictive mean and variance ``[T, N]`` at ``query_x [T, N, 1]`` of a one-output
    regression model adapted to each task's support ``support_x, support_y [T, K, 1]``: a
    :class:`~ibaml.MetaLearner` (``predict(adapt(...))``; for a heavy-tailed predictive the
    variance is its squared scale) or a :class:`~ibaml.baselines.dkt.DeepKernelGP` (its
    posterior given the support).

    >>> gp = DeepKernelGP(in_dim=1, hidden=(8,))
    >>> x = torch.randn(3, 7, 1)
    >>> [tuple(t.shape) for t in predictive_mean_var(gp, x[:, :4], x[:, :4] ** 2, x[:, 4:])]
    [(3, 3), (3, 3)]
    """
    if isinstance(model, DeepKernelGP):
        return model.predict(support_x, support_y, query_x)
    mean, var = model.predict(model.adapt(support_x, support_y), query_x)
    return mean[..., 0], var[..., 0]
