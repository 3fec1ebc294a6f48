"""Samplers against the closed-form optimal denoiser of Gaussian data, and guidance."""
import math
from functools import partial

import pytest
import torch

import diffusion as D
import samplers as S
from tests.gaussian_oracle import MU, SIGMA, exact_moment_errors, marginal_cov, moment_errors, optimal_eps

N = 20_000  # standard error of each whitened covariance entry is about 0.01

# (sampler, steps, max |mean error|, max |whitened cov - I|); measured errors are about half of these
# (ddpm 0.02-0.04, ddim-50 0.10, dpmpp-20 0.05, dpmpp_sde-50 0.01): DDPM's fixed variance and the few-step
# discretisations leave small biases in the narrow direction.
CASES = [("ddpm", None, 0.015, 0.08), ("ddim", 50, 0.015, 0.15), ("dpmpp", 20, 0.015, 0.10),
         ("dpmpp_sde", 50, 0.015, 0.04)]


def run(sampler, steps, diffusion, denoiser, seed=0, n=N, **options):
    g = torch.Generator().manual_seed(seed)
    return S.sample(denoiser, diffusion, (n, 2), sampler, steps, generator=g, dtype=torch.float64, **options)


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

@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10), ("dpmpp", 10), ("dpmpp_sde", 10)])
def test_same_seed_same_samples_different_seed_different(sampler, steps):
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    a, b, c = (run(sampler, steps, d, eps, seed=s, n=64) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", [partial(S.ddim_sample, eta=1.0), S.dpmpp_2m_sde_sample])
def test_stochastic_samplers_use_the_generator(sampler):
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = [sampler(eps, d, x, 10, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("sampler,steps,calls", [("ddpm", None, 1000), ("ddim", 7, 7), ("dpmpp", 7, 7),
                                                      ("dpmpp_sde", 7, 7)])
def test_callback_sees_every_step_with_x_t_and_x0(sampler, steps, calls):
    d = D.GaussianDiffusion.from_name("cosine")
    seen = []
    g = torch.Generator().manual_seed(0)
    out = S.sample(optimal_eps(d.alphas_cumprod), d, (8, 2), sampler, steps, generator=g,
                   callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())), dtype=torch.float64)
    assert [i for i, _, _ in seen] == list(range(calls))
    assert seen[0][1].std() > 0.5, "the first x_t is (almost) pure noise"
    assert torch.allclose(seen[-1][2], out, atol=0.05), "the last x0 prediction is the result"


def test_unknown_sampler_is_a_clear_error():
    d = D.GaussianDiffusion.from_name("cosine")
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of"):
        S.sample(lambda x, t: x, d, (1, 2), "euler")


# --- hand-computed steps: each coefficient of the update formulas pinned --------------------------

def schedule_with_lambdas(*lambdas):
    """A T = len(lambdas) schedule whose half log-SNRs are exactly these: alpha-bar = sigmoid(2 lambda)."""
    abar = torch.sigmoid(2 * torch.tensor(lambdas, dtype=torch.float64))
    return D.GaussianDiffusion(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))


def toy_eps(x, t):
    """Any smooth denoiser will do; t enters so that each step's x_0 estimate differs."""
    return torch.tanh(x) + 0.1 * t.view(-1, 1).to(x.dtype)


# log-SNRs -2 -> 1 -> 2: steps h = 3 then h = 1, so the second step has r = h_prev / h = 3 (1/3 if inverted)
UNEQUAL = (2.0, 1.0, -2.0)
X_T = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)


def hand_run(sampler, **options):
    """The sampler on the 3-step schedule: (x at each step, output, x_0 estimator, alphas, sigmas)."""
    d = schedule_with_lambdas(*UNEQUAL)
    assert d.timesteps(3) == [2, 1, 0]
    a, s = d.alphas.tolist(), d.sigmas.tolist()
    seen = []
    out = sampler(toy_eps, d, X_T, 3, callback=lambda i, x, x0: seen.append(x), **options)
    x0_of = lambda x, t: (x - s[t] * toy_eps(x, torch.tensor([t]))) / a[t]
    return seen, out, x0_of, a, s


