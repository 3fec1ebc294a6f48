"""Training data: images decoded once into memory, each with its candidate captions, and the captions' embeddings.

Three sources, picked by `load_dataset`: the built-in emoji set (rendered from Noto Color Emoji, no
download), Tiny ImageNet as unzipped, or any folder with one sub-folder per class. Caption embeddings
are computed once with the frozen text encoder and cached next to the data, so training steps never run it.

    python preprocess.py emoji --size 32     # render the emoji set into data/emoji_32.safetensors
"""
import argparse
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from xml.etree import ElementTree

import emoji
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models import text_encoder

NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
MAX_DECODE_PIXELS = 40_000_000  # ~120 MB decoded; a bigger image (or a forged header) is skipped, not risked
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}  # Fitzpatrick modifiers: variants, not new subjects
CLDR_ANNOTATIONS = ("/usr/share/unicode/cldr/common/annotations/en.xml",  # Debian: unicode-cldr-core
                    "/usr/share/unicode/cldr/common/annotationsDerived/en.xml")
# Captions people write, built from a name n (with article: a) and, for emoji, a CLDR keyword k. Each epoch
# draws one per image, so the model learns a neighbourhood of the text encoder's space, not one point.
EMOJI_TEMPLATES = ("{n}", "{a}", "an emoji of {a}", "{n} icon", "{a}, {k}")
PHOTO_TEMPLATES = ("{n}", "{a}", "a photo of {a}", "a close-up photo of {a}")
# Never training captions: `evaluate` scores these rewordings to measure generalisation.
HELDOUT_TEMPLATES = ("a drawing of {a}", "{n} symbol", "a {k} {n}")
DATA_LAYOUTS = """Accepted data:
  emoji                        the built-in emoji set, rendered on first use (no download)
  path/to/tiny-imagenet-200    Tiny ImageNet as unzipped (or a folder holding tiny-imagenet-200/):
                                 wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
                                 val/images/*.JPEG with val/val_annotations.txt
  path/to/folder               one sub-folder per class, images directly inside:
                                 folder/<class_name>/<image>.png|jpg|jpeg|bmp|gif|webp
                               caption: the class name ('_' and '-' become spaces), unless the image has
                               its own: <image stem>.txt beside it (one caption per line), or lines
                               {"file": "<class_name>/<image>", "caption": "..."} in folder/captions.jsonl"""


class CaptionedImages(torch.utils.data.Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W), each with one or more captions."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]], name: str, skipped: int = 0,
                 heldout: list[list[str]] | None = None):
        assert images.dtype == torch.uint8 and len(images) == len(captions), "one uint8 image per caption list"
        assert all(captions), "every image needs at least one caption"
        self.images, self.captions, self.name, self.skipped = images, captions, name, skipped
        # reworded prompts of each image that are never training captions (may be empty)
        self.heldout = heldout if heldout is not None else [[] for _ in captions]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> tuple[torch.Tensor, str]:
        image = self.images[i].float() / 127.5 - 1
        options = self.captions[i]
        # the global torch RNG, so that torch.manual_seed (and the trainer's saved RNG state) fixes the choice
        return image, options[torch.randint(len(options), ()).item()]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def all_captions(self) -> list[str]:
        return sorted(set(chain.from_iterable(self.captions)))


# --- decoding image files ------------------------------------------------------------------------

