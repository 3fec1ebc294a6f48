"""Training data: one captioned set composed of the sources a spec names, and the captions' embeddings.

Sources (one module each under sources/): emoji in three styles (Noto Color Emoji and OpenMoji rendered from
their fonts, EmojiOne from its PNGs), Open Clip Art drawings, Tiny ImageNet as unzipped, or any folder with
one sub-folder per class. A spec joins source names with "+": `emoji+openmoji+emojione+clipart`. Everything
is decoded once into a cache beside the data, and caption embeddings are computed once with the frozen text
encoder and cached too, so training steps never run it.

    python preprocess.py mix --size 32      # decode the default mix (and its caption embeddings) ahead of time
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from safetensors import safe_open
from tqdm import tqdm

from models import text_encoder
from sources.captions import STYLE_NAMES
from sources.clipart import clipart_dataset
from sources.emoji_font import emoji_dataset, font_emoji
from sources.emoji_png import png_emoji
from sources.image_folder import DATA_LAYOUT, image_folder
from sources.images import CaptionedImages, save_atomically
from sources.tiny_imagenet import tiny_imagenet

# name -> (image size, cache_dir) -> the source's set. "emoji" is Noto with plain captions, the set the shipped
# model learned; in a mix each style's captions also name it ("an OpenMoji red apple").
SOURCES = {"emoji": lambda size, cache: emoji_dataset(size, cache),
           "noto": lambda size, cache: font_emoji("noto", size, cache, name_style=True),
           "openmoji": lambda size, cache: font_emoji("openmoji", size, cache, name_style=True),
           "emojione": lambda size, cache: png_emoji(size, cache),
           "clipart": lambda size, cache: clipart_dataset(size, cache)}
MIX = "noto+openmoji+emojione+clipart"  # "mix": many pictures of every concept, in four styles
# (style, group) pairs never trained on, so that evaluate can ask for them: a model that learned style and
# concept apart draws "an OpenMoji pizza" without having seen one. Each concept is still seen in other styles.
HELDOUT_PAIRS = {("openmoji", "Food & Drink"), ("emojione", "Animals & Nature")}
DATA_LAYOUTS = f"""Accepted data:
  emoji                        Noto Color Emoji, plain captions (the shipped model's set; no download)
  noto, openmoji, emojione,    one source; joined with '+' into one set, e.g. emoji+clipart or
  clipart, mix                   noto+openmoji+emojione+clipart (= mix); captions may name the style
  path/to/tiny-imagenet-200    Tiny ImageNet as unzipped (or a folder holding tiny-imagenet-200/):
                                 wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
                                 val/images/*.JPEG with val/val_annotations.txt
{DATA_LAYOUT}"""


def source_names(spec) -> list[str] | None:
    """The registered sources a spec names ("mix" expanded), or None for a path."""
    names = [part for n in str(spec).split("+") for part in (MIX.split("+") if n.strip() == "mix" else [n.strip()])]
    if all(n in SOURCES for n in names):
        return list(dict.fromkeys(names))
    unknown = [n for n in names if n not in SOURCES]
    if len(names) > 1 or not Path(str(spec)).exists():
        raise FileNotFoundError(f"data {str(spec)!r}: {', '.join(map(repr, unknown))} is neither a source "
                                f"({', '.join(SOURCES)}, mix) nor an existing folder.\n{DATA_LAYOUTS}")
    return None


def dataset_styles(spec) -> list[str]:
    """The styles (STYLE_NAMES keys) whose names a model trained on `spec` learned, or [] for one without them
    ("emoji", a folder, Tiny ImageNet): what a style choice can offer."""
    try:
        names = source_names(spec) or []
    except FileNotFoundError:  # a folder the model was trained on, absent here
        return []
    return [n for n in names if n in STYLE_NAMES] if len(names) > 1 else []


def compose(names: list[str], size: int, cache_dir) -> tuple[CaptionedImages, CaptionedImages]:
    """The named sources as one set, split into (training images, images of the held-out (style, group) pairs).
    Held-out rewordings that some image trains on are dropped, so none is ever a training caption."""
    whole = CaptionedImages.concat([SOURCES[n](size, cache_dir) for n in names], "+".join(names))
    held = [(s, g) in HELDOUT_PAIRS for s, g in zip(whole.styles, whole.groups)]
    train, pairs = (whole.subset([i for i, h in enumerate(held) if h == want]) for want in (False, True))
    training = set(train.all_captions())
    for data in (train, pairs):
        data.heldout = [[c for c in cs if c not in training] for cs in data.heldout]
    return train, pairs


def load_dataset(spec, image_size: int | None = None, grayscale: bool = False, split: str = "train",
                 cache_dir="data") -> CaptionedImages:
    """The data that spec names (DATA_LAYOUTS). `split`: "train"; "val" for Tiny ImageNet; "heldout_pairs" for
    the images of HELDOUT_PAIRS in a mix of sources (never in "train")."""
    names = source_names(spec)
    if names is not None:
        if split not in ("train", "heldout_pairs"):
            raise ValueError(f"the data {str(spec)!r} has a 'train' and a 'heldout_pairs' split, not {split!r}")
        train, pairs = compose(names, image_size or 32, cache_dir)
        data = train if split == "train" else pairs
        data.name = str(spec)
        if grayscale:
            data.images = TF.rgb_to_grayscale(data.images)
        return data
    root = Path(spec)
    if (root / "wnids.txt").exists() or (root / "tiny-imagenet-200" / "wnids.txt").exists():
        return tiny_imagenet(root, split, image_size or 64, grayscale)
    if split != "train":
        raise ValueError(f"a folder of class sub-folders has only a 'train' split, not {split!r}")
    return image_folder(root, image_size or 32, grayscale, DATA_LAYOUTS)


# --- caption embeddings --------------------------------------------------------------------------

def read_embeddings(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with safe_open(path, "pt") as f:
        captions = json.loads(f.metadata()["captions"])
        tokens, offsets, pooled = (f.get_tensor(k) for k in ("tokens", "offsets", "pooled"))
    offsets = offsets.tolist()
    return {c: (tokens[offsets[i]:offsets[i + 1]], pooled[i]) for i, c in enumerate(captions)}


def write_embeddings(embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """One flat (sum L_i, 384) token tensor with offsets: captions have different token counts."""
    lengths = torch.tensor([0] + [t.shape[0] for t, _ in embeddings.values()])
    tensors = {"tokens": torch.cat([t for t, _ in embeddings.values()]).float().contiguous(),
               "offsets": lengths.cumsum(0),
               "pooled": torch.stack([p for _, p in embeddings.values()]).float().contiguous()}
    save_atomically(tensors, path, {"captions": json.dumps(list(embeddings), ensure_ascii=False)})


def embed_captions(captions: list[str], cache_path, encoder=None,
                   chunk_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """caption -> (token embeddings (L, 384), pooled (384,)), cached in a safetensors file.

    The text encoder is loaded only if some caption is not cached yet; new captions are added to the file."""
    cache_path = Path(cache_path)
    cached = read_embeddings(cache_path) if cache_path.exists() else {}
    new = [c for c in dict.fromkeys(captions) if c not in cached]
    if new:
        if encoder is None:
            encoder = text_encoder.TextEncoder()
        for start in tqdm(range(0, len(new), chunk_size), desc="embedding captions", unit="chunk", disable=None):
            chunk = new[start:start + chunk_size]
            cached.update(zip(chunk, encoder.encode_batch(chunk)))
        write_embeddings(cached, cache_path)
    return {c: cached[c] for c in captions}


# --- command line --------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Decode training data and embed its captions ahead of time "
                                     "(training also does it on first use).", epilog=DATA_LAYOUTS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a source, sources joined with '+', or a folder (see below)")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--cache-dir", default="data", help="folder for the decoded sets and embeddings")
    args = parser.parse_args(argv)
    start = time.time()
    data = load_dataset(args.data, args.size, cache_dir=args.cache_dir)
    captions = data.all_captions()
    embed_captions(captions, Path(args.cache_dir) / f"captions_{data.name}.safetensors")  # as train.py names it
    styles = {s: data.styles.count(s) for s in dict.fromkeys(data.styles)}
    print(f"{len(data)} images of {len(set(data.concepts))} concepts at {args.size}x{args.size} px "
          f"({', '.join(f'{s} {n}' for s, n in styles.items())}; {data.skipped} unreadable files skipped), "
          f"{len(captions)} captions, in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
