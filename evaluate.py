"""python evaluate.py: prompt adherence (retrieval), Frechet distance, and concept, variety and style scores of a model.

    python evaluate.py --num-prompts 200 --settings dpmpp:20 ddpm:1000 --out docs/evaluation.md
"""
import argparse
import os
import shlex
import sys
from pathlib import Path

from checkpoints import ModelFileError
from evaluation import evaluate, markdown_table
from guidance import add_guidance_arguments, describe_guidance, guidance_from_arguments
from image_features import InceptionFeatures
from pipeline import Pipeline
from preprocess import CaptionedImages, load_dataset
from samplers import SAMPLERS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Generate images for the captions of a random subset and score them: "
                                "top-1/top-5 retrieval of the prompted training image and Frechet distance to the "
                                "training images (first image of each caption); concept adherence (any picture of the "
                                "prompted concept counts), variety (Vendi), coverage and style (all --images-per-prompt).")
    p.add_argument("--checkpoint", default=None, help="checkpoint, ema.safetensors or run folder; default: the shipped model")
    p.add_argument("--data", default=None, help="captioned data set (as for train); default: the one the model was trained on")
    p.add_argument("--num-prompts", type=int, default=200, help="captions evaluated (a fixed random subset)")
    p.add_argument("--images-per-prompt", type=int, default=8, help="images drawn per prompt (k) for the concept "
                   "scores; the image scores and FD use the first of each")
    p.add_argument("--settings", nargs="+", default=["dpmpp:10", "dpmpp:25", "ddim:25"],
                   help="sampler:steps pairs to compare, e.g. dpmpp:20 ddim:50 ddpm:1000")
    add_guidance_arguments(p)
    p.add_argument("--start", choices=["T", "floor"], default="T", help="few-step samplers start at t = T-1, or at "
                   "the timestep of the log-SNR floor (see GaussianDiffusion.timesteps)")
    p.add_argument("--clip", choices=["static", "dynamic"], default="static",
                   help="x0 clipped to [-1, 1], or Imagen's dynamic thresholding")
    p.add_argument("--seed", type=int, default=0, help="fixes the subset and the sampling noise")
    p.add_argument("--batch", type=int, default=100, help="images generated at once")
    p.add_argument("--inception-weights", default=None, help="torchvision Inception-v3 weights file "
                   "(inception_v3_google-0cc3c7bd.pth) for FID proper; default: offline random-conv features")
    p.add_argument("--out", default=None, help="also write the table, with the command, to this markdown file")
    p.add_argument("--device", default="auto", help='"auto" (CUDA, MPS, CPU) or a torch device')
    return p


def parse_settings(specs: list[str]) -> list[tuple[str, int]]:
    """["dpmpp:25", "ddpm:1000"] -> [("dpmpp", 25), ("ddpm", 1000)], with a clear error for anything else."""
    settings = []
    for spec in specs:
        sampler, _, steps = spec.partition(":")
        if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"error: setting {spec!r} is not sampler:steps with a sampler among "
                             f"{', '.join(sorted(SAMPLERS))} and steps a whole number >= 1 (e.g. dpmpp:25)")
        settings.append((sampler, int(steps)))
    return settings


def heldout_pairs(pipe: Pipeline, spec) -> CaptionedImages | None:
    """The images of the (style, group) pairs the model's data holds out of training, or None where it holds none out
    (a single source, a folder, Tiny ImageNet)."""
    cfg = pipe.model.cfg
    try:
        pairs = load_dataset(spec or pipe.info.get("dataset", "emoji"), cfg.image_size, cfg.in_channels == 1,
                             split="heldout_pairs")
    except ValueError:  # a data set without that split: a folder or Tiny ImageNet
        return None
    return pairs if len(pairs) else None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    settings = parse_settings(args.settings)
    guidance = guidance_from_arguments(args)
    pipe = Pipeline.load(args.checkpoint, args.device)
    data = pipe.training_data(args.data)
    if args.num_prompts < 1 or 2 * args.num_prompts > len(data):
        raise SystemExit(f"error: --num-prompts must be from 1 to {len(data) // 2} (half the {len(data)} images, "
                         "so that as many other real images form the reference row)")
    if args.images_per_prompt < 1:
        raise SystemExit("error: --images-per-prompt must be at least 1")
    extractor = InceptionFeatures(args.inception_weights) if args.inception_weights else None
    fd_name = "FID (Inception-v3)" if extractor else "FD (random conv)"
    options = {"clip_x0": True if args.clip == "static" else "dynamic"}
    if args.start == "floor":
        if any(sampler == "ddpm" for sampler, _ in settings):
            raise SystemExit("error: --start floor is for the few-step samplers; DDPM always runs all T steps")
        options["start"] = "floor"
    pairs = heldout_pairs(pipe, args.data)
    rows = evaluate(pipe, data, settings, args.num_prompts, guidance, args.seed, args.batch, extractor, options,
                    args.images_per_prompt, pairs)
    table = markdown_table(rows, fd_name)
    print(table)
    if args.out:
        command = "python evaluate.py " + " ".join(shlex.quote(a) for a in argv)
        model = os.path.relpath(pipe.info["path"])
        prompts = (f"{args.num_prompts} prompts of {data.name} ({args.images_per_prompt} images each; "
                   f"{len(pairs) if pairs else 'no'} images of held-out (style, group) pairs)")
        Path(args.out).write_text(f"`{command}`\n\nModel: {model} ({pipe.info['parameters'] / 1e6:.2f}M parameters), "
                                  f"{prompts}, {describe_guidance(guidance)}, start {args.start}, clip {args.clip}, "
                                  f"seed {args.seed}.\n\n{table}\n")


if __name__ == "__main__":
    try:
        main()
    except ModelFileError as error:  # a bad model file: one line naming it and the fault, not a traceback
        raise SystemExit(f"error: cannot load a model: {error}") from None
