import math

import pytest
import torch

import diffusion as D
import samplers as S
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


# --- v-prediction and Min-SNR weighting --------------------------------------------------------

def test_v_target_converts_back_to_the_noise_and_the_clean_image():
    d = D.GaussianDiffusion.from_name("cosine", prediction="v")
    x0, noise = gaussian_data(500), torch.randn(500, 2, dtype=torch.float64)
    t = torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(2))
    x_t, v = d.q_sample(x0, t, noise), d.q_velocity(x0, t, noise)
    torch.testing.assert_close(d.eps_from_output(v, x_t, t), noise)
    torch.testing.assert_close(d.predict_x0(x_t, t, d.eps_from_output(v, x_t, t)), x0)
    eps = D.GaussianDiffusion.from_name("cosine")
    assert eps.eps_from_output(v, x_t, t) is v, "an eps-model's output is already the noise"


def test_a_v_model_samples_the_same_as_the_equivalent_eps_model():
    eps_d, v_d = D.GaussianDiffusion.from_name("cosine"), D.GaussianDiffusion.from_name("cosine", prediction="v")
    eps_model = optimal_eps(eps_d.alphas_cumprod)

    def v_model(x, t):  # the optimal v, written from the optimal eps: v = (eps - sigma x_t) / alpha
        a, s = v_d.alphas[t].view(-1, 1), v_d.sigmas[t].view(-1, 1)
        return (eps_model(x, t) - s * x) / a
    for sampler in ("dpmpp", "ddim"):
        out = [S.sample(m, d, (64, 2), sampler, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                        precision="fp32") for m, d in ((eps_model, eps_d), (v_model, v_d))]
        torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error(prediction):
    """Hang et al. 2023: eps-MSE = SNR * x0-MSE and v-MSE = (SNR + 1) * x0-MSE, so both weights make the
    loss min(SNR, gamma) * x0-MSE: equal for a model of either kind that makes the same x0 error."""
    d = D.GaussianDiffusion.from_name("cosine", prediction=prediction)
    x0, noise = gaussian_data(8), torch.randn(8, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 50, 100, 300, 600, 900, 999])
    x0_error = 0.1 * torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def model(x_t, tt):  # predicts x0 + x0_error, written as eps or v
        a, s = d.alphas[tt].view(-1, 1), d.sigmas[tt].view(-1, 1)
        x0_hat = x0 + x0_error
        eps_hat = (x_t - a * x0_hat) / s
        return eps_hat if prediction == "eps" else a * eps_hat - s * x0_hat
    snr = (d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    weighted = d.training_loss(model, x0, t, noise, min_snr_gamma=5.0)
    torch.testing.assert_close(weighted.double(), snr.clamp(max=5.0) * x0_error.pow(2).mean(1), rtol=1e-4, atol=1e-9)
    assert torch.equal(d.loss_weight(t, 0.0), torch.ones(8, dtype=torch.float64)), "gamma 0: plain MSE"
