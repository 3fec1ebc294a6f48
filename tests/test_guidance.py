"""Classifier-free guidance on a two-Gaussian model with exact answers."""
import pytest
import torch

import diffusion as D
import samplers as S
from guidance import Guidance, anneal_weight, annealed_condition, guided_denoiser
from tests.gaussian_oracle import MU, SIGMA, optimal_eps

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
    assert torch.equal(guided_denoiser(model, cond, uncond, 1.0)(x, t), model(x, t, cond))
    # and at other scales, the guided prediction is the textbook combination
    e_c, e_u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(guided_denoiser(model, cond, uncond, 3.0)(x, t), e_u + 3.0 * (e_c - e_u))


def test_guidance_above_one_moves_samples_away_from_the_unconditional_ones():
    d = D.GaussianDiffusion.from_name("cosine")
    model = TwoGaussians(d)
    cond, uncond = conditions(4000)
    dist = {}
    for scale in (1.0, 2.0, 4.0):
        g = torch.Generator().manual_seed(0)
        x = S.sample(guided_denoiser(model, cond, uncond, scale), d, (4000, 2), "dpmpp", 20,
                     generator=g, dtype=torch.float64)
        dist[scale] = x.mean(0).norm().item()  # the unconditional samples are centred at 0
    assert dist[1.0] == pytest.approx(MU.norm().item(), abs=0.02)
    assert dist[1.0] + 0.1 < dist[2.0] < dist[4.0]


class VarianceChannels(torch.nn.Module):
    """A learned-variance 'network' whose conditional and unconditional outputs differ in every channel."""

    def forward(self, x, t, cond):
        has_prompt = cond.mask.any(dim=1).view(-1, 1).to(x.dtype)
        eps = torch.sin(x) + has_prompt * torch.cos(x)
        var = 0.5 - has_prompt  # -0.5 for the prompt, +0.5 for the empty prompt
        return torch.cat([eps, var.expand_as(x)], dim=1)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guidance_takes_the_variance_channels_from_the_conditional_output(scale):
    model, (cond, uncond) = VarianceChannels(), conditions(8)
    x, t = torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 1000, (8,))
    out_c, out_u = model(x, t, cond), model(x, t, uncond)
    out = guided_denoiser(model, cond, uncond, scale)(x, t)
    torch.testing.assert_close(out[:, :2], out_u[:, :2] + scale * (out_c[:, :2] - out_u[:, :2]))
    assert torch.equal(out[:, 2:], out_c[:, 2:])


# --- guidance in an interval of noise levels, and condition annealing (CADS) -----------------------

