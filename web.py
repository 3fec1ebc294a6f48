"""The web app: type a prompt, watch the batch emerge from noise, download the images; or start from a picture or
a sketch, repaint part of a picture, or morph one prompt into another.

    python web.py [--checkpoint CKPT] [--host 127.0.0.1] [--port 7860] [--share] [--auth user:password] [--trusted-proxy ADDR] [--mcp]

The model loads once; a bounded queue serves users in turn. Every input is checked on the server
(web_checks.py; what Gradio checks first, web_calls.py), so a bad request gets a clear message and never a
traceback; web_results.py streams each generation's previews (cancelled if nobody reads them) and keeps its
results; web_guard.py caps request bodies, serves only the app's own images and, with --auth, hides the API from
the login page and slows password guessing. Each feature is a named API endpoint (generate, edit_image, inpaint,
morph) for gradio_client, and with --mcp a Model Context Protocol tool (web_mcp.py).
"""
import argparse
import asyncio
import html
import inspect
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text encoder ships with its package: never reach a hub
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waits beside a busy process: 2x slower (bench/threads.py)

import gradio as gr
import torch
from starlette.middleware import Middleware

from checkpoints import ModelFileError
from guidance import DEFAULT_GUIDANCE
from pipeline import DEFAULT_MODEL, Pipeline
from preprocess import dataset_styles
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, IMG2IMG_STRENGTH, RESAMPLE, sampler_steps
from sources.captions import STYLE_NAMES, with_style
from sources.images import fit_image
from web_calls import CheckedBlocks, result_unread
from web_checks import (  # noqa: F401 (MAX_PROMPT_CHARS: re-exported for callers of web)
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    SAMPLER_CHOICES,
    InputError,
    Request,
    edit_picture,
    fraction,
    inpaint_pictures,
    parse_morph,
    parse_request,
    reused_request,
)
from web_guard import LoginThrottle, WebGuard, parse_auth
from web_results import READ_WITHIN_S, Job, Unread, display_scale, morph_frames, save_results, stream_generation
from web_threads import choose_sampling_threads

MAX_UPLOAD = "1mb"  # the editors send PNGs of at most 512x512; uploads are never served back
EDITOR_CANVAS = (512, 512)  # pictures are fitted into this canvas in the browser, before they are sent
RESULT_COPIES = "results"  # the folder of Gradio's upload folder where Gradio copies our results (never an upload's)
# Gradio keeps a copy of the page's config per session (about 64 KB), and every raw API call without a session
# is a new one: 10,000 by default. The app keeps nothing in them (no gr.State), so few are kept
MAX_SESSIONS = 200
PREVIEW_DIR_PREFIX = ".previews-"  # a generation's preview frames, removed when it ends
DEFAULT_EXAMPLES = ["red apple", "tropical fish", "grinning face", "rocket", "red heart", "sun"]
MASK_COLOR = "#ff00ff"
ENDPOINTS = ("generate", "edit_image", "inpaint", "morph")  # the API's names (and the MCP tools')


@dataclass
class Work:
    """A checked request, ready to run: the sampler call and what to save and say about its images."""
    job: Job
    steps: int  # sampler steps, for the progress bar
    n: int
    metadata: list[dict]  # one per image, into its PNG
    captions: list[str]
    status: str  # shown beside the progress bar
    summary: str  # shown when it is done
    morph: bool = False  # the GIF shows the morph, not the denoising


def progress_html(k: int, n: int, text: str = "") -> str:
    """The status line while sampling; `text` quotes the user's prompt, so it is escaped like all the status HTML."""
    return f'<div class="progress"><progress value="{k}" max="{n}"></progress> step {k} of {n} {html.escape(text)}</div>'


def model_card(info: dict) -> str:
    steps = info.get("steps")
    trained = f"{steps:,} training steps ({info.get('epochs', '?')} epochs)" if steps else "training length unknown"
    return (f"**Model**: `{Path(info.get('path', '?')).name}` · trained on **{trained_on(info)}** · "
            f"{info.get('image_size', '?')}×{info.get('image_size', '?')} px · "
            f"{info.get('parameters', 0) / 1e6:.1f}M parameters · {trained}. "
            f"Prompts that suit it look like its training captions, e.g. *{', '.join(examples(info)[:4])}*.")


def guided(req: Request):
    """The app's default guidance (its interval of noise levels and condition annealing) at the request's scale."""
    return replace(DEFAULT_GUIDANCE, scale=req.guidance)


