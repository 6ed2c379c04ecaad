import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from ibaml import calibration as cal


def random_probs(T=6, Q=40, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, Q, C, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, C, (T, Q), generator=g)
    return torch.softmax(logits, -1), labels


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_and_mce_match_torchmetrics(n_bins):
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = random_probs()
    ours_ece = cal.ece(probs, labels, n_bins)
    ours_mce = cal.mce(probs, labels, n_bins)
    for t in range(probs.shape[0]):
        ref_ece = tm.multiclass_calibration_error(probs[t].float(), labels[t], num_classes=5, n_bins=n_bins, norm="l1")
        ref_mce = tm.multiclass_calibration_error(probs[t].float(), labels[t], num_classes=5, n_bins=n_bins, norm="max")
        assert ours_ece[t].item() == pytest.approx(ref_ece.item(), abs=1e-5)
        assert ours_mce[t].item() == pytest.approx(ref_mce.item(), abs=1e-5)


def test_pooled_ece_is_the_ece_of_all_points_and_near_zero_where_per_task_ece_is_not():
    """Labels drawn from the predictive itself (a calibrated predictor): 200 tasks of 75 points.
    The pooled ECE equals the ECE of the tasks' points concatenated and is near 0; the mean of
    the per-task ECEs is an order of magnitude larger (the binomial noise of 75 points in 15 bins)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 75, 5, generator=g, dtype=torch.float64) * 2.5, -1)
    labels = torch.multinomial(probs.reshape(-1, 5), 1, generator=g).reshape(200, 75)
    pooled = cal.pooled_ece(probs, labels)
    assert pooled["mean"] == pytest.approx(float(cal.ece(probs.reshape(1, -1, 5), labels.reshape(1, -1))[0]), abs=1e-12)
    assert pooled["mean"] < 0.015 and 0 < pooled["ci95"] < 0.02
    assert float(cal.ece(probs, labels).mean()) > 5 * pooled["mean"]
    over = cal.pooled_ece(probs ** 3 / (probs ** 3).sum(-1, keepdim=True), labels)   # sharpened: over-confident
    assert over["mean"] > pooled["mean"] + 3 * pooled["ci95"]
    report = cal.CalibrationReport.classification(probs, labels)
    assert report.metrics["ece_pooled"] == pooled


def test_ece_floor_is_the_ece_of_a_calibrated_predictor_and_not_of_a_miscalibrated_one():
    """Labels drawn from the predictive (calibrated): the per-task and pooled ECEs lie within
    their sampling error of the floors; labels from a sharpened predictive (under-confident
    probabilities): both lie far above them. The floor depends only on the confidences, is 0
    where every confidence is 1, and is reproducible from its seed; bad input is refused."""
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(400, 75, 5, generator=g, dtype=torch.float64) * 2.0, -1)
    labels = torch.multinomial(probs.reshape(-1, 5), 1, generator=g).reshape(400, 75)
    floor = cal.ece_floor(probs)
    per_task = cal.ece(probs, labels)
    assert floor["per_task"].shape == (400,)
    assert float(per_task.mean()) == pytest.approx(float(floor["per_task"].mean()), abs=3 * float(per_task.std()) / 20)
    assert float(floor["per_task"].mean()) > 0.1                     # 75 points in 15 bins: far from 0
    pooled = cal.pooled_ece(probs, labels)
    assert abs(pooled["mean"] - floor["pooled"]["mean"]) < pooled["ci95"] + floor["pooled"]["ci95"]
    sharp = probs ** 3 / (probs ** 3).sum(-1, keepdim=True)
    sharp_labels = torch.multinomial(sharp.reshape(-1, 5), 1, generator=g).reshape(400, 75)
    assert float(cal.ece(probs, sharp_labels).mean()) > float(floor["per_task"].mean()) + 0.05
    assert cal.pooled_ece(probs, sharp_labels)["mean"] > floor["pooled"]["mean"] + 0.05
    assert torch.equal(cal.ece_floor(probs)["per_task"], floor["per_task"])
    certain = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 10), generator=g), 5).double()
    assert float(cal.ece_floor(certain)["per_task"].abs().max()) == 0.0
    report = cal.CalibrationReport.classification(probs, labels)
    assert report.metrics["ece_floor"]["mean"] == pytest.approx(float(floor["per_task"].mean()))
    assert report.metrics["ece_pooled_floor"] == floor["pooled"]
    with pytest.raises(ValueError, match=r"\[T, Q, C\]"):
        cal.ece_floor(probs[0])
    with pytest.raises(ValueError, match="num_draws"):
        cal.ece_floor(probs, num_draws=0)


def test_fit_logit_scale_recovers_the_scale_of_the_labels():
    """Labels drawn from softmax(τ₀ f) at τ₀ = 3: the fitted τ is close to 3, from point outputs
    (S = 1) and from draws (S = 4) around them; bad shapes are refused."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(100, 1, 60, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(3.0 * f[:, 0], -1).reshape(-1, 5), 1, generator=g).reshape(100, 60)
    assert cal.fit_logit_scale(f, labels) == pytest.approx(3.0, rel=0.1)
    draws = f + 0.05 * torch.randn(100, 4, 60, 5, generator=g, dtype=torch.float64)
    assert cal.fit_logit_scale(draws, labels) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match=r"\[T, S, N, C\]"):
        cal.fit_logit_scale(f[:, 0], labels)


