"""Emoji from a folder of PNGs named by code point (EmojiOne 2 in Debian's ruby-gemojione), cached as safetensors."""
import json
import warnings
from pathlib import Path

from safetensors import safe_open

from sources.emoji_names import emoji_groups, emoji_images, fully_qualified_emoji
from sources.images import CaptionedImages, decode_images, save_atomically

EMOJIONE_PNG = "/usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png"


def png_name(e: str) -> str:
    """The file an emoji's picture has in the set: upper-case hex code points joined by '-', without FE0F."""
    return "-".join(f"{ord(c):04X}" for c in e if c != "\ufe0f") + ".png"


def build_png_emoji(size: int, cache_dir, folder=EMOJIONE_PNG, prefix: str = "emojione") -> Path:
    """Decode every emoji that has a PNG in `folder` (on white, fitted to size x size) into a safetensors cache.
    Unreadable files are skipped and counted (in the cache's metadata)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"EmojiOne PNGs not found at {folder}; install them with: apt-get install ruby-gemojione")
    chars = [e for e in fully_qualified_emoji() if (folder / png_name(e)).is_file()]
    if not chars:
        raise ValueError(f"{folder} holds no PNG named by an emoji's code points (e.g. {png_name(chr(0x1F34E))})")
    with warnings.catch_warnings(record=True):  # the count below says it, once
        images, kept, skipped = decode_images([folder / png_name(e) for e in chars], size, False, f"{prefix} at {size} px")
    metadata = {"emoji": json.dumps([chars[i] for i in kept], ensure_ascii=False), "skipped": str(skipped)}
    path = Path(cache_dir) / f"{prefix}_{size}.safetensors"
    save_atomically({"images": images}, path, metadata)
    return path


def png_emoji(size: int = 32, cache_dir="data", folder=EMOJIONE_PNG, style: str = "emojione",
              name_style: bool = True) -> CaptionedImages:
    """The set's emoji at size x size px, decoded into cache_dir on first use."""
    path = Path(cache_dir) / f"{style}_{size}.safetensors"
    if not path.exists():
        build_png_emoji(size, cache_dir, folder, style)
    with safe_open(path, "pt") as f:
        images, meta = f.get_tensor("images"), f.metadata()
    data = emoji_images(images, json.loads(meta["emoji"]), style, name_style, emoji_groups())
    data.skipped = int(meta["skipped"])
    if data.skipped:
        warnings.warn(f"skipped {data.skipped} unreadable PNGs of {path.name}'s source {folder}", stacklevel=2)
    return data
