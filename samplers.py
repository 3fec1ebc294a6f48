"""Samplers: plain functions of a denoiser `denoiser(x_t, t) -> model output` (predicted noise, plus the
Improved-DDPM variance channels when the model learns them), k-diffusion style; the schedule math comes
from `GaussianDiffusion`. Also the bf16 fast path, and image-to-image and
inpainting around any sampler (`edit_sample`: a start from q_sample at t0, and `inpaint_denoiser`, a
denoiser wrapper), not inside each. Guidance (how the prompt steers a denoiser) is in guidance.py.
"""
import math
from collections.abc import Sequence
from typing import Optional

import torch

from diffusion import Callback, Denoiser, GaussianDiffusion, Generators
from models.cpu import bf16_pays_off

# The app's and the commands' default sampler, chosen by measured adherence and time (docs/model_card.md):
# the stochastic solver's fresh noise corrects errors an ODE solver carries to the end.
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_sde", 25
IMG2IMG_STRENGTH = 0.75  # image-to-image's default: keeps the layout and colours, redraws the details

# --- samplers: plain functions of a denoiser ----------------------------------------------------

def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def randn(shape, generator: Generators = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) noise. With one generator per image (shape[0] of them), image k's noise comes from generator k
    alone, so it does not depend on the batch it is drawn in: any image of a batch can be redrawn alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one per image")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


DYNAMIC_PERCENTILE = 0.995  # Imagen's p: the scale s is this quantile of |x_0| in each sample


def threshold_x0(x0: torch.Tensor, clip_x0) -> torch.Tensor:
    """The x_0 estimate, clipped: False leaves it, True clamps it to [-1, 1] (in place), "dynamic" is
    Imagen's dynamic thresholding (Saharia et al. 2022): s = max(1, p-quantile of |x_0|) per sample,
    x_0 = clip(x_0, -s, s) / s. Unlike a static clamp, which flattens every saturated pixel at +-1 (the
    washed-out look of high guidance), it scales a sample back into range and only clips its outliers."""
    if isinstance(clip_x0, str):
        if clip_x0 != "dynamic":
            raise ValueError(f"unknown clip_x0 {clip_x0!r}; choose True, False or 'dynamic'")
        s = torch.quantile(x0.abs().flatten(1), DYNAMIC_PERCENTILE, dim=1).clamp(min=1)
        s = s.view(-1, *([1] * (x0.dim() - 1)))
        return x0.clamp(-s, s) / s
    if clip_x0 not in (True, False, None):
        raise ValueError(f"unknown clip_x0 {clip_x0!r}; choose True, False or 'dynamic'")
    return x0.clamp_(-1, 1) if clip_x0 else x0


def _predict_x0(denoiser: Denoiser, x: torch.Tensor, tt: torch.Tensor, alpha: float, sigma: float, clip_x0):
    """x_0 = (x_t - sigma_t eps) / alpha_t, with the schedule values given as precomputed Python floats."""
    eps = denoiser(x, tt)[:, : x.shape[1]]
    return threshold_x0((x - sigma * eps) / alpha, clip_x0)


def _schedule_floats(diffusion: GaussianDiffusion, ts: list[int]) -> tuple[list[float], list[float], list[float]]:
    """alpha_t, sigma_t and lambda_t of each step as Python floats, computed once before the loop:
    the loop then does no indexing, no host-device copies and no syncs, only the model and a few axpys."""
    idx = torch.tensor(ts)
    return diffusion.alphas[idx].tolist(), diffusion.sigmas[idx].tolist(), diffusion.lambdas[idx].tolist()


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, diffusion: GaussianDiffusion, x: torch.Tensor, steps: Optional[int] = None,
                generator: Generators = None, callback: Callback = None, clip_x0=False, t_start: Optional[int] = None):
    """Ancestral sampling through all T steps of p(x_{t-1} | x_t), or all t_start + 1 from x = x_{t_start}."""
    top = diffusion.first_timestep(t_start=t_start)
    if steps not in (None, top + 1):
        raise ValueError(f"DDPM runs all {top + 1} steps; got steps={steps}")
    for i, t in enumerate(range(top, -1, -1)):
        tt = _tvec(t, x)
        mean, log_var, x0 = diffusion.p_mean_variance(denoiser(x, tt), x, tt)
        if clip_x0:  # the posterior mean must see the clipped x_0
            x0 = threshold_x0(x0, clip_x0)
            mean, _ = diffusion.q_posterior(x0, x, tt)
        if callback is not None:
            callback(i, x, x0)
        x = mean + (0.5 * log_var).exp() * _randn_like(x, generator) if t > 0 else mean
    return x


# The few-step samplers take the step list's options (spacing, start, t_start) of `GaussianDiffusion.timesteps`;
# with t_start, x is x_{t_start} (e.g. q_sample(x_0, t_start) for image-to-image) instead of x_T.

