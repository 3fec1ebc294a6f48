"""End-to-end generation: prompt -> finished PNG files, ours vs a diffusers pipeline-equivalent loop.

Both sides: encode the prompt (a new prompt every round, so no cache helps) and the empty prompt with
the same all-MiniLM-L6-v2 encoder, run DPM-Solver++(2M) for --steps U-Net evaluations with
classifier-free guidance (conditional and unconditional halves in one batch), write one PNG per image.
Ours is `Pipeline.generate` (diffusion.sample with its default precision, the model in the layout
`Pipeline.load` picks on this CPU) + `plot_func.save_png`; the
diffusers loop is what StableDiffusionPipeline does per step, with DPMSolverMultistepScheduler on the
same cosine schedule, a UNet2DConditionModel of the same config and no VAE (pixel space, like ours).

    python bench/generation.py                   # shipped config, 1 and 4 images
    python bench/generation.py --arch matched
"""
import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from common import (
    ARCHS,
    BF16_RULE,
    DiffusersDenoiser,
    add_output_args,
    interleaved,
    layout_name,
    median,
    n_params,
    our_unet,
    ratio_of_medians,
    section,
    table,
    write_section,
)
from PIL import Image

from diffusion import GaussianDiffusion
from models.cpu import native_bf16, sampling_memory_format
from models.text_encoder import TextCondition, TextEncoder
from pipeline import Pipeline
from plot_func import save_png, to_pil, to_uint8
from samplers import dpmpp_2m_sample

WORDS = ["red", "blue", "green", "small", "big", "happy", "sleepy", "shiny"]
NOUNS = ["apple", "fish", "cat", "car", "house", "tree", "star", "moon"]


def prompts():
    """A different prompt every call: the text encoder's cache never hits."""
    for i in itertools.count():
        yield f"a {WORDS[i % 8]} {NOUNS[(i // 8) % 8]} number {i}"


class DiffusersLoop:
    """StableDiffusionPipeline.__call__ without the VAE: encode, CFG batch, scheduler.step, to PNG."""

    def __init__(self, unet: DiffusersDenoiser, st_model, size: int, precision: str):
        from diffusers import DPMSolverMultistepScheduler
        self.unet, self.st, self.size = unet, st_model, size
        self.scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                     algorithm_type="dpmsolver++", solver_order=2)
        self.dtype = torch.bfloat16 if precision == "bf16" else None

    def encode(self, texts):
        features = self.st.preprocess(texts)
        out = self.st({k: v for k, v in features.items() if isinstance(v, torch.Tensor)})
        return out["token_embeddings"], out["sentence_embedding"]

    @torch.inference_mode()
    def __call__(self, prompt: str, n: int, steps: int, guidance: float, seed: int, out_dir: Path):
        tokens, pooled = self.encode([prompt, ""])  # prompt and negative (empty) prompt, as pipelines do
        ctx = torch.cat([tokens[:1].expand(n, -1, -1), tokens[1:].expand(n, -1, -1)])
        pooled = torch.cat([pooled[:1].expand(n, -1), pooled[1:].expand(n, -1)])
        cond = TextCondition(ctx, torch.ones(ctx.shape[:2], dtype=torch.bool), pooled)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, self.size, self.size, generator=g) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            with torch.autocast("cpu", self.dtype, enabled=self.dtype is not None):
                out = self.unet(inp, t, cond).float()  # UNet2DConditionModel, inside the patch unfold
            eps_c, eps_u = out.chunk(2)
            x = self.scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, img in enumerate(images):
            Image.fromarray(img).save(out_dir / f"diffusers_{i:04d}.png")


def ours_generate(pipe: Pipeline, prompt: str, n: int, steps: int, guidance: float, seed: int, out_dir: Path):
    images = to_uint8(pipe.generate([prompt] * n, "dpmpp", steps, guidance, seed))
    for i, img in enumerate(images):
        save_png(to_pil(img), out_dir / f"ours_{i:04d}.png", {"prompt": prompt, "seed": seed})


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="shipped")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, nargs="+", default=[1, 4], help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ARCHS[args.arch]
    torch.manual_seed(0)
    # in the layout Pipeline.load puts the model in on this CPU, as the app samples
    layout = sampling_memory_format("cpu", args.size // arch.patch_size)
    model = our_unet(arch, args.size).to(memory_format=layout).eval().requires_grad_(False)
    unet = DiffusersDenoiser(arch, args.size).eval().requires_grad_(False)
    encoder = TextEncoder()
    pipe = Pipeline(model, GaussianDiffusion.from_name("cosine", 1000), encoder)
    # diffusers in bf16 only where bf16 is native: emulated it takes 20x fp32's time and is no one's default there
    precisions = ["fp32", "bf16"] if native_bf16("cpu") else ["fp32"]
    loops = {p: DiffusersLoop(unet, encoder.model, args.size, p) for p in precisions}
    texts, out = prompts(), Path(tempfile.mkdtemp(prefix="bench_generation_"))
    rows = []
    for n in args.n:
        fns = {"ours": lambda: ours_generate(pipe, next(texts), n, args.steps, args.guidance, 0, out)}
        fns |= {f"diffusers {p}": lambda loop=loop: loop(next(texts), n, args.steps, args.guidance, 0, out)
                for p, loop in loops.items()}
        r = interleaved(fns, args.reps, warmup=1)
        cells = {p: (f"{median(r[f'diffusers {p}']):.3f}", f"**{ratio_of_medians(r['ours'], r[f'diffusers {p}']):.2f}**")
                 if f"diffusers {p}" in r else ("n/a", "n/a") for p in ("fp32", "bf16")}
        rows.append([n, f"{median(r['ours']):.3f}", cells["fp32"][0], cells["bf16"][0], cells["fp32"][1],
                     cells["bf16"][1]])
        print(rows[-1])
    # what our sampler loop itself costs per step, with a denoiser that does nothing
    x = torch.randn(max(args.n), 3, args.size, args.size)
    zero = lambda x_t, t: torch.zeros_like(x_t)
    loop = interleaved({"loop": lambda: dpmpp_2m_sample(zero, pipe.diffusion, x, args.steps, clip_x0=True)}, 3, 1, 0.2)
    loop_us = 1e6 * median(loop["loop"]) / args.steps
    assert len(list(out.glob("ours_*.png"))) == max(args.n) and len(list(out.glob("diffusers_*.png"))) == max(args.n)
    header = ["images", "ours s", "diffusers fp32 s", "diffusers bf16 s", "ours / diffusers fp32",
              "ours / diffusers bf16"]
    body = table(header, rows)
    notes = (f"Config: {arch.describe()} at {args.size}px ({n_params(model) / 1e6:.2f}M parameters ours, "
             f"{n_params(unet) / 1e6:.2f}M diffusers); DPM-Solver++(2M), {args.steps} steps, guidance {args.guidance}, "
             f"so each step runs the U-Net on 2 x images. Seconds from prompt to PNG files on disk, medians of "
             f"{args.reps} interleaved rounds. Ours runs its default precision (bf16 autocast "
             f"{BF16_RULE}, else fp32) in the layout `Pipeline.load` picks here "
             f"({layout_name(layout)}). Our sampler's own work per step "
             "(DPM-Solver++ update, clipping, with a "
             f"denoiser that returns zeros, {max(args.n)} images): {loop_us:.0f} us.")
    print(body + "\n\n" + notes)
    if args.write:
        write_section(f"generation-{args.arch}", section(f"End-to-end generation ({args.arch} config)", body, notes),
                      args.doc)
    return body


if __name__ == "__main__":
    main()