def on_white(img: Image.Image) -> Image.Image:
    """Composite transparent images over white: dropping alpha would show whatever colour hides under it."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img


def load_image(path: Path, size: int, grayscale: bool) -> torch.Tensor:
    """One file -> uint8 (C, size, size): centre-cropped to a square and resized (antialiased) if needed."""
    mode = "L" if grayscale else "RGB"
    with Image.open(path) as img:  # reads the header only
        img.draft(mode, (size, size))  # JPEGs decode at a reduced scale still >= size: far faster for big photos
        if img.width * img.height > MAX_DECODE_PIXELS:
            raise ValueError(f"{img.width}x{img.height} pixels is more than the {MAX_DECODE_PIXELS:,} decoded at most")
        return fit_image(img, size, grayscale)


def fit_image(img: Image.Image, size: int, grayscale: bool) -> torch.Tensor:
    """A decoded picture -> uint8 (C, size, size): over white, centre-cropped to a square and resized (antialiased)."""
    img = on_white(img).convert("L" if grayscale else "RGB")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    return TF.pil_to_tensor(img)


def decode_images(paths: list[Path], size: int, grayscale: bool, desc: str) -> tuple[torch.Tensor, list[int], int]:
    """Decode all files into one uint8 tensor. Returns (images, indices of the files kept, number skipped)."""
    def decode(path):
        try:
            return load_image(path, size, grayscale)
        except Exception as e:  # Pillow reports broken files as OSError, SyntaxError, EOFError, DecompressionBombError...
            return e

    images = torch.empty(len(paths), 1 if grayscale else 3, size, size, dtype=torch.uint8)
    kept, failures = [], []
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding and resizing
        results = tqdm(pool.map(decode, paths), total=len(paths), desc=desc, unit="img", disable=None)
        for i, (path, result) in enumerate(zip(paths, results)):
            if isinstance(result, Exception):
                failures.append(f"{path}: {result}")
            else:
                images[len(kept)] = result
                kept.append(i)
    if not kept:
        raise ValueError(f"none of the {len(paths)} image files could be read, e.g. {failures[0]}")
    if failures:
        warnings.warn(f"skipped {len(failures)} of {len(paths)} files that could not be read as images, "
                      f"e.g. {failures[0]}", stacklevel=3)
    return images[:len(kept)], kept, len(failures)


def image_files(folder: Path) -> list[Path]:
    """Regular files with an image extension, and dangling links (so they are counted as unreadable). Not
    pipes or devices, which could block a read forever. Hidden files are clutter such as macOS's '._photo.jpg'."""
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


# --- Tiny ImageNet -------------------------------------------------------------------------------

def with_article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def templated(names, templates, keywords=()) -> list[str]:
    """Every name through every template; templates with {k} once per keyword not already in the name."""
    out = []
    for n in names:
        for t in templates:
            ks = [k for k in keywords if k not in n] if "{k}" in t else [None]
            out += [t.format(n=n, a=with_article(n), k=k) for k in ks]
    return list(dict.fromkeys(out))


def heldout_captions(names, training: set[str], keywords=()) -> list[str]:
    """The held-out rewordings of the first name: never among `training` (any image's training captions)."""
    return [c for c in templated(names[:1], HELDOUT_TEMPLATES, keywords) if c not in training]


def imagenet_captions(synonyms: str) -> list[str]:
    """'goldfish, Carassius auratus' -> every synonym through every template."""
    return templated(list(dict.fromkeys(s.strip() for s in synonyms.split(", ") if s.strip())), PHOTO_TEMPLATES)


def tiny_imagenet(root, split: str = "train", image_size: int = 64, grayscale: bool = False) -> CaptionedImages:
    """Tiny ImageNet's train (100,000 images, 200 classes) or val (10,000) split."""
    root = Path(root)
    if not (root / "wnids.txt").exists() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids = (root / "wnids.txt").read_text().split()
    words = dict(line.split("\t", 1) for line in (root / "words.txt").read_text().splitlines() if "\t" in line)
    missing = [w for w in wnids if w not in words]
    if missing:
        raise ValueError(f"{root / 'words.txt'} has no names for {len(missing)} classes of wnids.txt, e.g. {missing[0]}")
    captions = {w: imagenet_captions(words[w]) for w in wnids}  # shared per class: 100,000 images, 200 lists
    if split == "train":
        files = [(p, w) for w in wnids for p in image_files(root / "train" / w / "images")]
    elif split == "val":
        rows = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines() if line]
        files = [(root / "val" / "images" / name, w) for name, w, *_ in rows]
    else:
        raise ValueError(f"Tiny ImageNet split must be 'train' or 'val', not {split!r} (its test images have no labels)")
    training = {c for cs in captions.values() for c in cs}
    heldout = {w: heldout_captions([s.strip() for s in words[w].split(", ")], training) for w in wnids}
    images, kept, skipped = decode_images([p for p, _ in files], image_size, grayscale, f"tiny-imagenet {split}")
    return CaptionedImages(images, [captions[files[i][1]] for i in kept], "tiny-imagenet", skipped,
                           [heldout[files[i][1]] for i in kept])


# --- a folder of class sub-folders ---------------------------------------------------------------

def jsonl_captions(path: Path) -> dict[str, list[str]]:
    """captions.jsonl: lines {"file": "<class>/<name>", "caption": "..."} or {..., "captions": [...]}."""
    found: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); expected one JSON object per line") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            texts = entry["captions"] if "captions" in entry else [entry["caption"]]
            found.setdefault(entry["file"], []).extend(texts)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"file\": \"<class>/<name>\", \"caption\": \"...\"}} "
                             f"or {{\"file\": ..., \"captions\": [...]}}, got {line!r} ({e!r})") from None
    return found


