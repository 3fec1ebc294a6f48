"""The web app: type a prompt, watch the batch emerge from noise, download the images.

    python web.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 7860] [--share] [--auth user:password]

The model loads once; a bounded queue serves users in turn. Every input is checked on the server
(web_checks.py), so a bad request gets a clear message and never a traceback; web_guard.py caps request
bodies, serves only the app's own images and, with --auth, hides the API from the login page and slows
password guessing.
"""
import argparse
import asyncio
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text encoder ships with its package: never reach a hub

import gradio as gr
import torch
from starlette.middleware import Middleware

from checkpoints import ModelFileError
from pipeline import DEFAULT_MODEL, Pipeline
from plot_func import DenoisingRecorder, save_png, to_pil, to_uint8, upscale
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from web_checks import (  # noqa: F401 (MAX_PROMPT_CHARS: re-exported for callers of web)
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    SAMPLER_CHOICES,
    InputError,
    Request,
    parse_request,
)
from web_guard import LoginThrottle, WebGuard

MAX_UPLOAD = "1mb"  # Gradio's upload route, which no widget of the page uses: small, and never served back
PREVIEW_FRAMES = 20  # previews streamed per generation (and frames of its GIF), at most
KEEP_RESULTS = 200   # newest result folders kept on disk
PREVIEW_DIR_PREFIX = ".previews-"  # a generation's preview frames, removed when it ends
POLL_S = 0.02  # how often the page's stream checks for a new preview
CONSUMER_TIMEOUT_S = 30  # a preview nobody collects this long means the client is gone: stop sampling
DEFAULT_EXAMPLES = ["red apple", "tropical fish", "grinning face", "rocket", "red heart", "sun"]


class Cancelled(Exception):
    """Raised inside the sampler when its consumer has gone (Stop pressed, client disconnected)."""


