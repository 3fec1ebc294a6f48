"""Checks on every input of a /generate request, from the page or the API (used by web.py).

Raw values arrive as whatever a client sends (JSON numbers of any size, text, lists, null); each is checked here
and the lot becomes a Request, or an InputError whose message names the input and what is accepted. The work
is bounded whatever the size of the values: a long prompt is cut before it is cleaned, and messages quote at
most a few dozen characters of what was sent.
"""
import math
import random
import re
from dataclasses import dataclass

from models.text_encoder import MAX_TOKENS

SAMPLER_CHOICES = [("DPM-Solver++ SDE (2M)", "dpmpp_sde"), ("DPM-Solver++ (2M)", "dpmpp"), ("DDIM", "ddim"),
                   ("DDPM (always all steps)", "ddpm")]
MAX_IMAGES, MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 16, 200, 20.0, 2 ** 31 - 1
MAX_PROMPT_CHARS = 1000
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


def clean_prompt(prompt) -> tuple[str, str]:
    """(the prompt as the model gets it, a note if it was cut). Control and other non-printing characters
    become spaces, runs of whitespace one space; only the first READ_PROMPT_CHARS characters are looked at."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be text; got {type(prompt).__name__}")
    text = prompt[:READ_PROMPT_CHARS]  # cut first: cleaning is per character, in Python, on the event loop
    text = re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in text)).strip()
    if not text:
        raise InputError("the prompt is empty: describe the image, e.g. \"red apple\"")
    if len(text) > MAX_PROMPT_CHARS or len(prompt) > READ_PROMPT_CHARS:
        return text[:MAX_PROMPT_CHARS].rstrip(), f"prompt cut to its first {MAX_PROMPT_CHARS} characters"
    return text, ""


def parse_request(prompt, n, steps, sampler, guidance, seed, token_count=None) -> Request:
    """Check raw inputs (from the page or the API) and turn them into a Request, or raise InputError."""
    prompt, cut = clean_prompt(prompt)
    notes = [cut] if cut else []
    if token_count is not None and token_count(prompt) > MAX_TOKENS:
        notes.append(f"the text encoder reads only the first {MAX_TOKENS} tokens of the prompt; the rest is ignored")
    n = whole_number(n, "number of images", 1, MAX_IMAGES)
    steps = whole_number(steps, "steps", 1, MAX_STEPS)
    names = [value for _, value in SAMPLER_CHOICES]
    if not isinstance(sampler, str) or sampler not in names:
        raise InputError(f"sampler must be one of {', '.join(names)}; got {shown(sampler)}")
    number = to_number(guidance)
    if number is None or not 0 <= number <= MAX_GUIDANCE:
        raise InputError(f"guidance scale must be a number from 0 to {MAX_GUIDANCE:g}; got {shown(guidance)}")
    if seed is None or (isinstance(seed, str) and seed.strip() in ("", "-1")):
        seed = -1
    seed = whole_number(seed, "seed", -1, MAX_SEED)
    if seed == -1:
        seed = random.randint(0, MAX_SEED)
    return Request(prompt, n, steps, sampler, float(number), seed, "; ".join(notes))
