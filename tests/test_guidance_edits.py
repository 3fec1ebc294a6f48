"""Negative prompts, image-to-image, inpainting, prompt morphs and per-image seeds: the engine against the Gaussian
oracle's closed forms, the pipeline on a tiny random model."""
import math

import pytest
import torch

import diffusion as D
import samplers as S
from models.text_encoder import TextCondition, interpolate_conditions, null_condition
from pipeline import Pipeline, generate_images
from tests.gaussian_oracle import MU, SIGMA, moment_errors, optimal_eps
from tests.webserver import tiny_model

N = 20_000
FEW_STEP = [("dpmpp", 20, {}), ("ddim", 50, {}), ("dpmpp_sde", 50, {})]
COSINE = D.GaussianDiffusion.from_name("cosine")
ORACLE = optimal_eps(COSINE.alphas_cumprod)


def edit(sampler, steps, init, seed=0, denoiser=ORACLE, **options):
    g = torch.Generator().manual_seed(seed)
    return S.sample(denoiser, COSINE, tuple(init.shape), sampler, steps, generator=g, dtype=init.dtype, init=init,
                    **options)


def toy_eps(x, t):
    """Any smooth denoiser, elementwise (so each image's result cannot depend on the others in its batch)."""
    return torch.tanh(x) + 1e-3 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# --- image-to-image (SDEdit) -----------------------------------------------------------------------

def test_strength_is_the_fraction_of_the_schedule_the_input_is_noised_to():
    assert COSINE.strength_timestep(0) is None  # nothing to redraw
    assert COSINE.strength_timestep(0.5) == 500 and COSINE.strength_timestep(1) == 999
    assert COSINE.strength_timestep(1e-4) == 0
    for bad in (-0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match="strength must be between 0 and 1"):
            COSINE.strength_timestep(bad)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "dpmpp_sde"])
def test_strength_zero_returns_the_input_exactly(sampler):
    init = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    out = edit(sampler, 10 if sampler != "ddpm" else None, init, strength=0.0,
               denoiser=lambda x, t: calls.append(t) or toy_eps(x, t))
    assert torch.equal(out, init) and not calls


@pytest.mark.parametrize("sampler,steps,options", FEW_STEP)
def test_strength_one_ignores_the_input_in_distribution(sampler, steps, options):
    """From a point far out in the data's tails the output is still N(MU, SIGMA): noised to t = T-1, the input
    keeps a weight alpha_{T-1} ~ 0.002. Tolerances are the plain samplers' (test_samplers.CASES)."""
    init = torch.tensor([[1.0, -1.0]], dtype=torch.float64).repeat(N, 1)
    mean_err, cov_err = moment_errors(edit(sampler, steps, init, strength=1.0, **options))
    assert mean_err < 0.015 and cov_err < 0.15, (mean_err, cov_err)


