import math

import pytest
import torch

import diffusion as D
from tests.gaussian_oracle import MU, SIGMA, marginal_cov, optimal_eps


def gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T


@pytest.mark.parametrize("t", [50, 300, 800])
def test_mse_loss_of_the_optimal_denoiser_is_the_closed_form_minimum(t):
    """At the optimum the loss is the posterior variance of eps: tr(I - s^2 C_t^{-1}) / d."""
    d = D.GaussianDiffusion.from_name("cosine")
    n = 100_000
    x0 = gaussian_data(n)
    tt = torch.full((n,), t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = d.training_loss(optimal_eps(d.alphas_cumprod), x0, tt, noise).mean().item()
    abar = d.alphas_cumprod[t]
    expected = (torch.eye(2) - (1 - abar) * torch.linalg.inv(marginal_cov(abar)[0])).trace().item() / 2
    assert loss == pytest.approx(expected, rel=0.03)
    worse = d.training_loss(lambda x, t: 0.9 * optimal_eps(d.alphas_cumprod)(x, t), x0, tt, noise).mean().item()
    assert worse > loss


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(10), torch.randn(10)
    lv1, lv2 = torch.randn(10), torch.randn(10)
    ours = D.normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(ours, ref)


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.3, -2.0), (-0.9, -4.0), (0.99, -1.0)]:
        ll = D.discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_hybrid_loss_trains_variance_through_vlb_and_mean_through_mse_only():
    d = D.GaussianDiffusion.from_name("cosine")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn_like(x0)
    out = torch.zeros(4, 6, 8, 8, requires_grad=True)
    loss = d.training_loss(lambda x, tt: out, x0, t, noise)
    mse_only = ((noise) ** 2).flatten(1).mean(1)
    assert (loss > mse_only).all(), "the VLB term is positive and added"
    loss.sum().backward()
    mse_grad = torch.autograd.grad(((out[:, :3] - noise) ** 2).flatten(1).mean(1).sum(), out)[0]
    torch.testing.assert_close(out.grad[:, :3], mse_grad[:, :3])  # eps channels: MSE only
    assert out.grad[:, 3:].abs().sum() > 0                     # variance channels: VLB


def test_vlb_is_zero_when_the_model_matches_the_true_posterior():
    d = D.GaussianDiffusion.from_name("linear")
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([10, 700])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # exact eps, v=-1 gives posterior variance
    torch.testing.assert_close(d.vlb_term(out, x0, xt, t), torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)
    out_wrong = torch.cat([noise, torch.ones_like(noise)], dim=1)
    wrong = d.vlb_term(out_wrong, x0, xt, t)
    assert wrong[0] > 1e-4 and wrong[1] > 0  # late in the chain beta_t and the posterior variance nearly agree
    assert math.isfinite(d.vlb_term(out, x0, xt, torch.tensor([0, 0])).sum().item())
