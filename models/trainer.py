"""The training loop: one obvious loop, resumable exactly, the same code on one CPU or many GPUs (torchrun)."""
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from diffusion import GaussianDiffusion
from models.checkpoint import (load_checkpoint, prune_checkpoints, resolve_checkpoint, save_checkpoint,
                               save_weights, step_checkpoints)
from models.pipeline import generate_images, pick_device
from models.text_encoder import collate
from models.unet import ConditionalUNet, UNetConfig


def option(default, help: str):
    """A config field with its --help text beside it (tuples become immutable defaults)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every flag of `python diffusion.py train`; saved into each checkpoint."""
    data: str = option("emoji", 'training data: "emoji" (built-in, no download), a tiny-imagenet-200 folder, or a folder of class sub-folders')
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
    base_channels: int = option(64, 'U-Net width at full resolution')
    channel_mult: tuple[int, ...] = option((1, 2, 2), 'width multiplier per resolution level, e.g. 1 2 2')
    num_res_blocks: int = option(2, 'residual blocks per level')
    attention_resolutions: tuple[int, ...] = option((16, 8), 'feature-map sizes with self- and cross-attention, e.g. 16 8')
    num_heads: int = option(4, 'attention heads')
    patch_size: int = option(1, 'pixels per side folded into channels at the input (2: a 32px model computes on 16x16 maps, ~4x cheaper)')
    dropout: float = option(0.1, 'dropout inside residual blocks')
    precision: str = option("auto", '"auto" (fp16 with gradient scaling on CUDA, bf16 on CPUs with native bf16, else fp32), "fp32", "bf16" or "fp16"')
    device: str = option("auto", '"auto" (CUDA, then MPS, then CPU) or a torch device such as "cpu" or "cuda:1"')
    seed: int = option(0, 'seed of data order, noise and initial weights')
    out_dir: str = option("", 'run folder for checkpoints, plots and samples (default output_ImageNet/runs/<data>_<size>px)')
    resume: bool = option(False, 'continue exactly from the newest checkpoint in the run folder')
    save_every_steps: int = option(0, 'also checkpoint every N optimizer steps (0: only at the end of each epoch)')
    keep_last: int = option(3, 'step checkpoints to keep (best.pt is kept apart)')
    sample_every: int = option(5, 'epochs between sample grids and denoising GIFs (0: never)')
    sample_prompts: tuple[str, ...] = option((), 'prompts of the sample grids (default: captions spread over the dataset)')
    max_steps: int = option(0, 'stop, with a checkpoint, after this many optimizer steps in total (0: no limit)')
    max_minutes: float = option(0.0, 'stop, with a checkpoint, after this many minutes of this run (0: no limit)')
    num_workers: int = option(0, 'data-loader worker processes (datasets are held in memory, so 0 is usually fastest)')
    cache_dir: str = option("data", 'folder for the rendered emoji data set and cached caption embeddings')

    def unet_config(self, channels: int) -> UNetConfig:
        return UNetConfig(image_size=self.image_size, in_channels=channels, base_channels=self.base_channels,
                          channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks,
                          attention_resolutions=self.attention_resolutions, num_heads=self.num_heads,
                          dropout=self.dropout, learn_sigma=self.hybrid_loss, patch_size=self.patch_size)

    def run_dir(self) -> Path:
        name = "emoji" if self.data == "emoji" else Path(self.data).resolve().name
        return Path(self.out_dir or f"output_ImageNet/runs/{name}_{self.image_size}px")