def trained_on(info: dict) -> str:
    """What the model learned from, in words: "Noto, OpenMoji, EmojiOne emoji and clip art (8,928 pictures)"."""
    styles, count = dataset_styles(info.get("dataset", "")), info.get("images")
    words = " and ".join(", ".join(STYLE_NAMES[s] for s in styles).rsplit(", ", 1)) + " pictures" if styles \
        else str(info.get("dataset", "?"))
    return words + (f" ({count:,} images)" if isinstance(count, int) else "")


def noted(req: Request) -> str:
    """What was changed in a request on the way in, for the status line ("" if nothing)."""
    return f" — note: {req.note}" if req.note else ""


def examples(info: dict) -> list[str]:
    return list(info.get("example_prompts") or DEFAULT_EXAMPLES)[:8]


# What an endpoint's arguments mean, unless it says otherwise: `documented` writes them into its docstring
ARGUMENTS = {
    "prompt": "what to draw",
    "n": f"number of images, 1 to {MAX_IMAGES}; image k is drawn from seed + k",
    "steps": f"sampler steps, 1 to {MAX_STEPS} (DDPM always runs all of its steps)",
    "sampler": ", ".join(value for _, value in SAMPLER_CHOICES),
    "guidance": f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g} (1: none)",
    "seed": "a whole number (as text) for repeatable images, -1 for a random one",
    "negative_prompt": 'what to steer away from ("" for nothing)',
}
MCP_FILES = "; as an MCP tool, each file is a base64 data: URL (other URLs are not fetched)"
RETURNS = "the images, a GIF (of the denoising, or of the morph), the last preview, and a status line with the seed"


def documented(summary: str, **own: str):
    """Give an endpoint the docstring gradio_client and MCP clients show: `summary`, then each of its arguments
    (in its signature's order) from `own` or ARGUMENTS, then what it returns."""
    def document(fn):
        meaning = {**ARGUMENTS, **own}
        lines = [f"    {name}: {meaning[name]}" for name in inspect.signature(fn).parameters]
        fn.__doc__ = "\n".join([summary, "", "Args:", *lines, "Returns:", f"    {RETURNS}"])
        return fn
    return document


