import torch

from ibaml.baselines.dkt import DeepKernelGP
from ibaml.data.sine import SineTaskDistribution


def test_dkt_learns_sine_and_predicts_positive_variance():
    torch.manual_seed(0)
    model = DeepKernelGP(in_dim=1, hidden=(40, 40), lr=3e-3).double()
    tasks = SineTaskDistribution(shots=10, query=10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        model.meta_step(tasks.sample(10, gen, dtype=torch.float64))
    test = tasks.sample(100, torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, var = model.predict(test.support_x, test.support_y, test.query_x)
    assert mean.shape == var.shape == (100, 10)
    assert (var > 0).all()
    y = test.query_y[..., 0]
    mse = ((mean - y) ** 2).mean()
    zero_mse = (y ** 2).mean()
    assert mse < 0.5 * zero_mse, (mse, zero_mse)


def test_dkt_posterior_interpolates_support_points():
    torch.manual_seed(0)
    model = DeepKernelGP().double()
    tasks = SineTaskDistribution(shots=8, query=8)
    b = tasks.sample(3, torch.Generator().manual_seed(2), dtype=torch.float64)
    mean, var = model.predict(b.support_x, b.support_y, b.support_x)
    prior_var = model.covar_module.outputscale + model.likelihood.noise
    assert (var < prior_var).all()  # conditioning on a point shrinks its variance