def autocast_dtype(precision: str, device: torch.device):
    """None for fp32; bf16 on CPUs with native bf16 (AVX512-BF16/AMX); fp16 on CUDA."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if device.type == "cpu" and native_bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from preprocess import embed_captions, load_dataset  # data comes first in the flow
        self.cfg = cfg
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(cfg.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        self.run_dir = cfg.run_dir()
        torch.manual_seed(cfg.seed + self.rank)

        self.data = self._rank_zero_first(lambda: load_dataset(cfg.data, cfg.image_size, cfg.grayscale, "train", cfg.cache_dir))
        try:
            self.val_data = load_dataset(cfg.data, cfg.image_size, cfg.grayscale, "val", cfg.cache_dir)
        except (ValueError, FileNotFoundError):
            self.val_data = self.data  # no val split (emoji, folders): fixed-noise loss on a training subset
        captions = sorted(set(self.data.all_captions()) | set(self.val_data.all_captions()))
        cache = Path(cfg.cache_dir) / f"captions_{self.data.name}.safetensors"
        self.embeddings = self._rank_zero_first(lambda: embed_captions(captions, cache))

        self.unet_cfg = cfg.unet_config(self.data.channels)
        self.diffusion = GaussianDiffusion.from_name(cfg.schedule, cfg.timesteps)
        self.model = ConditionalUNet(self.unet_cfg).to(self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = DistributedSampler(self.data, self.world, self.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=len(self.data) >= cfg.batch_size * self.world)
        self.loader = DataLoader(self.data, cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
                                 drop_last=len(self.data) >= cfg.batch_size * self.world,
                                 pin_memory=self.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
        self.total_steps = cfg.epochs * len(self.loader)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total_steps))
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.rank)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        self.best_val = float("inf")
        self.prompts = list(cfg.sample_prompts) or self._default_prompts()
        if cfg.resume:
            self._resume()

    def _rank_zero_first(self, build):
        """Rank 0 builds the on-disk caches (emoji set, caption embeddings) alone; the others then read them."""
        if self.world > 1 and not self.main:
            dist.barrier()
        result = build()
        if self.world > 1 and self.main:
            dist.barrier()
        return result

    def _default_prompts(self, n: int = 8) -> list[str]:
        stride = max(1, len(self.data) // n)
        return [self.data.captions[i][0] for i in range(0, len(self.data), stride)][:n]

    # --- one step ------------------------------------------------------------------------------------

    def _condition(self, captions, drop: torch.Tensor):
        cond = collate([self.embeddings[c] for c in captions]).to(self.device)
        # dropped rows become the empty prompt: no visible tokens, zero pooled vector
        keep = ~drop.to(self.device)
        return type(cond)(cond.tokens, cond.mask & keep[:, None], cond.pooled * keep[:, None])

    def train_step(self, images, captions) -> float:
        x0 = images.to(self.device, non_blocking=True)
        drop = torch.rand(len(captions), generator=self.noise_gen, device=self.device) < self.cfg.p_uncond
        cond = self._condition(captions, drop)
        t = torch.randint(0, self.diffusion.T, (len(x0),), generator=self.noise_gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
        amp = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            loss = self.diffusion.training_loss(lambda x, tt: self.ddp(x, tt, cond), x0, t, noise).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def validation_loss(self, n: int = 256) -> float:
        """EMA model's loss on a fixed subset with fixed timesteps and noise: comparable across epochs."""
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(self.val_data), generator=g)[:n]
        x0 = torch.stack([self.val_data.images[i] for i in idx]).float().div(127.5).sub(1).to(self.device)
        cond = collate([self.embeddings[self.val_data.captions[i][0]] for i in idx]).to(self.device)
        t = torch.randint(0, self.diffusion.T, (len(idx),), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        model = self.ema.module.eval()
        losses = [self.diffusion.training_loss(lambda x, tt: model(x, tt, c), a, b, e)
                  for a, b, c, e in zip(x0.split(64), t.split(64), _split(cond, 64), noise.split(64))]
        return torch.cat(losses).mean().item()

    # --- the loop ------------------------------------------------------------------------------------

    def train(self) -> None:
        start = time.time()
        while self.epoch < self.cfg.epochs:
            self.sampler.set_epoch(self.epoch)
            self.model.train()
            batches = iter(self.loader)
            if self.batch_in_epoch:  # mid-epoch resume: skip what was seen, then restore the saved RNG
                for _ in range(self.batch_in_epoch):
                    next(batches)
                self._restore_rng(self._pending_rng)
            bar = tqdm(batches, total=len(self.loader), initial=self.batch_in_epoch, disable=not self.main,
                       desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="batch", dynamic_ncols=True)
            tick = time.time()
            for images, captions in bar:
                loss = self.train_step(images, captions)
                self.batch_in_epoch += 1
                self.history["step"].append(self.step)
                self.history["loss"].append(loss)
                rate = len(images) * self.world / max(time.time() - tick, 1e-9)
                tick = time.time()
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", lr=f"{self.lr_sched.get_last_lr()[0]:.1e}")
                if self.cfg.save_every_steps and self.step % self.cfg.save_every_steps == 0:
                    self.save()
                if self._out_of_budget(start):
                    self.save()
                    self._finish(f"stopped early at step {self.step} (budget reached)")
                    return
            self.epoch += 1
            self.batch_in_epoch = 0
            self.end_of_epoch()
        self._finish(f"finished {self.cfg.epochs} epochs, {self.step} steps")

    def _out_of_budget(self, start: float) -> bool:
        over = (self.cfg.max_steps and self.step >= self.cfg.max_steps) or \
               (self.cfg.max_minutes and time.time() - start > 60 * self.cfg.max_minutes)
        if self.world > 1:  # all ranks must stop together
            flag = torch.tensor(float(bool(over)), device=self.device)
            dist.all_reduce(flag)
            over = flag.item() > 0
        return bool(over)

    def end_of_epoch(self) -> None:
        val = self.validation_loss()
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(val)
        is_best = val < self.best_val
        self.best_val = min(self.best_val, val)
        self.save(best=is_best)
        if self.main:
            from plot_func import plot_loss
            h = self.history
            plot_loss(h["step"], h["loss"], h["val_step"], h["val_loss"], self.run_dir / "loss.png")
            every = self.cfg.sample_every
            if every and (self.epoch % every == 0 or self.epoch == self.cfg.epochs):
                self.save_samples(f"samples_epoch{self.epoch:04d}")
            tqdm.write(f"epoch {self.epoch}: validation loss {val:.4f}{' (best)' if is_best else ''}")

    def save_samples(self, stem: str) -> None:
        from plot_func import DenoisingRecorder, grid_image, to_uint8
        model = self.ema.module.eval()
        cond = collate([self.embeddings.get(p) or self._encode(p) for p in self.prompts])
        recorder = DenoisingRecorder(steps=25)
        images = generate_images(model, self.diffusion, cond, "dpmpp", 25, 3.0, seed=0, callback=recorder)
        grid_image(to_uint8(images), scale=2).save(self.run_dir / f"{stem}.png")
        recorder.finish(images)
        recorder.save(self.run_dir / f"{stem}.gif")

    def _encode(self, prompt: str):
        from models.text_encoder import TextEncoder
        self._encoder = getattr(self, "_encoder", None) or TextEncoder()
        return self._encoder.encode_each([prompt])[0]

    # --- checkpoints ---------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "config": {"train": asdict(self.cfg), "unet": self.unet_cfg.to_dict(),
                       "schedule": self.cfg.schedule, "timesteps": self.cfg.timesteps},
            "info": {"dataset": self.data.name, "image_size": self.cfg.image_size, "steps": self.step,
                     "epochs": self.epoch, "example_prompts": self.prompts},
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "lr_scheduler": self.lr_sched.state_dict(),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "history": self.history, "best_val": self.best_val, "rng": self._rng_state(),
        }

    def save(self, best: bool = False) -> None:
        if not self.main:
            return
        state = self.state()
        save_checkpoint(state, self.run_dir / f"checkpoint_{self.step:08d}.pt")
        prune_checkpoints(self.run_dir, self.cfg.keep_last)
        if best:
            save_checkpoint(state, self.run_dir / "best.pt")
        ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        save_weights(ema, {"config": state["config"], "info": state["info"]}, self.run_dir / "ema.safetensors")

    def _rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _restore_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        self.noise_gen.set_state(rng["noise"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _resume(self) -> None:
        if not step_checkpoints(self.run_dir):
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir} (expected checkpoint_*.pt)")
        ckpt = load_checkpoint(step_checkpoints(self.run_dir)[-1])
        if ckpt["config"]["unet"] != self.unet_cfg.to_dict():
            raise ValueError(f"--resume: the checkpoint's model config {ckpt['config']['unet']} does not match "
                             f"the flags' {self.unet_cfg.to_dict()}")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
        self.epoch, self.step, self.batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        self.history, self.best_val = ckpt["history"], ckpt["best_val"]
        self._pending_rng = ckpt["rng"]
        if not self.batch_in_epoch:
            self._restore_rng(self._pending_rng)
        if self.main:
            tqdm.write(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _finish(self, message: str) -> None:
        if self.world > 1:
            # DDP keeps replicas identical; check it, since a silent divergence would waste a whole run
            flat = torch.cat([p.detach().flatten().double() for p in self.model.parameters()])
            sums = torch.stack([flat.sum(), (flat * torch.linspace(0, 1, len(flat), device=flat.device)).sum()])
            gathered = [torch.zeros_like(sums) for _ in range(self.world)]
            dist.all_gather(gathered, sums)
            if self.main:
                agree = all(torch.equal(gathered[0], g) for g in gathered)
                tqdm.write(f"ranks agree on weights: {agree} (checksum {gathered[0][0].item():.10e})")
            dist.destroy_process_group()
        if self.main:
            tqdm.write(f"{message}; outputs in {self.run_dir}")


def _split(cond, size):
    return [type(cond)(*parts) for parts in zip(*(t.split(size) for t in cond))]
