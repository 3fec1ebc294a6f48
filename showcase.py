"""python showcase.py: redraw output_ImageNet/ (forward_diffusion.png, loss.png, final_<prompt>.png and
<prompt>_generation.gif) from the shipped model, or from any model with --checkpoint.
"""
import argparse
import re
from pathlib import Path

from checkpoints import ModelFileError
from pipeline import Pipeline
from plot_func import DenoisingRecorder, ensure_dir, forward_diffusion_strip, grid_image, plot_loss, save_png, to_uint8
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, sampler_steps

# The original project's README prompts first (two are rewordings, not emoji names), then emoji names
SHOWCASE_PROMPTS = ("red apple", "golden retriever", "sunset over mountains", "tropical fish", "rocket", "grinning face")


def slug(prompt: str) -> str:
    """A file-name-safe form of a prompt: 'red apple!' -> 'red_apple'."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_") or "prompt"


def showcase(pipe, data, out_dir, prompts=SHOWCASE_PROMPTS, n: int = 8, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
             guidance: float = 3.0, seed: int = 0) -> list[Path]:
    """forward_diffusion.png, loss.png (from the model's saved history), and per prompt a batch
    final_<prompt>.png and its denoising animation <prompt>_generation.gif. Returns the files written."""
    steps = sampler_steps(pipe.diffusion, sampler, steps)
    out = ensure_dir(out_dir)
    first = next((i for i, caps in enumerate(data.captions) if prompts[0] in caps), 0)
    forward_diffusion_strip(data.images[first].float() / 127.5 - 1, pipe.diffusion,
                            [0, 50, 100, 200, 300, 400, 500, 600, 800, 999], out / "forward_diffusion.png")
    written = [out / "forward_diffusion.png"]
    history = pipe.info.get("history")
    if history:
        plot_loss(history, out / "loss.png")
        written.append(out / "loss.png")
    for prompt in prompts:
        recorder = DenoisingRecorder(steps, scale=4)
        images = to_uint8(pipe.generate([prompt] * n, sampler, steps, guidance, seed, recorder))
        meta = {"prompt": prompt, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance,
                "model": Path(pipe.info.get("path", "?")).name}
        save_png(grid_image(images, nrow=n, scale=4), out / f"final_{slug(prompt)}.png", meta)
        recorder.finish(images)
        recorder.save(out / f"{slug(prompt)}_generation.gif")
        written += [out / f"final_{slug(prompt)}.png", out / f"{slug(prompt)}_generation.gif"]
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Redraw the showcase: forward_diffusion.png, loss.png, "
                                "final_<prompt>.png and <prompt>_generation.gif", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model to show; default: the shipped model")
    p.add_argument("--data", default=None, help="data set of the forward-noising strip; default: the model's")
    p.add_argument("--out-dir", default="output_ImageNet", help="where the files go")
    p.add_argument("--prompts", nargs="+", default=list(SHOWCASE_PROMPTS), help="one batch and GIF per prompt")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS),
                   help="dpmpp_sde: SDE-DPM-Solver++(2M); dpmpp: DPM-Solver++(2M)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--device", default="auto", help='"auto" (CUDA, MPS, CPU) or a torch device')
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.checkpoint, args.device)
    for path in showcase(pipe, pipe.training_data(args.data), args.out_dir, args.prompts, args.n, args.sampler, args.steps, args.guidance, args.seed):
        print("wrote", path)


if __name__ == "__main__":
    try:
        main()
    except ModelFileError as error:  # a bad model file: one line naming it and the fault, not a traceback
        raise SystemExit(f"error: cannot load a model: {error}") from None