@pytest.mark.parametrize("strength", [0.3, 0.6])
@pytest.mark.parametrize("sampler,steps", [("dpmpp", 20), ("ddim", 50)])
def test_how_far_image_to_image_moves_its_input_matches_the_ode_map(sampler, steps, strength):
    """For Gaussian data the probability-flow ODE from t0 to 0 is the linear map x_0 = MU + A (x_t0 - a MU),
    A = SIGMA^1/2 C^-1/2 with C = a^2 SIGMA + s^2 I (they commute). From x_t0 = a x + s z with x ~ data, the
    output moves E|out - x|^2 = tr((aA - I) SIGMA (aA - I)^T) + s^2 tr(A A^T) from its input: 0 at strength 0,
    the distance between two independent samples at 1. Measured within 2%."""
    x = MU + torch.randn(N, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    a2 = COSINE.alphas_cumprod[COSINE.strength_timestep(strength)]
    lam, v = torch.linalg.eigh(SIGMA)
    A = v @ torch.diag((lam / (a2 * lam + 1 - a2)).sqrt()) @ v.T
    shrink = a2.sqrt() * A - torch.eye(2, dtype=torch.float64)
    expected = torch.trace(shrink @ SIGMA @ shrink.T) + (1 - a2) * torch.trace(A @ A.T)
    moved = (edit(sampler, steps, x, strength=strength) - x).pow(2).sum(1).mean()
    assert moved / expected == pytest.approx(1, abs=0.05), (moved, expected)


def test_image_to_image_takes_at_most_one_step_per_timestep():
    seen = []
    init = torch.zeros(2, 2, dtype=torch.float64)
    edit("dpmpp", 25, init, strength=0.01, callback=lambda i, x, x0: seen.append(i))  # t0 = 10: 11 timesteps
    assert seen == list(range(11))
    assert S.sampler_steps(COSINE, "dpmpp", 25, 10) == 11 and S.sampler_steps(COSINE, "ddpm", None, 10) == 11


def test_strength_and_mask_need_an_init_image_of_the_batch_shape():
    with pytest.raises(ValueError, match="pass init"):
        S.sample(toy_eps, COSINE, (2, 2), strength=0.5)
    with pytest.raises(ValueError, match="pass init"):
        S.sample(toy_eps, COSINE, (2, 2), mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="init has shape"):
        S.sample(toy_eps, COSINE, (2, 2), init=torch.zeros(3, 2))


# --- inpainting (RePaint) ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10), ("dpmpp", 10), ("dpmpp_sde", 10)])
@pytest.mark.parametrize("strength,resample", [(1.0, 1), (0.6, 3)])
def test_inpainting_keeps_the_kept_pixels_exactly(sampler, steps, strength, resample):
    g = torch.Generator().manual_seed(3)
    init = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    out = edit(sampler, steps, init, strength=strength, mask=mask, resample=resample if sampler != "ddpm" else 1,
               denoiser=toy_eps)
    keep = mask.expand_as(init) == 0
    assert torch.equal(out[keep], init[keep])
    assert (out[~keep] - init[~keep]).abs().mean() > 0.1, "the masked region is generated"


def test_the_sampler_sees_the_kept_region_as_the_input_in_its_x0_previews():
    init = torch.tensor([[0.2, 0.7]], dtype=torch.float64).repeat(8, 1)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    previews = []
    edit("dpmpp", 10, init, mask=mask, resample=1, callback=lambda i, x, x0: previews.append(x0[:, 1].clone()))
    for x0 in previews:
        torch.testing.assert_close(x0, init[:, 1], atol=1e-9, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "dpmpp_sde"])
def test_samplers_read_x_t_after_the_denoiser_updated_it_in_place(sampler):
    """Inpainting's resampling moves x_t in place inside the denoiser: a sampler that kept its own copy would
    step from a stale x_t. Here the denoiser moves x_t to 0 and predicts no noise, so every x_0 estimate is 0."""
    def to_zero(x, t):
        x.zero_()
        return torch.zeros_like(x)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(S.SAMPLERS[sampler](to_zero, COSINE, x, 5 if sampler != "ddpm" else None), torch.zeros(4, 2))


def conditional(c: float, sigma=SIGMA):
    """Mean and variance of x_1 given x_2 = c under N(MU, sigma)."""
    return MU[0] + sigma[0, 1] / sigma[1, 1] * (c - MU[1]), sigma[0, 0] - sigma[0, 1] ** 2 / sigma[1, 1]


def inpaint_first_coordinate(c: float, sampler="dpmpp", steps=20, resample=1, sigma=SIGMA):
    init = torch.tensor([[0.0, c]], dtype=torch.float64).repeat(N, 1)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = edit(sampler, steps, init, mask=mask, resample=resample, denoiser=optimal_eps(COSINE.alphas_cumprod, MU, sigma))
    assert torch.equal(out[:, 1], init[:, 1])
    return out[:, 0]


def test_inpainting_independent_coordinates_draws_the_marginal():
    """Nothing to condition on: the generated coordinate is N(MU_1, SIGMA_11), whatever the kept one holds."""
    diagonal = torch.diag(SIGMA.diag())
    x1 = inpaint_first_coordinate(1.0, sigma=diagonal)
    assert abs(x1.mean() - MU[0]) < 0.015 and abs(x1.var() / SIGMA[0, 0] - 1) < 0.05


def test_inpainting_with_resampling_matches_the_exact_conditional_of_correlated_data():
    """x_2 kept at c, x_1 generated: the exact answer is N(MU_1 + S12/S22 (c - MU_2), S11 - S12^2/S22)
    (correlation 0.82; the conditional mean is 1.2 sd from the marginal one, its variance a third of it).
    Plain replacement moves x_1 only a fifth of the way (measured mean error -0.26, variance 2.5x);
    20 RePaint cycles per step bring it within 0.03 and 1% (at 10, the CLI's default: 0.05 and 10%)."""
    c = -0.1
    mean, var = conditional(c)
    x1 = inpaint_first_coordinate(c, resample=20)
    assert abs(x1.mean() - mean) < 0.05 and abs(x1.var() / var - 1) < 0.15, (x1.mean() - mean, x1.var() / var)
    plain = inpaint_first_coordinate(c, resample=1)
    assert abs(plain.mean() - mean) > 0.2, "plain replacement barely conditions: the reason resampling is on"


