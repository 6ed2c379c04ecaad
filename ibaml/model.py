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
>>> w = model.prior_call(meta, "location")
>>> model.log_likelihood(meta, w, torch.zeros(5, 1), torch.zeros(5, 1)).shape
torch.Size([5])
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn
from torch.func import functional_call

from priors.base import Prior

from .likelihoods import Likelihood


class TaskModel(nn.Module):
    """Network + prior + likelihood; see the module docstring.

    Args:
        net: any ``nn.Module`` that works with ``torch.func.functional_call`` (no running
            batch-norm statistics).
        prior: a :class:`priors.Prior` built over ``net``'s parameters.
        likelihood: a :class:`ibaml.likelihoods.Likelihood`.
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

    def _log_likelihood(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.likelihood.log_prob_points(self._net_output(w, x), y)

    def _prior(self, method: str, *args):
        return getattr(self.prior, method)(*args)

    def _likelihood(self, method: str, *args):
        return getattr(self.likelihood, method)(*args)

    # ------------------------------------------------------------------ public pure functions
    def net_output(self, meta, w: Tensor, x: Tensor) -> Tensor:
        """``f(x; w, θ)``: the network with task weights ``w [D]`` and shared weights from θ."""
        return self._call(meta, "_net_output", w, x)

    def log_likelihood(self, meta, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-point ``log p(y_n | f(x_n; w), θ)`` ``[N]``."""
        return self._call(meta, "_log_likelihood", w, x, y)

    def prior_call(self, meta, method: str, *args):
        """``prior.method(*args)`` evaluated at the meta-parameters ``meta``."""
        return self._call(meta, "_prior", method, *args)

    def likelihood_call(self, meta, method: str, *args):
        """``likelihood.method(*args)`` evaluated at the meta-parameters ``meta``."""
        return self._call(meta, "_likelihood", method, *args)
