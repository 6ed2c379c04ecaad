"""Networks for meta-learning, usable with ``torch.func.functional_call`` and ``vmap`` over
per-task weights: :class:`MLP` (sine regression) and :class:`Conv4` (few-shot image
classification, batch norm with batch statistics only).

Example
-------
>>> from torch.func import functional_call, vmap
>>> net = MLP(1, (40, 40), 1)
>>> params = {k: v.expand(3, *v.shape) for k, v in net.named_parameters()}
>>> vmap(lambda p, x: functional_call(net, p, (x,)))(params, torch.zeros(3, 5, 1)).shape
torch.Size([3, 5, 1])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class NoiseHead(nn.Linear):
    """A linear layer with one more output per output: ``[φ Wᵀ + b, g]``, ``g [out_features]``
    a parameter that does not depend on the input (the task's log noise scale for
    :class:`ibaml.TaskNoiseGaussianLikelihood`). A prior over the head covers ``weight``,
    ``bias`` and ``log_noise``, so the noise is a task parameter, inferred with the weights.

    Example
    -------
    >>> NoiseHead(40, 1)(torch.zeros(5, 40)).shape
    torch.Size([5, 2])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.log_noise = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return torch.cat([out, self.log_noise.expand(*out.shape[:-1], -1)], dim=-1)