class Studio:
    """The app's work, apart from its page: checked requests -> Work -> streamed updates and saved results."""

    def __init__(self, pipe: Pipeline, out_dir: Path, served: list[Path], upload_dir: str):
        self.pipe, self.out_dir, self.served, self.upload_dir = pipe, out_dir, served, upload_dir
        self.model_name = Path(pipe.info.get("path", "model")).name
        self.styles = dataset_styles(pipe.info.get("dataset", ""))  # what the style choice offers

    def request(self, prompt, n, steps, sampler, guidance, seed, negative_prompt) -> Request:
        return parse_request(prompt, n, steps, sampler, guidance, seed, self.pipe.encoder.token_count, negative_prompt)

    def model_input(self, picture) -> torch.Tensor:
        """A PIL picture fitted to the model's size, in [-1, 1], (C, H, W)."""
        cfg = self.pipe.model.cfg
        return fit_image(picture, cfg.image_size, cfg.in_channels == 1).float() / 127.5 - 1

    def settings(self, req: Request) -> dict:
        """What a result PNG records of its request (the image's own seed is added per image)."""
        return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "sampler": req.sampler,
                "steps": req.steps, "guidance": req.guidance, "seed": req.seed, "model": self.model_name}

    def images(self, req: Request, options: dict | None = None, extra: dict | None = None) -> Work:
        """Work for req.n images of one prompt, image k from seed + k; `options` (init, strength, mask) edit."""
        options = options or {}
        t0 = self.pipe.diffusion.strength_timestep(options["strength"]) if options else None
        steps = 0 if options and t0 is None else sampler_steps(self.pipe.diffusion, req.sampler, req.steps, t0)
        meta = {**self.settings(req), **(extra or {})}
        return Work(lambda callback: self.pipe.generate(
                        [req.prompt] * req.n, req.sampler, req.steps, guided(req), req.seed, callback,
                        negative_prompts=req.negative_prompt, **options),
                    steps, req.n, [{**meta, "index": i, "image_seed": req.seed + i} for i in range(req.n)],
                    [f"#{i} · seed {req.seed + i}" for i in range(req.n)], f"· seed {req.seed}{noted(req)}",
                    f"Done: {req.n} image(s) of “{req.prompt}”, seed {req.seed}, {req.sampler}, {steps} steps, "
                    f"guidance {req.guidance:g}{noted(req)}")

    def text_to_image(self, prompt, n, steps, sampler, guidance, seed, negative_prompt) -> Work:
        return self.images(self.request(prompt, n, steps, sampler, guidance, seed, negative_prompt))

    def image_to_image(self, picture, prompt, strength, n, steps, sampler, guidance, seed, negative_prompt) -> Work:
        req = self.request(prompt, n, steps, sampler, guidance, seed, negative_prompt)
        strength = fraction(strength, "strength")
        init = self.model_input(edit_picture(picture, self.upload_dir))
        return self.images(req, {"init": init.expand(req.n, -1, -1, -1), "strength": strength},
                           {"mode": "image-to-image", "strength": strength})

    def inpainting(self, picture, prompt, n, steps, sampler, guidance, seed, negative_prompt) -> Work:
        req = self.request(prompt, n, steps, sampler, guidance, seed, negative_prompt)
        image, mask = inpaint_pictures(picture, self.upload_dir)
        size = self.pipe.model.cfg.image_size  # fitted as the picture is; 1 = redraw where half or more was painted
        mask = (fit_image(mask, size, True) >= 128).float()[None]  # (as sample.py --mask)
        if not mask.any():
            raise InputError(f"the painted part vanishes at the model's {size}x{size} pixels (or lies outside the "
                             "centre square the model sees): paint a larger area")
        init = self.model_input(image).expand(req.n, -1, -1, -1)
        return self.images(req, {"init": init, "strength": 1.0, "mask": mask, "resample": RESAMPLE},
                           {"mode": "inpainting", "resample": RESAMPLE})

    def morph(self, prompt, prompt_b, frames, steps, sampler, guidance, seed, negative_prompt) -> Work:
        req = self.request(prompt, 1, steps, sampler, guidance, seed, negative_prompt)
        prompt_b, frames = parse_morph(prompt_b, frames)
        meta = {**self.settings(req), "prompt_b": prompt_b, "image_seed": req.seed, "mode": "morph"}
        weights = [k / (frames - 1) for k in range(frames)]
        return Work(lambda callback: self.pipe.morph(req.prompt, prompt_b, frames, req.sampler, req.steps, guided(req),
                                                     req.seed, callback, negative_prompt=req.negative_prompt),
                    sampler_steps(self.pipe.diffusion, req.sampler, req.steps), frames,
                    [{**meta, "index": k, "morph_weight": w} for k, w in enumerate(weights)],
                    [f"{w:.0%} of the way" for w in weights], f"· seed {req.seed}{noted(req)}",
                    f"Done: {frames} frames from “{req.prompt}” to “{prompt_b}”, seed {req.seed}{noted(req)}", morph=True)

    async def respond(self, make_work, *inputs):
        """Check the inputs (in a thread: pictures are decoded), then stream (gallery, gif, preview, status)."""
        try:
            work = await asyncio.to_thread(make_work, *inputs)
        except InputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:  # a check of ours that failed: logged in full, and still a sentence for the client
            traceback.print_exc()
            raise gr.Error("the request could not be read; please check its inputs", print_exception=False) from None
        unread = result_unread()  # asked now, while Gradio's context names this call
        yield None, None, None, progress_html(0, work.steps, work.status)
        try:
            async for update in self.stream(work, unread):
                yield update
        except Unread:  # a client that posted a call and never opened its result stream: the worker is freed
            print(f"generation cancelled: nobody read its results within {READ_WITHIN_S} s", flush=True)
            raise gr.Error(f"cancelled: nobody read the results within {READ_WITHIN_S} s of the start (open the "
                           "result stream right after the call)", print_exception=False) from None
        except Exception as error:  # a fault of ours: logged in full here, summarised for the user
            traceback.print_exc()
            raise gr.Error(f"generation failed ({type(error).__name__}: {error}); please try again",
                           print_exception=False) from None

    async def stream(self, work: Work, unread=None):
        # Previews go out as PNG files of our own, not PIL images: Gradio rewrites a PIL output's cache file
        # in place, so a user still downloading an identical earlier frame would get a truncated file;
        # files are copied into the cache atomically and never rewritten. And plain values only, never
        # gr.skip(): Gradio keeps every component update a session receives for the session's lifetime.
        scale = display_scale(work.n, self.pipe.model.cfg.image_size)
        with tempfile.TemporaryDirectory(dir=self.out_dir, prefix=PREVIEW_DIR_PREFIX) as frames:
            frame_path = None
            async for kind, value in stream_generation(work.job, work.steps, scale, unread):
                if kind == "frame":
                    frame, done = value
                    frame_path = str(Path(frames) / f"step{done:04d}.png")
                    await asyncio.to_thread(frame.save, frame_path)
                    yield None, None, frame_path, progress_html(done, work.steps, work.status)
                else:
                    images, recorder = value
                    gif_frames = morph_frames(images) if work.morph else recorder.frames
                    gallery, gif = await asyncio.to_thread(save_results, images, gif_frames, work.metadata,
                                                           work.captions, self.out_dir)
                    # the preview keeps the final grid (same file, URL); the summary quotes the prompt: escaped
                    yield gallery, gif, frame_path, html.escape(work.summary)

    def restyle(self, prompt, style):
        """The prompt box after a style choice: the style's words at its end ("any": none). Odd values (this is
        a listener, callable like any other) and an empty prompt leave the prompt as it was."""
        if not isinstance(prompt, str) or not prompt.strip() or (style != "any" and style not in self.styles):
            return gr.skip()
        return with_style(prompt, None if style == "any" else style)

    def reuse(self, evt: gr.EventData):
        """A clicked result's prompt, negative prompt, sampler, steps, guidance and own seed, back in the inputs.
        Plain EventData: gr.SelectData reads the client's event data (its index) before this runs, and fails."""
        data = getattr(evt, "_data", None)
        value = data.get("value") if isinstance(data, dict) else None
        image = value.get("image") if isinstance(value, dict) else None
        req = reused_request(image.get("path") if isinstance(image, dict) else None, self.served)
        if req is None:
            return [gr.skip()] * 6
        return [req.prompt, req.negative_prompt, req.sampler, req.steps, req.guidance, str(req.seed)]