def test_nll_brier_accuracy_match_direct_formulas():
    probs, labels = random_probs(seed=1)
    ref_nll = torch.nn.functional.nll_loss(torch.log(probs.reshape(-1, 5)), labels.reshape(-1), reduction="none")
    assert torch.allclose(cal.nll(probs, labels), ref_nll.view(6, 40).mean(-1))
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    assert torch.allclose(cal.brier(probs, labels), ((probs - onehot) ** 2).sum(-1).mean(-1))
    assert torch.allclose(cal.accuracy(probs, labels), (probs.argmax(-1) == labels).double().mean(-1))


def test_calibrated_gaussian_has_nominal_coverage():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(20, 2000, generator=g, dtype=torch.float64)
    var = torch.rand(20, 2000, generator=g, dtype=torch.float64) + 0.5
    y = mu + var.sqrt() * torch.randn(20, 2000, generator=g, dtype=torch.float64)
    for level in (0.5, 0.9, 0.95):
        assert cal.interval_coverage(mu, var, y, level).mean().item() == pytest.approx(level, abs=0.01)
    assert cal.pooled_calibration_error(mu, var, y)["mean"] < 0.01
    assert cal.pooled_calibration_error(mu, var / 4, y)["mean"] > 0.1
    per_task = cal.calibration_error(mu, var, y)  # 2000 points a task: fine enough task by task
    assert per_task.shape == (20,) and per_task.max().item() < 0.03
    assert cal.calibration_error(mu, var / 4, y).min().item() > 0.1
    # an overconfident predictive under-covers
    assert cal.interval_coverage(mu, var / 4, y, 0.9).mean().item() < 0.7


def test_gaussian_nll_matches_torch():
    g = torch.Generator().manual_seed(2)
    mu, y = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    var = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.1
    ref = torch.nn.functional.gaussian_nll_loss(mu, y, var, full=True, reduction="none").mean(-1)
    assert torch.allclose(cal.gaussian_nll(mu, var, y), ref)


def test_crps_matches_monte_carlo():
    g = torch.Generator().manual_seed(3)
    mu = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    var = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, -0.2]], dtype=torch.float64)
    n = 400_000
    x = mu + var.sqrt() * torch.randn(n, 1, 2, generator=g, dtype=torch.float64)
    x2 = mu + var.sqrt() * torch.randn(n, 1, 2, generator=g, dtype=torch.float64)
    mc = ((x - y).abs().mean(0) - 0.5 * (x - x2).abs().mean(0)).mean(-1)
    assert cal.crps_gaussian(mu, var, y).item() == pytest.approx(mc.item(), abs=5e-3)


def test_mean_ci95():
    out = cal.mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == pytest.approx(2.5)
    assert out["ci95"] == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert cal.mean_ci95([7.0]) == {"mean": 7.0, "ci95": 0.0}


