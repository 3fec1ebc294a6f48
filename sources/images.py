"""The in-memory data set every source builds (`CaptionedImages`), and decoding image files into it."""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from safetensors.torch import save_file
from tqdm import tqdm

from sources.captions import names_style

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
MAX_DECODE_PIXELS = 40_000_000  # ~120 MB decoded; a bigger image (or a forged header) is skipped, not risked


class CaptionedImages(torch.utils.data.Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W), each with one or more captions, and what it shows:
    its concept (the same key for the same thing in every source, e.g. "red apple"), its style (the source's
    key: "noto", "openmoji", "emojione", "clipart", or a folder's name) and its group ("Food & Drink", "animals")."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]], name: str, skipped: int = 0,
                 heldout: list[list[str]] | None = None, concepts: list[str] | None = None,
                 styles: list[str] | None = None, groups: list[str] | None = None):
        assert images.dtype == torch.uint8 and len(images) == len(captions), "one uint8 image per caption list"
        assert all(captions), "every image needs at least one caption"
        self.images, self.captions, self.name, self.skipped = images, captions, name, skipped
        # reworded prompts of each image that are never training captions (may be empty)
        self.heldout = heldout if heldout is not None else [[] for _ in captions]
        self.concepts = concepts if concepts is not None else [c[0] for c in captions]
        self.styles = styles if styles is not None else [name] * len(captions)
        self.groups = groups if groups is not None else [""] * len(captions)
        assert len(self.heldout) == len(self.concepts) == len(self.styles) == len(self.groups) == len(captions)
        self.styled_share = 0.0  # see favour_styled

    def favour_styled(self, share: float) -> None:
        """Draw a caption that names the image's style with probability `share` where the image has both kinds
        (0: uniformly from all its captions, as before)."""
        if not 0 <= share <= 1:
            raise ValueError(f"the share of captions that name their style must be in [0, 1], not {share}")
        self.styled_share = share
        self._by_style = [([c for c in cs if names_style(c, s)], [c for c in cs if not names_style(c, s)])
                          for cs, s in zip(self.captions, self.styles)]

    @classmethod
    def concat(cls, parts: list["CaptionedImages"], name: str) -> "CaptionedImages":
        """One set of several sources' images (all of one size and channel count)."""
        sizes = {tuple(p.images.shape[1:]) for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot mix sources of different image shapes: {sorted(sizes)}")
        joined = lambda field: [x for p in parts for x in getattr(p, field)]
        return cls(torch.cat([p.images for p in parts]), joined("captions"), name, sum(p.skipped for p in parts),
                   joined("heldout"), joined("concepts"), joined("styles"), joined("groups"))

    def subset(self, keep: list[int]) -> "CaptionedImages":
        """The images at indices `keep`, with everything recorded about them."""
        pick = lambda xs: [xs[i] for i in keep]
        return CaptionedImages(self.images[keep], pick(self.captions), self.name, self.skipped, pick(self.heldout),
                               pick(self.concepts), pick(self.styles), pick(self.groups))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> tuple[torch.Tensor, str]:
        image = self.images[i].float() / 127.5 - 1
        options = self.captions[i]
        if self.styled_share and all(self._by_style[i]):
            options = self._by_style[i][0 if torch.rand(()).item() < self.styled_share else 1]
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


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write then rename, so an interrupted run never leaves a half-written cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata)
    os.replace(tmp, path)
