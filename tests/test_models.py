"""Networks: output shapes, batch norm with batch statistics, per-task weights under vmap."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ibaml.core.nets import MLP, BatchNorm2d, Conv4, ConvBlock, batch_norm_batch_stats, soft_max_pool2d

DT = torch.float64
T = 3


def formula_batch_norm(x, weight, bias, eps=1e-5):
    """The batch-statistics norm written out: ``(x − mean) / sqrt(var + eps) · weight + bias``."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


def per_task_params(net, seed=0):
    """Each task gets its own perturbation of the network's weights: ``{name: [T, ...]}``."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.1 * torch.randn(T, *v.shape, generator=g, dtype=v.dtype)
            for k, v in net.named_parameters()}


def check_vmap_matches_loop(net, x):
    params = per_task_params(net)
    batched = vmap(lambda p, xt: functional_call(net, p, (xt,)))(params, x)
    looped = torch.stack([functional_call(net, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(T)])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-10)
    return params, batched


def test_mlp_shapes_and_vmap_matches_loop():
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1).to(DT)
    assert net(torch.zeros(7, 1, dtype=DT)).shape == (7, 1)
    assert sum(p.numel() for p in net.parameters()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1
    x = torch.randn(T, 10, 1, dtype=DT)
    params, out = check_vmap_matches_loop(net, x)
    assert out.shape == (T, 10, 1)


@pytest.mark.parametrize("in_channels,hidden,image_size,out_dim", [(3, 32, 84, 5), (3, 64, 84, 5), (1, 64, 28, 20)])
def test_conv4_output_shapes(in_channels, hidden, image_size, out_dim):
    net = Conv4(in_channels=in_channels, hidden=hidden, out_dim=out_dim, image_size=image_size)
    side = image_size // 16
    assert net.head.in_features == hidden * side * side
    assert net(torch.randn(4, in_channels, image_size, image_size)).shape == (4, out_dim)


def test_conv4_rejects_too_small_images():
    with pytest.raises(ValueError, match="image_size"):
        Conv4(image_size=8)


def test_conv4_vmap_matches_loop():
    torch.manual_seed(0)
    net = Conv4(in_channels=3, hidden=8, out_dim=5, image_size=84).to(DT)
    x = torch.randn(T, 6, 3, 84, 84, dtype=DT)
    _, out = check_vmap_matches_loop(net, x)
    assert out.shape == (T, 6, 5)


def test_conv4_per_task_gradients_under_vmap_match_loop():
    torch.manual_seed(0)
    net = Conv4(in_channels=1, hidden=6, out_dim=4, image_size=28).to(DT)
    params = per_task_params(net)
    x = torch.randn(T, 8, 1, 28, 28, dtype=DT)
    y = torch.randint(0, 4, (T, 8))

    def loss(p, xt, yt):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xt,)), yt)

    batched = vmap(grad(loss))(params, x, y)
    for t in range(T):
        single = grad(loss)({k: v[t] for k, v in params.items()}, x[t], y[t])
        for k in single:
            torch.testing.assert_close(batched[k][t], single[k], rtol=1e-9, atol=1e-10)


def test_batch_norm_uses_batch_statistics_and_keeps_no_buffers():
    net = Conv4(in_channels=3, hidden=8, out_dim=5, image_size=32).to(DT)
    assert list(net.buffers()) == []
    assert not any("running" in k or "num_batches" in k for k in net.state_dict())
    x = torch.randn(5, 3, 32, 32, dtype=DT)
    out_train = net.train()(x)
    out_eval = net.eval()(x)
    torch.testing.assert_close(out_train, out_eval)  # no train/eval difference: always batch stats
    # matches the formula written out
    w, b = torch.rand(3, dtype=DT) + 0.5, torch.randn(3, dtype=DT)
    torch.testing.assert_close(batch_norm_batch_stats(x, w, b), formula_batch_norm(x, w, b))
    bn = BatchNorm2d(3).to(DT)
    y = bn(x * 4.0 + 3.0)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=DT), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_conv4_hessian_vector_products_under_vmap_match_the_written_out_norm(monkeypatch, mode):
    """Second-order derivatives through the fused batch norm, per task under vmap, in both
    Hessian-vector-product modes of the implicit gradient, equal those through the formula."""
    import ibaml.core.nets as models

    torch.manual_seed(0)
    net = Conv4(in_channels=1, hidden=4, out_dim=3, image_size=16).to(DT)
    params = per_task_params(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 6, 1, 16, 16, generator=g, dtype=DT)
    y = torch.randint(0, 3, (T, 6), generator=g)
    u = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}

    def hvp(p, xt, yt, ut):
        grad_fn = grad(lambda q: torch.nn.functional.cross_entropy(functional_call(net, q, (xt,)), yt))
        if mode == "rev":
            return torch.func.vjp(grad_fn, p)[1](ut)[0]
        return torch.func.jvp(grad_fn, (p,), (ut,))[1]

    fused = vmap(hvp)(params, x, y, u)
    monkeypatch.setattr(models, "batch_norm_batch_stats", formula_batch_norm)
    written = vmap(hvp)(params, x, y, u)
    for k in fused:
        torch.testing.assert_close(fused[k], written[k], rtol=1e-8, atol=1e-10)


def test_conv_block_pools_before_rectifying_with_the_same_values_and_derivatives():
    """``relu(maxpool(·))`` is ``maxpool(relu(·))``: values, gradients and Hessian-vector products
    of the block against the written-out order, float64, on inputs where many windows are
    entirely negative (their gradient is 0 either way)."""
    torch.manual_seed(0)
    block = ConvBlock(2, 3).double()
    params = {k: v.detach() for k, v in block.named_parameters()}
    params["1.bias"] = torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)   # channel 0 mostly negative
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)

    def reference(p, x):
        out = F.conv2d(x, p["0.weight"], p["0.bias"], padding=1)
        return F.max_pool2d(F.relu(batch_norm_batch_stats(out, p["1.weight"], p["1.bias"])), 2)

    def block_fn(p, x):
        return functional_call(block, p, (x,))

    weights = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    assert (reference(params, x)[:, 0] == 0).float().mean() > 0.3
    torch.testing.assert_close(block_fn(params, x), reference(params, x), rtol=0, atol=0)
    loss = lambda f: (lambda p, x: (f(p, x) * weights).sum() + f(p, x).square().sum())
    g_block, g_ref = grad(loss(block_fn), argnums=(0, 1))(params, x), grad(loss(reference), argnums=(0, 1))(params, x)
    for k in params:
        torch.testing.assert_close(g_block[0][k], g_ref[0][k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_block[1], g_ref[1], rtol=1e-12, atol=1e-12)
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    hvp = lambda f: torch.func.jvp(lambda p: grad(loss(f))(p, x), (params,), (direction,))[1]
    h_block, h_ref = hvp(block_fn), hvp(reference)
    for k in params:
        torch.testing.assert_close(h_block[k], h_ref[k], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool", ["avg", "softmax", "stride"])
def test_a_smooth_conv4_is_its_written_out_blocks_and_twice_differentiable(pool):
    """``activation="silu"`` with ``pool="avg"``: each block is ``avgpool₂(silu(BN(conv(x))))``;
    ``"softmax"``: the smooth maximum :func:`soft_max_pool2d` in place of the average;
    ``"stride"``: ``silu(BN(conv_stride2(x)))``, no pooling, the side ``s → ⌈s/2⌉``. The
    network's weight gradient is itself differentiable (second derivatives pass torch's
    finite-difference check in float64), where ReLU with max-pooling has kinks."""
    torch.manual_seed(0)
    net = Conv4(in_channels=1, hidden=3, out_dim=2, image_size=17, activation="silu", pool=pool).to(DT)
    x = torch.randn(4, 1, 17, 17, dtype=DT)
    block = net.features[0]
    conv, bn = block[0], block[1]
    stride = 2 if pool == "stride" else 1
    activated = F.silu(batch_norm_batch_stats(F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1),
                                              bn.weight, bn.bias))
    expected = {"avg": F.avg_pool2d(activated, 2), "softmax": soft_max_pool2d(activated), "stride": activated}[pool]
    assert torch.equal(block(x), expected)
    side = 2 if pool == "stride" else 1   # 17 → 9 → 5 → 3 → 2 strided, 17 → 8 → 4 → 2 → 1 pooled
    assert net.head.in_features == 3 * side * side and net(x).shape == (4, 2)
    head_free = [n for n, _ in net.named_parameters() if n.startswith("features.3")]

    def loss(*weights):
        params = dict(net.named_parameters()) | dict(zip(head_free, weights))
        return functional_call(net, params, (x,)).logsumexp(-1).sum()

    weights = tuple(dict(net.named_parameters())[n].detach().clone().requires_grad_() for n in head_free)
    assert torch.autograd.gradgradcheck(loss, weights)
    with pytest.raises(ValueError, match="activation"):
        ConvBlock(1, 2, activation="tanh")


def test_soft_max_pooling_bounds_the_window_maximum():
    """``T·log Σ exp(x/T)`` over each 2×2 window (T = 0.1): at or above the window's maximum,
    within ``T·log 4`` of it, equal to it as T → 0, odd sides floored as ``max_pool2d`` floors them."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 17, 17, dtype=DT)
    pooled, hard = soft_max_pool2d(x), F.max_pool2d(x, 2)
    assert pooled.shape == hard.shape == (4, 1, 8, 8)
    assert bool((pooled >= hard).all()) and bool((pooled - hard <= 0.1 * math.log(4) + 1e-12).all())
    torch.testing.assert_close(soft_max_pool2d(x, temperature=1e-4), hard, rtol=0, atol=1e-3)


def test_an_image_run_configuration_builds_its_activation_and_pooling():
    from ibaml.recipes.image_presets import image_learner_from_config
    config = {"method": "imaml-hf", "dataset": "miniimagenet", "ways": 5, "shots": 1, "channels": 4,
              "dtype": "float64", "seed": 0}
    default = image_learner_from_config(config, (3, 32, 32)).model.net
    smooth = image_learner_from_config({**config, "activation": "silu", "pool": "avg"}, (3, 32, 32)).model.net
    assert {(b.activation, b.pool) for b in default.features} == {("relu", "max")}
    assert {(b.activation, b.pool) for b in smooth.features} == {("silu", "avg")}