def test_reports_round_trip_and_figures(tmp_path):
    probs, labels = random_probs(seed=4)
    rep = cal.CalibrationReport.classification(probs, labels, name="m")
    data = json.loads(rep.to_json())
    assert set(data["metrics"]) == set(cal.CLASSIFICATION_KEYS) == {"accuracy", "nll", "ece", "ece_pooled", "ece_floor",
                                                                     "ece_pooled_floor", "mce", "brier", "confidence"}
    assert sum(rep.bins["count"]) == probs.shape[0] * probs.shape[1]
    assert "| ece |" in rep.to_markdown()
    rep.plot_reliability_diagram().savefig(tmp_path / "rel.png")
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(4, 10, generator=g, dtype=torch.float64)
    reg = cal.CalibrationReport.regression(mu, torch.ones(4, 10, dtype=torch.float64), mu + 0.1, name="r")
    assert {"mse", "nll", "coverage_50", "coverage_90", "coverage_95", "calibration_error", "crps"} <= set(reg.metrics)
    reg.plot_calibration_curve().savefig(tmp_path / "curve.png")
    table = cal.compare_markdown({"a": reg, "b": reg}, keys=["mse", "nll"])
    assert table.count("\n") == 3
    with pytest.raises(ValueError, match="regression report"):
        rep.plot_calibration_curve()


@pytest.mark.parametrize("call, message", [
    (lambda: cal.gaussian_nll(torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, 3)), "var has shape"),
    (lambda: cal.gaussian_nll(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)), "positive"),
    (lambda: cal.mse(torch.tensor([[float("nan")]]), torch.zeros(1, 1)), "NaN or Inf"),
    (lambda: cal.ece(torch.full((1, 2, 3), 1 / 3), torch.tensor([[0, 3]])), "labels must lie"),
    (lambda: cal.interval_coverage(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), 1.5), "level"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_student_t_scores_against_scipy_and_their_gaussian_limits():
    """NLL and CRPS of t_ν(μ, s²): the NLL is scipy's log-density, the CRPS its integral
    ∫ (F(x) − 1[x ≥ y])² dx, both reach the Gaussian scores as ν → ∞; coverage uses t quantiles."""
    from scipy import integrate, stats
    g = torch.Generator().manual_seed(0)
    mu, s2 = torch.randn(3, 4, generator=g, dtype=torch.float64), 0.2 + torch.rand(3, 4, generator=g, dtype=torch.float64)
    y = mu + 2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    for nu in (1.5, 3.0, 12.0):
        ref = -stats.t.logpdf(y.numpy(), nu, loc=mu.numpy(), scale=s2.sqrt().numpy()).mean(-1)
        assert torch.allclose(cal.student_t_nll(mu, s2, y, nu), torch.from_numpy(ref), rtol=1e-12)
        m, s, yy = float(mu[0, 0]), float(s2[0, 0].sqrt()), float(y[0, 0])
        f = lambda x: (stats.t.cdf(x, nu, loc=m, scale=s) - (x >= yy)) ** 2
        crps = integrate.quad(f, -math.inf, yy, limit=400)[0] + integrate.quad(f, yy, math.inf, limit=400)[0]
        one = cal.crps_student_t(mu[:1, :1], s2[:1, :1], y[:1, :1], nu)
        assert float(one) == pytest.approx(crps, rel=1e-6)
    assert torch.allclose(cal.student_t_nll(mu, s2, y, 1e8), cal.gaussian_nll(mu, s2, y), rtol=1e-6)
    assert torch.allclose(cal.crps_student_t(mu, s2, y, 1e8), cal.crps_gaussian(mu, s2, y), rtol=1e-5)
    with pytest.raises(ValueError, match="df must be a number above 1"):
        cal.crps_student_t(mu, s2, y, 1.0)
    # coverage: exactly the points within the t quantile
    z = float(stats.t.ppf(0.95, 3.0))
    inside = ((y - mu).abs() <= z * s2.sqrt()).double().mean(-1)
    assert torch.equal(cal.calibration_curve(mu, s2, y, [0.9], tails=cal.StudentTTails(3.0))[:, 0], inside)
    report = cal.CalibrationReport.regression(mu, s2, y, tails=cal.StudentTTails(3.0))
    assert report.extra["tails"] == {"family": "student_t", "df": 3.0} and report.metrics["coverage_90"]["mean"] == pytest.approx(float(inside.mean()))