class RandomFourierFeatures(nn.Module):
    """Random Fourier features of an RBF kernel with a learned length scale ``ℓ``::

        φ(h) = √(2/R) cos(h Ω / ℓ + b),    Ω ~ N(0, I) [in, R],  b ~ U[0, 2π) [R]

    so that ``φ(h)ᵀφ(h') ≈ exp(−‖h − h'‖² / (2ℓ²))``: a linear head ``w ~ N(0, s² I)`` on
    ``φ`` is a Gaussian process with kernel ``s² exp(−‖h − h'‖²/(2ℓ²))`` (Rahimi & Recht, 2007).
    ``Ω`` and ``b`` are fixed buffers drawn from ``seed``; ``log ℓ`` is a parameter.

    >>> rff = RandomFourierFeatures(3, 2000, seed=1)
    >>> h = torch.randn(2, 3)
    >>> kernel = (rff(h[:1]) * rff(h[1:])).sum()
    >>> bool(abs(kernel - torch.exp(-((h[0] - h[1]) ** 2).sum() / 2)) < 0.1)
    True
    """

    def __init__(self, in_features: int, num_features: int, lengthscale: float = 1.0, seed: int = 0):
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"RandomFourierFeatures num_features must be a positive integer, got {num_features!r}")
        if not lengthscale > 0:
            raise ValueError(f"RandomFourierFeatures lengthscale must be positive, got {lengthscale!r}")
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("frequencies", torch.randn(int(in_features), int(num_features), generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(int(num_features), generator=g))
        self.log_lengthscale = nn.Parameter(torch.tensor(math.log(lengthscale)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = h @ self.frequencies.to(h.dtype) / torch.exp(self.log_lengthscale).to(h.dtype) + self.phases.to(h.dtype)
        return math.sqrt(2.0 / self.frequencies.shape[1]) * torch.cos(z)


class MLP(nn.Sequential):
    """Fully connected network ``in_dim → hidden... → out_dim`` with ``activation`` between
    layers; ``MLP(1, (40, 40), 1)`` is the standard sine-regression network. With
    ``noise_head=True`` the output layer is a :class:`NoiseHead` (``2 · out_dim`` outputs: the
    means, then the log noise scales of :class:`ibaml.TaskNoiseGaussianLikelihood`). With
    ``random_features=R`` the head reads ``R`` random Fourier features of the last hidden layer
    (:class:`RandomFourierFeatures`, drawn from ``seed``): a Gaussian prior over the head is then
    a Gaussian process with an RBF kernel on the learned features, whose variance returns to
    the prior's away from the data.

    Example
    -------
    >>> MLP(1, (40, 40), 1)(torch.zeros(5, 1)).shape
    torch.Size([5, 1])
    >>> MLP(1, (40, 40), 1, noise_head=True)(torch.zeros(5, 1)).shape
    torch.Size([5, 2])
    >>> MLP(1, (40, 40), 1, random_features=20).embed(torch.zeros(5, 1)).shape
    torch.Size([5, 20])
    """

    def __init__(self, in_dim: int = 1, hidden: Sequence[int] = (40, 40), out_dim: int = 1,
                 activation: type = nn.ReLU, noise_head: bool = False, random_features: int = 0,
                 seed: int = 0):
        layers = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        if random_features:
            layers.append(RandomFourierFeatures(width, random_features, seed=seed))
            width = int(random_features)
        layers.append((NoiseHead if noise_head else nn.Linear)(width, out_dim))
        super().__init__(*layers)

    @property
    def head(self) -> nn.Linear:
        """The output layer: ``forward(x) == head(embed(x))``."""
        return self[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations, the head's input ``[B, hidden[-1]]``."""
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


def batch_norm_batch_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch normalisation with the statistics of ``x`` itself (no running averages):
    ``y = (x − mean) / sqrt(var + eps) · weight + bias`` with the mean and biased variance
    over every dimension except the channels (dim 1).

    It is torch's fused batch norm in training mode without running statistics, which composes
    with ``vmap`` (per-task ``weight`` / ``bias``) and with forward- and reverse-mode derivatives
    of second order (the Hessian-vector products of the implicit gradient), and keeps about half
    the activations for the backward pass that the same formula written as separate tensor
    operations keeps. Under ``torch.autocast`` (a lower-precision ``x``) the affine parameters
    are cast to ``x``'s dtype, as the CPU kernel requires.

    Example
    -------
    >>> y = batch_norm_batch_stats(torch.randn(8, 3, 5, 5), torch.ones(3), torch.zeros(3))
    >>> bool(y.mean(dim=(0, 2, 3)).abs().max() < 1e-5)
    True
    """
    if weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


class BatchNorm2d(nn.Module):
    """Batch normalisation that always normalises with the current batch's statistics and keeps
    no running averages (no buffers), with a learnable affine ``weight`` / ``bias`` ``[C]``: the
    transductive batch norm of MAML / iBaML, safe under ``torch.func.vmap`` over tasks.

    Example
    -------
    >>> bn = BatchNorm2d(4)
    >>> list(dict(bn.named_buffers())), bn(torch.randn(2, 4, 3, 3)).shape
    ([], torch.Size([2, 4, 3, 3]))
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_batch_stats(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, batch statistics only"


#: the activations and poolings a :class:`Conv4` block can take: ``relu`` and ``max`` (the
#: literature's), or the smooth ``silu`` (``x·sigmoid(x)``) with ``avg`` or ``softmax``
#: (:func:`soft_max_pool2d`), with which the network is twice differentiable in its weights
#: everywhere; ``stride`` halves the side with a stride-2 convolution instead of a pooling
#: (MAML's Omniglot network; its pooling is the identity), smooth too
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


def soft_max_pool2d(x: torch.Tensor, size: int = 2, temperature: float = 0.1) -> torch.Tensor:
    """``T · log Σ_window exp(x / T)`` over non-overlapping ``size × size`` windows (a trailing
    row or column that fills no window is dropped, as ``max_pool2d`` does): a smooth upper bound on
    the window's maximum, within ``T · log size²`` of it.

    >>> x = torch.tensor([[[[0., 1.], [2., 3.]]]])
    >>> round(float(soft_max_pool2d(x, temperature=0.01)), 4)
    3.0
    """
    b, c, h, w = x.shape
    h, w = h // size * size, w // size * size
    windows = x[..., :h, :w].reshape(b, c, h // size, size, w // size, size)
    return temperature * torch.logsumexp(windows / temperature, dim=(3, 5))


POOLS = {"max": F.max_pool2d, "avg": F.avg_pool2d, "softmax": soft_max_pool2d, "stride": lambda x, size: x}


def conv_block(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
               eps: float = 1e-5, activation: str = "relu", pool: str = "max") -> torch.Tensor:
    """``maxpool₂(relu(BN(conv3x3(x; W, b); γ, β)))``, the block of :class:`Conv4`, as a pure function;
    ``pool₂(activation(·))`` with another ``activation`` (:data:`ACTIVATIONS`) or ``pool`` (:data:`POOLS`);
    ``pool="stride"``: ``activation(BN(conv3x3, stride 2(x)))``, no pooling.

    Computed as ``relu(maxpool₂(·))``: the two commute exactly (ReLU is monotone, so the largest
    of four rectified values is the rectified largest, and a window whose largest value is not
    positive gets gradient 0 either way), and rectifying the pooled map instead of the full one
    keeps one full-resolution activation fewer for the backward pass (measured by
    ``benchmarks/memory_profile.py``: ``docs/results/speed_memory.md``).

    Example
    -------
    >>> x, w, b = torch.randn(4, 2, 8, 8), torch.randn(3, 2, 3, 3), torch.randn(3)
    >>> bn = batch_norm_batch_stats(F.conv2d(x, w, b, padding=1), torch.ones(3), torch.zeros(3))
    >>> bool(torch.equal(conv_block(x, w, b, torch.ones(3), torch.zeros(3)), F.max_pool2d(F.relu(bn), 2)))
    True
    """
    stride = 2 if pool == "stride" else 1
    out = batch_norm_batch_stats(F.conv2d(x, conv_weight, conv_bias, stride=stride, padding=1), bn_weight, bn_bias, eps)
    if activation == "relu" and pool == "max":
        return F.relu(F.max_pool2d(out, 2))
    return POOLS[pool](ACTIVATIONS[activation](out), 2)


class ConvBlock(nn.Sequential):
    """``conv3x3 (padding 1) → BatchNorm2d (batch statistics) → ReLU → maxpool 2``
    (:func:`conv_block`; ``activation`` and ``pool`` by name: :data:`ACTIVATIONS`, :data:`POOLS`)."""

    def __init__(self, in_channels: int, out_channels: int, activation: str = "relu", pool: str = "max"):
        if activation not in ACTIVATIONS or pool not in POOLS:
            raise ValueError(f"activation {activation!r}, pool {pool!r}: choose from {', '.join(ACTIVATIONS)} and "
                             f"{', '.join(POOLS)}")
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, stride=2 if pool == "stride" else 1, padding=1),
                         BatchNorm2d(out_channels), nn.ReLU() if activation == "relu" else nn.SiLU(),
                         {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2)}.get(pool, nn.Identity()))
        self.activation, self.pool = activation, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self[0], self[1]
        return conv_block(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.eps, self.activation, self.pool)


class Conv4(nn.Module):
    """The four-block convolutional network of few-shot image classification:
    4 × [conv3x3 → batch norm (batch statistics, no running averages) → ReLU → maxpool 2],
    then flatten and a linear head to ``out_dim`` logits. The spatial side shrinks
    ``s → ⌊s/2⌋`` per block, so the head sees ``hidden · ⌊image_size/16⌋²`` features
    (84 → 5×5, 28 → 1×1).

    Input ``[B, in_channels, image_size, image_size]``, output ``[B, out_dim]``. Batch
    statistics are taken over the ``B`` images of one call, so each task's support (or query)
    set is normalised on its own when the network is vmapped over tasks.

    ``activation="silu", pool="avg"`` makes the network twice differentiable in its weights:
    with ReLU and max-pooling a prior over every weight poses an inner problem whose gradient
    jumps where an activation or a pooling window switches, so its solution sits on a kink,
    where no step drives ``‖∇G‖`` to zero and the implicit function theorem, which assumes a
    smooth stationary point, does not hold (``docs/design.md``). ``pool="softmax"`` keeps
    max-pooling's bias in a smooth form (:func:`soft_max_pool2d`, ``T = 0.1``) and
    ``pool="stride"`` replaces the pooling by a stride-2 convolution; on the stroke benchmark
    MAML learns with SiLU and the soft maximum and stays at chance with average pooling
    (``docs/results/images.md``). The head-only recipes do not need any of them: their inner
    problem is smooth in the head whatever the body.

    Example
    -------
    >>> net = Conv4(in_channels=3, hidden=32, out_dim=5, image_size=84)
    >>> net(torch.randn(10, 3, 84, 84)).shape
    torch.Size([10, 5])
    """

    def __init__(self, in_channels: int = 3, hidden: int = 32, out_dim: int = 5, image_size: int = 84,
                 activation: str = "relu", pool: str = "max"):
        super().__init__()
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2 if pool == "stride" else side // 2
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for four 2x2 poolings, got {image_size}")
        self.image_size = image_size
        self.features = nn.Sequential(*(ConvBlock(c, hidden, activation, pool) for c in (in_channels, hidden,
                                                                                        hidden, hidden)))
        self.head = nn.Linear(hidden * side * side, out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened features, the head's input ``[B, hidden · side²]``."""
        return self.features(x).flatten(start_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
