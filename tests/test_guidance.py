"""Classifier-free guidance on a two-Gaussian model with exact answers."""
import pytest
import torch

import diffusion as D
import samplers as S
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
    assert torch.equal(S.guided_denoiser(model, cond, uncond, 1.0)(x, t), model(x, t, cond))
    # and at other scales, the guided prediction is the textbook combination
    e_c, e_u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(S.guided_denoiser(model, cond, uncond, 3.0)(x, t), e_u + 3.0 * (e_c - e_u))


def test_guidance_above_one_moves_samples_away_from_the_unconditional_ones():
    d = D.GaussianDiffusion.from_name("cosine")
    model = TwoGaussians(d)
    cond, uncond = conditions(4000)
    dist = {}
    for scale in (1.0, 2.0, 4.0):
        g = torch.Generator().manual_seed(0)
        x = S.sample(S.guided_denoiser(model, cond, uncond, scale), d, (4000, 2), "dpmpp", 20,
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
    out = S.guided_denoiser(model, cond, uncond, scale)(x, t)
    torch.testing.assert_close(out[:, :2], out_u[:, :2] + scale * (out_c[:, :2] - out_u[:, :2]))
    assert torch.equal(out[:, 2:], out_c[:, 2:])