def test_dpmpp_2m_step_with_unequal_step_sizes_matches_the_paper():
    """Lu et al. 2022, Algorithm 2: x_i = (s_i/s_{i-1}) x - a_i (e^{-h_i} - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i, here 3 / 1."""
    seen, out, x0_of, a, s = hand_run(S.dpmpp_2m_sample)
    x0_2 = x0_of(X_T, 2)
    x1 = s[1] / s[2] * X_T + a[1] * (1 - math.exp(-3)) * x0_2  # first step: first order
    x0_1 = x0_of(x1, 1)
    d = (1 + 1 / 6) * x0_1 - (1 / 6) * x0_2
    x_end = s[0] / s[1] * x1 + a[0] * (1 - math.exp(-1)) * d
    torch.testing.assert_close(seen[1], x1)
    torch.testing.assert_close(seen[2], x_end)
    torch.testing.assert_close(out, x0_of(x_end, 0))  # the last step returns the x_0 estimate


# second-order weights w in D = x0 + w (x0 - x0_prev) at h = 1, r = 3: midpoint 1/(2r); heun
# (1/(1 - e^{-2h}) - 1/(2h)) / r, from integrating 2 e^{-2(h - tau)} (x0 + tau (x0 - x0_prev) / h_prev) exactly
@pytest.mark.parametrize("solver,w", [("midpoint", 1 / 6), ("heun", (1 / (1 - math.exp(-2)) - 1 / 2) / 3)])
def test_sde_dpmpp_2m_steps_match_the_formula(solver, w):
    """x_{i+1} = (s_{i+1}/s_i) e^{-h} x + a_{i+1} (1 - e^{-2h}) D + s_{i+1} sqrt(1 - e^{-2h}) z,
    with z the generator's draws in order."""
    seen, out, x0_of, a, s = hand_run(S.dpmpp_2m_sde_sample, solver=solver, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    z1, z2 = (torch.randn(X_T.shape, generator=g, dtype=torch.float64) for _ in range(2))
    x0_2 = x0_of(X_T, 2)
    x1 = s[1] / s[2] * math.exp(-3) * X_T + a[1] * (1 - math.exp(-6)) * x0_2 + s[1] * math.sqrt(1 - math.exp(-6)) * z1
    x0_1 = x0_of(x1, 1)
    d = x0_1 + w * (x0_1 - x0_2)
    x_end = s[0] / s[1] * math.exp(-1) * x1 + a[0] * (1 - math.exp(-2)) * d + s[0] * math.sqrt(1 - math.exp(-2)) * z2
    torch.testing.assert_close(seen[1], x1)
    torch.testing.assert_close(seen[2], x_end)
    torch.testing.assert_close(out, x0_of(x_end, 0))


# --- SDE-DPM-Solver++(2M) on the oracle --------------------------------------------------------------

# measured max |whitened cov - I| (N = 200k, cosine): midpoint 0.075 at 20 steps, 0.015 at 50, 0.001 at 100;
# heun 0.22 at 20, 0.03 at 50. (At 10 steps the bias crosses zero, so 10 steps is not a fair comparison.)
SDE_TOL = {("midpoint", 20): 0.12, ("midpoint", 50): 0.04, ("heun", 20): 0.3, ("heun", 50): 0.06}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("solver", ["midpoint", "heun"])
def test_sde_solver_error_shrinks_with_steps(schedule, solver):
    d = D.GaussianDiffusion.from_name(schedule)
    eps = optimal_eps(d.alphas_cumprod)
    errors = {steps: moment_errors(run("dpmpp_sde", steps, d, eps, solver=solver)) for steps in (20, 50)}
    for steps, (mean_err, cov_err) in errors.items():
        assert mean_err < 0.015 and cov_err < SDE_TOL[solver, steps], (steps, mean_err, cov_err)
    assert errors[50][1] < errors[20][1] / 2, errors


UNIFORM_STEPS = (10, 20, 40, 80, 160, 320)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_with_uniform_spacing_converges_at_second_order(schedule):
    """Steps evenly spaced in t are uneven in lambda (r far from 1), where the multistep correction matters.
    Exact output moments (no sampling noise) must improve with every doubling of the steps, and by
    about 4x per doubling once fine: measured 0.61/0.57/0.32/0.11/0.029/0.0055 (cosine) and
    0.92/0.50/0.40/0.23/0.076/0.016 (linear). With r upside down the solver is only first order (about
    2.5x per doubling), though by luck of these steps it is even more accurate at 20-80 steps."""
    d = D.GaussianDiffusion.from_name(schedule)
    eps = optimal_eps(d.alphas_cumprod)
    errors = [exact_moment_errors(lambda x: S.dpmpp_2m_sample(eps, d, x, steps, spacing="uniform"))
              for steps in UNIFORM_STEPS]
    assert all(mean_err < 0.002 for mean_err, _ in errors), errors
    cov = [cov_err for _, cov_err in errors]
    assert all(a > b for a, b in zip(cov, cov[1:])) and cov[-1] < 0.02, cov
    assert cov[-1] / cov[-2] < 0.3, cov


# --- DDIM with eta = 1 ------------------------------------------------------------------------------

def test_ddim_eta_one_step_is_the_exact_posterior_of_point_mass_data():
    """Data x_0 = MU exactly (the oracle with zero covariance): the optimal denoiser knows x_0, and one
    DDIM step with eta = 1 from t to s must draw from q(x_s | x_t, x_0), derived here by Bayes' rule:
    prior x_s ~ N(sqrt(a_s) x_0, 1 - a_s), likelihood x_t | x_s ~ N(sqrt(a_t / a_s) x_s, 1 - a_t / a_s).
    (A moment test of the final samples cannot see a wrong eta: every eta has the right marginals.)"""
    d = D.GaussianDiffusion.from_name("cosine")
    t, s = 600, 300
    assert d.timesteps(3, "uniform", t_start=t) == [t, s, 0]
    a_t, a_s = d.alphas_cumprod[t], d.alphas_cumprod[s]
    x_t = d.q_sample(MU[None], torch.tensor([t]), torch.tensor([[0.8, -1.5]], dtype=torch.float64))
    eps = optimal_eps(d.alphas_cumprod, MU, torch.zeros(2, 2, dtype=torch.float64))
    seen = []
    S.ddim_sample(eps, d, x_t.repeat(N, 1), 3, torch.Generator().manual_seed(0), eta=1.0, spacing="uniform",
                  t_start=t, callback=lambda i, x, x0: seen.append(x))
    x_s = seen[1]
    precision = 1 / (1 - a_s) + (a_t / a_s) / (1 - a_t / a_s)
    mean = (a_s.sqrt() * MU / (1 - a_s) + (a_t / a_s).sqrt() * x_t[0] / (1 - a_t / a_s)) / precision
    se = (1 / precision / N).sqrt().item()  # standard error of the sample mean
    torch.testing.assert_close(x_s.mean(0), mean, atol=4 * se, rtol=0)
    torch.testing.assert_close(x_s.var(0), (1 / precision).expand(2), atol=0, rtol=0.05)  # rel. s.e. 1%


def test_ddim_eta_one_with_all_steps_is_ddpm():
    """Every step t -> t-1 of DDIM with eta = 1 is the DDPM posterior step, noise draws in the same order."""
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    ddpm, ddim = (run(name, None if name == "ddpm" else 1000, d, eps, n=64, **kw)
                  for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0})))
    torch.testing.assert_close(ddim, ddpm, atol=1e-9, rtol=0)


