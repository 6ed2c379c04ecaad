"""Gaussian prior families: isotropic (iMAML), diagonal (iBaML), layer-wise, low-rank.

Each holds its meta-parameters as ``PyroParam``s (variances and precisions constrained
positive), has the closed-form KL from a mean-field Gaussian, and can carry a
:class:`GaussianHyperprior`.

Example
-------
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
>>> prior = DiagonalGaussian.from_module(net, init_scale=0.1)
>>> prior.log_prob(dict(net.named_parameters())).shape
torch.Size([])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch import Tensor

from .base import LOG_2PI, Prior, check_positive, diag_gaussian_kl, diag_gaussian_log_prob


@dataclass(frozen=True)
class GaussianHyperprior:
    """Hyperprior on a Gaussian prior's meta-parameters (as in iBaML / ABML):

        μ_i ~ N(0, loc_scale²),   1/σ_i² ~ Gamma(concentration, rate)

        log p(θ) = Σ_i [log N(μ_i; 0, loc_scale²) + log Gamma(1/σ_i²; a, b)]

    ``loc_scale=None`` leaves the means without hyperprior.
    """

    loc_scale: Optional[float] = None
    concentration: float = 1.0
    rate: float = 0.01

    def __post_init__(self):
        if self.loc_scale is not None:
            check_positive("GaussianHyperprior loc_scale", self.loc_scale)
        check_positive("GaussianHyperprior concentration", self.concentration)
        check_positive("GaussianHyperprior rate", self.rate)

    def log_prob(self, loc: Tensor, precision: Tensor) -> Tensor:
        a, b = self.concentration, self.rate
        out = (a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(precision) - b * precision).sum()
        if self.loc_scale is not None:
            out = out + diag_gaussian_log_prob(loc, torch.zeros_like(loc), torch.full_like(loc, self.loc_scale ** 2))
        return out


class _GaussianPrior(Prior):
    """Shared parts: a learnable mean ``loc [D]`` and a diagonal variance ``variance() [D]``."""

    def __init__(self, template: Mapping[str, Tensor], learn_loc: bool = True,
                 hyperprior: Optional[GaussianHyperprior] = None):
        super().__init__(template)
        loc = self.initial_weights.clone()
        if learn_loc:
            self.loc = PyroParam(loc)
        else:
            self.register_buffer("loc", loc)
        self.hyperprior = hyperprior

    def variance(self) -> Tensor:
        raise NotImplementedError

    def location(self) -> Tensor:
        return self.loc

    def log_prob(self, params) -> Tensor:
        """``Σ_i log N(w_i; μ_i, σ_i²)``."""
        return diag_gaussian_log_prob(self.flat(params), self.loc, self.variance())

    def precision_diag(self) -> Tensor:
        """``1/σ²`` (flat ``[D]``)."""
        return 1.0 / self.variance()

    def kl(self, mean, var, eps: Optional[Tensor] = None) -> Tensor:
        """Closed form ``½ Σ_i [s_i/σ_i² + (m_i − μ_i)²/σ_i² − 1 + log σ_i² − log s_i]``
        (``eps`` is ignored)."""
        return diag_gaussian_kl(self.flat(mean), self.flat(var), self.loc, self.variance())

    def hyper_log_prob(self) -> Tensor:
        if self.hyperprior is None:
            return self.loc.new_zeros(())
        return self.hyperprior.log_prob(self.loc, 1.0 / self.variance())

    def rsample(self, n: int, generator: Optional[torch.Generator] = None):
        """``w = μ + σ ⊙ ε``, ``ε ~ N(0, I)``."""
        eps = self._standard_normal(n, self.dim, generator=generator)
        w = self.loc + torch.sqrt(self.variance()) * eps
        return torch.func.vmap(self.unflat)(w)


class IsotropicGaussian(_GaussianPrior):
    """iMAML's prior ``N(μ, λ⁻¹ I)``: one precision ``λ`` for every weight.

    The MAP inner objective is then ``NLL(w) + (λ/2)||w − μ||²`` (up to a constant),
    the proximal regulariser of iMAML.

    Args:
        precision: ``λ > 0``.
        learn_precision: learn ``λ`` (a positive ``PyroParam``) or keep it fixed.
    """

    def __init__(self, template, precision: float = 1.0, learn_precision: bool = False, **kwargs):
        check_positive("IsotropicGaussian precision", precision)
        super().__init__(template, **kwargs)
        lam = torch.tensor(float(precision), dtype=self.initial_weights.dtype)
        if learn_precision:
            self.precision = PyroParam(lam, constraint=constraints.positive)
        else:
            self.register_buffer("precision", lam)

    def variance(self) -> Tensor:
        return (1.0 / self.precision).expand(self.dim)

    def log_prob(self, params) -> Tensor:
        """``−(λ/2)||w − μ||² + (D/2)(log λ − log 2π)``."""
        w = self.flat(params)
        lam = self.precision
        return -0.5 * lam * ((w - self.loc) ** 2).sum() + 0.5 * self.dim * (torch.log(lam) - LOG_2PI)


def initial_scales(prior, init_scale=0.1, relative_scale: Optional[float] = None, family: str = "") -> Tensor:
    """Flat ``[D]`` initial standard deviations of a prior over ``prior.names``.

    ``init_scale`` is one number for every weight or a dict ``{tensor name: scale}``, a scale
    being a number or a tensor of the named tensor's shape (one per entry; tensors it does not
    name raise); ``relative_scale = r`` instead sets each tensor's scale to ``r``
    times the root-mean-square of its initial weights, ``σ_t = r · sqrt(mean_i w_{t,i}²)``,
    so that the weight noise is the same fraction of every layer's weights (a tensor whose
    initial weights are all zero gets ``init_scale``).
    """
    w = prior.initial_weights
    segment = prior.spec.segment_ids().to(w.device)
    if relative_scale is not None:
        check_positive(f"{family} relative_scale".strip(), relative_scale)
        rms = torch.zeros(len(prior.names), dtype=w.dtype, device=w.device).index_add_(0, segment, w ** 2)
        rms = (rms / torch.tensor(prior.spec.numels, dtype=w.dtype, device=w.device)).sqrt()
        fallback = float(init_scale) if not isinstance(init_scale, Mapping) else 0.1
        per_tensor = torch.where(rms > 0, relative_scale * rms, torch.full_like(rms, fallback))
        return per_tensor[segment]
    if isinstance(init_scale, Mapping):
        missing = [n for n in prior.names if n not in init_scale]
        if missing:
            raise ValueError(f"init_scale names no scale for {missing}")
        pieces = []
        for n, shape in zip(prior.names, prior.spec.shapes):
            label = f"{family} init_scale[{n!r}]".strip()
            value = init_scale[n]
            if isinstance(value, Tensor):      # one scale per entry of the tensor
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"{label} has shape {tuple(value.shape)}, the tensor {tuple(shape)}")
                if not bool(torch.isfinite(value).all() and (value > 0).all()):
                    raise ValueError(f"{label} must hold positive finite numbers")
                pieces.append(value.detach().to(dtype=w.dtype, device=w.device).reshape(-1))
            else:
                check_positive(label, value)
                pieces.append(torch.full((math.prod(shape),), float(value), dtype=w.dtype, device=w.device))
        return torch.cat(pieces)
    check_positive(f"{family} init_scale".strip(), init_scale)
    return torch.full_like(w, float(init_scale))


class DiagonalGaussian(_GaussianPrior):
    """iBaML's non-isotropic prior ``N(μ, diag σ²)`` with a mean and a variance per weight.

    Args:
        init_scale: initial standard deviation ``σ``: one number for all weights, or a dict
            ``{tensor name: σ}``.
        relative_scale: if given, each tensor's initial ``σ`` is this fraction of the
            root-mean-square of its initial weights (see :func:`initial_scales`).

    >>> net = torch.nn.Linear(4, 2)
    >>> DiagonalGaussian.from_module(net, init_scale={"weight": 0.01, "bias": 0.1}).scale[-2:]
    tensor([0.1000, 0.1000], grad_fn=<SliceBackward0>)
    """

    def __init__(self, template, init_scale=0.1, relative_scale: Optional[float] = None, **kwargs):
        super().__init__(template, **kwargs)
        scales = initial_scales(self, init_scale, relative_scale, family="DiagonalGaussian")
        self.scale = PyroParam(scales, constraint=constraints.positive)

    def variance(self) -> Tensor:
        return self.scale ** 2


class LayerwiseGaussian(_GaussianPrior):
    """``N(μ, diag σ²)`` with one scale per covered tensor: ``σ_i = scale[tensor(i)]``.

    Args:
        init_scale: initial standard deviation of every tensor.
    """

    def __init__(self, template, init_scale: float = 0.1, **kwargs):
        check_positive("LayerwiseGaussian init_scale", init_scale)
        super().__init__(template, **kwargs)
        self.register_buffer("segment", self.spec.segment_ids().to(self.initial_weights.device))
        self.scale = PyroParam(torch.full((len(self.names),), float(init_scale), dtype=self.initial_weights.dtype),
                               constraint=constraints.positive)

    def variance(self) -> Tensor:
        return self.scale[self.segment] ** 2


class LowRankGaussian(_GaussianPrior):
    """``N(μ, Σ)`` with ``Σ = diag(d) + U Uᵀ``, ``U [D, r]``: correlations of rank ``r``.

    Uses ``torch.distributions.LowRankMultivariateNormal`` (Woodbury identities, cost
    ``O(D r²)``). The preconditioner is the exact precision diagonal

        diag(Σ⁻¹) = 1/d − rowsum((L⁻¹ Uᵀ D⁻¹)ᵀ²),   L Lᵀ = I + Uᵀ D⁻¹ U,

    and the closed-form KL from ``q = N(m, diag s)`` is

        KL = ½ [Σ_i (Σ⁻¹)_ii s_i − D − Σ_i log s_i] − log N(m; μ, Σ) − (D/2) log 2π.

    Host synchronisation: the precision diagonal uses ``cholesky_ex`` (no error check), but
    ``log_prob`` goes through ``LowRankMultivariateNormal``, whose Cholesky factorisation of
    the capacitance checks for errors and so synchronises a CUDA device once per evaluation
    (on the CPU it reads nothing back); the other priors read nothing on either device.

    Args:
        rank: ``r``.
        init_scale: initial ``sqrt(d)``.
        init_factor_scale: standard deviation of the random initial ``U`` entries
            (a zero ``U`` is a stationary point of the meta-objective in ``U``).
        seed: seed of the initial ``U``.
    """

    def __init__(self, template, rank: int = 2, init_scale: float = 0.1, init_factor_scale: float = 1e-2,
                 seed: int = 0, **kwargs):
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LowRankGaussian rank must be a positive integer, got {rank!r}")
        check_positive("LowRankGaussian init_scale", init_scale)
        check_positive("LowRankGaussian init_factor_scale", init_factor_scale)
        super().__init__(template, **kwargs)
        w = self.initial_weights
        g = torch.Generator().manual_seed(seed)
        factor = torch.randn(self.dim, int(rank), generator=g, dtype=w.dtype) * init_factor_scale
        self.cov_factor = PyroParam(factor.to(w.device))
        self.cov_diag = PyroParam(torch.full_like(w, float(init_scale) ** 2), constraint=constraints.positive)

    def _distribution(self):
        return torch.distributions.LowRankMultivariateNormal(self.loc, self.cov_factor, self.cov_diag,
                                                             validate_args=False)

    def variance(self) -> Tensor:
        """Marginal variances ``d + rowsum(U²)``."""
        return self.cov_diag + (self.cov_factor ** 2).sum(-1)

    def log_prob(self, params) -> Tensor:
        return self._distribution().log_prob(self.flat(params))

    def precision_diag(self) -> Tensor:
        U, d = self.cov_factor, self.cov_diag
        W = U / d.unsqueeze(-1)
        capacitance = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device) + U.transpose(-1, -2) @ W
        L = torch.linalg.cholesky_ex(capacitance)[0]   # I + UᵀD⁻¹U is positive definite; no error check
        Z = torch.linalg.solve_triangular(L, W.transpose(-1, -2), upper=False)
        return 1.0 / d - (Z ** 2).sum(0)

    def precision_matrix(self) -> Tensor:
        """``Σ⁻¹ = D⁻¹ − D⁻¹U (I + UᵀD⁻¹U)⁻¹ UᵀD⁻¹`` (Woodbury), dense ``[D, D]``."""
        U, d = self.cov_factor, self.cov_diag
        W = U / d.unsqueeze(-1)
        capacitance = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device) + U.transpose(-1, -2) @ W
        L = torch.linalg.cholesky_ex(capacitance)[0]
        Z = torch.linalg.solve_triangular(L, W.transpose(-1, -2), upper=False)     # [r, D]
        return torch.diag_embed(1.0 / d) - Z.transpose(-1, -2) @ Z

    def kl(self, mean, var, eps: Optional[Tensor] = None) -> Tensor:
        mean, var = self.flat(mean), self.flat(var)
        trace_term = (self.precision_diag() * var).sum()
        return 0.5 * (trace_term - self.dim - torch.log(var).sum()) - self._distribution().log_prob(mean) \
            - 0.5 * self.dim * LOG_2PI

    def hyper_log_prob(self) -> Tensor:
        if self.hyperprior is None:
            return self.loc.new_zeros(())
        return self.hyperprior.log_prob(self.loc, 1.0 / self.cov_diag)

    def rsample(self, n: int, generator: Optional[torch.Generator] = None):
        """``w = μ + sqrt(d) ⊙ ε₁ + U ε₂``."""
        eps1 = self._standard_normal(n, self.dim, generator=generator)
        eps2 = self._standard_normal(n, self.cov_factor.shape[-1], generator=generator)
        w = self.loc + torch.sqrt(self.cov_diag) * eps1 + eps2 @ self.cov_factor.transpose(-1, -2)
        return torch.func.vmap(self.unflat)(w)
