"""What each emoji is called and where Unicode files it: CLDR names, aliases and keywords, the emoji-test.txt
group, and the captions built from them (shared by every emoji style)."""
import warnings
from pathlib import Path
from xml.etree import ElementTree

import emoji
import torch

from sources.captions import EMOJI_TEMPLATES, HELDOUT_STYLED_TEMPLATES, heldout_captions, styled, templated
from sources.images import CaptionedImages

CLDR_ANNOTATIONS = ("/usr/share/unicode/cldr/common/annotations/en.xml",  # Debian: unicode-cldr-core
                    "/usr/share/unicode/cldr/common/annotationsDerived/en.xml")
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # Debian: unicode-data
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}  # Fitzpatrick modifiers: variants, not new subjects


def fully_qualified_emoji() -> list[str]:
    """Every fully-qualified emoji of the `emoji` package, skin-tone variants left out, in a fixed order."""
    return sorted(e for e, d in emoji.EMOJI_DATA.items()
                  if d["status"] == emoji.STATUS["fully_qualified"] and not SKIN_TONES & set(e))


def emoji_groups(path=EMOJI_TEST) -> dict[str, str]:
    """Emoji (without variation selectors) -> its Unicode group ("Food & Drink", "Animals & Nature", ...)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Unicode's emoji-test.txt not found at {path}; it gives each emoji's group: "
                                "apt-get install unicode-data")
    groups, group = {}, ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and "#" in line:
            e = line.split("#", 1)[1].split()[0]
            groups[e.replace("\ufe0f", "")] = group
    return groups


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


def emoji_images(images: torch.Tensor, chars: list[str], style: str, name_style: bool,
                 groups: dict[str, str] | None = None) -> CaptionedImages:
    """The rendered `chars` as a captioned set of one style. The concept is the CLDR name, the same in every style.
    `name_style`: half of the captions name the style too ("an OpenMoji red apple"), and the held-out rewordings
    gain one naming it; without, the captions are the plain ones alone (as the shipped model was trained)."""
    captions, heldout = emoji_captions(chars)
    names = [c[0] for c in captions]
    if name_style:
        captions = [c + styled([n], style) for c, n in zip(captions, names)]
        heldout = [h + styled([n], style, HELDOUT_STYLED_TEMPLATES) for h, n in zip(heldout, names)]
    group = [(groups or {}).get(e.replace("\ufe0f", ""), "") for e in chars]
    return CaptionedImages(images, captions, style, heldout=heldout, concepts=names, styles=[style] * len(chars),
                           groups=group)
