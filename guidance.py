"""How the prompt steers sampling: classifier-free guidance, limited to an interval of noise levels, and
condition annealing (CADS). Each turns a conditional network `model(x, t, cond)` into a plain denoiser
`denoiser(x_t, t)` for the samplers.

Noise levels are written as u = t / T, 1 at pure noise and 0 at the clean image.
- Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality"): guidance early in sampling mostly decides the layout and wipes out variety; outside
  [low, high] the conditional model runs alone (one network pass instead of two).
- CADS (Sadat et al. 2024, "Condition-annealed diffusion sampler"): the condition the network sees is
  y_u = sqrt(gamma(u)) y + s sqrt(1 - gamma(u)) n, with fresh n ~ N(0, I) at each step, then rescaled to y's
  mean and standard deviation (psi = 1). gamma is 0 above u = tau2, 1 below tau1 and linear in between, so
  the first part of sampling hears a blurred prompt and picks a layout of its own; the last part hears it clearly.
"""
import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from diffusion import Denoiser
from models.text_encoder import TextCondition, concat_conditions
from samplers import randn

CADS_SEED_OFFSET = 0xCAD5  # the condition noise of image k comes from seed k + this: apart from its sampling noise


@dataclass(frozen=True)
class Guidance:
    """`scale`: eps = eps_uncond + scale (eps_cond - eps_uncond), 1 = none. `interval`: the (low, high) range of
    u = t/T where guidance applies, (0, 1) = everywhere. `anneal`: CADS's (tau1, tau2), None = off, with
    condition noise `anneal_noise` (s)."""
    scale: float = 3.0
    interval: tuple[float, float] = (0.0, 1.0)
    anneal: Optional[tuple[float, float]] = None
    anneal_noise: float = 0.25

    def __post_init__(self):
        low, high = self.interval
        if not 0 <= low <= high <= 1:
            raise ValueError(f"guidance interval must be 0 <= low <= high <= 1 (of t/T), got {self.interval}")
        if self.anneal is not None and not 0 <= self.anneal[0] < self.anneal[1] <= 1:
            raise ValueError(f"condition annealing needs 0 <= tau1 < tau2 <= 1 (of t/T), got {self.anneal}")
        if not self.anneal_noise >= 0:
            raise ValueError(f"condition noise must be >= 0, got {self.anneal_noise}")


# The web app's and the commands' default, chosen by measured adherence and variety (docs/model_card.md, "Guidance
# at sampling time"): on stage 14, scale 3 draws the concept as often as 4 with a little more variety, more of the
# named style and a lower FD; 5, guidance limited to an interval, and condition annealing lost adherence.
DEFAULT_GUIDANCE = Guidance(3.0)


def add_guidance_arguments(p: argparse.ArgumentParser, default: Guidance = DEFAULT_GUIDANCE) -> None:
    """--guidance, --guidance-interval, --cads and --cads-noise, for the commands that sample."""
    p.add_argument("--guidance", type=float, default=default.scale, help="classifier-free guidance scale (1: none)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=list(default.interval), metavar=("LOW", "HIGH"),
                   help="guide only where t/T lies in [LOW, HIGH] (Kynkaanniemi et al. 2024); 0 1: everywhere")
    p.add_argument("--cads", type=float, nargs=2, default=default.anneal and list(default.anneal),
                   metavar=("TAU1", "TAU2"), help="condition annealing (CADS): the prompt is noised above t/T = TAU1 "
                   "and replaced by noise above TAU2 (None: off)")
    p.add_argument("--no-cads", dest="cads", action="store_const", const=None, help="condition annealing off")
    p.add_argument("--cads-noise", type=float, default=default.anneal_noise, help="CADS's noise scale s")


