"""Presets of few-shot image classification, on top of :func:`ibaml.recipes.presets.build_learner`:
the softmax's logit scale (:data:`LOGIT_SCALE`, :func:`logit_scale`,
:func:`categorical_likelihood`, :func:`logit_scale_overrides`), MAML's inner step per dataset
(:data:`MAML_IMAGE_STEP`, :func:`image_inner_lr`), and :func:`image_learner`, which puts them
together with the method's classification prior (:data:`ibaml.recipes.presets.CLASSIFICATION`) into a
learner for ``ways``-way tasks; :func:`image_learner_from_config` builds the Conv4 learner of an
image run's configuration (``examples/miniimagenet.py``'s options, the ``config`` of its
checkpoints).

Example
-------
>>> from ibaml.core.nets import Conv4
>>> learner = image_learner("ibaml", Conv4(hidden=8, out_dim=5, image_size=32), dataset="miniimagenet",
...                         ways=5, shots=1)
>>> type(learner.likelihood).__name__, float(learner.likelihood.scale.detach()), learner.inner_loop.steps
('CategoricalLikelihood', 2.0, 10)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ibaml.core.likelihoods import CategoricalLikelihood
from ibaml.core.nets import Conv4
from ibaml.recipes.presets import METHODS, build_learner, method_recipe, resolve
from ibaml.recipes.presets import inner_steps as preset_inner_steps
from ibaml.train.learner import MetaLearner

__all__ = ["LOGIT_SCALE", "MAML_IMAGE_STEP", "logit_scale", "categorical_likelihood", "logit_scale_overrides",
           "image_inner_lr", "image_learner", "image_learner_from_config"]

#: the softmax's logit scale per method (``examples/miniimagenet.py``'s ``--logit-scale``; a
#: :class:`CategoricalLikelihood` built by the caller): ``mode`` ``"fixed"`` (τ = 1),
#: ``"learned"`` (τ a meta-parameter of inner and outer objectives) or ``"predictive"`` (a
#: meta-parameter of the predictions only: ``CategoricalLikelihood(scale=init,
#: learn_scale=True, scale_inner=False)``), ``init`` and the meta learning rate ``meta_lr``.
#: Every method gets the same, as every method gets a learned noise in regression. A prior
#: strong enough to make the inner problem of a softmax head well posed shrinks its logits
#: (with τ = 1 the head-prior methods are under-confident: ``docs/results/images.md``), and a
#: predictive scale undoes that without touching the inner problem. From τ = 2 at ``meta_lr``
#: 3·10⁻² every method's scale settles within the stroke benchmark's 300 meta-iterations; at
#: 10⁻² it was still rising, from τ = 1 a fast rate collapsed it, and a scale inside the inner
#: problem ran away. The logit-scale study and the calibration it gives are in
#: ``docs/results/images.md``.
LOGIT_SCALE = {method: dict(mode="predictive", init=2.0, meta_lr=3e-2) for method in METHODS}

#: MAML's inner step on the mean cross-entropy of the support set per image dataset (Finn et
#: al. 2017); :func:`image_inner_lr` turns it into the step on the summed NLL
MAML_IMAGE_STEP = {"miniimagenet": 0.01, "omniglot": 0.4}


def logit_scale(method: str, mode: Optional[str] = None, init: Optional[float] = None,
                meta_lr: Optional[float] = None) -> dict:
    """``{"mode", "init", "meta_lr"}`` of a softmax's logit scale τ: the values given, else
    the method's :data:`LOGIT_SCALE`, else a fixed τ = 1.

    >>> logit_scale("ibaml", init=4.0)
    {'mode': 'predictive', 'init': 4.0, 'meta_lr': 0.03}
    """
    preset = {"mode": "fixed", "init": 1.0, "meta_lr": 1e-2, **LOGIT_SCALE.get(resolve(method, {})[0], {})}
    given = {"mode": mode, "init": init, "meta_lr": meta_lr}
    return {k: (v if v is not None else preset[k]) for k, v in given.items()}


def categorical_likelihood(scale: dict) -> CategoricalLikelihood:
    """The softmax ``p(y | f) = softmax(τ f)`` of a :func:`logit_scale` setting: τ fixed
    (``"fixed"``), a meta-parameter of inner and outer objectives (``"learned"``) or of the
    predictions only (``"predictive"``). Its meta learning rate goes to ``build_learner``
    through :func:`logit_scale_overrides`.

    >>> categorical_likelihood(logit_scale("maml")).scale_inner
    False
    """
    return CategoricalLikelihood(scale=scale["init"], learn_scale=scale["mode"] != "fixed",
                                 scale_inner=scale["mode"] != "predictive")


def logit_scale_overrides(scale: dict) -> dict:
    """``meta_lr_overrides`` entry of a learned logit scale (none for a fixed one).

    >>> logit_scale_overrides(logit_scale("imaml"))
    {'likelihood\\\\.scale': 0.03}
    """
    return {} if scale["mode"] == "fixed" else {r"likelihood\.scale": scale["meta_lr"]}


def image_inner_lr(method: str, dataset: str, ways: int, shots: int, inner_optimizer=None) -> Optional[float]:
    """The inner step size of an image run with ``inner_optimizer`` (default the method's): for
    SGD, MAML's step on the mean support cross-entropy, ``MAML_IMAGE_STEP[dataset] / (ways·shots)``
    on the summed NLL that the inner objective uses; 0.01 for Adam; ``None`` (the preset's)
    otherwise.

    >>> image_inner_lr("maml", "miniimagenet", 5, 1), image_inner_lr("imaml", "miniimagenet", 5, 1)
    (0.002, None)
    """
    optimizer = method_recipe(method, inner_optimizer=inner_optimizer or None).inner_optimizer
    if optimizer == "sgd":
        return MAML_IMAGE_STEP[dataset] / (ways * shots)
    return 0.01 if optimizer == "adam" else None


def image_learner(method: str, net: nn.Module, *, dataset: str, ways: int, shots: int,
                  inner_steps: Optional[int] = None, eval_inner_steps: Optional[int] = None,
                  inner_optimizer=None, inner_lr: Optional[float] = None, logit_scale_mode: Optional[str] = None,
                  logit_scale_init: Optional[float] = None, logit_scale_meta_lr: Optional[float] = None,
                  prior_meta_lr: Optional[float] = None, num_predictive_samples: int = 20,
                  **options) -> MetaLearner:
    """A :class:`MetaLearner` of ``method`` for ``ways``-way ``shots``-shot tasks of ``dataset``
    (``"miniimagenet"`` or ``"omniglot"``) with the network ``net`` (``ways`` outputs), every
    setting left at ``None`` taken from the presets:

    * the inner steps (:func:`ibaml.recipes.presets.inner_steps`) and the inner step size
      (:func:`image_inner_lr`, MAML's step for SGD);
    * a softmax likelihood with the method's logit scale (:func:`logit_scale` from
      ``logit_scale_mode``, ``logit_scale_init``, ``logit_scale_meta_lr``; on the device and in
      the dtype of ``net``), its meta learning rate through ``meta_lr_overrides``;
    * ``prior_meta_lr``: the meta learning rate of the prior's scales and precision (default:
      ``meta_lr``);
    * ``options`` go to :func:`ibaml.recipes.presets.build_learner` (``precision``, ``init_scale``,
      ``kl_weight``, ``cg_steps``, ``meta_lr``, ``seed``, ...; those given as ``None`` are left to
      the method's classification preset, :data:`ibaml.recipes.presets.CLASSIFICATION`).
    """
    steps, eval_steps = preset_inner_steps(method, inner_steps, eval_inner_steps, options.get("include"))
    scale = logit_scale(method, logit_scale_mode, logit_scale_init, logit_scale_meta_lr)
    first = next(net.parameters())
    likelihood = categorical_likelihood(scale).to(device=first.device, dtype=first.dtype)
    overrides = {**logit_scale_overrides(scale), **(options.pop("meta_lr_overrides", None) or {})}
    if prior_meta_lr is not None:
        overrides[r"prior\.(scale|precision)"] = prior_meta_lr
    if inner_lr is None:
        inner_lr = image_inner_lr(method, dataset, ways, shots, inner_optimizer)
    return build_learner(method, net, likelihood, inner_steps=steps, eval_inner_steps=eval_steps,
                         inner_optimizer=inner_optimizer, inner_lr=inner_lr, meta_lr_overrides=overrides or None,
                         num_predictive_samples=num_predictive_samples, num_classes=ways,
                         **{k: v for k, v in options.items() if v is not None})


def image_learner_from_config(config: dict, image_shape, device=None, dtype: Optional[torch.dtype] = None,
                              nonfinite: str = "skip") -> MetaLearner:
    """The :func:`image_learner` of an image run's configuration (``examples/miniimagenet.py``'s
    options by name, as its checkpoints' ``config`` holds them) on images of ``image_shape``
    ``(C, H, W)``: a :class:`~ibaml.core.nets.Conv4` with ``config["channels"]`` filters,
    ``config["ways"]`` outputs and ``config["activation"]`` / ``config["pool"]`` (default ReLU, max), drawn from ``config["seed"]`` (the global torch generator seeded
    with it), in ``dtype`` (default the configuration's) on ``device``; the method's presets
    for every option the configuration leaves at ``None`` or does not hold, and ``nonfinite``
    for tasks whose values are not finite (:class:`~ibaml.MetaLearner`).

    >>> config = {"method": "imaml", "dataset": "omniglot", "ways": 5, "shots": 1, "channels": 8,
    ...           "dtype": "float64", "seed": 0, "precision": 10.0}
    >>> learner = image_learner_from_config(config, (1, 28, 28))
    >>> float(learner.prior.precision), learner.model.net.head.out_features
    (10.0, 5)
    """
    channels, height, _ = image_shape
    torch.manual_seed(config["seed"])
    net = Conv4(in_channels=channels, hidden=config["channels"], out_dim=config["ways"], image_size=height,
                activation=config.get("activation") or "relu", pool=config.get("pool") or "max")
    option = config.get
    return image_learner(
        config["method"], net.to(device=device, dtype=dtype or getattr(torch, config["dtype"])),
        dataset=config["dataset"], ways=config["ways"], shots=config["shots"], inner_steps=option("inner_steps"),
        eval_inner_steps=option("eval_inner_steps"), inner_optimizer=option("inner_optimizer"),
        inner_lr=option("inner_lr"), logit_scale_mode=option("logit_scale"), logit_scale_init=option("logit_scale_init"),
        logit_scale_meta_lr=option("logit_scale_meta_lr"), prior_meta_lr=option("prior_meta_lr"),
        num_predictive_samples=option("predictive_samples", 20), precision=option("precision"),
        init_scale=option("init_scale"), kl_weight=option("kl_weight"), include=option("prior"),
        num_outer_samples=option("outer_samples"), outer=option("outer"), cg_steps=option("cg_steps"),
        cg_damping=option("cg_damping"), meta_lr=option("meta_lr"), chunk_size=option("chunk_size"),
        inner_support_size=option("inner_support_size"),
        seed=config["seed"], nonfinite=nonfinite)
