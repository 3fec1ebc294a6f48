"""Captions from names: templates people write, and the held-out rewordings `evaluate` scores."""
import re

# Captions people write, built from a name n (with article: a) and, for emoji, a CLDR keyword k. Each epoch
# draws one per image, so the model learns a neighbourhood of the text encoder's space, not one point.
EMOJI_TEMPLATES = ("{n}", "{a}", "an emoji of {a}", "{n} icon", "{a}, {k}")
PHOTO_TEMPLATES = ("{n}", "{a}", "a photo of {a}", "a close-up photo of {a}")
# Never training captions: `evaluate` scores these rewordings to measure generalisation.
HELDOUT_TEMPLATES = ("a drawing of {a}", "{n} symbol", "a {k} {n}")


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


# How prompts name each source's style; a caption names it or not, so a prompt without a style may come out in
# any of them and one with a style learns to mean it.
STYLE_NAMES = {"noto": "Noto", "openmoji": "OpenMoji", "emojione": "EmojiOne", "clipart": "clip art"}
STYLED_TEMPLATES = ("{s} {n}", "{sa} {n}", "{n}, {s} style", "{a} in {s} style")
CLIPART_TEMPLATES = ("a clip art drawing of {a}", "{n} clip art", "{a}, clip art")
HELDOUT_STYLED_TEMPLATES = ("{a} drawn in {s} style",)  # never trained: scores style-following on rewordings


def styled(names, style: str, templates=STYLED_TEMPLATES) -> list[str]:
    """Captions that name the style too: "an OpenMoji apple", "apple, EmojiOne style", "a clip art drawing of a dog"."""
    s = STYLE_NAMES[style]
    if style == "clipart" and templates is STYLED_TEMPLATES:
        templates = CLIPART_TEMPLATES
    return list(dict.fromkeys(t.format(s=s, sa=with_article(s), n=n, a=with_article(n)) for n in names for t in templates))


def names_style(caption: str, style: str) -> bool:
    """Whether `caption` names `style` (a STYLE_NAMES key) as a whole word, in any case: "an OpenMoji pizza"."""
    return style in STYLE_NAMES and re.search(rf"\b{re.escape(STYLE_NAMES[style])}\b", caption, re.IGNORECASE) is not None


def style_words(style: str) -> str:
    """The words a prompt ends with to ask for a style, as the training captions put them: ", OpenMoji style"."""
    return ", clip art" if style == "clipart" else f", {STYLE_NAMES[style]} style"


_STYLE_ENDING = re.compile("|".join(re.escape(style_words(s)) + r"\s*$" for s in STYLE_NAMES), re.IGNORECASE)


def with_style(prompt: str, style: str | None) -> str:
    """`prompt` ending in the style's words ("a dog" -> "a dog, OpenMoji style"), after taking off any style words it
    ended with; style None takes them off (any style)."""
    bare = _STYLE_ENDING.sub("", prompt.rstrip())
    return bare if style is None else bare + style_words(style)