@torch.no_grad()
def ddim_sample(denoiser: Denoiser, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int = 50,
                generator: Generators = None, callback: Callback = None,
                clip_x0=False, eta: float = 0.0, spacing: str = "logsnr", start: str = "T",
                t_start: Optional[int] = None):
    """DDIM (Song et al. 2021): eta=0 is the deterministic ODE-like sampler, eta=1 is DDPM-like."""
    ts = diffusion.timesteps(steps, spacing, start=start, t_start=t_start)
    abar = diffusion.alphas_cumprod[torch.tensor(ts)].tolist() + [1.0]
    alphas, sigmas, _ = _schedule_floats(diffusion, ts)
    for i, t in enumerate(ts):
        x0 = _predict_x0(denoiser, x, _tvec(t, x), alphas[i], sigmas[i], clip_x0)
        if callback is not None:
            callback(i, x, x0)
        a_t, a_prev = abar[i], abar[i + 1]
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with a clipped x0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


def _dpmpp_2m(denoiser: Denoiser, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int, generator: Generators,
              callback: Callback, clip_x0, eta: float, solver: str, spacing: str, start: str, t_start: Optional[int]):
    """The DPM-Solver++(2M) family (Lu et al. 2022; k-diffusion's sample_dpmpp_2m_sde): eta = 0 is the ODE
    solver, eta = 1 the SDE one. With h = lambda_{i+1} - lambda_i and H = (1 + eta) h, each step solves the
    linear part exactly with x_0 held at D and adds fresh noise:
        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x + alpha_{i+1} (1 - e^{-H}) D + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z,
    D = x_0 extrapolated along lambda with the previous step's slope (midpoint or Heun weight). The last
    step lands on the clean image (sigma = 0), which is the predicted x_0 itself, as in k-diffusion."""
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver {solver!r}; choose 'midpoint' or 'heun'")
    ts = diffusion.timesteps(steps, spacing, start=start, t_start=t_start)
    alpha, sigma, lam = _schedule_floats(diffusion, ts)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        x0 = _predict_x0(denoiser, x, _tvec(t, x), alpha[i], sigma[i], clip_x0)
        if callback is not None:
            callback(i, x, x0)
        if i + 1 == len(ts):
            return x0
        h = lam[i + 1] - lam[i]
        big_h = (1 + eta) * h
        phi = -math.expm1(-big_h)  # 1 - e^{-H}, accurate for small h
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            w = 1 / (2 * r) if solver == "midpoint" else (1 / phi - 1 / big_h) / r
            d = x0 + w * (x0 - x0_prev)
        x = (sigma[i + 1] / sigma[i] * math.exp(-eta * h)) * x + (alpha[i + 1] * phi) * d
        if eta:
            x = x + (sigma[i + 1] * math.sqrt(-math.expm1(-2 * eta * h))) * _randn_like(x, generator)
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def dpmpp_2m_sample(denoiser: Denoiser, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int = 20,
                    generator: Generators = None, callback: Callback = None, clip_x0=False,
                    spacing: str = "logsnr", start: str = "T", t_start: Optional[int] = None):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in lambda = log(alpha / sigma): the ODE
    member of `_dpmpp_2m`. Deterministic: `generator` is accepted for a uniform sampler signature."""
    return _dpmpp_2m(denoiser, diffusion, x, steps, None, callback, clip_x0, 0.0, "midpoint", spacing, start, t_start)


@torch.no_grad()
def dpmpp_2m_sde_sample(denoiser: Denoiser, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int = 25,
                        generator: Generators = None, callback: Callback = None, clip_x0=False,
                        solver: str = "midpoint", spacing: str = "logsnr", start: str = "T",
                        t_start: Optional[int] = None):
    """SDE-DPM-Solver++(2M): `_dpmpp_2m` with eta = 1 (k-diffusion's sample_dpmpp_2m_sde default).

    On the Gaussian oracle it needs more steps than the ODE solver (covariance error 0.075 at 20 steps,
    0.015 at 50), but the fresh noise washes out earlier errors: the bf16 rounding at t = T-1 that moves
    20-step DPM-Solver++(2M) samples by 0.1 moves these by 0.001, and on the trained default model it
    draws the prompted emoji far more often (docs/model_card.md). `solver`: "midpoint" (k-diffusion's
    default) or "heun" (the exact integral of x_0 extrapolated linearly in lambda), less accurate here.
    """
    return _dpmpp_2m(denoiser, diffusion, x, steps, generator, callback, clip_x0, 1.0, solver, spacing, start, t_start)


SAMPLERS = {"dpmpp": dpmpp_2m_sample, "dpmpp_sde": dpmpp_2m_sde_sample, "ddim": ddim_sample, "ddpm": ddpm_sample}


def sampler_steps(diffusion: GaussianDiffusion, sampler: str, steps: Optional[int], t_start: Optional[int] = None) -> int:
    """Model evaluations the named sampler will make: DDPM always takes all T steps (t_start + 1 from t_start);
    the others `steps`, and from a t_start (image-to-image) at most one per timestep, t_start + 1."""
    top = diffusion.first_timestep(t_start=t_start)
    steps = DEFAULT_STEPS if steps is None else steps
    return top + 1 if sampler == "ddpm" else (steps if t_start is None else min(steps, top + 1))


def runs_in_bf16(precision: str, dtype: torch.dtype, device) -> bool:
    """Whether `fast_denoiser` runs the denoiser of samples of `dtype` on `device` under bf16 autocast."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose 'auto', 'bf16' or 'fp32'")
    return precision == "bf16" or (precision == "auto" and dtype == torch.float32 and bf16_pays_off(device))