# --- where the step list starts --------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_floor_start_is_the_timestep_at_the_log_snr_floor(schedule):
    d = D.GaussianDiffusion.from_name(schedule)
    top = d.timesteps(20, start="floor")[0]
    lam = d.lambdas
    assert abs(lam[top] + 5) <= min(abs(lam[top - 1] + 5), abs(lam[top + 1] + 5))
    assert d.timesteps(20)[0] == 999  # the default is unchanged
    # there x_T ~ N(0, I) is (almost) the marginal of the data: N(a MU, a^2 SIGMA + s^2 I)
    abar = d.alphas_cumprod[top]
    assert (marginal_cov(abar) - torch.eye(2, dtype=torch.float64)).abs().max() < 1e-4
    assert (abar.sqrt() * MU).abs().max() < 0.005


@pytest.mark.parametrize("start", ["T", "floor"])
@pytest.mark.parametrize("sampler,steps,mean_tol,cov_tol", CASES[1:])
def test_both_starts_reproduce_gaussian_data(start, sampler, steps, mean_tol, cov_tol):
    d = D.GaussianDiffusion.from_name("cosine")
    mean_err, cov_err = moment_errors(run(sampler, steps, d, optimal_eps(d.alphas_cumprod), start=start))
    assert mean_err < mean_tol and cov_err < cov_tol, (mean_err, cov_err)


