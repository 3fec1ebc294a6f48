"""Loaded model + schedule + text encoder -> images: shared by `sample.py`, training previews and the web app."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from checkpoints import ModelFileError, ModelFileNotFoundError, error_line, read_model_file, resolve_checkpoint
from diffusion import PREDICTIONS, SCHEDULES, GaussianDiffusion
from guidance import CADS_SEED_OFFSET, DEFAULT_GUIDANCE, Guidance, guided_denoiser
from models.cpu import bf16_layer_copy, sampling_memory_format
from models.text_encoder import EMBED_DIM, TextCondition, TextEncoder, interpolate_conditions, null_condition
from models.unet import ConditionalUNet, UNetConfig
from preprocess import load_dataset
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, RESAMPLE, runs_in_bf16, sample

DEFAULT_MODEL = Path(__file__).resolve().parent / "output_ImageNet" / "default_model.safetensors"
# A model file's config is checked before anything is allocated: each size within these bounds (so that even
# building the model on the meta device to count its parameters is quick), then the count itself.
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights; the shipped model has 6M
UNET_SIZES = {"image_size": (1, 1024), "in_channels": (1, 16), "base_channels": (1, 4096), "num_res_blocks": (1, 32),
              "num_heads": (1, 64), "patch_size": (1, 16), "context_dim": (EMBED_DIM, EMBED_DIM)}
MAX_LEVELS, MAX_CHANNEL_MULT, MAX_TIMESTEPS, MAX_STYLES = 8, 64, 100_000, 64


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless a device is named."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.inference_mode()
def generate_images(model: ConditionalUNet, diffusion: GaussianDiffusion, cond: TextCondition,
                    sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, guidance: float | Guidance = DEFAULT_GUIDANCE,
                    seed: int | Sequence[int] = 0,
                    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                    clip_x0=True, negative: Optional[TextCondition] = None, init: Optional[torch.Tensor] = None,
                    strength: float = 1.0, mask: Optional[torch.Tensor] = None, resample: int = RESAMPLE,
                    **sampler_options) -> torch.Tensor:
    """Sample one image per row of `cond`; returns (B, C, H, W) in [-1, 1].

    Image k starts from its own generator seeded `seed + k` (or `seed[k]` given a list), so the same seed gives
    the same images and any one of them is redrawn alone by seed + k at batch size 1 (CADS's condition noise too,
    from seed + k + CADS_SEED_OFFSET). `guidance` is a scale or a `Guidance`; it pushes away from
    `negative` (one row, or one per image; default the empty prompt's condition). `init` (B, C, H, W in [-1, 1],
    at the model's size), `strength`, `mask` (1 = generate, 0 = keep) and `resample`: image-to-image and
    inpainting (see diffusion.edit_sample). `clip_x0` (True, or "dynamic" thresholding) and `sampler_options`
    (e.g. start="floor") go to `sample`."""
    device = next(model.parameters()).device
    n, cfg = cond.tokens.shape[0], model.cfg
    seeds = [seed + k for k in range(n)] if isinstance(seed, int) else list(seed)
    uncond = null_condition(n) if negative is None else negative
    if len(uncond.pooled) == 1 and n > 1:
        uncond = uncond.index([0] * n)
    anneal = isinstance(guidance, Guidance) and guidance.anneal is not None
    cads_noise = [torch.Generator(device).manual_seed(s + CADS_SEED_OFFSET) for s in seeds] if anneal else None
    denoiser = guided_denoiser(model, cond.to(device), uncond.to(device), guidance, diffusion.T, cads_noise)
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    extra = {} if init is None else {"init": init.to(device), "strength": strength, "resample": resample,
                                     "mask": None if mask is None else mask.to(device)}
    return sample(denoiser, diffusion, (n, cfg.in_channels, cfg.image_size, cfg.image_size), sampler, steps,
                  generator=generators, callback=callback, device=device, clip_x0=clip_x0,
                  **extra, **sampler_options)


@dataclass
class Pipeline:
    model: ConditionalUNet
    diffusion: GaussianDiffusion
    encoder: TextEncoder
    info: dict = field(default_factory=dict)  # dataset, steps trained, example prompts, source path
    _bf16_model: Optional[ConditionalUNet] = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, path=None, device="auto", encoder: TextEncoder | None = None) -> "Pipeline":
        model, diffusion, info = load_model(path, pick_device(device))
        return cls(model, diffusion, encoder or TextEncoder(), info)

    def sampling_model(self, precision: str = "auto", dtype: torch.dtype = torch.float32) -> ConditionalUNet:
        """The model that samples `dtype` images at `precision` (see samplers.fast_denoiser): where that is bf16
        autocast, a copy whose convolution and linear weights are bf16 already (models.cpu.bf16_layer_copy: the
        same images, without casting them all at every step), made at the first such call; else the model."""
        if not runs_in_bf16(precision, dtype, next(self.model.parameters()).device):
            return self.model
        if self._bf16_model is None:
            self._bf16_model = bf16_layer_copy(self.model)
        return self._bf16_model

    def _sampling_model(self, options: dict) -> ConditionalUNet:
        return self.sampling_model(options.get("precision", "auto"), options.get("dtype", torch.float32))

    def condition(self, prompts: Sequence[str]) -> TextCondition:
        """The prompts' text condition, with the styles they name where the model has a style embedding."""
        return self.encoder(prompts).with_style(prompts, self.model.cfg.style_words)

    def training_data(self, spec=None):
        """The captioned data set `spec` (default: the one the model was trained on) at the model's size."""
        cfg = self.model.cfg
        return load_dataset(spec or self.info.get("dataset", "emoji"), cfg.image_size, cfg.in_channels == 1)

    def generate(self, prompts: Sequence[str], sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=0, callback=None,
                 negative_prompts: str | Sequence[str] = "", **options) -> torch.Tensor:
        """Images of `prompts` (see generate_images): image k from seed + k. `negative_prompts`, one for all or one
        per prompt, are what guidance pushes away from; "" is the plain empty-prompt guidance. `options` go to
        `generate_images` and the sampler: init, strength, mask, resample, clip_x0, start, ..."""
        prompts = list(prompts)
        negatives = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each")
        negative = self.condition(negatives) if any(p.strip() for p in negatives) else None
        return generate_images(self._sampling_model(options), self.diffusion,
                               self.condition(prompts), sampler, steps, guidance, seed, callback, negative=negative,
                               **options)

    def morph(self, prompt_a: str, prompt_b: str, frames: int = 8, sampler="dpmpp", steps=25, guidance=DEFAULT_GUIDANCE, seed=0,
              callback=None, negative_prompt: str = "", **options) -> torch.Tensor:
        """`frames` images whose text condition goes from `prompt_a` to `prompt_b` in equal steps (see
        interpolate_conditions), all from the starting noise of `seed`, so that only the prompt changes: the first
        and last frames are what `generate([prompt_a], seed=seed)` and `generate([prompt_b], seed=seed)` draw."""
        if not (isinstance(frames, int) and frames >= 2):
            raise ValueError(f"a morph needs at least 2 frames, got {frames!r}")
        cond = interpolate_conditions(self.condition([prompt_a]), self.condition([prompt_b]),
                                      [k / (frames - 1) for k in range(frames)])
        negative = self.condition([negative_prompt]) if negative_prompt.strip() else None
        return generate_images(self._sampling_model(options), self.diffusion, cond, sampler,
                               steps, guidance, [seed] * frames, callback, negative=negative, **options)


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _shown(value) -> str:
    try:
        return repr(value)[:40]
    except ValueError:  # an integer with more digits than Python will print
        return "a number too long to print"


def unet_config(unet: dict, path) -> UNetConfig:
    """The U-Net config of a model file, every key known and every size within bounds, or ModelFileError."""
    known = [f.name for f in fields(UNetConfig)]
    unknown = sorted(map(str, set(unet) - set(known)))
    if unknown:
        raise ModelFileError(f"{path}: its model config has unknown keys ({', '.join(unknown)}); known: {', '.join(known)}")
    bad = [f"{key} must be a whole number from {low} to {high}" for key, (low, high) in UNET_SIZES.items()
           if key in unet and not _whole(unet[key], low, high)]
    mult, attention = unet.get("channel_mult", [1]), unet.get("attention_resolutions", [])
    if not isinstance(mult, list | tuple) or not 1 <= len(mult) <= MAX_LEVELS or not all(_whole(m, 1, MAX_CHANNEL_MULT) for m in mult):
        bad.append(f"channel_mult must be 1 to {MAX_LEVELS} whole numbers from 1 to {MAX_CHANNEL_MULT}")
    if not isinstance(attention, list | tuple) or len(attention) > 16 or not all(_whole(r, 1, 1024) for r in attention):
        bad.append("attention_resolutions must be at most 16 whole numbers from 1 to 1024")
    dropout = unet.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        bad.append("dropout must be a number from 0 to below 1")
    if not isinstance(unet.get("learn_sigma", False), bool):
        bad.append("learn_sigma must be true or false")
    words = unet.get("style_words", [])
    if not isinstance(words, list | tuple) or len(words) > MAX_STYLES or not all(
            isinstance(w, str) and 0 < len(w.strip()) <= 40 for w in words) or len(set(words)) < len(words):
        bad.append(f"style_words must be at most {MAX_STYLES} different names of 1 to 40 characters")
    if bad:
        raise ModelFileError(f"{path}: its model config is not a model this project can build ({'; '.join(bad)})")
    try:
        return UNetConfig(**unet)
    except ValueError as e:  # e.g. an image size the resolution levels do not divide
        raise ModelFileError(f"{path}: its model config is inconsistent ({e})") from None


def _diffusion(config: dict, path) -> GaussianDiffusion:
    schedule, timesteps, prediction = config.get("schedule"), config.get("timesteps"), config.get("prediction", "eps")
    known = lambda value, names: isinstance(value, str) and value in names  # a list is not hashable: no TypeError
    if not known(schedule, SCHEDULES) or not _whole(timesteps, 1, MAX_TIMESTEPS) or not known(prediction, PREDICTIONS):
        raise ModelFileError(f"{path}: its config needs schedule one of {', '.join(sorted(SCHEDULES))}, timesteps a "
                             f"whole number from 1 to {MAX_TIMESTEPS} and prediction one of {', '.join(PREDICTIONS)}; "
                             f"got {_shown(schedule)}, {_shown(timesteps)}, {_shown(prediction)}")
    return GaussianDiffusion.from_name(schedule, timesteps, prediction)


def _shape_check(cfg: UNetConfig, given: dict[str, tuple], path) -> None:
    """Count the config's parameters and compare the weights' names and shapes (`given`) with it, allocating nothing."""
    try:
        with torch.device("meta"):
            shapes = ConditionalUNet(cfg)
    except Exception as e:  # e.g. a channel count the attention heads do not divide
        raise ModelFileError(f"{path}: its model config does not build ({error_line(e, 120)})") from None
    count = shapes.num_parameters()
    if count > MAX_PARAMETERS:
        raise ModelFileError(f"{path}: its config describes a model of {count:,} parameters ({count * 4 / 2 ** 30:,.0f} "
                             f"GiB as float32); refused, the limit is {MAX_PARAMETERS:,}")
    expected = {name: tuple(t.shape) for name, t in shapes.state_dict().items()}
    wrong = [f"{name} is {given[name]}, the config needs {shape}" for name, shape in expected.items()
             if name in given and given[name] != shape]
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = [f"{len(items)} {what} ({', '.join(items[:2])}{', ...' if len(items) > 2 else ''})"
                for what, items in (("of wrong shape", wrong), ("missing", missing), ("unexpected", extra)) if items]
    if problems:
        raise ModelFileError(f"{path}: its weights do not fit its config: {'; '.join(problems)}")


def model_spec(config: dict, shapes: dict[str, tuple], path) -> tuple[UNetConfig, GaussianDiffusion]:
    """The U-Net config and schedule of a model file whose weights have these names and `shapes`, or ModelFileError."""
    cfg, diffusion = unet_config(config["unet"], path), _diffusion(config, path)
    _shape_check(cfg, shapes, path)
    return cfg, diffusion


def load_model(path=None, device=torch.device("cpu")) -> tuple[ConditionalUNet, GaussianDiffusion, dict]:
    """EMA weights from a training checkpoint (.pt), a run folder, or a shipped .safetensors file.

    Anything wrong with the file or its contents is one ModelFileError (a ValueError) naming the file and the
    fault; a config describing an absurd model is refused before anything is allocated for it."""
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise ModelFileNotFoundError(f"no model given and the default model {DEFAULT_MODEL} is missing; "
                                         "pass --checkpoint with a checkpoint file or training run folder")
        path = DEFAULT_MODEL
    path = resolve_checkpoint(path)
    spec = []  # a .safetensors file is checked from its header, before any tensor is read
    weights, config, info = read_model_file(path, lambda config, shapes: spec.append(model_spec(config, shapes, path)))
    cfg, diffusion = spec[0]
    model = ConditionalUNet(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # names and shapes were checked: a last line of defence
        raise ModelFileError(f"{path}: its weights do not fit its config ({error_line(e, 200)})") from None
    # the same function, in the layout that samples fastest on this device (models/cpu.py)
    layout = sampling_memory_format(device, cfg.image_size // cfg.patch_size)
    model.to(device, memory_format=layout).eval().requires_grad_(False)
    return model, diffusion, {**info, "path": str(path), "parameters": model.num_parameters()}