def fast_denoiser(denoiser: Denoiser, x: torch.Tensor, precision: str = "auto") -> Denoiser:
    """The denoiser run under bf16 autocast where that is fast ("auto": float32 samples on a CPU where
    models.cpu.bf16_pays_off; "bf16": always; "fp32": never). The sampler's own arithmetic stays in x's dtype."""
    if not runs_in_bf16(precision, x.dtype, x.device):
        return denoiser

    def run(x_t, t):
        with torch.autocast(x_t.device.type, torch.bfloat16):
            out = denoiser(x_t, t)
        return out.to(x_t.dtype)
    return run


# RePaint's default U, resampling cycles per step (U model evaluations each): on the shipped model, half an emoji
# inpainted with plain replacement (U = 1) often does not match the kept half; with 10 the two make one glyph.
RESAMPLE = 10


def inpaint_denoiser(denoiser: Denoiser, diffusion: GaussianDiffusion, known: torch.Tensor, mask: torch.Tensor,
                     noise: torch.Tensor, resample: int = 1, timesteps: Sequence[int] = (),
                     generator: Generators = None, clip_x0=False) -> Denoiser:
    """RePaint (Lugmayr et al. 2022) around a noise-predicting denoiser, so that every sampler inpaints.

    `mask` is 1 where to generate and 0 where to keep `known` (broadcastable to it). Replacement: the network sees
    the kept region as `known` noised to the current level, alpha_t known + sigma_t noise (one noise draw for all
    steps, so the ODE samplers see a smooth path), next to the sampler's own x_t in the generated region. In the
    kept region the denoiser returns the noise that makes the sampler's x_0 estimate `known`, so previews show it;
    `edit_sample` pastes the exact pixels back at the end.

    Replacement alone conditions the generated region only weakly: information about the kept pixels reaches the
    network as noisy as x_t, and early steps commit to content before it is legible (on a 2-D Gaussian with
    correlation 0.8 it moves the generated coordinate a fifth of the way from its marginal to its conditional
    distribution). Resampling fixes this by mixing: with `resample` = U > 1, before each of its predictions the
    generated region of the sampler's x_t is U - 1 times taken down to the next timestep of `timesteps` (the
    sampler's step list) by the DDPM posterior and noised back up by the forward process, with freshly noised
    kept pixels each time. Those cycles update x_t in place (the samplers read x_t after calling their denoiser)
    and cost U model evaluations per step."""
    alphas, sigmas = (v.to(device=known.device, dtype=known.dtype) for v in (diffusion.alphas, diffusion.sigmas))
    shape = (-1, *([1] * (known.dim() - 1)))
    c = known.shape[1]
    following = dict(zip(timesteps, timesteps[1:]))  # each timestep's next one, where resampling goes down to

    def shown(x, alpha, sigma, z):  # what the network sees: the kept region replaced
        return mask * x + (1 - mask) * (alpha * known + sigma * z)

    def cycle(x, t, s):  # one RePaint resampling of the generated region: down to s, then back up to t
        alpha, sigma = diffusion.alphas[t].item(), diffusion.sigmas[t].item()  # on the CPU: no device sync
        x_t = shown(x, alpha, sigma, _randn_like(x, generator))
        x0 = _predict_x0(denoiser, x_t, _tvec(t, x), alpha, sigma, clip_x0)
        # x_s ~ q(x_s | x_t, x_0), then x_t ~ q(x_t | x_s) = N(sqrt(r) x_s, (1 - r) I), in one draw
        mean, var = diffusion.q_posterior_between(x0, x_t, t, s)
        r = (alpha / diffusion.alphas[s].item()) ** 2
        return math.sqrt(r) * mean + math.sqrt(r * var + 1 - r) * _randn_like(x, generator)

    def denoise(x, t):
        if resample > 1 and (s := following.get(int(t[0]))) is not None:
            for _ in range(resample - 1):
                x.copy_(mask * cycle(x, int(t[0]), s) + (1 - mask) * x)
        alpha, sigma = alphas[t].view(shape), sigmas[t].view(shape)  # indexed on the device: no sync per step
        out = denoiser(shown(x, alpha, sigma, noise), t)
        eps = mask * out[:, :c] + (1 - mask) * ((x - alpha * known) / sigma)
        return torch.cat([eps, out[:, c:]], dim=1)
    return denoise


