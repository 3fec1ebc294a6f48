"""Loaded model + schedule + text encoder -> images: shared by `sample.py`, training previews and the web app."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from checkpoints import read_model_file, resolve_checkpoint
from diffusion import GaussianDiffusion, guided_denoiser, sample
from models.text_encoder import TextCondition, TextEncoder, null_condition
from models.unet import ConditionalUNet, UNetConfig
from preprocess import load_dataset

DEFAULT_MODEL = Path(__file__).resolve().parent / "output_ImageNet" / "default_model.safetensors"


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
def generate_images(model: ConditionalUNet, diffusion: GaussianDiffusion, cond: TextCondition, sampler: str = "dpmpp",
                    steps: int = 25, guidance: float = 3.0, seed: int = 0,
                    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                    clip_x0=True, **sampler_options) -> torch.Tensor:
    """Sample one image per row of `cond`; returns (B, C, H, W) in [-1, 1]. Same seed, same images.
    `clip_x0` (True, or "dynamic" thresholding) and `sampler_options` (e.g. start="floor") go to `sample`."""
    device = next(model.parameters()).device
    n, cfg = cond.tokens.shape[0], model.cfg
    denoiser = guided_denoiser(model, cond.to(device), null_condition(n).to(device), guidance)
    generator = torch.Generator(device).manual_seed(seed)
    return sample(denoiser, diffusion, (n, cfg.in_channels, cfg.image_size, cfg.image_size), sampler, steps,
                  generator=generator, callback=callback, device=device, clip_x0=clip_x0,
                  **sampler_options)


@dataclass
class Pipeline:
    model: ConditionalUNet
    diffusion: GaussianDiffusion
    encoder: TextEncoder
    info: dict = field(default_factory=dict)  # dataset, steps trained, example prompts, source path

    @classmethod
    def load(cls, path=None, device="auto", encoder: TextEncoder | None = None) -> "Pipeline":
        model, diffusion, info = load_model(path, pick_device(device))
        return cls(model, diffusion, encoder or TextEncoder(), info)

    def training_data(self, spec=None):
        """The captioned data set `spec` (default: the one the model was trained on) at the model's size."""
        cfg = self.model.cfg
        return load_dataset(spec or self.info.get("dataset", "emoji"), cfg.image_size, cfg.in_channels == 1)

    def generate(self, prompts: Sequence[str], sampler="dpmpp", steps=25, guidance=3.0, seed=0, callback=None) -> torch.Tensor:
        return generate_images(self.model, self.diffusion, self.encoder(list(prompts)), sampler, steps, guidance, seed, callback)


def load_model(path=None, device=torch.device("cpu")) -> tuple[ConditionalUNet, GaussianDiffusion, dict]:
    """EMA weights from a training checkpoint (.pt), a run folder, or a shipped .safetensors file."""
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise FileNotFoundError(f"no model given and the default model {DEFAULT_MODEL} is missing; "
                                    "pass --checkpoint with a checkpoint file or training run folder")
        path = DEFAULT_MODEL
    path = resolve_checkpoint(path)
    weights, config, info = read_model_file(path)
    model = ConditionalUNet(UNetConfig(**config["unet"]))
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.from_name(config["schedule"], config["timesteps"], config.get("prediction", "eps"))
    return model, diffusion, {**info, "path": str(path), "parameters": model.num_parameters()}
