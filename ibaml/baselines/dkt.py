"""Deep kernel transfer (Patacchiola et al., 2020): a GP with a meta-learned deep kernel.

Regression baseline for uncertainty. The kernel is ``k(x, x') = s² exp(−|φ(x) − φ(x')|² / 2ℓ²)``
on features ``φ`` of a network; ``φ``, ``s``, ``ℓ``, the constant mean ``c`` and the noise
``σ²`` are shared by all tasks and meta-learned by maximising each task's exact marginal
likelihood on its support and query points together:

    L(ψ) = −(1/T) Σ_t (1/N_t) log N(y_t; c, K_ψ(X_t, X_t) + σ² I)

At test time the GP is conditioned on the support set:

    μ_* = c + K_*s (K_ss + σ²I)⁻¹ (y_s − c),
    v_* = k(x_*, x_*) − K_*s (K_ss + σ²I)⁻¹ K_s* + σ²

All tasks of a batch are handled at once (batched kernels and Cholesky factors).

Example
-------
>>> dkt = DeepKernelGP(in_dim=1, hidden=(40, 40))
>>> loss = dkt.meta_step(tasks.sample(25, generator))
>>> mean, var = dkt.predict(test.support_x, test.support_y, test.query_x)
"""

from __future__ import annotations

import copy
from typing import Sequence

import gpytorch

import torch
from torch import Tensor, nn

from ..calibration import CalibrationReport
from ibaml.core.nets import MLP


class DeepKernelGP(nn.Module):
    """Deep-kernel GP regression meta-learned across tasks (see the module docstring).

    Args:
        in_dim: input dimension.
        hidden: widths of the feature network; its last entry is the feature dimension.
        lr: Adam learning rate of :meth:`meta_step`.
    """

    def __init__(self, in_dim: int = 1, hidden: Sequence[int] = (40, 40), lr: float = 1e-3):
        super().__init__()
        if not hidden:
            raise ValueError("hidden must name at least one layer width")
        self.features = MLP(in_dim, tuple(hidden[:-1]), hidden[-1])
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood()
        self.lr = lr
        self._optimizer = None

    def _prior(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        z = self.features(x)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return self._optimizer

    def meta_step(self, batch) -> float:
        """One Adam step on the mean per-point negative marginal log-likelihood of a task batch."""
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1).reshape(x.shape[0], x.shape[1])
        self.train()
        marginal = self.likelihood(self._prior(x))
        loss = -marginal.log_prob(y).mean() / x.shape[1]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def training_state(self) -> dict:
        """Parameters and the optimiser's state (a copy), what :func:`ibaml.train.training.fit` checkpoints."""
        return copy.deepcopy({"model": self.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor):
        """Posterior predictive mean and variance (noise included), each ``[T, Q]``."""
        self.eval()
        T = support_x.shape[0]
        zs, zq = self.features(support_x), self.features(query_x)
        noise = self.likelihood.noise.reshape(())
        c = self.mean_module.constant.reshape(())
        K_ss = self.covar_module(zs).to_dense() + noise * torch.eye(zs.shape[1], dtype=zs.dtype, device=zs.device)
        K_qs = self.covar_module(zq, zs).to_dense()
        k_qq = self.covar_module(zq, diag=True)
        L = torch.linalg.cholesky(K_ss)
        resid = (support_y.reshape(T, -1) - c).unsqueeze(-1)
        alpha = torch.cholesky_solve(resid, L)
        mean = c + (K_qs @ alpha).squeeze(-1)
        V = torch.linalg.solve_triangular(L, K_qs.transpose(-1, -2), upper=False)
        var = (k_qq - (V ** 2).sum(-2)).clamp(min=1e-10) + noise
        return mean, var

    def evaluate(self, batch, name: str = "") -> CalibrationReport:
        """The regression report of the predictive (:meth:`predict`) at ``batch``'s query points, as
        :meth:`ibaml.MetaLearner.evaluate` gives it for a meta-learner."""
        mean, var = self.predict(batch.support_x, batch.support_y, batch.query_x)
        return CalibrationReport.regression(mean, var, batch.query_y.reshape(mean.shape), name=name)
