"""``TaskModel``: a network, a prior over (some of) its weights and a likelihood, exposed
as pure functions of an explicit meta-parameter dict.

The prior covers the network tensors named by ``prior.names``; their values ``w`` (a flat
vector ``[D]``) are the task parameters that the inner loop adapts. Every other
learnable tensor — the prior's own parameters, network weights the prior does not
cover (a shared body), a learnable likelihood noise — is a meta-parameter θ. The dict
``model.meta_parameters()`` names them ``"prior.*"``, ``"net.*"``, ``"likelihood.*"``.

Example
-------
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
>>> model = TaskModel(net, DiagonalGaussian.from_module(net), GaussianLikelihood(0.1))
>>> meta = model.meta_parameters()
>>> w = model.prior_location(meta)
>>> model.log_likelihood(meta, w, torch.zeros(5, 1), torch.zeros(5, 1)).shape
torch.Size([5])
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn
from torch.func import functional_call

from priors.base import Prior

from ibaml.core.likelihoods import Likelihood


def _head_module(net: nn.Module) -> Optional[nn.Linear]:
    """The network's linear head: ``net.head`` where ``net.embed`` exists (``forward(x) =
    head(embed(x))``), or the last layer of an ``nn.Sequential`` ending in ``nn.Linear``."""
    head = getattr(net, "head", None)
    if isinstance(head, nn.Linear) and callable(getattr(net, "embed", None)):
        return head
    if isinstance(net, nn.Sequential) and len(net) > 1 and isinstance(net[-1], nn.Linear):
        return net[-1]
    return None


def embed(net: nn.Module, x: Tensor) -> Tensor:
    """The input of :func:`_head_module`'s head: ``net.embed(x)``, or all layers but the last."""
    if callable(getattr(net, "embed", None)):
        return net.embed(x)
    for layer in list(net)[:-1]:
        x = layer(x)
    return x


class HeadKeys(NamedTuple):
    """Names of a linear head's tensors: ``weight``, ``bias`` (or ``None``) and, for a
    :class:`ibaml.core.nets.NoiseHead`, ``log_noise`` (else ``None``)."""

    weight: str
    bias: Optional[str]
    log_noise: Optional[str] = None


def _head_only(net: nn.Module, names) -> Optional[HeadKeys]:
    """The :class:`HeadKeys` when ``names`` are exactly the parameters of the network's linear
    head (:func:`_head_module`); else ``None``."""
    head = _head_module(net)
    if head is None:
        return None
    prefix = next((n for n, m in net.named_modules() if m is head), None)
    if prefix is None:
        return None
    keys = HeadKeys(f"{prefix}.weight", f"{prefix}.bias" if head.bias is not None else None,
                    f"{prefix}.log_noise" if isinstance(getattr(head, "log_noise", None), torch.Tensor) else None)
    return keys if set(names) == {k for k in keys if k is not None} else None


def _head_apply(keys: HeadKeys, features: Tensor, p) -> Tensor:
    """The head's outputs ``[N, C]`` from its input ``features [N, F]`` and tensors ``p``."""
    out = Fn.linear(features, p[keys.weight], p.get(keys.bias))
    if keys.log_noise is None:
        return out
    return torch.cat([out, p[keys.log_noise].expand(*out.shape[:-1], -1)], dim=-1)


