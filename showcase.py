"""python showcase.py: redraw output_ImageNet/ (forward_diffusion.png, loss.png, final_<prompt>.png and
<prompt>_generation.gif; for a model of several styles styles_<prompt>.png and heldout_pairs.png) from the shipped
model, or from any model with --checkpoint.
"""
import argparse
import re
from pathlib import Path

from checkpoints import ModelFileError
from guidance import DEFAULT_GUIDANCE, Guidance, add_guidance_arguments, describe_guidance, guidance_from_arguments
from pipeline import Pipeline
from plot_func import DenoisingRecorder, ensure_dir, forward_diffusion_strip, grid_image, plot_loss, save_png, to_uint8
from preprocess import HELDOUT_PAIRS, dataset_styles
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, sampler_steps
from sources.captions import with_style

# The original project's README prompts first (two are rewordings, not emoji names), then everyday ones
SHOWCASE_PROMPTS = ("red apple", "golden retriever", "sunset over mountains", "a dog", "a red car", "an apple")
STYLE_PROMPTS = ("a dog", "an apple")  # styles_<prompt>.png: a row per style the model learned
# heldout_pairs.png: concepts of the (style, group) pairs that training never showed (preprocess.HELDOUT_PAIRS)
HELDOUT_PAIR_PROMPTS = {("openmoji", "Food & Drink"): ("an OpenMoji pizza", "an OpenMoji red apple"),
                        ("emojione", "Animals & Nature"): ("an EmojiOne dog", "an EmojiOne tiger")}


def slug(prompt: str) -> str:
    """A file-name-safe form of a prompt: 'red apple!' -> 'red_apple'."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_") or "prompt"


def rows_figure(pipe, prompts, path: Path, n: int, sampler: str, steps: int, guidance: Guidance, seed: int) -> Path:
    """One grid: a row of `n` seeds per prompt, top to bottom; the prompts are in the PNG's metadata."""
    images = to_uint8(pipe.generate([p for p in prompts for _ in range(n)], sampler, steps, guidance,
                                    [seed + k for _ in prompts for k in range(n)]))
    save_png(grid_image(images, nrow=n, scale=4), path, {"rows": " | ".join(prompts), "seeds": f"{seed} to {seed + n - 1}",
                                                          "sampler": sampler, "steps": steps,
                                                          "guidance": describe_guidance(guidance)})
    return path


def style_figures(pipe, out: Path, n, sampler, steps, guidance, seed) -> list[Path]:
    """styles_<prompt>.png for each of STYLE_PROMPTS and heldout_pairs.png, for a model of several styles."""
    styles = dataset_styles(pipe.info.get("dataset", ""))
    written = [rows_figure(pipe, [with_style(p, s) for s in styles], out / f"styles_{slug(p)}.png", n, sampler, steps,
                           guidance, seed) for p in STYLE_PROMPTS] if styles else []
    pairs = [p for pair, ps in HELDOUT_PAIR_PROMPTS.items() if pair in HELDOUT_PAIRS and pair[0] in styles for p in ps]
    if pairs:
        written.append(rows_figure(pipe, pairs, out / "heldout_pairs.png", n, sampler, steps, guidance, seed))
    return written


def showcase(pipe, data, out_dir, prompts=SHOWCASE_PROMPTS, n: int = 8, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
             guidance: Guidance | float = DEFAULT_GUIDANCE, seed: int = 0) -> list[Path]:
    """forward_diffusion.png, loss.png (from the model's saved history), per prompt a row of `n` seeds
    final_<prompt>.png and its denoising animation <prompt>_generation.gif, and the style figures
    (`style_figures`). Returns the files written."""
    guidance = guidance if isinstance(guidance, Guidance) else Guidance(guidance)
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
        meta = {"prompt": prompt, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance.scale,
                "model": Path(pipe.info.get("path", "?")).name}
        save_png(grid_image(images, nrow=n, scale=4), out / f"final_{slug(prompt)}.png", meta)
        recorder.finish(images)
        recorder.save(out / f"{slug(prompt)}_generation.gif")
        written += [out / f"final_{slug(prompt)}.png", out / f"{slug(prompt)}_generation.gif"]
    return written + style_figures(pipe, out, n, sampler, steps, guidance, seed)


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
    add_guidance_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--device", default="auto", help='"auto" (CUDA, MPS, CPU) or a torch device')
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.checkpoint, args.device)
    for path in showcase(pipe, pipe.training_data(args.data), args.out_dir, args.prompts, args.n, args.sampler, args.steps,
                         guidance_from_arguments(args), args.seed):
        print("wrote", path)


if __name__ == "__main__":
    try:
        main()
    except ModelFileError as error:  # a bad model file: one line naming it and the fault, not a traceback
        raise SystemExit(f"error: cannot load a model: {error}") from None