def guidance_from_arguments(args: argparse.Namespace) -> Guidance:
    """The Guidance of parsed `add_guidance_arguments` flags, or a one-line error saying what is accepted."""
    try:
        return Guidance(args.guidance, tuple(args.guidance_interval), args.cads and tuple(args.cads), args.cads_noise)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def describe_guidance(g: Guidance) -> str:
    """"guidance 3, in t/T 0.2-0.8, CADS 0.6-0.9 (s 0.25)": the parts that differ from plain guidance."""
    text = f"guidance {g.scale:g}"
    if g.interval != (0.0, 1.0):
        text += f" in t/T {g.interval[0]:g}-{g.interval[1]:g}"
    return text + (f", CADS {g.anneal[0]:g}-{g.anneal[1]:g} (s {g.anneal_noise:g})" if g.anneal else "")


def anneal_weight(u: float, tau1: float, tau2: float) -> float:
    """CADS's gamma(u): 1 (the clean condition) for u <= tau1, 0 for u >= tau2, linear in between."""
    return min(1.0, max(0.0, (tau2 - u) / (tau2 - tau1)))


def _rescaled(y: torch.Tensor, y_noised: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`y_noised` moved to the mean and standard deviation of `y`, per row, over the entries where weight > 0."""
    dims = tuple(range(1, y.dim()))
    count = weight.sum(dims, keepdim=True).clamp_min(1)

    def stats(v):
        mean = (v * weight).sum(dims, keepdim=True) / count
        return mean, (((v - mean) ** 2 * weight).sum(dims, keepdim=True) / count).sqrt()
    (m, s), (m_n, s_n) = stats(y), stats(y_noised)
    return ((y_noised - m_n) / s_n.clamp_min(1e-12) * s + m) * weight


def annealed_condition(cond: TextCondition, gamma: float, noise_scale: float,
                       generators: Optional[Sequence[torch.Generator]]) -> TextCondition:
    """CADS's noised condition at weight `gamma` (1: `cond` itself), noise from one generator per row."""
    if gamma >= 1:
        return cond
    real = (cond.mask > 0).to(cond.tokens.dtype)
    noise = lambda v: randn(v.shape, generators, v.device, v.dtype)
    mix = lambda v: gamma ** 0.5 * v + noise_scale * (1 - gamma) ** 0.5 * noise(v)
    tokens = _rescaled(cond.tokens, mix(cond.tokens), real[..., None].expand_as(cond.tokens))
    pooled = _rescaled(cond.pooled, mix(cond.pooled), torch.ones_like(cond.pooled))
    return cond._replace(tokens=tokens, pooled=pooled)  # the style weights, if any, stay as they are


def guided_denoiser(model, cond: TextCondition, uncond: TextCondition, guidance: Guidance | float,
                    timesteps: int = 1000, generators: Optional[Sequence[torch.Generator]] = None) -> Denoiser:
    """Classifier-free guidance of `model(x, t, cond)` towards `cond` and away from `uncond` (TextConditions of
    one row per image), within `guidance.interval`, with CADS when `guidance.anneal` is set (its noise from
    `generators`, one per image). A float is a plain `Guidance(scale)`; scale 1 is exactly the conditional model.
    Learned variance channels, if any, come from the conditional prediction."""
    g = guidance if isinstance(guidance, Guidance) else Guidance(float(guidance))
    low, high = g.interval
    both = concat_conditions([cond, uncond])  # padded once; again only for an annealed step's noised condition

    def denoise(x, t):
        u = float(t.reshape(-1)[0]) / timesteps  # the samplers step every image of a batch alike
        c = cond if g.anneal is None else annealed_condition(cond, anneal_weight(u, *g.anneal), g.anneal_noise,
                                                              generators)
        if g.scale == 1 or not low <= u <= high:
            return model(x, t, c)
        pair = both if c is cond else concat_conditions([c, uncond])
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), pair).chunk(2)
        k = x.shape[1]
        return torch.cat([out_u[:, :k] + g.scale * (out_c[:, :k] - out_u[:, :k]), out_c[:, k:]], dim=1)
    return denoise