# --- truncated step lists (image-to-image) ---------------------------------------------------------

FEW_STEP = [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpmpp", {}), ("dpmpp_sde", {}), ("dpmpp_sde", {"solver": "heun"})]


@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("sampler,options", FEW_STEP)
def test_t_start_at_the_top_is_the_full_sampler_bit_for_bit(sampler, options, spacing):
    d = D.GaussianDiffusion.from_name("cosine")
    eps = optimal_eps(d.alphas_cumprod)
    full = run(sampler, 12, d, eps, n=64, spacing=spacing, **options)
    assert torch.equal(run(sampler, 12, d, eps, n=64, spacing=spacing, t_start=999, **options), full)
    assert d.timesteps(12, spacing, t_start=999) == d.timesteps(12, spacing)


@pytest.mark.parametrize("sampler,options", FEW_STEP)
def test_strength_zero_returns_the_input(sampler, options):
    """t_start = 0: one step from x_0' = q_sample(x_0, 0), which is x_0 up to sigma_0 = 0.0064 of noise that
    the single denoising step may leave; starting anywhere else would return an unrelated sample."""
    d = D.GaussianDiffusion.from_name("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = MU + torch.randn(64, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    x_t0 = d.q_sample(x0, torch.zeros(64, dtype=torch.long), torch.randn(64, 2, generator=g, dtype=torch.float64))
    out = S.SAMPLERS[sampler](optimal_eps(d.alphas_cumprod), d, x_t0, 1, generator=g, t_start=0, **options)
    assert (out - x0).abs().max() < 5 * d.sigmas[0]


@pytest.mark.parametrize("sampler,steps,mean_tol,cov_tol", CASES[1:])
def test_starting_from_q_sample_at_t0_reproduces_gaussian_data(sampler, steps, mean_tol, cov_tol):
    d = D.GaussianDiffusion.from_name("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = MU + torch.randn(N, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    t0 = torch.full((N,), 500)
    x_t0 = d.q_sample(x0, t0, torch.randn(N, 2, generator=g, dtype=torch.float64))
    out = S.SAMPLERS[sampler](optimal_eps(d.alphas_cumprod), d, x_t0, steps, generator=g, t_start=500)
    mean_err, cov_err = moment_errors(out)
    assert mean_err < mean_tol and cov_err < cov_tol, (mean_err, cov_err)


# --- x_0 thresholding -------------------------------------------------------------------------------

def test_dynamic_thresholding_on_a_hand_built_tensor():
    """Sample 0 lies in [-0.5, 0.5]: s = max(1, .) = 1 leaves it alone. Sample 1 holds |x| = 0, 0.01, ..., 2.00
    (201 values, mixed signs, shuffled); the 0.995-quantile of 201 sorted values is the one at index
    0.995 * 200 = 199, so s = 1.99: x / 1.99, with only the +-2.00 clipped to +-1.99 first."""
    small = torch.linspace(-0.5, 0.5, 201)
    big = (torch.arange(201) / 100) * torch.tensor([1.0, -1.0]).repeat(101)[:201]
    big = big[torch.randperm(201, generator=torch.Generator().manual_seed(0))]
    x0 = torch.stack([small, big]).view(2, 3, 67)  # image-shaped: the quantile is over each sample's pixels
    out = S.threshold_x0(x0.clone(), "dynamic")
    assert torch.equal(out[0], x0[0])
    torch.testing.assert_close(out[1].flatten(), big.clamp(-1.99, 1.99) / 1.99)
    assert out[1].abs().max() == 1
    assert torch.equal(S.threshold_x0(x0.clone(), True), x0.clamp(-1, 1))  # static clip, as before
    assert torch.equal(S.threshold_x0(x0.clone(), False), x0)


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 5), ("dpmpp", 5), ("dpmpp_sde", 5)])
def test_samplers_threshold_x0_dynamically(sampler, steps):
    """A denoiser that predicts no noise: x_0 = x_t / alpha_t, far outside [-1, 1] at high noise."""
    d = D.GaussianDiffusion.from_name("cosine")
    seen = []
    out = S.sample(lambda x, t: torch.zeros_like(x), d, (4, 3, 8, 8), sampler, steps, clip_x0="dynamic",
                   generator=torch.Generator().manual_seed(0), callback=lambda i, x, x0: seen.append((x, x0)))
    ts = list(range(999, -1, -1)) if sampler == "ddpm" else d.timesteps(steps)
    for t, (x, x0) in zip(ts, seen):
        torch.testing.assert_close(x0, S.threshold_x0(x / d.alphas[t].float(), "dynamic"))
    assert (seen[0][1].abs().amax(dim=(1, 2, 3)) == 1).all()
    assert out.abs().max() <= 1  # the last step lands on the thresholded x_0 (DDPM: its posterior mean uses it)