def test_lognormal_scale_mixture_scores_against_quadrature_and_the_gaussian_limit():
    """The log-normal scale mixture E_u N(μ, v e^{2τu}): its NLL is minus the log of the density
    integrated over u, its CRPS the integral ∫ (F(x) − 1[x ≥ y])² dx, its central intervals hold
    their level of its own draws, and τ → 0 gives the Gaussian scores."""
    from scipy import integrate, stats
    tails = cal.LogNormalScale(0.7)
    g = torch.Generator().manual_seed(1)
    mu, v = torch.randn(2, 3, generator=g, dtype=torch.float64), 0.3 + torch.rand(2, 3, generator=g, dtype=torch.float64)
    y = mu + 1.5 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    m, s, yy = float(mu[0, 0]), float(v[0, 0].sqrt()), float(y[0, 0])
    density = lambda x: integrate.quad(lambda u: stats.norm.pdf(u) * stats.norm.pdf(x, m, s * math.exp(0.7 * u)), -10, 10)[0]
    assert float(tails.nll(mu[:1, :1], v[:1, :1], y[:1, :1])) == pytest.approx(-math.log(density(yy)), rel=1e-6)
    cdf = lambda x: integrate.quad(lambda u: stats.norm.pdf(u) * stats.norm.cdf(x, m, s * math.exp(0.7 * u)), -10, 10)[0]
    f = lambda x: (cdf(x) - (x >= yy)) ** 2
    crps = integrate.quad(f, -60, yy, limit=400)[0] + integrate.quad(f, yy, 60, limit=400)[0]
    assert float(tails.crps(mu[:1, :1], v[:1, :1], y[:1, :1])) == pytest.approx(crps, rel=1e-5)
    draws = torch.randn(200_000, generator=g, dtype=torch.float64) * torch.exp(0.7 * torch.randn(200_000, generator=g, dtype=torch.float64))
    q = tails.central_quantile(torch.tensor([0.5, 0.9]))
    assert float((draws.abs() <= q[0]).double().mean()) == pytest.approx(0.5, abs=0.005)
    assert float((draws.abs() <= q[1]).double().mean()) == pytest.approx(0.9, abs=0.005)
    tiny = cal.LogNormalScale(1e-7)
    assert torch.allclose(tiny.nll(mu, v, y), cal.gaussian_nll(mu, v, y), rtol=1e-9)
    assert torch.allclose(tiny.crps(mu, v, y), cal.crps_gaussian(mu, v, y), rtol=1e-7)
    report = cal.CalibrationReport.regression(mu, v, y, tails=tails)
    assert report.extra["tails"] == {"family": "lognormal_scale", "sd": 0.7}
    with pytest.raises(ValueError, match="sd must lie in"):
        cal.LogNormalScale(-0.1)


def test_variance_bins_of_one_bin_is_the_one_factor_and_bad_input_is_named():
    from ibaml.calibration import fit_variance_bins, fit_variance_scale
    g = torch.Generator().manual_seed(0)
    mu, var = torch.zeros(30, 4), torch.rand(30, 4, generator=g) + 0.1
    y = torch.randn(30, 4, generator=g)
    one = fit_variance_bins(mu, var, y, bins=1)
    assert one.log_factor[0] == pytest.approx(math.log(fit_variance_scale(mu, var, y)))
    assert torch.allclose(one(var), fit_variance_scale(mu, var, y) * var)
    # a constant predictive: every bin at one variance, merged into one point
    flat = fit_variance_bins(mu, torch.ones(30, 4), y, bins=5)
    assert len(flat.log_variance) == 1
    scale = fit_variance_bins(mu, var, y, bins=4)
    assert list(scale.log_variance) == sorted(scale.log_variance) and len(scale.log_variance) == 4
    with pytest.raises(ValueError, match="bins"):
        fit_variance_bins(mu, var, y, bins=0)
    with pytest.raises(ValueError, match="positive"):
        fit_variance_bins(mu, -var, y)
