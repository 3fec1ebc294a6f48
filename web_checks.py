"""Checks on every input of the app's requests, from the page or the API (used by web.py).

Raw values arrive as whatever a client sends (JSON numbers of any size, text, lists, null, file references);
each is checked here and the lot becomes a Request (plus pictures for image-to-image and inpainting), or an
InputError whose message names the input and what is accepted. The work is bounded whatever the size of the
values: a long prompt is cut before it is cleaned, a picture's size is read from its header before it is
decoded, and messages quote at most a few dozen characters of what was sent.
"""
import math
import os
import random
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from models.text_encoder import MAX_TOKENS

SAMPLER_CHOICES = [("DPM-Solver++ SDE (2M)", "dpmpp_sde"), ("DPM-Solver++ (2M)", "dpmpp"), ("DDIM", "ddim"),
                   ("DDPM (always all steps)", "ddpm")]
MAX_IMAGES, MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 16, 200, 20.0, 2 ** 31 - 1
MAX_PROMPT_CHARS = 1000
MAX_FRAMES = 24  # frames of a prompt morph
MAX_PICTURE_SIDE = 4096  # pixels a side of an uploaded picture (the page's editor sends at most 512)
READ_PROMPT_CHARS = 4 * MAX_PROMPT_CHARS  # a prompt is cut to this many characters before it is cleaned


class InputError(ValueError):
    """A request the app refuses, with a message for the user."""


@dataclass(frozen=True)
class Request:
    prompt: str
    n: int
    steps: int
    sampler: str
    guidance: float
    seed: int
    negative_prompt: str = ""  # what guidance steers away from ("": the empty prompt, plain guidance)
    note: str = ""  # what was changed on the way in (e.g. truncation), to show the user


def shown(value, limit: int = 40) -> str:
    """repr(value) for a message, cut to `limit` characters: a megabyte of junk is not echoed back."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        return "a number too long to print"
    return text if len(text) <= limit else text[:limit] + "..."


def to_number(value) -> int | float | None:
    """A JSON number or numeric text as an exact int or a finite float (-0 made 0); None for anything else:
    booleans, lists, junk text, NaN, infinities and text beyond float range ("1e400"). Integers of any size
    stay exact ints, so 10**400 or 2**64 compare with the bounds without overflowing."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, float):
            number = value
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number + 0.0 if math.isfinite(number) else None  # -0.0 + 0.0 == +0.0


def whole_number(value, name: str, low: int, high: int) -> int:
    number = to_number(value)
    if number is None or not low <= number <= high or number != int(number):
        raise InputError(f"{name} must be a whole number from {low} to {high}; got {shown(value)}")
    return int(number)


def clean_text(text, name: str) -> tuple[str, str]:
    """(the text as the model gets it, a note if it was cut). Control and other non-printing characters
    become spaces, runs of whitespace one space; only the first READ_PROMPT_CHARS characters are looked at."""
    if text is None:
        return "", ""
    if not isinstance(text, str):
        raise InputError(f"the {name} must be text; got {type(text).__name__}")
    cleaned = text[:READ_PROMPT_CHARS]  # cut first: cleaning is per character, in Python, on the event loop
    cleaned = re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in cleaned)).strip()
    if len(cleaned) > MAX_PROMPT_CHARS or len(text) > READ_PROMPT_CHARS:
        return cleaned[:MAX_PROMPT_CHARS].rstrip(), f"{name} cut to its first {MAX_PROMPT_CHARS} characters"
    return cleaned, ""


def clean_prompt(prompt, name: str = "prompt") -> tuple[str, str]:
    """clean_text, and an empty prompt refused."""
    if prompt is None:
        raise InputError(f"the {name} must be text; got NoneType")
    text, cut = clean_text(prompt, name)
    if not text:
        raise InputError(f"the {name} is empty: describe the image, e.g. \"red apple\"")
    return text, cut


def parse_request(prompt, n, steps, sampler, guidance, seed, token_count=None, negative_prompt="") -> Request:
    """Check raw inputs (from the page or the API) and turn them into a Request, or raise InputError."""
    prompt, cut = clean_prompt(prompt)
    negative_prompt, negative_cut = clean_text(negative_prompt, "negative prompt")
    notes = [note for note in (cut, negative_cut) if note]
    for text, name in ((prompt, "prompt"), (negative_prompt, "negative prompt")):
        if token_count is not None and text and token_count(text) > MAX_TOKENS:
            notes.append(f"the text encoder reads only the first {MAX_TOKENS} tokens of the {name}; the rest is ignored")
    n = whole_number(n, "number of images", 1, MAX_IMAGES)
    steps = whole_number(steps, "steps", 1, MAX_STEPS)
    names = [value for _, value in SAMPLER_CHOICES]
    if not isinstance(sampler, str) or sampler not in names:
        raise InputError(f"sampler must be one of {', '.join(names)}; got {shown(sampler)}")
    guidance = fraction(guidance, "guidance scale", MAX_GUIDANCE)
    if seed is None or (isinstance(seed, str) and seed.strip() in ("", "-1")):
        seed = -1
    seed = whole_number(seed, "seed", -1, MAX_SEED)
    if seed == -1:
        seed = random.randint(0, MAX_SEED)
    return Request(prompt, n, steps, sampler, guidance, seed, negative_prompt, "; ".join(notes))


