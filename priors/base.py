"""The ``Prior`` base class: a learnable prior p(w; θ) over some of a network's weights.

A prior is a :class:`pyro.nn.PyroModule` whose meta-parameters θ are constrained
``PyroParam``s (a scale is declared ``constraint=positive`` where it lives). Its Pyro
parameters are module-local (:class:`LocalPyroModule`): each prior reads its own tensors, not
Pyro's global param store, and the process-wide ``module_local_params`` setting stays as the
user set it. It covers a fixed, ordered set of named network tensors (its ``spec``); the weights those tensors
hold are the *task parameters* that the inner loop adapts, everything else in the
network is shared.

Contract for a custom prior (subclass ``Prior``):

* required: ``log_prob(params) -> Tensor`` (0-d): ``log p(w; θ)`` summed over all
  covered entries; ``params`` is a dict ``{name: tensor}`` with the spec's names and
  shapes (``self.flat(params)`` gives the flat vector ``w`` of length ``D``). MAP inference
  uses it as is (``G = NLL − log p``) and variational inference through the default
  ``kl``; the implicit gradient differentiates it twice, so it should be smooth in ``w``
  near the solutions.
* optional, each with a working default:

  - ``location()`` (flat ``[D]``): where the inner loop starts (the MAP weights, the
    variational means). Default: the network's initial weights; return a learnable mean
    to have the starting point meta-learnt.
  - ``precision_diag()`` (flat ``[D]`` or ``None``): a diagonal approximation of
    ``−∇² log p``. It preconditions conjugate gradient and gives a variational posterior
    its starting variance ``1/precision``. Default ``None``: no preconditioner, and
    ``q`` starts at ``Variational.init_variance``.
  - ``kl(mean, var, eps)``: ``KL(N(mean, diag var) ‖ p)``. Default: Monte Carlo with the
    given standard-normal draws ``eps [M, D]``. Override it with a closed form where one
    exists (exact and cheaper), and where the Monte Carlo estimate is poorly behaved: for a
    log-density with kinks (Laplace) it is piecewise linear in the mean and adds no
    curvature to the inner problem.
  - ``hyper_log_prob()``: a hyperprior ``log p(θ)``; :class:`ibaml.MetaLearner` adds
    ``−hyper_weight · log p(θ)`` to the meta-objective. Default 0.
  - ``rsample(n, generator)``: draws from the prior (not used in meta-training).

The algorithms call priors through :func:`torch.func.functional_call` with the meta-
parameters as an explicit dict, so every method must read θ from ``self`` (never
from a cache) and use tensor operations only; then the implicit gradient needs no
derivative written by hand. ``notebooks/custom_priors.ipynb`` writes a Laplace prior with
its closed-form KL and checks its implicit meta-gradient against finite differences.

Example
-------
>>> from pyro.distributions import constraints
>>> from pyro.nn import PyroParam
>>> net = torch.nn.Linear(3, 1)
>>> class Laplace(Prior):
...     def __init__(self, template, scale=1.0):
...         super().__init__(template)
...         self.loc = PyroParam(self.flat(template).clone())
...         self.scale = PyroParam(torch.full((self.dim,), scale), constraint=constraints.positive)
...     def location(self):
...         return self.loc
...     def log_prob(self, params):
...         w = self.flat(params)
...         return (-(w - self.loc).abs() / self.scale - torch.log(2 * self.scale)).sum()
>>> prior = Laplace.from_module(net)
>>> prior.log_prob(dict(net.named_parameters())).shape
torch.Size([])
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Mapping, Optional, Union

import pyro
import torch
from pyro.nn import PyroModule
from torch import Tensor

from .flatten import FlatSpec, ParamDict


NameFilter = Union[None, str, Iterable[str], Callable[[str], bool]]

LOG_2PI = math.log(2 * math.pi)


def check_positive(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive finite number (a scale, precision or df)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def select_names(names: Iterable[str], include: NameFilter) -> list:
    """Names kept by ``include``: ``None`` (all), a regular expression (``re.search``),
    a collection of exact names, or a predicate ``name -> bool``."""
    names = list(names)
    if include is None:
        kept = names
    elif isinstance(include, str):
        pattern = re.compile(include)
        kept = [n for n in names if pattern.search(n)]
    elif callable(include):
        kept = [n for n in names if include(n)]
    else:
        wanted = list(include)
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ValueError(f"include names {missing} are not parameters of the module; it has {names}")
        kept = [n for n in names if n in set(wanted)]
    if not kept:
        raise ValueError(f"include={include!r} selects no parameter; the module has {names}")
    return kept


def last_layer(module: torch.nn.Module) -> list:
    """Names of the parameters of ``module``'s last submodule that holds parameters of its own
    (in registration order): the output layer of an MLP or the classifier of a Conv4, the
    "head" that a prior over the head alone adapts per task while the rest is shared.

    >>> last_layer(torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)))
    ['2.weight', '2.bias']
    """
    owners = [(name, m) for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError(f"{type(module).__name__} has no parameters")
    prefix, last = owners[-1]
    return [f"{prefix}.{n}" if prefix else n for n, _ in last.named_parameters(recurse=False)]


def diag_gaussian_log_prob(w: Tensor, loc: Tensor, var: Tensor) -> Tensor:
    """``Σ_i log N(w_i; loc_i, var_i) = −½ Σ_i [(w_i − loc_i)²/var_i + log var_i + log 2π]``."""
    return -0.5 * (((w - loc) ** 2) / var + torch.log(var) + LOG_2PI).sum()


def diag_gaussian_kl(mean: Tensor, var: Tensor, loc: Tensor, prior_var: Tensor) -> Tensor:
    """``KL(N(m, diag s) ‖ N(μ, diag σ²)) = ½ Σ_i [s_i/σ_i² + (m_i − μ_i)²/σ_i² − 1 + log σ_i² − log s_i]``."""
    return 0.5 * (var / prior_var + (mean - loc) ** 2 / prior_var - 1.0 + torch.log(prior_var) - torch.log(var)).sum()


class LocalPyroModule(PyroModule):
    """A :class:`pyro.nn.PyroModule` whose Pyro parameters are module-local without a
    process-wide switch: it is built and called under
    ``pyro.settings.context(module_local_params=True)``, which restores the setting after.

    In Pyro's default (global) mode, a ``PyroParam`` read inside a module's ``__call__`` goes
    through the global param store under the attribute's name: two priors with a ``loc``
    would share one value, and the tensors that :func:`torch.func.functional_call`
    substitutes would be replaced by the stored ones. With module-local parameters each
    module reads its own tensors (in ``parameters()``, ``state_dict()``, copies), so the
    meta-parameters passed as a dict are the ones used and differentiated. Pyro fixes a
    module's call context when the module is built and consults the setting when a call
    enters and leaves it, hence ``__init__`` and ``__call__`` are both wrapped; outside a
    call (``prior.log_prob(w)``) a ``PyroParam`` reads the module's own tensor in either mode.

    A ``LocalPyroModule`` placed inside another ``PyroModule`` shares that module's call
    context; build the outer module under the same setting
    (``with pyro.settings.context(module_local_params=True): ...``).
    """

    def __init__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            super().__init__(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)


class Prior(LocalPyroModule):
    """Base class of learnable priors over the weights named in ``template``.

    Args:
        template: dict ``{name: tensor}`` of the covered network tensors; their names
            and shapes fix the layout, their values the default location (the
            network's initial weights).
    """

    def __init__(self, template: Mapping[str, Tensor]):

        super().__init__()
        if not template:
            raise ValueError("a prior must cover at least one parameter tensor")
        self.spec = FlatSpec.from_dict(template)
        self.register_buffer("initial_weights", self.spec.flatten({k: v.detach() for k, v in template.items()}).clone())

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_module(cls, module: torch.nn.Module, include: NameFilter = None, **kwargs) -> "Prior":
        """A prior over ``module``'s parameters selected by ``include`` (default: all),
        located at their current values. Extra keyword arguments go to the family."""
        params = dict(module.named_parameters())
        names = select_names(params, include)
        return cls({n: params[n].detach().clone() for n in names}, **kwargs)

    # ------------------------------------------------------------------- layout
    @property
    def names(self) -> tuple:
        """Names of the covered network tensors, in flattening order."""
        return self.spec.names

    @property
    def dim(self) -> int:
        """Number of covered weights ``D``."""
        return self.spec.size

    def flat(self, params: Union[Mapping[str, Tensor], Tensor]) -> Tensor:
        """The flat vector ``w [D]`` of a parameter dict (a flat tensor is returned as is)."""
        if isinstance(params, Tensor):
            return params
        missing = [n for n in self.spec.names if n not in params]
        if missing:
            raise KeyError(f"parameters {missing} covered by the prior are missing")
        return self.spec.flatten(params)

    def unflat(self, w: Tensor) -> ParamDict:
        """The parameter dict (views) of a flat vector ``w [D]``."""
        return self.spec.unflatten(w)

    # ------------------------------------------------------------------- the contract
    def forward(self, method: str, *args, **kwargs):
        """``prior(method, *args)`` calls ``prior.method(*args)``; this lets
        :func:`torch.func.functional_call` evaluate any method at given meta-parameters."""
        return getattr(self, method)(*args, **kwargs)

    def log_prob(self, params) -> Tensor:
        """``log p(w; θ)`` summed over all covered weights (0-d tensor)."""
        raise NotImplementedError(f"{type(self).__name__} must implement log_prob(params)")

    def location(self) -> Tensor:
        """Flat ``[D]`` starting point of the inner loop (default: the initial weights)."""
        return self.initial_weights

    def precision_diag(self) -> Optional[Tensor]:
        """Flat ``[D]`` diagonal of the prior precision ``−∇² log p`` (or an approximation),
        used as a preconditioner; ``None`` when unknown."""
        return None

    def precision_matrix(self) -> Optional[Tensor]:
        """The dense ``[D, D]`` prior precision ``−∇² log p`` of a Gaussian prior, for a posterior
        with a full covariance (:class:`ibaml.core.inference.FullCovariance`); default
        ``diag(precision_diag())``, exact for a diagonal family (``None`` where that is unknown).
        Families with correlations override it."""
        diag = self.precision_diag()
        return None if diag is None else torch.diag_embed(diag)

    def kl(self, mean, var, eps: Optional[Tensor] = None) -> Tensor:
        """``KL(q ‖ p)`` for ``q = N(mean, diag var)`` by Monte Carlo with fixed draws:

            KL ≈ (1/M) Σ_j [log q(w_j) − log p(w_j)],   w_j = mean + sqrt(var) ⊙ ε_j

        ``eps [M, D]`` are standard-normal draws (held fixed so the estimate is a smooth
        function of ``mean``, ``var`` and θ). Gaussian families override this with the
        closed form."""
        mean, var = self.flat(mean), self.flat(var)
        if eps is None:
            raise ValueError(f"{type(self).__name__}.kl has no closed form: pass standard-normal draws eps [M, D]")
        samples = mean + torch.sqrt(var) * eps
        log_q = torch.func.vmap(lambda w: diag_gaussian_log_prob(w, mean, var))(samples)
        log_p = torch.func.vmap(lambda w: self.log_prob(self.unflat(w)))(samples)
        return (log_q - log_p).mean()

    def hyper_log_prob(self) -> Tensor:
        """Hyperprior ``log p(θ)`` (0 when the prior has none)."""
        return self.initial_weights.new_zeros(())

    def rsample(self, n: int, generator: Optional[torch.Generator] = None) -> ParamDict:
        """``n`` reparameterised draws, as a dict of ``[n, *shape]`` tensors."""
        raise NotImplementedError(f"{type(self).__name__} does not implement rsample")

    def _standard_normal(self, *shape, generator=None) -> Tensor:
        w = self.initial_weights
        return torch.randn(*shape, dtype=w.dtype, device=w.device, generator=generator)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tensors={len(self.names)}"
