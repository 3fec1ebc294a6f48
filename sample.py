"""python sample.py: generate images from a prompt with a trained model; PNGs carry their settings as metadata.

    python sample.py --prompt "a red apple" --n 8 --gif
    python sample.py --prompt "a green apple" --init-image apple.png --strength 0.6
    python sample.py --prompt "a rocket" --init-image photo.png --mask mask.png
"""
import argparse
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from checkpoints import ModelFileError
from guidance import Guidance, add_guidance_arguments, describe_guidance, guidance_from_arguments
from pipeline import Pipeline
from plot_func import DenoisingRecorder, grid_image, save_png, to_pil, to_uint8
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, IMG2IMG_STRENGTH, RESAMPLE, SAMPLERS, sampler_steps
from sources.images import load_image


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Generate images with a trained model; PNGs carry their settings as metadata.")
    p.add_argument("--checkpoint", default=None, help="checkpoint (.pt / .safetensors) or training run folder "
                   "(its best, else latest checkpoint); default: the shipped model")
    p.add_argument("--prompt", default=None, help="text prompt; --n images of it")
    p.add_argument("--prompts-file", default=None, help="file with one prompt per line: one image per line, in order")
    p.add_argument("--n", type=int, default=8, help="number of images of --prompt")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (DDPM always uses all T)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER,
                   help="dpmpp_sde: SDE-DPM-Solver++(2M); dpmpp: DPM-Solver++(2M)")
    add_guidance_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="same seed, same images; image k alone is --seed SEED+k --n 1")
    p.add_argument("--negative-prompt", default="", help="what guidance steers away from (default: nothing)")
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture, centre-cropped and "
                   "resized to the model's size")
    p.add_argument("--strength", type=float, default=None, help="how much of --init-image is redrawn: 0 keeps it, "
                   f"1 ignores it (default {IMG2IMG_STRENGTH}, or 1 with --mask)")
    p.add_argument("--mask", default=None, help="inpainting: a picture the size of --init-image, white where to "
                   "draw and black where to keep it")
    p.add_argument("--resample", type=int, default=RESAMPLE, help="with --mask: RePaint resampling cycles per step "
                   "(1: plain replacement, faster but the two regions may not match)")
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


def image_size(path: str, flag: str) -> tuple[int, int]:
    """The pixel size of an image file (its header only), or a one-line error naming the flag and the fault."""
    try:
        with Image.open(path) as img:
            return img.size
    except UnidentifiedImageError:
        reason = "not an image Pillow can read"
    except (OSError, Image.DecompressionBombError) as e:
        reason = getattr(e, "strerror", None) or str(e)
    raise SystemExit(f"error: cannot read {flag} {path}: {reason}")


def read_image(path: str, flag: str, size: int, grayscale: bool):
    """uint8 (C, size, size), centre-cropped and resized as training images are, or a one-line error."""
    try:
        return load_image(Path(path), size, grayscale)
    except Exception as e:  # Pillow reports broken files as OSError, SyntaxError, EOFError, DecompressionBombError...
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: cannot read {flag} {path}: {reason}") from None


def check_edit(args) -> None:
    """The image-to-image and inpainting flags, checked before the model loads."""
    if args.init_image is None:
        if args.mask is not None or args.strength is not None:
            raise SystemExit("error: --strength and --mask need --init-image")
        return
    if args.strength is None:
        args.strength = 1.0 if args.mask else IMG2IMG_STRENGTH
    if not 0 <= args.strength <= 1:
        raise SystemExit(f"error: --strength must be between 0 and 1, got {args.strength}")
    if args.resample < 1:
        raise SystemExit(f"error: --resample must be 1 or more, got {args.resample}")
    size = image_size(args.init_image, "--init-image")
    mask_size = size if args.mask is None else image_size(args.mask, "--mask")
    if mask_size != size:
        raise SystemExit(f"error: --mask is {mask_size[0]}x{mask_size[1]} pixels but --init-image is "
                         f"{size[0]}x{size[1]}; the mask must cover the picture pixel for pixel")


def edit_options(args, cfg, n: int) -> dict:
    """init, strength, mask and resample for Pipeline.generate: the picture in [-1, 1] at the model's size for each
    image, the mask 1 (white, redraw) or 0 (black, keep)."""
    if args.init_image is None:
        return {}
    grayscale = cfg.in_channels == 1
    init = read_image(args.init_image, "--init-image", cfg.image_size, grayscale).float() / 127.5 - 1
    options = {"init": init.expand(n, -1, -1, -1), "strength": args.strength}
    if args.mask is not None:
        mask = read_image(args.mask, "--mask", cfg.image_size, grayscale=True)
        options.update(mask=(mask >= 128).float()[None], resample=args.resample)
    return options


def guidance_metadata(g: Guidance) -> dict:
    """The guidance interval and CADS, where set, in words (the scale has its own key)."""
    return {} if g.interval == (0.0, 1.0) and g.anneal is None else {"guidance_details": describe_guidance(g)}


def edit_metadata(args) -> dict:
    meta = {"negative_prompt": args.negative_prompt} if args.negative_prompt.strip() else {}
    if args.init_image is not None:
        meta.update(init_image=args.init_image, strength=args.strength)
    if args.mask is not None:
        meta.update(mask=args.mask, resample=args.resample)
    return meta


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    prompts = read_prompts(args)
    guidance = guidance_from_arguments(args)
    check_edit(args)
    pipe = Pipeline.load(args.checkpoint, args.device)
    options = edit_options(args, pipe.model.cfg, len(prompts))
    t0 = pipe.diffusion.strength_timestep(args.strength) if options else None
    # model evaluations: from t0 at most t0 + 1; none at strength 0, which returns the picture as it is
    args.steps = 0 if options and t0 is None else sampler_steps(pipe.diffusion, args.sampler, args.steps, t0)
    recorder = DenoisingRecorder(args.steps) if args.gif else None
    images = to_uint8(pipe.generate(prompts, args.sampler, args.steps, guidance, args.seed, recorder,
                                    negative_prompts=args.negative_prompt, **options))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        meta = {"prompt": prompt, "seed": args.seed, "index": i, "image_seed": args.seed + i, "sampler": args.sampler,
                "steps": args.steps, "guidance": args.guidance, **guidance_metadata(guidance), "checkpoint": pipe.info["path"], **edit_metadata(args)}
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
