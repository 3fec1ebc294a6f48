"""Samplers against the closed-form optimal denoiser of Gaussian data, and guidance."""
import pytest
import torch

import diffusion as D
from tests.gaussian_oracle import MU, SIGMA, moment_errors, optimal_eps

N = 20_000  # standard error of each whitened covariance entry is about 0.01

# (sampler, steps, max |mean error|, max |whitened cov - I|); measured errors are about half of these
# (ddpm 0.02-0.04, ddim-50 0.10, dpmpp-20 0.05): DDPM's fixed variance and the few-step
# discretisations leave small biases in the narrow direction.
CASES = [("ddpm", None, 0.015, 0.08), ("ddim", 50, 0.015, 0.15), ("dpmpp", 20, 0.015, 0.10)]


def run(sampler, steps, diffusion, denoiser, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return D.sample(denoiser, diffusion, (n, 2), sampler, steps, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,mean_tol,cov_tol", CASES)
def test_sampler_reproduces_gaussian_data(schedule, sampler, steps, mean_tol, cov_tol):
    d = D.GaussianDiffusion.from_name(schedule)
    mean_err, cov_err = moment_errors(run(sampler, steps, d, optimal_eps(d.alphas_cumprod)))
    assert mean_err < mean_tol and cov_err < cov_tol, (mean_err, cov_err)


# --- the test above must catch real bugs: each mutation here must make it fail -------------------

def fails(sampler, steps, mean_tol, cov_tol, d, denoiser):
    x = run(sampler, steps, d, denoiser, n=5000)
    if not torch.isfinite(x).all():
        return True
    mean_err, cov_err = moment_errors(x)
    return mean_err >= mean_tol or cov_err >= cov_tol


@pytest.mark.parametrize("sampler,steps,mean_tol,cov_tol", CASES)
def test_wrong_sign_of_the_noise_is_caught(sampler, steps, mean_tol, cov_tol):
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    assert fails(sampler, steps, mean_tol, cov_tol, d, lambda x, t: -eps(x, t))


class PosteriorOffByOne(D.GaussianDiffusion):
    """The classic bug: alpha-bar_t used where the posterior needs alpha-bar_{t-1}."""

    def __init__(self, betas):
        super().__init__(betas)
        prev = self.alphas_cumprod
        self.posterior_mean_coef_x0 = self.betas * prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)


def test_off_by_one_in_the_posterior_schedule_is_caught():
    d = PosteriorOffByOne(D.linear_schedule())
    assert fails(*CASES[0], d, optimal_eps(d.alphas_cumprod))


@pytest.mark.parametrize("sampler,steps,mean_tol,cov_tol", CASES[1:])
def test_denoiser_queried_at_an_off_by_one_step_is_caught(sampler, steps, mean_tol, cov_tol):
    """The model sees the timestep of the previous step of the sequence (an index off by one)."""
    d = D.GaussianDiffusion.from_name("linear")
    eps = optimal_eps(d.alphas_cumprod)
    ts = d.timesteps(steps)
    shifted = {t: ts[max(i - 1, 0)] for i, t in enumerate(ts)}
    lagged = lambda x, t: eps(x, torch.full_like(t, shifted[int(t[0])]))
    assert fails(sampler, steps, mean_tol, cov_tol, d, lagged)


# --- determinism and callbacks ------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10), ("dpmpp", 10)])
def test_same_seed_same_samples_different_seed_different(sampler, steps):
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    a, b, c = (run(sampler, steps, d, eps, seed=s, n=64) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_stochastic_ddim_uses_the_generator():
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = [D.ddim_sample(eps, d, x, 10, eta=1.0, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("sampler,steps,calls", [("ddpm", None, 1000), ("ddim", 7, 7), ("dpmpp", 7, 7)])
def test_callback_sees_every_step_with_x_t_and_x0(sampler, steps, calls):
    d = D.GaussianDiffusion.from_name("cosine")
    seen = []
    g = torch.Generator().manual_seed(0)
    out = D.sample(optimal_eps(d.alphas_cumprod), d, (8, 2), sampler, steps, generator=g,
                   callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())), dtype=torch.float64)
    assert [i for i, _, _ in seen] == list(range(calls))
    assert seen[0][1].std() > 0.5, "the first x_t is (almost) pure noise"
    assert torch.allclose(seen[-1][2], out, atol=0.05), "the last x0 prediction is the result"


def test_unknown_sampler_is_a_clear_error():
    d = D.GaussianDiffusion.from_name("cosine")
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of"):
        D.sample(lambda x, t: x, d, (1, 2), "euler")


# --- classifier-free guidance --------------------------------------------------------------------

class TwoGaussians(torch.nn.Module):
    """A 'network' with exact answers: prompt 1 -> N(+mu, s^2 I); empty prompt -> N(0, s^2 I)."""

    def __init__(self, diffusion):
        super().__init__()
        self.abar = diffusion.alphas_cumprod

    def forward(self, x, t, cond):
        mean = torch.where(cond.mask.any(dim=1, keepdim=True), MU, torch.zeros_like(MU))
        eps = optimal_eps(self.abar, MU, SIGMA)  # shape of covariance shared; mean per sample
        return eps(x - self.abar[t].sqrt()[:, None].to(x.dtype) * (mean - MU), t)


def conditions(n):
    from models.text_encoder import collate, null_condition
    prompt = collate([(torch.ones(3, 384), torch.ones(384))] * n)
    return prompt, null_condition(n)


def test_guidance_scale_one_is_exactly_the_conditional_model():
    d = D.GaussianDiffusion.from_name("cosine")
    model = TwoGaussians(d)
    cond, uncond = conditions(16)
    x, t = torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 1000, (16,))
    assert torch.equal(D.guided_denoiser(model, cond, uncond, 1.0)(x, t), model(x, t, cond))
    # and at other scales, the guided prediction is the textbook combination
    e_c, e_u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(D.guided_denoiser(model, cond, uncond, 3.0)(x, t), e_u + 3.0 * (e_c - e_u))


def test_guidance_above_one_moves_samples_away_from_the_unconditional_ones():
    d = D.GaussianDiffusion.from_name("cosine")
    model = TwoGaussians(d)
    cond, uncond = conditions(4000)
    dist = {}
    for scale in (1.0, 2.0, 4.0):
        g = torch.Generator().manual_seed(0)
        x = D.sample(D.guided_denoiser(model, cond, uncond, scale), d, (4000, 2), "dpmpp", 20,
                     generator=g, dtype=torch.float64)
        dist[scale] = x.mean(0).norm().item()  # the unconditional samples are centred at 0
    assert dist[1.0] == pytest.approx(MU.norm().item(), abs=0.02)
    assert dist[1.0] + 0.1 < dist[2.0] < dist[4.0]