def sidecar_captions(path: Path) -> list[str]:
    """Lines of an image's caption file; one that is unreadable or not UTF-8 text is ignored with a warning."""
    if not path.is_file():
        return []
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"ignored caption file {path}: not readable as UTF-8 text ({e})", stacklevel=3)
        return []


def image_folder(root, image_size: int = 32, grayscale: bool = False) -> CaptionedImages:
    """root/<class_name>/<image>: captioned by class name, or by the image's own captions where it has any."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder.\n{DATA_LAYOUTS}")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))  # not .ipynb_checkpoints
    files = [p for d in classes for p in image_files(d)]
    if not files:
        raise ValueError(f"{root} has no images in class sub-folders ({len(classes)} sub-folders found).\n{DATA_LAYOUTS}")
    jsonl = root / "captions.jsonl"
    own = jsonl_captions(jsonl) if jsonl.exists() else {}
    unmatched = own.keys() - {p.relative_to(root).as_posix() for p in files}
    if unmatched:
        warnings.warn(f"{len(unmatched)} entries of {jsonl} name no image, e.g. {sorted(unmatched)[0]!r}", stacklevel=2)

    def captions_of(path: Path) -> list[str]:
        texts = own.get(path.relative_to(root).as_posix(), []) + sidecar_captions(path.with_suffix(".txt"))
        texts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        return texts or templated([class_name(path)], PHOTO_TEMPLATES)

    images, kept, skipped = decode_images(files, image_size, grayscale, root.name)
    captions = [captions_of(files[i]) for i in kept]
    training = {c for cs in captions for c in cs}
    heldout = [heldout_captions([class_name(files[i])], training) for i in kept]
    return CaptionedImages(images, captions, root.resolve().name, skipped, heldout)


def class_name(path: Path) -> str:
    return path.parent.name.replace("_", " ").replace("-", " ")


# --- the emoji set -------------------------------------------------------------------------------

def cldr_annotations(paths=CLDR_ANNOTATIONS) -> dict[str, tuple[list[str], list[str]]]:
    """Emoji (without variation selectors) -> (text-to-speech names, keywords) from CLDR's English annotations.

    Empty, with a warning, when the files are missing: captions then come from the `emoji` package alone."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        warnings.warn(f"CLDR annotations not found at {missing[0]} (apt-get install unicode-cldr-core): emoji "
                      "captions are their names and aliases only", stacklevel=2)
    for path in paths:
        if Path(path).is_file():
            for node in ElementTree.parse(path).getroot().iter("annotation"):
                names, keywords = found.setdefault(node.get("cp").replace("\ufe0f", ""), ([], []))
                words = [w.strip() for w in (node.text or "").split("|") if w.strip()]
                (names if node.get("type") == "tts" else keywords).extend(words)
    return found


def emoji_names(e: str, cldr: dict) -> list[str]:
    """CLDR name, aliases and text-to-speech name: ':red_apple:', [':apple:'] -> ['red apple', 'apple']."""
    data = emoji.EMOJI_DATA[e]
    names = [name.strip(":").replace("_", " ") for name in [data["en"], *data.get("alias", [])]]
    return list(dict.fromkeys(names + cldr.get(e.replace("\ufe0f", ""), ([], []))[0]))


