"""Images and figures: tensors -> PNG/GIF, sample grids, loss curves, the forward-noising strip.

Pure helpers with no model loading (the lowest layer); `python showcase.py` uses them to redraw output_ImageNet/.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from torchvision.utils import make_grid


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, C, H, W)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(img: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> PIL image (L for one channel, RGB for three)."""
    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 1) -> Image.Image:
    """uint8 (B, C, H, W) -> one PIL grid, optionally upscaled with crisp nearest-neighbour pixels."""
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = to_pil(make_grid(images, nrow=nrow, padding=2, pad_value=255))
    return upscale(grid, scale)


def upscale(img: Image.Image, scale: int) -> Image.Image:
    return img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_png(img: Image.Image, path, metadata: dict | None = None) -> None:
    """PNG with `metadata` as text chunks (prompt, seed, sampler...), readable by any PNG tool."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    img.save(path, pnginfo=info)


GIF_FRAME_MS, GIF_HOLD_LAST_MS = 80, 1500  # each frame's time on screen, and the pause on the last one


def save_gif(frames: list[Image.Image], path, frame_ms: int = GIF_FRAME_MS,
             hold_last_ms: int = GIF_HOLD_LAST_MS) -> None:
    """Animated GIF that loops, pausing on the final frame.

    Pillow merges consecutive frames that come out identical (their times add up), so a GIF may hold fewer
    frames than it was given but always plays them for as long: read one by its timeline, not its frame count.
    """
    # a palette per frame by fast octree: Pillow's default (median cut) looks the same on these pictures and takes
    # several times as long, which the web app paid after every batch's last step
    frames = [f.quantize(method=Image.Quantize.FASTOCTREE) if f.mode == "RGB" else f for f in frames]
    durations = [frame_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False)


def with_progress_bar(img: Image.Image, fraction: float, color: str = "black", height: int = 3) -> Image.Image:
    """`img` with a bar underneath, filled to `fraction`: shows how far the denoising has gone."""
    out = Image.new(img.mode, (img.width, img.height + height), "white")
    out.paste(img, (0, 0))
    filled = round(img.width * fraction)
    if filled > 0:
        ImageDraw.Draw(out).rectangle([0, img.height, filled - 1, out.height - 1], fill=color)
    return out


class DenoisingRecorder:
    """Sampler callback keeping at most `max_frames` previews of the predicted x_0 grid, for a GIF.

    Each preview carries a progress bar, so frames stay distinct even when the image itself does not
    move; `finish` closes the sequence with the final images and a green (finished) bar. `on_frame`,
    if given, receives every kept frame with the number of steps done (the web app streams them).
    """

    def __init__(self, steps: int, max_frames: int = 50, scale: int = 2, on_frame=None):
        self.steps, self.scale, self.on_frame, self.frames = steps, scale, on_frame, []
        self.every = max(1, -(-steps // max_frames))

    def __call__(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i % self.every == 0 or i == self.steps - 1:
            self._keep(with_progress_bar(grid_image(to_uint8(x0), scale=self.scale), (i + 1) / self.steps), i + 1)

    def finish(self, images: torch.Tensor) -> Image.Image:
        """Add the final frame for `images` ([-1, 1] or uint8) and return it."""
        images = images if images.dtype == torch.uint8 else to_uint8(images)
        frame = with_progress_bar(grid_image(images, scale=self.scale), 1.0, "green")
        self._keep(frame, self.steps)
        return frame

    def _keep(self, frame: Image.Image, steps_done: int) -> None:
        self.frames.append(frame)
        if self.on_frame is not None:
            self.on_frame(frame, steps_done)

    def save(self, path) -> None:
        save_gif(self.frames, path)


def plot_loss(history: dict, path) -> None:
    """Training loss per step (raw and smoothed) and validation loss per evaluation, log scale.

    `history` holds lists "step", "loss", "val_step", "val_loss" (the trainer's, or its compact copy)."""
    steps, train_loss, val_epochs_steps, val_loss = (history[k] for k in ("step", "loss", "val_step", "val_loss"))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_loss:
        ax.plot(steps, train_loss, color="tab:blue", alpha=0.25, lw=0.8)
        k = max(1, len(train_loss) // 50)
        smooth = np.convolve(train_loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label="train (smoothed)")
    if val_loss:
        ax.plot(val_epochs_steps, val_loss, "o-", color="tab:orange", label="validation (EMA weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forward_diffusion_strip(image: torch.Tensor, diffusion, ts: list[int], path, scale: int = 4, seed: int = 0) -> None:
    """One image (C, H, W) in [-1, 1] noised to increasing timesteps, side by side, labelled with t."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=g)
    x0 = image[None].repeat(len(ts), 1, 1, 1)
    xt = diffusion.q_sample(x0, torch.tensor(ts), noise[None].expand_as(x0))
    fig, axes = plt.subplots(1, len(ts), figsize=(1.6 * len(ts), 2))
    for ax, t, img in zip(axes, ts, to_uint8(xt)):
        ax.imshow(upscale(to_pil(img), scale), cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(f"t = {t}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_dir(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