@torch.no_grad()
def edit_sample(denoiser: Denoiser, diffusion: GaussianDiffusion, init: torch.Tensor, noise: torch.Tensor,
                sampler: str = "dpmpp", steps: Optional[int] = None, strength: float = 1.0,
                mask: Optional[torch.Tensor] = None, generator: Generators = None, callback: Callback = None,
                resample: int = RESAMPLE, **kwargs) -> torch.Tensor:
    """Image-to-image (SDEdit, Meng et al. 2022) and inpainting around the named sampler; `noise` ~ N(0, I).

    `init` (B, C, H, W in [-1, 1]) is noised to t0 = strength * T with q_sample and the sampler runs from there
    (t_start; lowered to the log-SNR floor with start="floor"), with `steps` steps, at most t0 + 1: strength 0
    returns the input, 1 starts from all but pure noise and so ignores it. With `mask` (1 = generate, 0 = keep)
    the kept region is replaced at every step, with `resample` RePaint cycles (`inpaint_denoiser`), and the
    result holds its pixels exactly."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not (isinstance(resample, int) and resample >= 1):
        raise ValueError(f"resample must be a whole number from 1, got {resample!r}")
    t0 = diffusion.strength_timestep(strength)
    if t0 is None:
        return init.clone()
    top = diffusion.first_timestep(kwargs.get("start", "T"), t0)
    x = diffusion.q_sample(init, torch.full((len(init),), top), noise)
    steps = sampler_steps(diffusion, sampler, steps, top)
    if mask is not None:
        ts = range(top, -1, -1) if sampler == "ddpm" else diffusion.timesteps(
            steps, kwargs.get("spacing", "logsnr"), start=kwargs.get("start", "T"), t_start=top)
        denoiser = inpaint_denoiser(denoiser, diffusion, init, mask, noise, resample, list(ts), generator,
                                    kwargs.get("clip_x0", False))
    out = SAMPLERS[sampler](denoiser, diffusion, x, steps, generator=generator, callback=callback, t_start=top, **kwargs)
    return out if mask is None else mask * out + (1 - mask) * init


def sample(denoiser: Denoiser, diffusion: GaussianDiffusion, shape, sampler: str = "dpmpp", steps: Optional[int] = None,
           generator: Generators = None, callback: Callback = None, device=None,
           precision: str = "auto", init: Optional[torch.Tensor] = None, strength: float = 1.0,
           mask: Optional[torch.Tensor] = None, resample: int = RESAMPLE, **kwargs):
    """Draw x_T ~ N(0, I) from `generator` and run the named sampler (DDPM always takes all T steps).

    `generator` is one torch.Generator, or one per image (see `randn`). `precision` is the denoiser's (see
    `fast_denoiser`): by default bf16 autocast on CPUs with native bf16, which makes a sampling step about 1.5x
    faster there; "fp32" turns it off. With `init` (an image batch of `shape`) the noise drawn serves
    image-to-image at `strength`, and inpainting where `mask` is 1 with `resample` RePaint cycles per step (see
    `edit_sample`). Other keyword arguments go to the sampler: clip_x0 (False, True or "dynamic"), eta (DDIM),
    solver (dpmpp_sde), and for the few-step samplers the step list's spacing ("logsnr", "uniform") and start
    ("T", "floor").
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if init is None and (mask is not None or strength != 1):
        raise ValueError("strength and mask apply to an init image; pass init")
    if device is None:
        first = generator if generator is None or isinstance(generator, torch.Generator) else generator[0]
        device = first.device if first is not None else "cpu"
    x = randn(shape, generator, device, kwargs.pop("dtype", torch.float32))
    denoiser = diffusion.eps_denoiser(fast_denoiser(denoiser, x, precision))
    if init is not None:
        if tuple(init.shape) != tuple(x.shape):
            raise ValueError(f"init has shape {tuple(init.shape)}; the batch to generate is {tuple(x.shape)}")
        mask = None if mask is None else mask.to(x)
        return edit_sample(denoiser, diffusion, init.to(x), x, sampler, steps, strength, mask, generator, callback,
                           resample, **kwargs)
    steps = sampler_steps(diffusion, sampler, steps)
    return SAMPLERS[sampler](denoiser, diffusion, x, steps, generator=generator, callback=callback, **kwargs)