def fraction(value, name: str, high: float = 1.0) -> float:
    """A number from 0 to `high`, or InputError."""
    number = to_number(value)
    if number is None or not 0 <= number <= high:
        raise InputError(f"{name} must be a number from 0 to {high:g}; got {shown(value)}")
    return float(number)


# --- files named by the client: only inside the app's own folders ---------------------------------------

def file_inside(path: str, folders) -> str | None:
    """The real path of `path` if it is a file under one of `folders` (symlinks and ".." resolved first)."""
    real = os.path.realpath(path)
    inside = any(real.startswith(os.path.realpath(folder) + os.sep) for folder in folders)
    return real if inside and os.path.isfile(real) else None


def reused_request(path, served) -> Request | None:
    """The request a clicked result was made with (prompt, negative prompt, sampler, steps, guidance, and its
    own seed as the seed), from the text chunks of its PNG, if `path` is a PNG in one of the `served` folders
    and those settings pass the checks; None otherwise (a click's event data comes from the client)."""
    if not isinstance(path, str) or "\0" in path or not path.lower().endswith(".png"):
        return None
    real = file_inside(path, served)
    if real is None:
        return None
    try:
        with Image.open(real) as img:
            found = dict(getattr(img, "text", {}))
    except Exception:  # not a PNG after all, or unreadable
        return None
    if "prompt" not in found or "image_seed" not in found:
        return None
    try:  # the PNG may be anyone's upload in the cache: its text is checked like any input
        return parse_request(found["prompt"], 1, found.get("steps"), found.get("sampler"), found.get("guidance"),
                             found["image_seed"], negative_prompt=found.get("negative_prompt"))
    except InputError:
        return None


# --- pictures: the editor's value (or an API client's) -------------------------------------------------

def uploaded_picture(value, name: str, upload_dir: str) -> Image.Image:
    """The picture a file reference points at, decoded, if it lies in the app's upload folder (a path anywhere
    else is refused, whatever the client claims) and is at most MAX_PICTURE_SIDE pixels a side."""
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(path, str) or "\0" in path:
        raise InputError(f"the {name} must be an uploaded image file; got {shown(value)}")
    real = file_inside(path, [upload_dir])
    if real is None:
        raise InputError(f"the {name} was not uploaded to this app; upload it first (gradio_client: handle_file)")
    try:
        with Image.open(real) as img:  # reads the header only
            if max(img.size) > MAX_PICTURE_SIDE:
                raise InputError(f"the {name} is {img.width}x{img.height} pixels; at most {MAX_PICTURE_SIDE} a side "
                                 "is accepted (the model draws at its own small size anyway)")
            img.load()
            return img.copy()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"the {name} is not an image; PNG, JPEG, WebP, GIF and BMP are accepted") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"the {name} could not be decoded ({type(e).__name__}); please send another file") from None


def editor_part(value, key: str):
    part = value.get(key) if isinstance(value, dict) else None
    return part if part not in (None, {}) else None


def edit_picture(value, upload_dir: str) -> Image.Image:
    """Image-to-image: what the editor shows (its composite: the upload with the strokes drawn on it, or a
    sketch on a transparent canvas, which preprocess.fit_image puts on white)."""
    part = editor_part(value, "composite") or editor_part(value, "background")
    if part is None:
        raise InputError("there is no picture to start from: upload one or draw a sketch in the editor")
    return uploaded_picture(part, "picture", upload_dir)


def inpaint_pictures(value, upload_dir: str) -> tuple[Image.Image, Image.Image]:
    """Inpainting: (the uploaded picture, the mask as L: 255 where to redraw). The mask is everything
    painted on the editor's layers (alpha of 128 or more), or for a layer without alpha, its white pixels."""
    background = editor_part(value, "background")
    if background is None:
        raise InputError("there is no picture to inpaint: upload one, then paint over the part to redraw")
    picture = uploaded_picture(background, "picture", upload_dir)
    layers = value.get("layers") or []
    if not isinstance(layers, list) or len(layers) > 8:
        raise InputError(f"the mask layers must be a list of at most 8 images; got {shown(layers)}")
    mask = Image.new("L", picture.size, 0)
    for k, layer in enumerate(layers):
        img = uploaded_picture(layer, f"mask (layer {k + 1})", upload_dir)
        if img.size != picture.size:
            raise InputError(f"the mask (layer {k + 1}) is {img.width}x{img.height} pixels but the picture is "
                             f"{picture.width}x{picture.height}; the mask must cover it pixel for pixel")
        img = img.convert("RGBA") if img.mode == "P" else img
        painted = img.getchannel("A") if "A" in img.getbands() else img.convert("L")
        mask.paste(255, mask=painted.point(lambda v: 255 if v >= 128 else 0))
    if mask.getbbox() is None:
        raise InputError("the mask is empty: paint over the part of the picture to redraw")
    return picture, mask


def parse_morph(prompt_b, frames) -> tuple[str, int]:
    """The second prompt and frame count of a prompt morph."""
    text, _ = clean_prompt(prompt_b, "second prompt")
    return text, whole_number(frames, "frames", 2, MAX_FRAMES)
