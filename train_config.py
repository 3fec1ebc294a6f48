"""`TrainConfig`: every flag of `python train.py`, saved into each checkpoint, and the schedules derived from it."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.cpu import bf16_pays_off
from models.unet import UNetConfig


def option(default, help: str):
    """A config field with its --help text beside it (tuples become immutable defaults)."""
    return field(default=default, metadata={"help": help})


# flag: (what it accepts, the test), for the numeric flags a typo could push outside what training means
FLAG_RANGES = {
    "image_size": ("at least 4", lambda v: v >= 4), "epochs": ("at least 1", lambda v: v >= 1),
    "batch_size": ("at least 1", lambda v: v >= 1), "lr": ("positive", lambda v: v > 0),
    "weight_decay": ("0 or more", lambda v: v >= 0), "warmup_steps": ("0 or more", lambda v: v >= 0),
    "grad_clip": ("positive", lambda v: v > 0), "ema_decay": ("in [0, 1)", lambda v: 0 <= v < 1),
    "p_uncond": ("in [0, 1]", lambda v: 0 <= v <= 1), "timesteps": ("at least 2", lambda v: v >= 2),
    "min_snr_gamma": ("0 (off) or positive", lambda v: v >= 0), "cond_noise": ("0 or more", lambda v: v >= 0),
    "styled_captions": ("in [0, 1]", lambda v: 0 <= v <= 1), "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "patch_size": ("at least 1", lambda v: v >= 1), "num_heads": ("at least 1", lambda v: v >= 1),
}


@dataclass
class TrainConfig:
    """Every flag of `python train.py`; saved into each checkpoint."""
    data: str = option("emoji", 'training data: a source ("emoji", built in: the Noto set the shipped model learned; "noto", "openmoji", "emojione", "clipart"), sources joined with "+", "mix" (all four styles), a tiny-imagenet-200 folder, or a folder of class sub-folders')
    image_size: int = option(32, 'square image size in pixels (images are resized)')
    grayscale: bool = option(False, 'train on one channel (e.g. 28x28 grayscale datasets)')
    epochs: int = option(50, 'passes over the training data')
    batch_size: int = option(64, 'images per optimizer step, per process')
    lr: float = option(2e-4, 'peak AdamW learning rate')
    weight_decay: float = option(0.0, 'AdamW weight decay')
    warmup_steps: int = option(500, 'linear learning-rate warm-up steps')
    lr_decay: str = option("cosine", '"cosine" (to 10%% of the peak at the end) or "constant" after warm-up')
    grad_clip: float = option(1.0, 'clip the gradient norm to this value')
    ema_decay: float = option(0.999, 'decay of the exponential moving average of weights (the EMA weights are the ones sampled)')
    p_uncond: float = option(0.1, 'probability of dropping the prompt, so classifier-free guidance has an unconditional model')
    schedule: str = option("cosine", 'noise schedule: "cosine" or "linear"')
    timesteps: int = option(1000, 'diffusion steps T')
    hybrid_loss: bool = option(False, 'also learn the variance with L_simple + 0.001 L_vlb (Improved DDPM)')
    prediction: str = option("eps", 'what the network predicts: "eps" (the noise) or "v" (alpha eps - sigma x0)')
    min_snr_gamma: float = option(0.0, 'Min-SNR-gamma loss weighting, e.g. 5 (0: off, plain MSE)')
    cond_noise: float = option(0.0, 'std of Gaussian noise added to the text embeddings in training, relative to their RMS')
    init_from: str = option("", 'warm-start from these weights (.safetensors or checkpoint; a fresh optimizer), e.g. output_ImageNet/default_model.safetensors')
    base_channels: int = option(64, 'U-Net width at full resolution')
    channel_mult: tuple[int, ...] = option((1, 2, 2), 'width multiplier per resolution level, e.g. 1 2 2')
    num_res_blocks: int = option(2, 'residual blocks per level')
    attention_resolutions: tuple[int, ...] = option((16, 8), 'feature-map sizes with self- and cross-attention, e.g. 16 8')
    num_heads: int = option(4, 'attention heads')
    patch_size: int = option(1, 'pixels per side folded into channels at the input (2: a 32px model computes on 16x16 maps, ~4x cheaper)')
    styled_captions: float = option(0.0, 'share of training captions that name the picture\'s style, where it has such captions, e.g. 0.75 (0: drawn uniformly from all its captions; in the mix a uniform draw names it 0.41 of the time)')
    style_embedding: bool = option(False, 'learn an embedding per style the data names (mix, or sources joined with "+"), added where a caption names it: "an OpenMoji pizza" gets OpenMoji\'s')
    dropout: float = option(0.1, 'dropout inside residual blocks')
    precision: str = option("auto", '"auto" (fp16 with gradient scaling on CUDA, bf16 on CPUs with native bf16, else fp32), "fp32", "bf16" or "fp16"')
    device: str = option("auto", '"auto" (CUDA, then MPS, then CPU) or a torch device such as "cpu" or "cuda:1"')
    seed: int = option(0, 'seed of data order, noise and initial weights')
    out_dir: str = option("", 'run folder for checkpoints, plots and samples (default output_ImageNet/runs/<data>_<size>px)')
    resume: bool = option(False, 'continue exactly from the newest checkpoint in the run folder')
    resume_fallback: bool = option(False, 'with --resume: if the newest checkpoint is unreadable, continue from the newest readable one')
    max_bad_steps: int = option(10, 'stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped, not applied)')
    save_every_steps: int = option(0, 'also checkpoint every N optimizer steps (0: only at the end of each epoch)')
    keep_last: int = option(3, 'step checkpoints to keep (best.pt is kept apart)')
    sample_every: int = option(5, 'epochs between sample grids and denoising GIFs (0: never)')
    sample_prompts: tuple[str, ...] = option((), 'prompts of the sample grids (default: captions spread over the dataset)')
    max_steps: int = option(0, 'stop, with a checkpoint, after this many optimizer steps in total (0: no limit)')
    max_minutes: float = option(0.0, 'stop, with a checkpoint, after this many minutes of this run (0: no limit)')
    num_workers: int = option(0, 'data-loader worker processes (datasets are held in memory, so 0 is usually fastest)')
    cache_dir: str = option("data", 'folder for the rendered emoji data set and cached caption embeddings')

    def __post_init__(self):
        """A flag outside its range is a clear error before any data is loaded."""
        for name, (accepted, ok) in FLAG_RANGES.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {accepted}, not {getattr(self, name)}")

    def unet_config(self, channels: int, style_words: tuple[str, ...] = ()) -> UNetConfig:
        """The U-Net of these flags for data of `channels` whose captions name `style_words` (used with
        --style-embedding only)."""
        return UNetConfig(image_size=self.image_size, in_channels=channels, base_channels=self.base_channels,
                          channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks,
                          attention_resolutions=self.attention_resolutions, num_heads=self.num_heads,
                          dropout=self.dropout, learn_sigma=self.hybrid_loss, patch_size=self.patch_size,
                          style_words=tuple(style_words) if self.style_embedding else ())

    def run_dir(self) -> Path:
        name = "emoji" if self.data == "emoji" else Path(self.data).resolve().name
        return Path(self.out_dir or f"output_ImageNet/runs/{name}_{self.image_size}px")


# settings a checkpoint fixes: resuming with other values would silently continue with the checkpoint's
MUST_MATCH_ON_RESUME = ("batch_size", "lr", "weight_decay", "warmup_steps", "lr_decay", "ema_decay", "seed")
def autocast_dtype(precision: str, device: torch.device):
    """None for fp32; bf16 on CPUs where it is faster than fp32 (models.cpu.bf16_pays_off); fp16 on CUDA."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if bf16_pays_off(device) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def adamw(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW at the flags' rate and decay; on CPU and CUDA PyTorch's fused kernel, which gives the same update as
    its default (foreach) one within float rounding and runs the shipped config's step about 3x faster on the CPU
    (7.7 against 25 ms at one thread, a few percent of a training step; `python bench/training.py`)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=True if device.type in ("cpu", "cuda") else None)


def load_optimizer_state(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """opt.load_state_dict, with each parameter's state (AdamW's moments) in that parameter's memory layout. A loaded
    state keeps the layout it was saved in, and the fused AdamW kernel silently updates a parameter wrongly where
    its state's layout differs (a checkpoint from a machine that trained in channels_last, resumed on one that
    trains in NCHW, or the reverse)."""
    opt.load_state_dict(state_dict)
    for param, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