class TaskModel(nn.Module):
    """Network + prior + likelihood; see the module docstring.

    Args:
        net: any ``nn.Module`` that works with ``torch.func.functional_call`` (no running
            batch-norm statistics).
        prior: a :class:`priors.Prior` built over ``net``'s parameters.
        likelihood: a :class:`ibaml.core.likelihoods.Likelihood`.
    """

    def __init__(self, net: nn.Module, prior: Prior, likelihood: Likelihood):
        super().__init__()
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a priors.Prior, got {type(prior).__name__}")
        net_params = dict(net.named_parameters())
        unknown = [n for n in prior.names if n not in net_params]
        if unknown:
            raise ValueError(f"the prior covers {unknown}, which are not parameters of the network")
        for n in prior.names:
            if tuple(net_params[n].shape) != tuple(prior.spec.shapes[prior.names.index(n)]):
                raise ValueError(f"prior shape for {n!r} does not match the network's {tuple(net_params[n].shape)}")
        self.net = net
        self.prior = prior
        self.likelihood = likelihood
        self._task_names = {"net." + n for n in prior.names}
        self._head_keys = _head_only(net, prior.names)

    # ------------------------------------------------------------------ meta-parameters
    def meta_parameters(self) -> Dict[str, nn.Parameter]:
        """All learnable tensors except the task weights the prior covers."""
        return {n: p for n, p in self.named_parameters() if n not in self._task_names}

    def forward(self, method: str, *args, **kwargs):
        """Dispatch used by :func:`torch.func.functional_call` (``model(method, *args)``)."""
        return getattr(self, method)(*args, **kwargs)

    def _call(self, meta, method, *args):
        return functional_call(self, meta, (method,) + args)

    # ------------------------------------------------------------------ evaluated at θ = meta
    def _net_output(self, w: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.net, self.prior.unflat(w), (x,))

    def _points_log_prob(self, output: Tensor, y: Tensor, predictive: bool = False, noise_ratio=None) -> Tensor:
        if noise_ratio is not None:
            return self.likelihood.predictive_log_prob_points(output, y, noise_ratio)
        if predictive:
            return self.likelihood.predictive_log_prob_points(output, y)
        return self.likelihood.log_prob_points(output, y)

    def _log_likelihood(self, w: Tensor, x: Tensor, y: Tensor, predictive: bool = False, noise_ratio=None) -> Tensor:
        return self._points_log_prob(self._net_output(w, x), y, predictive, noise_ratio)

    def _net_outputs(self, weights: Tensor, x: Tensor) -> Tensor:
        if self._head_keys is None:
            return torch.func.vmap(lambda w: self._net_output(w, x))(weights)
        features = embed(self.net, x)                  # once for every draw of the head
        keys = self._head_keys
        return torch.func.vmap(lambda w: _head_apply(keys, features, self.prior.unflat(w)))(weights)

    def _head_mean_outputs(self, mean: Tensor, x: Tensor):
        keys = self._require_head()
        features = embed(self.net, x)                                  # [N, F]
        return features, _head_apply(keys, features, self.prior.unflat(mean))   # [N, C]

    def _head_statistics(self, mean: Tensor, var: Tensor, x: Tensor):
        features, out_mean = self._head_mean_outputs(mean, x)
        return out_mean, _head_apply(self._head_keys, features ** 2, self.prior.unflat(var))   # [N, C] each

    def _linearized_nll(self, mean: Tensor, var: Tensor, x: Tensor, y: Tensor) -> Tensor:
        features, out_mean = self._head_mean_outputs(mean, x)             # one pass of the body
        keys = self._head_keys
        lam = self.likelihood.output_curvature(out_mean)              # [N, C]
        s = self.prior.unflat(var)
        c = s[keys.weight].shape[0]                                    # outputs of the linear part
        h_weight = lam[:, :c].transpose(-1, -2) @ features ** 2        # [c, F]: Σ_n λ_nc φ_nf²
        term = (s[keys.weight] * h_weight).sum()
        if keys.bias is not None:
            term = term + (s[keys.bias] * lam[:, :c].sum(0)).sum()
        if keys.log_noise is not None:
            term = term + (s[keys.log_noise] * lam[:, c:].sum(0)).sum()
        return -self.likelihood.log_prob_points(out_mean, y).sum() + 0.5 * term

    def _head_jacobian(self, x: Tensor) -> Tensor:
        keys = self._require_head()
        features = embed(self.net, x)                                  # [N, F]
        zero = features.new_zeros(self.prior.dim)                      # the head is linear: J at any w
        return torch.func.jacrev(lambda w: _head_apply(keys, features, self.prior.unflat(w)))(zero)

    def _require_head(self):
        if self._head_keys is None:
            raise ValueError("this computation needs a prior over exactly the network's linear head (net.head, "
                             "with net.embed), e.g. include=priors.last_layer(net); this prior covers "
                             f"{list(self.prior.names)}")
        return self._head_keys

    def _log_likelihood_samples(self, weights: Tensor, x: Tensor, y: Tensor, predictive: bool = False,
                                noise_ratio=None) -> Tensor:
        outputs = self._net_outputs(weights, x)
        return torch.func.vmap(lambda o: self._points_log_prob(o, y, predictive, noise_ratio))(outputs)

    def _prior(self, method: str, *args):
        return getattr(self.prior, method)(*args)

    def _likelihood(self, method: str, *args):
        return getattr(self.likelihood, method)(*args)

    # ------------------------------------------------------------------ public pure functions
    def net_output(self, meta, w: Tensor, x: Tensor) -> Tensor:
        """``f(x; w, θ)``: the network with task weights ``w [D]`` and shared weights from θ."""
        return self._call(meta, "_net_output", w, x)

    def log_likelihood(self, meta, w: Tensor, x: Tensor, y: Tensor, predictive: bool = False,
                       noise_ratio=None) -> Tensor:
        """Per-point ``log p(y_n | f(x_n; w), θ)`` ``[N]``; with ``predictive=True`` the likelihood
        of predictions (:meth:`Likelihood.predictive_log_prob_points`, the outer objectives'), and
        with a ``noise_ratio`` that of a task's inferred noise
        (:class:`ibaml.ConjugateNoiseGaussianLikelihood`)."""
        return self._call(meta, "_log_likelihood", w, x, y, predictive, noise_ratio)

    def net_outputs(self, meta, weights: Tensor, x: Tensor) -> Tensor:
        """``f(x; w_j, θ)`` for draws ``weights [S, D]``: ``[S, N, ...]``. Where the prior covers
        exactly the network's linear head (``net.head`` with ``net.embed(x)``, ``forward(x) =
        head(embed(x))``, as in :class:`ibaml.core.nets.MLP` and :class:`ibaml.core.nets.Conv4`; or the
        last layer of an ``nn.Sequential``), the shared features are computed once for all draws."""
        return self._call(meta, "_net_outputs", weights, x)

    def log_likelihood_samples(self, meta, weights: Tensor, x: Tensor, y: Tensor, predictive: bool = False,
                               noise_ratio=None) -> Tensor:
        """``log p(y_n | f(x_n; w_j), θ)`` for draws ``weights [S, D]``: ``[S, N]`` (``predictive`` and
        ``noise_ratio`` as in :meth:`log_likelihood`)."""
        return self._call(meta, "_log_likelihood_samples", weights, x, y, predictive, noise_ratio)

    def head_outputs(self, meta, mean: Tensor, var: Tensor, x: Tensor):
        """Mean and variance ``[N, C]`` of a linear head's outputs under ``N(mean, diag var)``:
        ``φ(x) m_W + m_b`` and ``φ(x)² s_W + s_b`` (``φ = net.embed``), followed for a
        :class:`ibaml.core.nets.NoiseHead` by ``m_g`` and ``s_g``."""
        return self._call(meta, "_head_statistics", mean, var, x)

    def head_jacobian(self, meta, x: Tensor) -> Tensor:
        """``J = ∂f(x_n; w)/∂w`` ``[N, C, D]`` of a linear head over the prior's flat weights
        (``f = J w``: ``φ(x_n)`` in a weight's entries, 1 in its bias'), at the features of θ."""
        return self._call(meta, "_head_jacobian", x)

    def linearized_nll(self, meta, mean: Tensor, var: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``NLL(m) + ½ Σ_i s_i h_i``: the second-order expansion of ``E_q[−Σ_n log p(y_n | f(x_n; w))]``
        for a linear head, with ``h = Σ_n J_nᵀ Λ_n J_n`` on the diagonal, the Gauss–Newton
        curvature of the NLL in the head's weights at ``mean`` (``Λ = output_curvature``):
        ``h_{c,f} = Σ_n Λ_nc φ_nf²``, ``h_c = Σ_n Λ_nc`` for the bias. The body runs once."""
        return self._call(meta, "_linearized_nll", mean, var, x, y)

    def prior_call(self, meta, method: str, *args):
        """``prior.method(*args)`` evaluated at the meta-parameters ``meta``: the generic form of
        the named calls below (``prior_location``, ``prior_log_prob``, ...), for a custom
        prior's own methods."""
        return self._call(meta, "_prior", method, *args)

    def likelihood_call(self, meta, method: str, *args):
        """``likelihood.method(*args)`` evaluated at the meta-parameters ``meta``: the generic
        form of the named calls below (``likelihood_noise_ratio``, ...)."""
        return self._call(meta, "_likelihood", method, *args)

    # ------------------------------------------------------------------ named prior and likelihood calls
    def prior_location(self, meta):
        """The prior's location ``μ(θ)`` ``[D]``, the inner loop's start. At the meta-parameters ``meta``."""
        return self.prior_call(meta, "location")

    def prior_log_prob(self, meta, w: Tensor):
        """``log p(w; θ)`` (0-d). At the meta-parameters ``meta``."""
        return self.prior_call(meta, "log_prob", w)

    def prior_precision_diag(self, meta):
        """The prior precision's diagonal ``[D]`` (``None`` where unknown). At the meta-parameters ``meta``."""
        return self.prior_call(meta, "precision_diag")

    def prior_precision_matrix(self, meta):
        """The dense prior precision ``[D, D]`` (``None`` where unknown). At the meta-parameters ``meta``."""
        return self.prior_call(meta, "precision_matrix")

    def prior_kl(self, meta, mean: Tensor, var: Tensor, eps: Optional[Tensor] = None):
        """``KL(N(mean, diag var) ‖ p(·; θ))`` (closed form, or by the draws ``eps``). At the meta-parameters ``meta``."""
        return self.prior_call(meta, "kl", mean, var, eps)

    def prior_hyper_log_prob(self, meta):
        """The hyperprior's ``log p(θ)`` (0 where there is none). At the meta-parameters ``meta``."""
        return self.prior_call(meta, "hyper_log_prob")

    def likelihood_squared_deviation(self, meta, output: Tensor, y: Tensor):
        """``Σ_d (y_d − f_d)²/σ²`` per point ``[N]``. At the meta-parameters ``meta``."""
        return self.likelihood_call(meta, "squared_deviation", output, y)

    def likelihood_noise_ratio(self, meta, data_deviation: Tensor, prior_deviation: Tensor, num_entries: int):
        """A task's noise-variance ratio (:attr:`Likelihood.infers_task_noise`). At the meta-parameters ``meta``."""
        return self.likelihood_call(meta, "noise_ratio", data_deviation, prior_deviation, num_entries)

    def likelihood_output_curvature(self, meta, output: Tensor):
        """``−∂² log p(y | f)/∂f²`` per output entry. At the meta-parameters ``meta``."""
        return self.likelihood_call(meta, "output_curvature", output)

    def likelihood_log_prob_gaussian_outputs(self, meta, mean: Tensor, var: Tensor, y: Tensor, *noise_ratio):
        """Per-point log density for Gaussian outputs ``N(mean, var)``. At the meta-parameters ``meta``."""
        return self.likelihood_call(meta, "log_prob_gaussian_outputs", mean, var, y, *noise_ratio)

    def likelihood_predictive_gaussian_outputs(self, meta, mean: Tensor, var: Tensor, *noise_ratio):
        """The exact predictive for Gaussian outputs ``N(mean, var)``. At the meta-parameters ``meta``."""
        return self.likelihood_call(meta, "predictive_gaussian_outputs", mean, var, *noise_ratio)

    def likelihood_predictive(self, meta, outputs: Tensor, *noise_ratio):
        """The predictive from output draws ``[S, N, ...]``. At the meta-parameters ``meta``."""
        return self.likelihood_call(meta, "predictive", outputs, *noise_ratio)