class CountingModel(torch.nn.Module):
    """Records the batch size of each call; eps depends on whether the row has a prompt and on t."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, cond):
        self.batches.append(x.shape[0])
        has_prompt = cond.mask.any(dim=1).view(-1, 1).to(x.dtype)
        return torch.sin(x) + has_prompt * torch.cos(x) + 1e-3 * t.view(-1, 1).to(x.dtype)


@pytest.mark.parametrize("t_now, inside", [(100, False), (299, False), (300, True), (450, True), (600, True),
                                           (601, False), (999, False)])
def test_guidance_applies_only_inside_its_interval_of_noise_levels(t_now, inside):
    model, (cond, uncond) = CountingModel(), conditions(4)
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), t_now)
    out = guided_denoiser(model, cond, uncond, Guidance(3.0, interval=(0.3, 0.6)), timesteps=1000)(x, t)
    e_c, e_u = model(x, t, cond), model(x, t, uncond)
    expected = e_u + 3.0 * (e_c - e_u) if inside else e_c
    torch.testing.assert_close(out, expected)
    assert model.batches[0] == (8 if inside else 4)  # outside, the conditional model runs alone: one pass of 4


def test_an_interval_that_holds_no_step_is_the_conditional_model_and_the_full_one_is_plain_guidance():
    d = D.GaussianDiffusion.from_name("cosine")
    model, (cond, uncond) = TwoGaussians(d), conditions(2000)
    run = lambda guidance: S.sample(guided_denoiser(model, cond, uncond, guidance, d.T), d, (2000, 2), "dpmpp", 20,
                                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(run(Guidance(4.0, interval=(1.0, 1.0))), run(1.0))
    assert torch.equal(run(Guidance(4.0, interval=(0.0, 1.0))), run(4.0))
    # guiding only the late, low-noise steps moves the mean less than guiding all of them
    late = run(Guidance(4.0, interval=(0.0, 0.3))).mean(0).norm().item()
    assert MU.norm().item() + 0.02 < late < run(4.0).mean(0).norm().item()


@pytest.mark.parametrize("bad", [dict(interval=(0.6, 0.3)), dict(interval=(-0.1, 1.0)), dict(interval=(0.0, 1.5)),
                                 dict(anneal=(0.9, 0.6)), dict(anneal=(0.5, 0.5)), dict(anneal_noise=-1.0),
                                 dict(anneal_noise=float("nan"))])
def test_bad_guidance_settings_are_refused_with_what_is_accepted(bad):
    with pytest.raises(ValueError, match="must be|needs"):
        Guidance(3.0, **bad)


def test_anneal_weight_is_cads_gamma():
    assert [anneal_weight(u, 0.6, 0.9) for u in (0.0, 0.6, 0.75, 0.9, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])


def long_condition(n=3, length=64, real=40):
    from models.text_encoder import TextCondition
    g = torch.Generator().manual_seed(5)
    tokens = 0.3 + 0.7 * torch.randn(n, length, 384, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[:, :real] = True
    tokens[~mask] = 0
    return TextCondition(tokens, mask, torch.randn(n, 384, generator=g, dtype=torch.float64))


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.8])
def test_annealed_condition_keeps_the_prompts_statistics_and_mixes_in_noise_as_cads_says(gamma):
    """y_g = sqrt(g) y + s sqrt(1 - g) n, rescaled: per row, the real tokens keep y's mean and std, padding stays 0,
    and the correlation with y is sqrt(g) sd(y) / sqrt(g var(y) + s^2 (1 - g)) (rescaling does not change it)."""
    cond, s = long_condition(), 0.25
    out = annealed_condition(cond, gamma, s, generators([1, 2, 3]))
    real = cond.mask
    assert torch.equal(out.mask, cond.mask) and torch.all(out.tokens[~real] == 0)
    for row in range(3):
        y, y_g = cond.tokens[row][real[row]], out.tokens[row][real[row]]
        torch.testing.assert_close(y_g.mean(), y.mean())
        torch.testing.assert_close(y_g.std(unbiased=False), y.std(unbiased=False))
        corr = torch.corrcoef(torch.stack([y.flatten(), y_g.flatten()]))[0, 1].item()
        sd = y.std().item()
        assert corr == pytest.approx(gamma ** 0.5 * sd / (gamma * sd ** 2 + s ** 2 * (1 - gamma)) ** 0.5, abs=0.02)


def test_annealed_condition_at_weight_one_is_the_prompt_and_its_noise_is_each_images_own():
    cond = long_condition()
    assert annealed_condition(cond, 1.0, 0.25, generators([1, 2, 3])) is cond
    batch = annealed_condition(cond, 0.5, 0.25, generators([1, 2, 3]))
    alone = annealed_condition(cond.index([2]), 0.5, 0.25, generators([3]))
    torch.testing.assert_close(alone.tokens, batch.tokens[2:], rtol=0, atol=0)
    torch.testing.assert_close(alone.pooled, batch.pooled[2:], rtol=0, atol=0)


def test_cads_feeds_the_network_noised_conditions_early_and_the_prompt_late():
    seen = {}

    def model(x, t, c):
        seen[int(t[0])] = c.tokens[:4].clone()  # the prompt's rows come first, before the empty prompt's
        return torch.zeros_like(x)
    cond, (_, uncond) = long_condition(4), conditions(4)
    denoise = guided_denoiser(model, cond, uncond, Guidance(3.0, anneal=(0.6, 0.9)), 1000, generators(range(4)))
    for t in (950, 750, 500):
        denoise(torch.zeros(4, 2), torch.full((4,), t))
    assert torch.equal(seen[500], cond.tokens)  # u = 0.5 <= tau1: the clean prompt
    corr = lambda t: torch.corrcoef(torch.stack([seen[t][cond.mask].flatten(), cond.tokens[cond.mask].flatten()]))[0, 1].item()
    assert corr(950) < 0.05 < corr(750) < 0.99  # u >= tau2: noise alone; in between: part prompt, part noise
