"""The training loop: one obvious loop, resumable exactly, the same code on one CPU or many GPUs (torchrun)."""
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from checkpoints import (
    CheckpointWriteError,
    compact_history,
    prune_checkpoints,
    read_training_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    save_weights,
    step_checkpoints,
)
from diffusion import GaussianDiffusion
from guidance import DEFAULT_GUIDANCE
from models.cpu import training_memory_format
from models.text_encoder import TextEncoder, collate
from models.unet import ConditionalUNet
from pipeline import generate_images, pick_device
from plot_func import DenoisingRecorder, grid_image, plot_loss, to_uint8
from preprocess import dataset_styles, embed_captions, load_dataset
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from sources.captions import STYLE_NAMES
from train_config import MUST_MATCH_ON_RESUME, TrainConfig, adamw, autocast_dtype, load_optimizer_state, lr_lambda
from warm_start import config_diffs, warm_start_weights

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """SIGINT/SIGTERM stopped training after a checkpoint; the exit status is 128 + the signal number."""


class TrainingStopped(SystemExit):
    """Training cannot go on (diverged, disk full); the message says why and what was kept."""


class Trainer:
    def __init__(self, cfg: TrainConfig):
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

        self.unet_cfg = cfg.unet_config(self.data.channels, self._style_words())
        if cfg.styled_captions:
            self.data.favour_styled(cfg.styled_captions)
        self.diffusion = GaussianDiffusion.from_name(cfg.schedule, cfg.timesteps, cfg.prediction)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        layout = training_memory_format(self.device, self.amp_dtype)  # channels_last for bf16 on AMX; the EMA's too
        self.model = ConditionalUNet(self.unet_cfg).to(self.device, memory_format=layout)
        if cfg.init_from and not cfg.resume:
            self._init_from(cfg.init_from)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = adamw(self.model.parameters(), cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = DistributedSampler(self.data, self.world, self.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=len(self.data) >= cfg.batch_size * self.world)
        self.loader = DataLoader(self.data, cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
                                 drop_last=len(self.data) >= cfg.batch_size * self.world,
                                 pin_memory=self.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                                 worker_init_fn=_ignore_stop_signals if cfg.num_workers else None)
        self.total_steps = cfg.epochs * len(self.loader)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total_steps))
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.rank)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        self.best_val = float("inf")
        self.skipped_steps = self.bad_in_a_row = 0  # steps dropped for a non-finite loss or gradient
        self.stop_signal = 0  # set by SIGINT/SIGTERM: checkpoint and stop after the current step
        self.prompts = list(cfg.sample_prompts) or self._default_prompts()
        if self.main:
            remove_stale_temp_files(self.run_dir)  # left by a process killed mid-write
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

    def _style_words(self) -> tuple[str, ...]:
        """The names of the styles the data's captions name, for --style-embedding and --styled-captions."""
        words = tuple(STYLE_NAMES[s] for s in dataset_styles(self.cfg.data))
        for flag, on in (("--style-embedding", self.cfg.style_embedding), ("--styled-captions", self.cfg.styled_captions)):
            if on and not words:
                raise ValueError(f"{flag} needs data of several styles (mix, or sources joined with '+', e.g. "
                                 f"noto+openmoji); {self.cfg.data!r} names none")
        return words

    def _default_prompts(self, n: int = 8) -> list[str]:
        stride = max(1, len(self.data) // n)
        return [self.data.captions[i][0] for i in range(0, len(self.data), stride)][:n]

    # --- one step ------------------------------------------------------------------------------------

    def _condition(self, captions, drop: torch.Tensor):
        cond = self._collate(captions).to(self.device)
        # dropped rows become the empty prompt: no visible tokens, zero pooled vector, no style
        keep = ~drop.to(self.device)
        tokens, pooled = cond.tokens, cond.pooled
        if self.cfg.cond_noise:  # robustness: the model learns the neighbourhood of each caption, not a point
            tokens = tokens + self._relative_noise(tokens) * cond.mask[..., None]
            pooled = pooled + self._relative_noise(pooled)
        style = None if cond.style is None else cond.style * keep[:, None]
        return cond._replace(tokens=tokens, mask=cond.mask & keep[:, None], pooled=pooled * keep[:, None], style=style)

    def _collate(self, captions):
        return collate([self.embeddings[c] for c in captions]).with_style(captions, self.unet_cfg.style_words)

    def _relative_noise(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return self.cfg.cond_noise * rms * torch.randn(x.shape, generator=self.noise_gen, device=x.device)

    def train_step(self, images, captions) -> float | None:
        """One optimizer step; None if it was skipped because the loss or the gradient was not finite."""
        x0 = images.to(self.device, non_blocking=True)
        drop = torch.rand(len(captions), generator=self.noise_gen, device=self.device) < self.cfg.p_uncond
        cond = self._condition(captions, drop)
        t = torch.randint(0, self.diffusion.T, (len(x0),), generator=self.noise_gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
        amp = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            loss = self.diffusion.training_loss(lambda x, tt: self.ddp(x, tt, cond), x0, t, noise,
                                                min_snr_gamma=self.cfg.min_snr_gamma).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not self._finite(loss, grad_norm):
            self.opt.zero_grad(set_to_none=True)  # nothing of this batch reaches the weights
            self.scaler.update()
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            return None
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        self.bad_in_a_row = 0
        return loss.item()

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Loss and gradient finite on every rank. With fp16 the gradient scaler already skips (and
        learns from) overflowing gradients, so only the loss is checked then."""
        ok = torch.isfinite(loss.detach().float())
        if not self.scaler.is_enabled():
            ok = ok & torch.isfinite(grad_norm)
        if self.world > 1:  # ranks must agree, or DDP's next all-reduce would hang
            ok = ok.float()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    @torch.no_grad()
    def validation_loss(self, n: int = 256) -> float:
        """EMA model's loss on a fixed subset with fixed timesteps and noise: comparable across epochs."""
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(self.val_data), generator=g)[:n]
        x0 = torch.stack([self.val_data.images[i] for i in idx]).float().div(127.5).sub(1).to(self.device)
        cond = self._collate([self.val_data.captions[i][0] for i in idx]).to(self.device)
        t = torch.randint(0, self.diffusion.T, (len(idx),), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        model = self.ema.module.eval()
        losses = [self.diffusion.training_loss(lambda x, tt: model(x, tt, c), a, b, e)
                  for a, b, c, e in zip(x0.split(64), t.split(64), _split(cond, 64), noise.split(64))]
        return torch.cat(losses).mean().item()

    # --- the loop ------------------------------------------------------------------------------------

    def train(self) -> None:
        """Run to the end (or the step/time budget). SIGINT/SIGTERM: checkpoint, then raise Interrupted."""
        with self._stop_on_signals():
            self._train()

    def _train(self) -> None:
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
                if loss is None:
                    self._check_divergence()
                else:
                    self.history["step"].append(self.step)
                    self.history["loss"].append(loss)
                    rate = len(images) * self.world / max(time.time() - tick, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", lr=f"{self.lr_sched.get_last_lr()[0]:.1e}",
                                    **({"skipped": self.skipped_steps} if self.skipped_steps else {}))
                    if self.cfg.save_every_steps and self.step % self.cfg.save_every_steps == 0:
                        self.save()
                tick = time.time()
                over_budget, signum = self._should_stop(start)
                if over_budget or signum:
                    self.save()
                    if signum:
                        self._finish(f"interrupted by {signal.Signals(signum).name} at step {self.step}, checkpoint "
                                     f"saved; run the same command with --resume to continue")
                        raise Interrupted(128 + signum)
                    self._finish(f"stopped early at step {self.step} (budget reached)")
                    return
            self.epoch += 1
            self.batch_in_epoch = 0
            self.end_of_epoch()
        self._finish(f"finished {self.cfg.epochs} epochs, {self.step} steps")

    def _should_stop(self, start: float) -> tuple[bool, int]:
        """(step or time budget reached, number of a stop signal received or 0), agreed by all ranks."""
        over = bool((self.cfg.max_steps and self.step >= self.cfg.max_steps) or
                    (self.cfg.max_minutes and time.time() - start > 60 * self.cfg.max_minutes))
        signum = self.stop_signal
        if self.world > 1:  # all ranks must stop together
            flags = torch.tensor([float(over), float(signum)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            over, signum = flags[0].item() > 0, int(flags[1].item())
        return over, signum

    def _check_divergence(self) -> None:
        """After max_bad_steps non-finite steps in a row, stop without writing: the last checkpoint stays the good one."""
        if self.bad_in_a_row < self.cfg.max_bad_steps:
            return
        kept = step_checkpoints(self.run_dir)
        kept = f"the newest checkpoint, {kept[-1]}, holds them" if kept else "no checkpoint had been written yet"
        message = (f"training stopped: the loss or gradient was not finite (NaN or inf) for {self.bad_in_a_row} "
                   f"steps in a row (--max-bad-steps {self.cfg.max_bad_steps}) in epoch {self.epoch + 1}; "
                   f"{self.skipped_steps} steps skipped in all. Skipped steps never reach the weights, so they are "
                   f"those of step {self.step}, the last good one, and {kept}. A lower --lr, --precision fp32 or "
                   "a look at the data may help.")
        if self.world > 1:
            dist.destroy_process_group()
        raise TrainingStopped(message)

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM ask for a checkpoint and a clean stop after the current step; a second one stops at
        once (KeyboardInterrupt), which loses only the work since the last checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum, frame):
            if self.stop_signal:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.main:
                tqdm.write(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                           "(send it again to stop at once)")
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old)

    def end_of_epoch(self) -> None:
        val = self.validation_loss()
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(val)
        is_best = val < self.best_val
        self.best_val = min(self.best_val, val)
        self.save(best=is_best)
        if self.main:
            plot_loss(self.history, self.run_dir / "loss.png")
            every = self.cfg.sample_every
            if every and (self.epoch % every == 0 or self.epoch == self.cfg.epochs):
                self.save_samples(f"samples_epoch{self.epoch:04d}")
            tqdm.write(f"epoch {self.epoch}: validation loss {val:.4f}{' (best)' if is_best else ''}")

    def save_samples(self, stem: str) -> None:
        model = self.ema.module.eval()
        cond = collate([self.embeddings.get(p) or self._encode(p) for p in self.prompts]).with_style(
            self.prompts, self.unet_cfg.style_words)
        recorder = DenoisingRecorder(steps=DEFAULT_STEPS)
        images = generate_images(model, self.diffusion, cond, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE,
                                 seed=0, callback=recorder)
        grid_image(to_uint8(images), scale=2).save(self.run_dir / f"{stem}.png")
        recorder.finish(images)
        recorder.save(self.run_dir / f"{stem}.gif")

    def _encode(self, prompt: str):
        self._encoder = getattr(self, "_encoder", None) or TextEncoder()
        return self._encoder.encode_each([prompt])[0]

    # --- checkpoints ---------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "config": {"train": asdict(self.cfg), "unet": self.unet_cfg.to_dict(), "schedule": self.cfg.schedule,
                       "timesteps": self.cfg.timesteps, "prediction": self.cfg.prediction},
            "info": {"dataset": self.data.name, "images": len(self.data), "image_size": self.cfg.image_size, "steps": self.step,
                     "epochs": self.epoch, "example_prompts": self.prompts, "history": compact_history(self.history)},
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "lr_scheduler": self.lr_sched.state_dict(),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "history": self.history, "best_val": self.best_val, "rng": self._rng_state(),
            "skipped_steps": self.skipped_steps,
        }

    def save(self, best: bool = False) -> None:
        if not self.main:
            return
        state = self.state()
        # the step checkpoint goes last: it is what --resume reads, so a kill before it redoes best.pt and
        # ema.safetensors too; old checkpoints are pruned only once the new one is safely written
        try:
            if best:
                save_checkpoint(state, self.run_dir / "best.pt")
            ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
            save_weights(ema, {"config": state["config"], "info": state["info"]}, self.run_dir / "ema.safetensors")
            save_checkpoint(state, self.run_dir / f"checkpoint_{self.step:08d}.pt")
            prune_checkpoints(self.run_dir, self.cfg.keep_last)
        except CheckpointWriteError as error:
            raise TrainingStopped(f"training stopped at step {self.step}: {error}. Free some space, then run the "
                                  "same command with --resume.") from None

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
        path, ckpt = self._newest_readable_checkpoint()
        self._check_resumable(path, ckpt)
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        load_optimizer_state(self.opt, ckpt["optimizer"])  # saved perhaps by a machine training in the other layout
        if ckpt["scaler"]:  # empty when saved without fp16 gradient scaling: a resumed fp16 run starts a fresh scale
            self.scaler.load_state_dict(ckpt["scaler"])
        self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
        self.epoch, self.step, self.batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        self.history, self.best_val = ckpt["history"], ckpt["best_val"]
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self._pending_rng = ckpt["rng"]
        if not self.batch_in_epoch:
            self._restore_rng(self._pending_rng)
        if self.main:
            tqdm.write(f"resumed from {path.name}: step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _newest_readable_checkpoint(self) -> tuple[Path, dict]:
        """The newest checkpoint, or with --resume-fallback the newest one that loads and is complete."""
        found = step_checkpoints(self.run_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir} (expected checkpoint_*.pt)")
        for path in reversed(found):
            try:
                return path, read_training_checkpoint(path)
            except ValueError as error:
                if not self.cfg.resume_fallback:
                    raise ValueError(f"--resume: {error}\nRun with --resume-fallback to continue from the newest "
                                     f"readable checkpoint instead ({len(found) - 1} older in {self.run_dir}).") from None
                if self.main:
                    tqdm.write(f"--resume-fallback: skipping {path.name}: {error}")
        raise ValueError(f"--resume: none of the {len(found)} checkpoints in {self.run_dir} is readable")

    def _init_from(self, path) -> None:
        weights, grown = warm_start_weights(path, self.cfg, self.unet_cfg)
        self.model.load_state_dict(weights)
        if self.main:
            tqdm.write(f"initialised from {path}{grown}")

    def _check_resumable(self, path: Path, ckpt: dict) -> None:
        """Refuse to resume with flags that contradict the checkpoint, naming each difference."""
        diffs = config_diffs(ckpt["config"], self.cfg, self.unet_cfg, MUST_MATCH_ON_RESUME)
        if diffs:
            raise ValueError(f"--resume: {path} does not match the flags ({'; '.join(diffs)}). Resume with the flags "
                             "the run was started with, or start a new run in another --out-dir.")

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


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C/SIGTERM to the main process, which checkpoints and stops them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _split(cond, size):
    return [cond.index(slice(start, start + size)) for start in range(0, len(cond.pooled), size)]