def build_app(pipe: Pipeline, out_dir: Path, max_queue: int = 16, concurrency: int = 1,
              served: list[Path] | None = None, upload_dir: str | None = None) -> gr.Blocks:
    """The page. `served`: folders whose result PNGs a click may read settings from (default: `out_dir`);
    `upload_dir`: where Gradio stores uploads, the only place pictures are read from (default: Gradio's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{PREVIEW_DIR_PREFIX}*"):  # left by a server that was killed mid-generation
        shutil.rmtree(stale, ignore_errors=True)
    studio = Studio(pipe, out_dir, served or [out_dir], upload_dir or gr.utils.get_upload_folder())

    # The endpoints (their names and docstrings are the API's and the MCP tools'). Raw values arrive
    # (preprocess=False) and are checked by web_checks with clear messages; pictures are file references.
    @documented("Text to image: draw `n` pictures of a prompt with the diffusion model, streaming previews.",
                prompt='what to draw, e.g. "a dog", or in one style: "a dog, OpenMoji style" (styles: Noto, OpenMoji, '
                       'EmojiOne, clip art)')
    async def generate(prompt: str, n: int = 4, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                       guidance: float = DEFAULT_GUIDANCE.scale, seed: int = -1, negative_prompt: str = ""):
        async for update in studio.respond(studio.text_to_image, prompt, n, steps, sampler, guidance, seed,
                                           negative_prompt):
            yield update

    @documented("Image to image (SDEdit): redraw a picture or a sketch to fit a prompt.",
                picture='the image editor\'s value: {"background": file, "layers": [...], "composite": file}; the '
                        f"composite (else the background) is the starting picture{MCP_FILES}",
                strength="how much is redrawn, 0 (the picture as it is) to 1 (ignores it)")
    async def edit_image(picture: dict, prompt: str, strength: float = IMG2IMG_STRENGTH, n: int = 4,
                         steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, guidance: float = DEFAULT_GUIDANCE.scale,
                         seed: int = -1, negative_prompt: str = ""):
        async for update in studio.respond(studio.image_to_image, picture, prompt, strength, n, steps, sampler,
                                           guidance, seed, negative_prompt):
            yield update

    @documented("Inpainting (RePaint): redraw only the painted part of a picture; the rest stays as it is.",
                picture='the image editor\'s value: {"background": the picture, "layers": [the painted mask: '
                        'opaque pixels, or white ones in a picture without alpha, are redrawn], "composite": ignored}'
                        + MCP_FILES,
                prompt="what to draw in the painted part")
    async def inpaint(picture: dict, prompt: str, n: int = 4, steps: int = DEFAULT_STEPS,
                      sampler: str = DEFAULT_SAMPLER, guidance: float = DEFAULT_GUIDANCE.scale, seed: int = -1, negative_prompt: str = ""):
        async for update in studio.respond(studio.inpainting, picture, prompt, n, steps, sampler, guidance, seed,
                                           negative_prompt):
            yield update

    @documented("Prompt morph: frames whose prompt goes from one to another, all from the same starting noise; "
                "the GIF plays them there and back.",
                prompt="the first frame's prompt", prompt_b="the last frame's prompt",
                frames=f"number of frames, 2 to {MAX_FRAMES}")
    async def morph(prompt: str, prompt_b: str, frames: int = 8, steps: int = DEFAULT_STEPS,
                    sampler: str = DEFAULT_SAMPLER, guidance: float = DEFAULT_GUIDANCE.scale, seed: int = -1, negative_prompt: str = ""):
        async for update in studio.respond(studio.morph, prompt, prompt_b, frames, steps, sampler, guidance, seed,
                                           negative_prompt):
            yield update

    with CheckedBlocks(title="Text to image diffusion", delete_cache=(600, 3600)) as app:
        gr.Markdown("# Text to image diffusion\nType a prompt and watch the images emerge from noise.")
        gr.Markdown(model_card(pipe.info))
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="e.g. red apple", max_lines=1, elem_id="prompt")
                style = gr.Dropdown([("any", "any")] + [(STYLE_NAMES[s], s) for s in studio.styles], value="any",
                                    label="Style (adds its words to the prompt; typing them works too)",
                                    elem_id="style", visible=bool(studio.styles))
                gr.Examples(examples=[[e] for e in examples(pipe.info)], inputs=[prompt], label="Example prompts")
                negative = gr.Textbox("", label="Negative prompt (what to steer away from)", max_lines=1,
                                      placeholder="e.g. green", elem_id="negative")
                with gr.Tabs():
                    with gr.Tab("Text to image", id="text"):
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Tab("Image to image", id="edit"):
                        edit_in = gr.ImageEditor(label="Start from: upload a picture or sketch one", elem_id="edit_picture",
                                                 sources=("upload", "clipboard"), canvas_size=EDITOR_CANVAS,
                                                 fixed_canvas=True, format="png", layers=False)
                        strength = gr.Slider(0, 1, value=IMG2IMG_STRENGTH, step=0.05, elem_id="strength",
                                             label="Strength: 0 keeps the picture, 1 ignores it")
                        run_edit = gr.Button("Redraw the picture", variant="primary", elem_id="run_edit")
                    with gr.Tab("Inpaint", id="inpaint"):
                        inpaint_in = gr.ImageEditor(label="Upload a picture, then paint over what to redraw",
                                                    elem_id="inpaint_picture", sources=("upload", "clipboard"),
                                                    canvas_size=EDITOR_CANVAS, fixed_canvas=True, format="png",
                                                    layers=False, transforms=(),
                                                    brush=gr.Brush(colors=[MASK_COLOR], color_mode="fixed"))
                        run_inpaint = gr.Button("Redraw the painted part", variant="primary", elem_id="run_inpaint")
                    with gr.Tab("Morph", id="morph"):
                        prompt_b = gr.Textbox(label="Morph into this prompt", max_lines=1, placeholder="e.g. sun",
                                              elem_id="prompt_b")
                        frames = gr.Number(value=8, precision=0, label=f"Frames (2 to {MAX_FRAMES})", elem_id="frames")
                        run_morph = gr.Button("Morph", variant="primary", elem_id="run_morph")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
                # plain number boxes: out-of-range values reach the server, which explains what is accepted
                n = gr.Number(value=4, precision=0, label=f"Number of images (1 to {MAX_IMAGES})", elem_id="n")
                sampler = gr.Dropdown(SAMPLER_CHOICES, value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
                steps = gr.Number(value=DEFAULT_STEPS, precision=0, label=f"Steps (1 to {MAX_STEPS}; DDPM always runs all {pipe.diffusion.T})",
                                  elem_id="steps")
                guidance = gr.Slider(0, MAX_GUIDANCE, value=DEFAULT_GUIDANCE.scale, step=0.5, label="Guidance scale", elem_id="guidance")
                seed = gr.Textbox(value="-1", label="Seed (-1: random)", max_lines=1, elem_id="seed")
            with gr.Column(scale=2):
                status = gr.HTML(label="Status", elem_id="status")
                preview = gr.Image(label="Denoising (predicted images)", type="pil", format="png",
                                   interactive=False, elem_id="preview")
                gallery = gr.Gallery(label="Images (click one to reuse its prompt, seed and settings)", columns=4,
                                     format="png", buttons=["download", "download_all"], elem_id="gallery")
                gif = gr.Image(label="GIF (the denoising, or the morph)", type="filepath", interactive=False,
                               elem_id="gif", buttons=["download"])
        for shown in (gallery, gif, preview):  # copied apart from the uploads (in hash-named folders), so that only
            shown.GRADIO_CACHE = str(Path(studio.upload_dir) / RESULT_COPIES)  # results are served
        settings, outputs = [steps, sampler, guidance, seed, negative], [gallery, gif, preview, status]
        # the buttons and Enter share one concurrency group, so `concurrency` bounds them together
        shared = dict(preprocess=False, concurrency_id="generate", concurrency_limit=concurrency, show_progress="hidden")
        # the button and Enter in the prompt: one endpoint (a second listener was callable as "generate_1")
        events = [gr.on([run.click, prompt.submit], generate, [prompt, n, *settings], outputs, api_name="generate",
                        **shared),
                  run_edit.click(edit_image, [edit_in, prompt, strength, n, *settings], outputs,
                                 api_name="edit_image", **shared),
                  run_inpaint.click(inpaint, [inpaint_in, prompt, n, *settings], outputs, api_name="inpaint", **shared),
                  run_morph.click(morph, [prompt, prompt_b, frames, *settings], outputs, api_name="morph", **shared)]
        stop.click(None, cancels=events)
        style.input(studio.restyle, [prompt, style], [prompt], api_visibility="private", show_progress="hidden")
        gallery.select(studio.reuse, None, [prompt, negative, sampler, steps, guidance, seed], api_visibility="private",
                       show_progress="hidden")
    return app.queue(max_size=max_queue, default_concurrency_limit=concurrency)


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
    p.add_argument("--trusted-proxy", default="", metavar="ADDRESSES",
                   help="comma-separated addresses of reverse proxies whose X-Forwarded-For is believed (default: none, "
                   "so the login throttle and logs see each connection's real peer)")
    p.add_argument("--mcp", action="store_true", help="also serve the endpoints as Model Context Protocol tools "
                   "at /gradio_api/mcp/ (needs gradio[mcp]; not with --auth, which MCP clients cannot pass)")
    args = p.parse_args(argv)
    auth = parse_auth(args.auth)
    if args.mcp and auth:
        raise SystemExit("error: --mcp cannot be combined with --auth: Gradio's MCP route does not ask for the login")
    try:
        pipe = Pipeline.load(args.checkpoint, args.device)
    except ModelFileError as error:
        raise SystemExit(f"error: cannot load a model: {error}") from None
    out_dir = Path(args.out_dir).resolve()
    # Gradio's cache (uploads; in RESULT_COPIES its copies of our results) lies beside the output folder, outside
    # allowed_paths: served by WebGuard alone, only PNGs and GIFs of the output folder and RESULT_COPIES, as images
    cache_dir = out_dir.with_name(f"{out_dir.name}-cache")
    os.environ["GRADIO_TEMP_DIR"] = str(cache_dir)
    copies = cache_dir / RESULT_COPIES
    # uvicorn believes X-Forwarded-For from FORWARDED_ALLOW_IPS, 127.0.0.1 unless set: a local client could then
    # send a new address with every guessed password and never be throttled
    os.environ["FORWARDED_ALLOW_IPS"] = args.trusted_proxy
    app = build_app(pipe, out_dir, args.max_queue, args.concurrency, [out_dir, copies], str(cache_dir))
    guard = Middleware(WebGuard, served=[out_dir, copies], throttle=LoginThrottle() if auth else None,
                       hide_api_from_login_page=auth is not None, endpoints=ENDPOINTS)
    if args.mcp:
        from web_mcp import serve_tools_with_pictures
        serve_tools_with_pictures()
    print(f"model: {pipe.info.get('path')} ({pipe.info.get('parameters', 0) / 1e6:.1f}M parameters)")
    choose_sampling_threads(pipe)  # timed on the app's work, before the first user's (web_threads.py)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
               allowed_paths=[str(out_dir)], show_error=False, max_file_size=MAX_UPLOAD, mcp_server=args.mcp,
               state_session_capacity=MAX_SESSIONS,
               ssr_mode=False, app_kwargs={"middleware": [guard]})  # no Node server rendering pages past the guard


if __name__ == "__main__":
    main()