def test_resample_must_be_a_whole_number_from_one():
    init, mask = torch.zeros(2, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="resample must be a whole number"):
        edit("dpmpp", 5, init, mask=mask, resample=0)


# --- per-image generators -----------------------------------------------------------------------------

def test_per_image_generators_draw_each_image_as_if_alone():
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = S.randn((3, 2, 4, 4), gens(5, 6, 7))
    for k, s in enumerate((5, 6, 7)):
        assert torch.equal(batch[k:k + 1], S.randn((1, 2, 4, 4), gens(s)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        S.randn((3, 2), gens(1, 2))


@pytest.mark.parametrize("sampler,steps,options", [("ddpm", None, {}), ("ddim", 10, {"eta": 1.0}),
                                                     ("dpmpp_sde", 10, {})])
def test_stochastic_samplers_redraw_any_image_of_a_batch_alone(sampler, steps, options):
    run = lambda seeds: S.sample(toy_eps, COSINE, (len(seeds), 3, 4, 4), sampler, steps,
                                 generator=[torch.Generator().manual_seed(s) for s in seeds], **options)
    batch = run([10, 11, 12])
    assert torch.equal(batch[1:2], run([11])) and torch.equal(batch[2:], run([12]))
    assert torch.equal(batch, run([10, 11, 12])) and not torch.allclose(batch[0], batch[1])


# --- interpolated conditions -----------------------------------------------------------------------------

def condition(n_tokens: int, seed: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(1, 384, generator=g)
    return TextCondition(torch.randn(1, n_tokens, 384, generator=g), torch.ones(1, n_tokens, dtype=torch.bool),
                         pooled / pooled.norm())


def test_interpolated_conditions_are_the_prompts_at_the_ends_and_mix_in_between():
    a, b = condition(3, 0), condition(5, 1)
    mix = interpolate_conditions(a, b, [0, 0.5, 1])
    assert mix.tokens.shape == (3, 5, 384)
    assert torch.equal(mix.tokens[0, :3], a.tokens[0]) and mix.mask[0].tolist() == [1.0] * 3 + [0.0] * 2
    assert torch.equal(mix.tokens[2], b.tokens[0]) and mix.mask[2].tolist() == [1.0] * 5
    assert torch.equal(mix.pooled[0], a.pooled[0]) and torch.equal(mix.pooled[2], b.pooled[0])
    assert mix.mask[1].tolist() == [1.0] * 3 + [0.5] * 2, "tokens only b has come in at the frame's weight"
    torch.testing.assert_close(mix.tokens[1, :3], (a.tokens[0] + b.tokens[0, :3]) / 2)
    assert torch.equal(mix.tokens[1, 3:], b.tokens[0, 3:])
    quarter = interpolate_conditions(b, a, [0.25])  # the other way round, tokens only the start has fade out
    assert quarter.mask[0].tolist() == [1.0] * 3 + [0.75] * 2 and torch.equal(quarter.tokens[0, 3:], b.tokens[0, 3:])
    assert abs(mix.pooled[1].norm() - 1) < 1e-5, "slerp stays on the unit sphere"
    cos = lambda u, v: (u @ v).item()
    assert cos(mix.pooled[1], a.pooled[0]) == pytest.approx(cos(mix.pooled[1], b.pooled[0]), abs=1e-5)
    empty = interpolate_conditions(a, null_condition(1), [0.25]).pooled[0]
    torch.testing.assert_close(empty, 0.75 * a.pooled[0])  # no direction to slerp towards: a straight line


# --- the pipeline on a tiny model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory, text_encoder):
    return Pipeline.load(tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"), "cpu", encoder=text_encoder)


PROMPTS = ["red apple", "a blue circle on a white background", "sun", "red apple"]


def test_empty_negative_prompt_is_the_plain_guidance_bit_for_bit(pipe):
    plain = generate_images(pipe.model, pipe.diffusion, pipe.encoder(PROMPTS), "dpmpp", 6, 3.0, seed=4)
    for negative in ("", " ", ["", "", " ", ""]):
        assert torch.equal(pipe.generate(PROMPTS, "dpmpp", 6, 3.0, seed=4, negative_prompts=negative), plain)
    as_condition = generate_images(pipe.model, pipe.diffusion, pipe.encoder(PROMPTS), "dpmpp", 6, 3.0, seed=4,
                                   negative=pipe.encoder([""] * 4))
    assert torch.equal(as_condition, plain)


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(pipe):
    """eps = eps_neg + s (eps_pos - eps_neg): with the prompt itself as the negative, guidance cancels out and
    any scale draws what scale 1 (the conditional model alone) draws."""
    prompts = ["red apple"] * 2
    itself = pipe.generate(prompts, "dpmpp", 6, 5.0, seed=1, negative_prompts="red apple")
    torch.testing.assert_close(itself, pipe.generate(prompts, "dpmpp", 6, 1.0, seed=1), atol=1e-4, rtol=0)
    other = pipe.generate(prompts, "dpmpp", 6, 5.0, seed=1, negative_prompts="blue circle")
    assert (other - pipe.generate(prompts, "dpmpp", 6, 5.0, seed=1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        pipe.generate(prompts, negative_prompts=["a", "b", "c"])


@pytest.mark.parametrize("sampler", ["dpmpp", "dpmpp_sde"])
def test_any_image_of_a_batch_regenerates_alone_from_seed_plus_k(pipe, sampler):
    """Image k has its own generator seeded seed + k. Batched matrix products may round differently at another
    batch size (or prompt padding), so alone it is the same image within float tolerance (on CPU bf16 exactly)."""
    batch = pipe.generate(PROMPTS, sampler, 6, 3.0, seed=20)
    assert torch.equal(batch, pipe.generate(PROMPTS, sampler, 6, 3.0, seed=20)), "same seed, same images"
    for k, prompt in enumerate(PROMPTS):
        alone = pipe.generate([prompt], sampler, 6, 3.0, seed=20 + k)
        torch.testing.assert_close(alone[0], batch[k], atol=1e-4, rtol=0)
    assert (batch[0] - batch[3]).abs().max() > 0.05, "the same prompt twice in a batch: two different images"


def test_pipeline_image_to_image_and_inpainting(pipe):
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    init = init.expand(2, -1, -1, -1)
    assert torch.equal(pipe.generate(["sun"] * 2, steps=6, init=init, strength=0.0), init)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    out = pipe.generate(["sun"] * 2, steps=6, init=init, mask=mask, resample=2)
    assert torch.equal(out[..., :8], init[..., :8]) and (out[..., 8:] - init[..., 8:]).abs().mean() > 0.1


def test_morph_ends_are_the_plain_generations_and_frames_change_gradually(pipe):
    # A property of the math, so fp32 (the bf16 kernels' rounding differs between CPUs) and no clipping: the random
    # model's x0 predictions lie far outside [-1, 1], and clipped pixels change in jumps whatever the morph does.
    a, b, n = "red apple", "a blue circle on a white background", 11
    options = dict(precision="fp32", clip_x0=False)
    frames = pipe.morph(a, b, n, "dpmpp", 8, 3.0, seed=3, **options)
    assert frames.shape == (n, 3, 16, 16)
    # equal up to fp32 kernel rounding, which depends on the batch (11 frames vs 1 image) and the thread count:
    # measured up to 0.0056 (5e-4 relative) at one thread; a wrong end frame differs by the whole morph (ends > 1)
    same = dict(rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(frames[0], pipe.generate([a], "dpmpp", 8, 3.0, seed=3, **options)[0], **same)
    torch.testing.assert_close(frames[-1], pipe.generate([b], "dpmpp", 8, 3.0, seed=3, **options)[0], **same)
    dist = lambda x, y: (x - y).abs().mean().item()
    ends = dist(frames[0], frames[-1])
    steps = [dist(frames[k], frames[k + 1]) for k in range(n - 1)]
    # Measured: the largest of the 10 steps is 0.29 of the ends. A morph that switched b's extra tokens on at full
    # weight in its first frame in between jumped 0.96 of the way there; fp32 kernels differ by ~1e-6 relative.
    assert ends > 1.0 and max(steps) < 0.5 * ends, (ends, [s / ends for s in steps])
    with pytest.raises(ValueError, match="at least 2 frames"):
        pipe.morph(a, b, 1)
