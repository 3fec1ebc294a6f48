"""Gaussian diffusion: the noise schedule and everything derived from it.

`GaussianDiffusion` owns the schedule: q_sample, the posterior, the training losses and the
timestep lists of the few-step samplers (which live in samplers.py and never redo schedule math).
"""
import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch

# denoiser(x_t, t) -> model output; it may update x_t in place first (inpainting's resampling does), and the
# samplers read x_t only after calling it
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]  # (step index, x_t, predicted x_0)
Generators = Optional[torch.Generator | Sequence[torch.Generator]]  # one for the batch, or one per image


# --- noise schedules ---------------------------------------------------------------------------

def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's betas, rescaled so that any T spans the same noise range as T=1000."""
    scale = 1000 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM's closed form alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t + s)/(1 + s)) pi/2), t in [0, 1]."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(torch.zeros_like(t))


def cosine_schedule(T: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    t = torch.arange(T + 1, dtype=torch.float64) / T
    abar = cosine_alpha_bar(t)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to bins of width 2/255."""
    std_normal = torch.distributions.Normal(0.0, 1.0)
    inv_std = torch.exp(-log_scale)
    cdf_plus = std_normal.cdf(inv_std * (x - mean + 1 / 255))
    cdf_minus = std_normal.cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


PREDICTIONS = ("eps", "v")


class GaussianDiffusion:
    """The schedule and everything derived from it. `prediction` is what the network outputs: the noise
    ("eps") or v = alpha_t eps - sigma_t x_0 ("v", Salimans & Ho 2022), which stays informative at the
    top of the schedule where an eps-model's x_0 estimate is almost pure error."""

    def __init__(self, betas: torch.Tensor, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.prediction = prediction
        self.betas = betas.double()
        self.T = len(betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.alphas = self.alphas_cumprod.sqrt()  # x_t = alpha_t x_0 + sigma_t eps
        self.sigmas = (1 - self.alphas_cumprod).sqrt()
        self.lambdas = torch.log(self.alphas / self.sigmas)  # half log-SNR, decreasing in t
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # posterior variance is 0 at t=0: clip its log to the t=1 value, as Improved DDPM does
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def from_name(cls, schedule: str = "cosine", T: int = 1000, prediction: str = "eps") -> "GaussianDiffusion":
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        return cls(SCHEDULES[schedule](T), prediction)

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as a (B, 1, 1, ...) tensor broadcastable against `like`."""
        out = values[t.cpu()].to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # --- forward process and posterior -----------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x_0, the v-prediction target."""
        return self._at(self.alphas, t, x0) * noise - self._at(self.sigmas, t, x0) * x0

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def q_posterior(self, x0, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef_x0, t, x_t) * x0 + self._at(self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance, t, x_t)

    def q_posterior_between(self, x0: torch.Tensor, x_t: torch.Tensor, t: int, s: int) -> tuple[torch.Tensor, float]:
        """Mean and variance of q(x_s | x_t, x_0) for any s < t (q_posterior is the case s = t - 1): with
        r = abar_t / abar_s, mean = (sqrt(abar_s) (1 - r) x_0 + sqrt(r) (1 - abar_s) x_t) / (1 - abar_t) and
        variance (1 - abar_s)(1 - r) / (1 - abar_t)."""
        a_t, a_s = self.alphas_cumprod[t].item(), self.alphas_cumprod[s].item()
        r = a_t / a_s
        mean = (math.sqrt(a_s) * (1 - r) * x0 + math.sqrt(r) * (1 - a_s) * x_t) / (1 - a_t)
        return mean, (1 - a_s) * (1 - r) / (1 - a_t)

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False):
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) from the model output.

        With learned variance the extra channels v in [-1, 1] interpolate, in the log domain,
        between the posterior variance (v=-1) and beta_t (v=+1), as in Improved DDPM.
        """
        c = x_t.shape[1]
        eps = out[:, :c]
        x0 = self.predict_x0(x_t, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, log_var = self.q_posterior(x0, x_t, t)
        if out.shape[1] == 2 * c:
            frac = (out[:, c:] + 1) / 2
            log_var = frac * self._at(self.betas.log(), t, x_t) + (1 - frac) * log_var
        return mean, log_var, x0

    # --- training losses --------------------------------------------------------------------------

    def vlb_term(self, out, x0, x_t, t) -> torch.Tensor:
        """Per-sample L_{t-1} of the variational bound in bits/dim (decoder NLL at t=0)."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.p_mean_variance(out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def eps_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output with its first channels turned into predicted noise (eps = sigma x_t + alpha v)."""
        if self.prediction == "eps":
            return out
        c = x_t.shape[1]
        eps = self._at(self.sigmas, t, x_t) * x_t + self._at(self.alphas, t, x_t) * out[:, :c]
        return torch.cat([eps, out[:, c:]], dim=1)

    def eps_denoiser(self, denoiser: Denoiser) -> Denoiser:
        """A denoiser that returns predicted noise whatever the network predicts: what the samplers expect."""
        return denoiser if self.prediction == "eps" else lambda x, t: self.eps_from_output(denoiser(x, t), x, t)

    def loss_weight(self, t: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023): the x_0-error weight SNR clipped at gamma, expressed
        for the target's own MSE: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v. 0: off."""
        if not min_snr_gamma:
            return torch.ones(len(t), dtype=torch.float64)
        snr = (self.alphas_cumprod / (1 - self.alphas_cumprod))[t.cpu()]
        return snr.clamp(max=min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)

    def training_loss(self, model: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      vlb_weight: float = 0.001, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """Per-sample loss: MSE of the predicted noise (or v), optionally Min-SNR weighted, plus
        lambda * L_vlb when the model learns its variance.

        As in Improved DDPM the VLB term sees a frozen noise prediction, so it trains only the
        variance, and L_vlb = T * E_t[L_t] makes lambda = 0.001 weigh each term by T/1000.
        """
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t)
        c = x0.shape[1]
        target = noise if self.prediction == "eps" else self.q_velocity(x0, t, noise)
        weight = self.loss_weight(t, min_snr_gamma).to(device=out.device, dtype=torch.float32)
        loss = weight * mean_flat((out[:, :c].float() - target.float()) ** 2)
        if out.shape[1] == 2 * c:
            frozen = self.eps_from_output(torch.cat([out[:, :c].detach(), out[:, c:]], dim=1).float(), x_t, t)
            loss = loss + vlb_weight * self.T * self.vlb_term(frozen, x0.float(), x_t.float(), t)
        return loss

    def first_timestep(self, start: str = "T", t_start: Optional[int] = None, min_lambda: float = -5.0) -> int:
        """Where the step list of `timesteps` starts: t_start (default T-1), lowered to the log-SNR floor with
        start="floor"."""
        top = self.T - 1 if t_start is None else t_start
        if not 0 <= top <= self.T - 1:
            raise ValueError(f"t_start must be between 0 and {self.T - 1}, got {t_start}")
        if start == "floor":
            return min(top, int((self.lambdas - min_lambda).abs().argmin()))
        if start != "T":
            raise ValueError(f"unknown start {start!r}; choose 'T' or 'floor'")
        return top

    def strength_timestep(self, strength: float) -> Optional[int]:
        """Image-to-image strength in [0, 1] -> the timestep t0 = strength * T the input is noised to (at most
        T-1, where the input is all but gone: alpha_{T-1} ~ 0.002 on the cosine schedule); None for 0,
        which leaves the input as it is."""
        if not 0 <= strength <= 1:  # also refuses NaN
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        return None if strength == 0 else min(self.T - 1, round(strength * self.T))

    def timesteps(self, steps: int, spacing: str = "logsnr", min_lambda: float = -5.0, start: str = "T",
                  t_start: Optional[int] = None) -> list[int]:
        """`steps` distinct timesteps from the first one down to 0 for the few-step samplers.

        "logsnr" spaces them evenly in log-SNR (floored at `min_lambda`, since the top of a cosine
        schedule is all noise), which puts enough steps at low noise: with 20 DPM-Solver++ steps
        it is several times more accurate than "uniform" spacing in t on the Gaussian oracle test.

        The first timestep is T-1 (`start="T"`), or with `start="floor"` the one whose log-SNR is nearest
        `min_lambda`: an eps-model's x_0 estimate at T-1 (log-SNR about -10 on the cosine schedule) is
        nearly pure error. x_T ~ N(0, I) stays right there: the marginal at the floor has variance
        alpha^2 Var(x_0) + sigma^2 = 1 - alpha^2 (1 - Var(x_0)) with alpha^2 = sigmoid(2 min_lambda) ~ 5e-5.
        `t_start` truncates the list further (image-to-image from x_t0 = q_sample(x_0, t0)); the
        default, T-1, gives exactly the full list.
        """
        top = self.first_timestep(start, t_start, min_lambda)
        if not 1 <= steps <= top + 1:
            raise ValueError(f"steps must be between 1 and {top + 1}, got {steps}")
        if spacing == "uniform":
            return torch.linspace(top, 0, steps, dtype=torch.float64).round().long().tolist()
        if spacing != "logsnr":
            raise ValueError(f"unknown spacing {spacing!r}; choose 'logsnr' or 'uniform'")
        lam = self.lambdas
        targets = torch.linspace(max(lam[top].item(), min_lambda), lam[0].item(), steps, dtype=torch.float64)
        nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
        ts = [top]
        for i, t in enumerate(nearest[1:], start=1):  # strictly decreasing, leaving room for the rest
            ts.append(max(min(t, ts[-1] - 1), steps - 1 - i))
        return ts