def emoji_captions(chars: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Training captions (the CLDR name first) and held-out rewordings of each emoji."""
    cldr = cldr_annotations()
    names = [emoji_names(e, cldr) for e in chars]
    keywords = [cldr.get(e.replace("\ufe0f", ""), ([], []))[1] for e in chars]
    captions = [templated(n, EMOJI_TEMPLATES[:-1]) + templated(n[:1], EMOJI_TEMPLATES[-1:], k)
                for n, k in zip(names, keywords)]
    training = {c for cs in captions for c in cs}
    return captions, [heldout_captions(n, training, k) for n, k in zip(names, keywords)]


def render_emoji(e: str, font: ImageFont.FreeTypeFont, size: int, glyph_width: float) -> Image.Image | None:
    """The glyph scaled to fit 90% of a white size x size square, or None if the font cannot draw it as one glyph."""
    if font.getlength(e) > glyph_width:
        return None  # a sequence newer than the font: it would draw its parts side by side
    canvas = Image.new("RGBA", font.getbbox(e)[2:], (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), e, font=font, embedded_color=True)
    bbox = canvas.getbbox()  # of the non-transparent pixels; None: the font has no glyph (drew nothing)
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    scale = 0.9 * size / max(glyph.size)
    glyph = glyph.resize([max(1, round(s * scale)) for s in glyph.size], Image.Resampling.LANCZOS)
    out = Image.new("RGBA", (size, size), "white")
    out.alpha_composite(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return out.convert("RGB")


def build_emoji(size: int = 32, cache_dir="data", font_path=NOTO_EMOJI_FONT) -> Path:
    """Render every fully-qualified emoji (skin-tone variants left out) and write cache_dir/emoji_{size}.safetensors."""
    if not Path(font_path).exists():
        raise FileNotFoundError(f"Noto Color Emoji font not found at {font_path}; "
                                "install it with: apt-get install fonts-noto-color-emoji")
    font = ImageFont.truetype(str(font_path), 109)  # a bitmap font: 109 px is the only size it renders
    glyph_width = font.getlength("\N{GRINNING FACE}")
    chars = sorted(e for e, d in emoji.EMOJI_DATA.items()
                   if d["status"] == emoji.STATUS["fully_qualified"] and not SKIN_TONES & set(e))
    rendered = {}
    for e in tqdm(chars, desc=f"rendering emoji at {size} px", unit="glyph", disable=None):
        img = render_emoji(e, font, size, glyph_width)
        if img is not None:
            rendered[e] = img
    images = torch.stack([TF.pil_to_tensor(img) for img in rendered.values()])
    metadata = {"emoji": json.dumps(list(rendered), ensure_ascii=False)}  # which glyph each image is
    path = Path(cache_dir) / f"emoji_{size}.safetensors"
    save_atomically({"images": images}, path, metadata)
    return path


def emoji_dataset(size: int = 32, cache_dir="data") -> CaptionedImages:
    """The emoji set at size x size px, rendered into cache_dir on first use."""
    path = Path(cache_dir) / f"emoji_{size}.safetensors"
    if not path.exists():
        build_emoji(size, cache_dir)
    with safe_open(path, "pt") as f:
        images, chars = f.get_tensor("images"), json.loads(f.metadata()["emoji"])
    captions, heldout = emoji_captions(chars)
    return CaptionedImages(images, captions, "emoji", heldout=heldout)


# --- choosing a source ---------------------------------------------------------------------------

def load_dataset(spec, image_size: int | None = None, grayscale: bool = False, split: str = "train",
                 cache_dir="data") -> CaptionedImages:
    """The data that spec names: "emoji", a Tiny ImageNet folder or a folder of class sub-folders (DATA_LAYOUTS)."""
    if str(spec) == "emoji":
        if split != "train":
            raise ValueError(f"the emoji set has only a 'train' split, not {split!r}")
        data = emoji_dataset(image_size or 32, cache_dir)
        if grayscale:
            data.images = TF.rgb_to_grayscale(data.images)
        return data
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"data {str(spec)!r} does not exist.\n{DATA_LAYOUTS}")
    if (root / "wnids.txt").exists() or (root / "tiny-imagenet-200" / "wnids.txt").exists():
        return tiny_imagenet(root, split, image_size or 64, grayscale)
    if split != "train":
        raise ValueError(f"a folder of class sub-folders has only a 'train' split, not {split!r}")
    return image_folder(root, image_size or 32, grayscale)


# --- caption embeddings --------------------------------------------------------------------------

def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write then rename, so an interrupted run never leaves a half-written cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata)
    os.replace(tmp, path)


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
    parser = argparse.ArgumentParser(description="Prepare training data ahead of time (training also does it on first use).",
                                     epilog=DATA_LAYOUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("emoji", help="render the emoji set into CACHE_DIR/emoji_SIZE.safetensors",
                       description="Render every emoji of Noto Color Emoji (skin-tone variants left out) "
                                   "on white, with its CLDR name and aliases as captions.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image size in pixels")
    p.add_argument("--cache-dir", default="data", help="folder for the rendered set")
    p.add_argument("--font", default=NOTO_EMOJI_FONT, help="path to NotoColorEmoji.ttf")
    args = parser.parse_args(argv)
    start = time.time()
    path = build_emoji(args.size, args.cache_dir, args.font)
    data = emoji_dataset(args.size, args.cache_dir)
    print(f"rendered {len(data)} emoji glyphs at {args.size}x{args.size} px with {len(data.all_captions())} "
          f"captions in {time.time() - start:.1f} s -> {path}")


if __name__ == "__main__":
    main()
