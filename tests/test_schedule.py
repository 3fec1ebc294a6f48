import math

import pytest
import torch

from diffusion import GaussianDiffusion, cosine_alpha_bar, cosine_schedule, linear_schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_is_monotone_and_in_unit_interval(schedule):
    d = GaussianDiffusion.from_name(schedule, 1000)
    assert ((d.betas > 0) & (d.betas < 1)).all()
    abar = d.alphas_cumprod
    assert ((abar > 0) & (abar < 1)).all()
    assert (abar[1:] < abar[:-1]).all(), "alpha-bar must strictly decrease with t"
    assert (d.lambdas[1:] < d.lambdas[:-1]).all()
    assert abar[-1] < 1e-3 < 0.99 < abar[0], "x_T must be almost pure noise and x_0 almost clean"


def test_cosine_schedule_matches_closed_form():
    T = 1000
    abar = torch.cumprod(1 - cosine_schedule(T), dim=0)
    s = 0.008
    closed = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
              for t in range(1, T + 1)]
    # the last steps are clipped at beta = 0.999, as in Improved DDPM; compare the rest exactly
    torch.testing.assert_close(abar[:-10], torch.tensor(closed[:-10], dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert cosine_alpha_bar(torch.tensor([0.0])).item() == 1.0


def test_linear_schedule_endpoints():
    betas = linear_schedule(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 10, 250, 600, 999])
def test_q_sample_has_the_scheduled_mean_and_variance(schedule, t):
    d = GaussianDiffusion.from_name(schedule)
    g = torch.Generator().manual_seed(t)
    n = 200_000
    x0 = torch.tensor([0.8, -0.5, 0.0]).repeat(n, 1)
    xt = d.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape, generator=g))
    abar = d.alphas_cumprod[t].item()
    se_mean = math.sqrt((1 - abar) / n)
    assert torch.allclose(xt.mean(0).double(), math.sqrt(abar) * x0[0].double(), atol=5 * se_mean + 1e-6)
    var = xt.var(0).double()
    assert torch.allclose(var, torch.full_like(var, 1 - abar), rtol=0.02, atol=1e-9)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the schedule equals the product-of-Gaussians answer."""
    d = GaussianDiffusion.from_name("linear")
    t = torch.tensor([5, 400])
    x0, xt = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, log_var = d.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_prev, beta = d.alphas_cumprod[ti - 1], d.betas[ti]
        # prior x_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t ~ N(sqrt(1 - beta) x_{t-1}, beta)
        precision = 1 / (1 - a_prev) + (1 - beta) / beta
        expected_mean = (a_prev.sqrt() * x0[i] / (1 - a_prev) + (1 - beta).sqrt() * xt[i] / beta) / precision
        torch.testing.assert_close(mean[i], expected_mean)
        torch.testing.assert_close(log_var[i].exp().squeeze(), 1 / precision)


@pytest.mark.parametrize("t, s", [(400, 399), (999, 500), (300, 10), (50, 0)])
def test_posterior_between_any_two_steps_is_the_gaussian_conditional(t, s):
    """q(x_s | x_t, x_0) for s < t, against conditioning the joint Gaussian of (x_s, x_t) given x_0:
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) e1 and x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) e2."""
    d = GaussianDiffusion.from_name("cosine")
    x0, xt = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    mean, var = d.q_posterior_between(x0, xt, t, s)
    a_t, a_s = d.alphas_cumprod[t].double(), d.alphas_cumprod[s].double()
    cov = (a_t / a_s).sqrt() * (1 - a_s)  # Cov(x_s, x_t | x0)
    torch.testing.assert_close(mean, a_s.sqrt() * x0 + cov / (1 - a_t) * (xt - a_t.sqrt() * x0))
    assert math.isclose(var, (1 - a_s - cov ** 2 / (1 - a_t)).item(), rel_tol=1e-5, abs_tol=1e-9)
    if s == t - 1:  # the adjacent case is q_posterior
        adjacent, log_var = d.q_posterior(x0, xt, torch.tensor([t]))
        torch.testing.assert_close(mean, adjacent)
        assert math.isclose(var, log_var.exp().item(), rel_tol=1e-4)


@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("steps", [1, 2, 20, 50, 999, 1000])
def test_timesteps_are_distinct_and_span_the_schedule(spacing, steps):
    ts = GaussianDiffusion.from_name("cosine").timesteps(steps, spacing)
    assert len(ts) == steps and ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:]))
    assert steps == 1 or ts[-1] == 0


def test_bad_schedule_arguments_are_clear():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion.from_name("quadratic")
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        GaussianDiffusion.from_name("cosine").timesteps(0)