@pytest.mark.parametrize("bad", ["static", "Dynamic", 2, 0.5])
def test_unknown_clip_x0_is_a_clear_error(bad):
    d = D.GaussianDiffusion.from_name("cosine")
    with pytest.raises(ValueError, match="unknown clip_x0"):
        S.sample(lambda x, t: x, d, (1, 2), "dpmpp", 2, clip_x0=bad)


# --- every numeric range check accepts its ends and refuses one past them --------------------------

@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
def test_timesteps_range_checks_at_both_ends(spacing):
    d = D.GaussianDiffusion.from_name("cosine")
    assert d.timesteps(1, spacing) == [999] and len(d.timesteps(1000, spacing)) == 1000
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
            d.timesteps(steps, spacing)
    assert d.timesteps(1, spacing, t_start=0) == [0] and d.timesteps(1, spacing, t_start=999) == [999]
    assert d.timesteps(101, spacing, t_start=100) == list(range(100, -1, -1))
    with pytest.raises(ValueError, match="steps must be between 1 and 101"):
        d.timesteps(102, spacing, t_start=100)
    for t_start in (-1, 1000):
        with pytest.raises(ValueError, match="t_start must be between 0 and 999"):
            d.timesteps(1, spacing, t_start=t_start)
    top = d.timesteps(1, spacing, start="floor")[0]
    assert len(d.timesteps(top + 1, spacing, start="floor")) == top + 1
    with pytest.raises(ValueError, match=f"steps must be between 1 and {top + 1}"):
        d.timesteps(top + 2, spacing, start="floor")


def test_sampler_range_checks_at_both_ends():
    d = D.GaussianDiffusion.from_name("cosine")
    zero = lambda x, t: torch.zeros_like(x)
    x = torch.zeros(1, 2)
    for steps in (None, 1000):
        assert S.ddpm_sample(zero, d, x, steps).shape == (1, 2)
    for steps in (999, 1001):
        with pytest.raises(ValueError, match="DDPM runs all 1000 steps"):
            S.ddpm_sample(zero, d, x, steps)
    for name in ("ddim", "dpmpp", "dpmpp_sde"):
        for steps in (1, 1000):
            assert S.sample(zero, d, (1, 2), name, steps).shape == (1, 2)
        for steps in (0, 1001):  # 0 is refused, not taken for the default
            with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
                S.sample(zero, d, (1, 2), name, steps)


@pytest.mark.parametrize("call,match", [
    (lambda d: d.timesteps(5, "cosine"), "unknown spacing"),
    (lambda d: d.timesteps(5, start="top"), "unknown start"),
    (lambda d: S.dpmpp_2m_sde_sample(lambda x, t: x, d, torch.zeros(1, 2), 5, solver="euler"), "unknown solver"),
])
def test_unknown_options_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(D.GaussianDiffusion.from_name("cosine"))


def test_dpmpp_sde_is_reachable_from_the_command_lines():
    from evaluate import parse_settings
    from sample import parser
    assert parse_settings(["dpmpp_sde:25"]) == [("dpmpp_sde", 25)]
    assert parser().parse_args(["--sampler", "dpmpp_sde", "--prompt", "x"]).sampler == "dpmpp_sde"
