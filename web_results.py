"""A generation in the web app: sampled in a worker thread with its previews streamed out, then saved as PNGs
(their settings as metadata, which is how a clicked result gives them back: web_checks.reused_request) and a
GIF (used by web.py)."""
import asyncio
import math
import queue
import random
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch
from PIL import Image

from plot_func import DenoisingRecorder, save_gif, save_png, to_pil, to_uint8, upscale

PREVIEW_FRAMES = 20  # previews streamed per generation (and frames of its GIF), at most
KEEP_RESULTS = 200   # newest result folders kept on disk
POLL_S = 0.02  # how often the page's stream checks for a new preview
CONSUMER_TIMEOUT_S = 30  # a preview nobody collects this long means the client is gone: stop sampling
READ_WITHIN_S = 5  # a generation whose results nobody has started reading by then is cancelled

Job = Callable[[Callable], torch.Tensor]  # callback(i, x, x0) -> images in [-1, 1]


class Cancelled(Exception):
    """Raised inside the sampler when its consumer has gone (Stop pressed, client disconnected)."""


class Unread(Exception):
    """Raised by stream_generation when nobody has started reading the results READ_WITHIN_S into a generation."""


async def stream_generation(job: Job, steps: int, scale: int, unread=None) -> AsyncIterator[tuple[str, object]]:
    """Run `job` (a sampler call taking the step callback) in a worker thread; yield ("frame", (preview, steps
    done)) as they come, then ("done", (uint8 images, recorder)); the last frame is the final grid. If
    `unread()` is true READ_WITHIN_S in, nobody reads the results: the sampler is stopped and Unread raised.

    Async, so that Stop (Gradio cancels the task) lands at once in the wait below; the sampler then
    stops at its next step. The event loop only polls a queue, so it stays free for other users.
    """
    events, stop = queue.Queue(maxsize=2), threading.Event()

    def put(item) -> None:
        deadline = time.monotonic() + CONSUMER_TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                return events.put(item, timeout=0.2)
            except queue.Full:
                pass
        raise Cancelled

    recorder = DenoisingRecorder(max(steps, 1), PREVIEW_FRAMES, scale, on_frame=lambda *frame: put(("frame", frame)))
    done = [0]

    def each_step(i, x, x0) -> None:  # checked every step, not only per preview: Stop and disconnects act at once
        if stop.is_set():
            raise Cancelled
        done[0] = i + 1
        recorder(i, x, x0)

    def work() -> None:
        try:
            images = to_uint8(job(each_step))
            recorder.finish(images)
            put(("done", (images, recorder)))
        except Cancelled:  # logged, so an operator can see abandoned work being dropped
            print(f"generation stopped after {done[0]} of {steps} steps: Stop pressed or the client left", flush=True)
        except Exception as error:  # handed to the consumer, which reports it
            try:
                put(("error", error))
            except Cancelled:
                pass

    threading.Thread(target=work, daemon=True, name="sampler").start()
    read_by = time.monotonic() + READ_WITHIN_S
    try:
        while True:
            if unread is not None and time.monotonic() > read_by:
                if unread():
                    raise Unread
                unread = None  # read: asked once
            try:
                kind, value = events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(POLL_S)
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return
    finally:
        stop.set()


def display_scale(n: int, image_size: int, target_px: int = 384) -> int:
    """Integer upscale so the preview grid is about `target_px` wide (crisp nearest-neighbour pixels)."""
    cols = math.ceil(math.sqrt(n))
    return max(1, target_px // (cols * (image_size + 2) + 2))


def save_results(images: torch.Tensor, gif_frames: list[Image.Image], metadata: list[dict], captions: list[str],
                 out_dir: Path) -> tuple[list[tuple[str, str]], str]:
    """Write native and display PNGs (image i with metadata[i]) and the GIF into a new folder; prune old folders.
    Returns the gallery's (display PNG, caption) pairs and the GIF's path."""
    folder = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(16 ** 6):06x}"
    folder.mkdir(parents=True)
    scale = result_scale(images)
    shown = []
    for i, (img, meta, caption) in enumerate(zip(images, metadata, captions)):
        pil = to_pil(img)
        save_png(pil, folder / f"{i:04d}.png", meta)
        save_png(upscale(pil, scale), folder / f"{i:04d}_x{scale}.png", {**meta, "upscale": scale})
        shown.append((str(folder / f"{i:04d}_x{scale}.png"), caption))
    gif = folder / "process.gif"
    save_gif(gif_frames, gif)
    for old in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name[:1].isdigit())[:-KEEP_RESULTS]:
        shutil.rmtree(old, ignore_errors=True)
    return shown, str(gif)


def result_scale(images: torch.Tensor, target_px: int = 256) -> int:
    """Integer upscale of a result image for display, to about `target_px` wide (crisp pixels)."""
    return max(1, target_px // images.shape[-1])


def morph_frames(images: torch.Tensor) -> list[Image.Image]:
    """A morph's images as GIF frames at the results' display size, there and back again (no jump at the loop)."""
    frames = [upscale(to_pil(img), result_scale(images)) for img in images]
    return frames + frames[-2:0:-1]
