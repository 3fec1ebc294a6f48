"""python sample.py: generate images from a prompt with a trained model; PNGs carry their settings as metadata.

    python sample.py --prompt "a red apple" --n 8 --gif
"""
import argparse
from pathlib import Path

from checkpoints import ModelFileError
from diffusion import SAMPLERS, sampler_steps
from pipeline import Pipeline
from plot_func import DenoisingRecorder, grid_image, save_png, to_pil, to_uint8


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Generate images with a trained model; PNGs carry their settings as metadata.")
    p.add_argument("--checkpoint", default=None, help="checkpoint (.pt / .safetensors) or training run folder "
                   "(its best, else latest checkpoint); default: the shipped model")
    p.add_argument("--prompt", default=None, help="text prompt; --n images of it")
    p.add_argument("--prompts-file", default=None, help="file with one prompt per line: one image per line, in order")
    p.add_argument("--n", type=int, default=8, help="number of images of --prompt")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (DDPM always uses all T)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpmpp", help="dpmpp: DPM-Solver++(2M)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--out-dir", default="output_ImageNet/samples", help="where the PNGs go")
    p.add_argument("--gif", action="store_true", help="also write process.gif of the denoising")
    p.add_argument("--device", default="auto", help='"auto" (CUDA, MPS, CPU) or a torch device')
    return p


def read_prompts(args) -> list[str]:
    if (args.prompt is None) == (args.prompts_file is None):
        raise SystemExit("error: give exactly one of --prompt or --prompts-file")
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    else:
        prompts = [args.prompt] * args.n
    if not prompts or args.n < 1:
        raise SystemExit("error: nothing to generate (no prompts, or --n below 1)")
    return prompts


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    prompts = read_prompts(args)
    pipe = Pipeline.load(args.checkpoint, args.device)
    args.steps = sampler_steps(pipe.diffusion, args.sampler, args.steps)
    recorder = DenoisingRecorder(args.steps) if args.gif else None
    images = to_uint8(pipe.generate(prompts, args.sampler, args.steps, args.guidance, args.seed, recorder))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        meta = {"prompt": prompt, "seed": args.seed, "index": i, "sampler": args.sampler, "steps": args.steps,
                "guidance": args.guidance, "checkpoint": pipe.info["path"]}
        save_png(to_pil(img), out / f"{i:04d}.png", meta)
    grid = grid_image(images, scale=2)
    save_png(grid, out / "grid.png", {"prompts": " | ".join(dict.fromkeys(prompts)), "seed": args.seed})
    if args.gif:
        recorder.finish(images)
        recorder.save(out / "process.gif")
    print(f"wrote {len(prompts)} images to {out}")


if __name__ == "__main__":
    try:
        main()
    except ModelFileError as error:  # a bad model file: one line naming it and the fault, not a traceback
        raise SystemExit(f"error: cannot load a model: {error}") from None