async def stream_generation(pipe: Pipeline, req: Request, scale: int) -> AsyncIterator[tuple[str, object]]:
    """Sample in a worker thread; yield ("frame", (preview, steps done)) as they come, then
    ("done", (uint8 images, recorder)); the last frame is the final grid.

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

    steps = pipe.diffusion.T if req.sampler == "ddpm" else req.steps
    recorder = DenoisingRecorder(steps, PREVIEW_FRAMES, scale, on_frame=lambda *frame: put(("frame", frame)))
    done = [0]

    def each_step(i, x, x0) -> None:  # checked every step, not only per preview: Stop and disconnects act at once
        if stop.is_set():
            raise Cancelled
        done[0] = i + 1
        recorder(i, x, x0)

    def work() -> None:
        try:
            images = to_uint8(pipe.generate([req.prompt] * req.n, req.sampler, req.steps, req.guidance, req.seed, each_step))
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
    try:
        while True:
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


def save_results(images: torch.Tensor, recorder: DenoisingRecorder, req: Request, model: str, out_dir: Path):
    """Write native and display PNGs (with metadata) and the GIF into a new folder; prune old folders."""
    folder = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{req.seed}-{random.randrange(16 ** 6):06x}"
    folder.mkdir(parents=True)
    meta = {**{k: v for k, v in asdict(req).items() if k not in ("n", "note")}, "model": model}
    scale = max(1, 256 // images.shape[-1])
    shown = []
    for i, img in enumerate(images):
        pil = to_pil(img)
        # image i of a batch is drawn from seed + i: that seed alone, at batch size 1, redraws it
        own = {**meta, "index": i, "image_seed": req.seed + i}
        save_png(pil, folder / f"{i:04d}.png", own)
        save_png(upscale(pil, scale), folder / f"{i:04d}_x{scale}.png", {**own, "upscale": scale})
        shown.append((str(folder / f"{i:04d}_x{scale}.png"), f"#{i} · seed {req.seed + i}"))
    gif = folder / "process.gif"
    recorder.save(gif)
    for old in sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name[:1].isdigit())[:-KEEP_RESULTS]:
        shutil.rmtree(old, ignore_errors=True)
    return shown, str(gif)


def progress_html(k: int, n: int, text: str = "") -> str:
    return f'<div class="progress"><progress value="{k}" max="{n}"></progress> step {k} of {n} {text}</div>'


def model_card(info: dict) -> str:
    steps = info.get("steps")
    trained = f"{steps:,} training steps ({info.get('epochs', '?')} epochs)" if steps else "training length unknown"
    return (f"**Model**: `{Path(info.get('path', '?')).name}` · data: **{info.get('dataset', '?')}** · "
            f"{info.get('image_size', '?')}×{info.get('image_size', '?')} px · "
            f"{info.get('parameters', 0) / 1e6:.1f}M parameters · {trained}. "
            f"Prompts that suit it look like its training captions, e.g. *{', '.join(examples(info)[:4])}*.")


def examples(info: dict) -> list[str]:
    return list(info.get("example_prompts") or DEFAULT_EXAMPLES)[:8]


def build_app(pipe: Pipeline, out_dir: Path, max_queue: int = 16, concurrency: int = 1) -> gr.Blocks:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{PREVIEW_DIR_PREFIX}*"):  # left by a server that was killed mid-generation
        shutil.rmtree(stale, ignore_errors=True)
    image_size = pipe.model.cfg.image_size
    model_name = Path(pipe.info.get("path", "model")).name

    async def generate(prompt, n, steps, sampler, guidance, seed):
        try:
            req = parse_request(prompt, n, steps, sampler, guidance, seed, pipe.encoder.token_count)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:  # a check of ours that failed: logged in full, and still a sentence for the client
            traceback.print_exc()
            raise gr.Error("the request could not be read; please check its inputs", print_exception=False) from None
        total = pipe.diffusion.T if req.sampler == "ddpm" else req.steps
        note = f" — note: {req.note}" if req.note else ""
        yield None, None, None, progress_html(0, total, f"· seed {req.seed}{note}")
        try:
            async for update in stream_frames(req, total, note):
                yield update
        except Exception as error:  # a fault of ours: logged in full here, summarised for the user
            traceback.print_exc()
            raise gr.Error(f"generation failed ({type(error).__name__}: {error}); please try again",
                           print_exception=False) from None

    async def stream_frames(req: Request, total: int, note: str):
        # Previews go out as PNG files of our own, not PIL images: Gradio rewrites a PIL output's cache file
        # in place, so a user still downloading an identical earlier frame would get a truncated file;
        # files are copied into the cache atomically and never rewritten. And plain values only, never
        # gr.skip(): Gradio keeps every component update a session receives for the session's lifetime.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=PREVIEW_DIR_PREFIX) as frames:
            frame_path = None
            async for kind, value in stream_generation(pipe, req, display_scale(req.n, image_size)):
                if kind == "frame":
                    frame, done = value
                    frame_path = str(Path(frames) / f"step{done:04d}.png")
                    await asyncio.to_thread(frame.save, frame_path)
                    yield None, None, frame_path, progress_html(done, total, f"· seed {req.seed}{note}")
                else:
                    images, recorder = value
                    gallery, gif = await asyncio.to_thread(save_results, images, recorder, req, model_name, out_dir)
                    # the preview keeps the final grid: the same file, so the same URL
                    yield gallery, gif, frame_path, (f"Done: {req.n} image(s) of “{req.prompt}”, seed {req.seed}, "
                                                     f"{req.sampler}, {total} steps, guidance {req.guidance:g}{note}")

    with gr.Blocks(title="Text to image diffusion", delete_cache=(600, 3600)) as app:
        gr.Markdown("# Text to image diffusion\nType a prompt and watch the images emerge from noise.")
        gr.Markdown(model_card(pipe.info))
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="e.g. red apple", max_lines=1, elem_id="prompt")
                gr.Examples(examples=[[e] for e in examples(pipe.info)], inputs=[prompt], label="Example prompts")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                # plain number boxes: out-of-range values reach the server, which explains what is accepted
                n = gr.Number(value=4, precision=0, label=f"Number of images (1 to {MAX_IMAGES})", elem_id="n")
                sampler = gr.Dropdown(SAMPLER_CHOICES, value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
                steps = gr.Number(value=DEFAULT_STEPS, precision=0, label=f"Steps (1 to {MAX_STEPS}; DDPM always runs all {pipe.diffusion.T})",
                                  elem_id="steps")
                guidance = gr.Slider(0, MAX_GUIDANCE, value=3.0, step=0.5, label="Guidance scale", elem_id="guidance")
                seed = gr.Textbox(value="-1", label="Seed (-1: random)", max_lines=1, elem_id="seed")
            with gr.Column(scale=2):
                status = gr.HTML(label="Status", elem_id="status")
                preview = gr.Image(label="Denoising (predicted images)", type="pil", format="png",
                                   interactive=False, elem_id="preview")
                gallery = gr.Gallery(label="Images", columns=4, format="png", buttons=["download"],
                                     elem_id="gallery")
                gif = gr.Image(label="Denoising GIF", type="filepath", interactive=False, elem_id="gif",
                               buttons=["download"])
        inputs, outputs = [prompt, n, steps, sampler, guidance, seed], [gallery, gif, preview, status]
        # preprocess=False: raw values reach parse_request, which checks them all with clear messages
        # the button and Enter share one concurrency group, so `concurrency` bounds them together
        shared = dict(preprocess=False, concurrency_id="generate", concurrency_limit=concurrency, show_progress="hidden")
        click = run.click(generate, inputs, outputs, api_name="generate", **shared)
        submit = prompt.submit(generate, inputs, outputs, api_visibility="private", **shared)
        stop.click(None, cancels=[click, submit])
    return app.queue(max_size=max_queue, default_concurrency_limit=concurrency)


def parse_auth(text: str | None):
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth takes user:password (both non-empty)")
    return user, password


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Web app: type a prompt, watch the denoising, get a batch.")
    p.add_argument("--checkpoint", help=f"checkpoint file or training run folder (default: {DEFAULT_MODEL.name})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve your network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--auth", help="require this user:password to use the app and its API")
    p.add_argument("--out-dir", default="output_ImageNet/web", help="where generated images and GIFs go")
    p.add_argument("--device", default="auto", help='"auto" (CUDA, then MPS, then CPU) or a torch device')
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more are told to retry")
    p.add_argument("--concurrency", type=int, default=1,
                   help="generations run at once (1 suits a CPU: one generation already uses every core)")
    args = p.parse_args(argv)
    auth = parse_auth(args.auth)
    try:
        pipe = Pipeline.load(args.checkpoint, args.device)
    except ModelFileError as error:
        raise SystemExit(f"error: cannot load a model: {error}") from None
    out_dir = Path(args.out_dir).resolve()
    # Gradio's cache (its copies of our results, and whatever is sent to its upload route) lies beside the
    # output folder, outside allowed_paths: Gradio serves nothing there as a page, and WebGuard serves only the
    # PNGs and GIFs in these two folders, as images
    cache_dir = out_dir.with_name(f"{out_dir.name}-cache")
    os.environ["GRADIO_TEMP_DIR"] = str(cache_dir)
    app = build_app(pipe, out_dir, args.max_queue, args.concurrency)
    guard = Middleware(WebGuard, served=[out_dir, cache_dir], throttle=LoginThrottle() if auth else None,
                       hide_api_from_login_page=auth is not None)
    print(f"model: {pipe.info.get('path')} ({pipe.info.get('parameters', 0) / 1e6:.1f}M parameters)")
    app.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
               allowed_paths=[str(out_dir)], show_error=False, max_file_size=MAX_UPLOAD,
               ssr_mode=False, app_kwargs={"middleware": [guard]})  # no Node server rendering pages past the guard


if __name__ == "__main__":
    main()
