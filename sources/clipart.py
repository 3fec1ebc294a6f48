"""The Open Clip Art Library (Debian's openclipart-svg): public-domain SVG drawings, rendered once and cached.

Each drawing is captioned from its own metadata (title, keywords) and its folder, with its author's name,
file-name noise and collection titles dropped; most titles are English, some Italian ones are translated."""
import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple
from xml.etree import ElementTree

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from safetensors import safe_open
from tqdm import tqdm

from sources.captions import HELDOUT_STYLED_TEMPLATES, STYLE_NAMES, heldout_captions, styled, templated
from sources.images import CaptionedImages, on_white, save_atomically

OPENCLIPART_ROOT = "/usr/share/openclipart/svg"
SUPERSAMPLE = 4  # render at 4x and downscale with LANCZOS: thin outlines stay crisp at 32 px, not blurred to grey

# Not drawings of things: fill patterns, gradients and page templates; files named only in Italian file names
# (titled "Various Cliparts") and duplicates; icon sets, whose names are program or toolbar-action ids
# ("viewmag+", "gnome-mime-application-pdf", "70a001") and whose drawings are mostly abstract UI glyphs.
LEFT_OUT_FOLDERS = ("special", "unsorted", "computer/icons")
LEFT_OUT_TITLES = {"gramastar"}  # 1,375 generated {n/m} star polygons: grey rings at 32 px
# Titles of a whole collection, not of the drawing ("Clipart by Nicu Buculei - pear" is on his apple too):
# the file name names the drawing instead.
COLLECTION_TITLE = re.compile(r"clipart by .* - |part of the .* collection|theme|icons|iconset|clipart|"
                              r"symbol_signs|road signs|map symbols|sibmission|r\d+ general|^(card|people|"
                              r"advertising|sallite|simple arrows|pc connectors|chess pieces)$", re.IGNORECASE)

# Folders (and their sub-folders) that hold one kind of thing: that kind is the concept of every drawing in
# them, since their titles name individuals ("Copper the Beagle") or are in Italian ("Cavallo"). A few
# drawings are filed wrongly (plants/trees holds a bow saw) and take the folder's kind all the same.
KINDS = {"animals/birds/penguin": "penguin", "animals/dinosaurs": "dinosaur", "animals/mammals/bears": "bear",
         "animals/mammals/dogs": "dog", "animals/mammals/horses": "horse", "animals/mammals/housecats": "cat",
         "computer/folders": "folder", "education/books": "book", "electronics/battery": "battery",
         "electronics/bulb": "light bulb", "office/telephone": "telephone", "people/clothing/hats": "hat",
         "people/clothing/pantyhose": "pantyhose", "people/smilies": "smiley", "people/stickmen": "stick figure",
         "plants/flowers": "flower", "plants/trees": "tree", "recreation/games/cards": "playing card",
         "recreation/games/chess": "chess piece", "shapes/arrows": "arrow", "shapes/callouts": "speech bubble",
         "shapes/flowchart": "flowchart symbol", "shapes/jigsaw": "jigsaw piece", "signs_and_symbols/clocks": "clock",
         "signs_and_symbols/flags": "flag", "signs_and_symbols/led": "led light", "transportation/roadsigns": "road sign",
         "transportation/aiga-symbols": "sign", "transportation/vehicles/hummers": "car"}
# Kinds a title only qualifies: "Ireland" names which flag, "ireland flag" is the thing drawn (and its concept)
QUALIFIED_KINDS = {"flag", "road sign", "sign", "playing card"}

# The head noun of Italian (and a few French and Spanish) titles, mostly Architetto Francesco Rollandin's;
# the words after it are modifiers ("Sedia in legno", a wooden chair) and are dropped.
FOREIGN = dict(pair.split(":") for pair in """
abeille:bee abitazione:house acquila:eagle aquila:eagle aglio:garlic albero:tree anelli:rings antilope:antelope
arbre:tree asso:ace attenzione:warning_sign ballerina:dancer barattolo:jar bicicletta:bicycle binocolo:binoculars
bobine:film_reel borsa:bag bottiglia:bottle bussola:compass calamita:magnet calcolatrice:calculator camicia:shirt
canguro:kangaroo cani:dog carta:paper cartella:folder casa:house casco:helmet cassa:box cavalletta:grasshopper
cavallo:horse cestino:basket cesto:basket champignon:mushroom chiave:key cigni:swan cigno:swan cinepresa:film_camera
clessidra:hourglass coccinella:ladybird coccinelle:ladybird coccinellona:ladybird coniglio:rabbit cubo:cube
dente:tooth dinosauri:dinosaur dinosauro:dinosaur donna:woman elefante:elephant estrella:star fabbrica:factory
farfalla:butterfly fata:fairy finestra:window finestre:window fiore:flower foglio:sheet_of_paper forbici:scissors
forchettoni:fork formichina:ant formicona:ant fuoco:fire gabbiano:seagull gallo:rooster gattina:cat gatto:cat
gelato:ice_cream glace:ice_cream gufo:owl insetto:insect lampada:lamp lattine:can lente:magnifying_glass
lettera:letter libellula:dragonfly libro:book livella:spirit_level lucchetto:padlock lucertola:lizard
lucertolona:lizard lucertolone:lizard lumaca:snail macchina:car mantide:praying_mantis mattone:brick mazzo:bunch
microscopio:microscope mondo:globe moschito:mosquito nonno:grandfather orologio:clock orso:bear ours:bear
pacco:parcel palloncini:balloons pallone:ball pannocchia:corn_cob pattinatrice:skater pattinatrici:skater
pattino:skate pecora:sheep peperoncino:chili_pepper pera:pear pesce:fish pescetto:fish pinguino:penguin
pinzatrice:stapler pollo:chicken poltrona:armchair pomodori:tomato portafoglio:wallet provetta:test_tube
pulsante:button puntine:drawing_pins ragnetto:spider ragno:spider ramarro:lizard rana:frog ravanello:radish
ruota:wheel salvagente:lifebuoy schermo:screen scolapasta:colander secchio:bucket sedia:chair signore:man
signorina:woman siringa:syringe stambecco:ibex stampante:printer stemma:coat_of_arms stormo:flock_of_birds
tabella:table tacchino:turkey tasto:key tavolo:table tazza:cup teiera:teapot telecamera:video_camera
telefono:telephone televisore:television teschio:skull tigre:tiger topo:mouse toro:bull torta:cake trattore:tractor
uccello:bird utensile:tool utensili:tools vacca:cow valigie:suitcase viti:screws zanzara:mosquito zucca:pumpkin
leone:lion tigri:tiger unita:disk_drive cronometro:stopwatch esperimento:chemistry_experiment sortie:emergency_exit""".split())
FOREIGN_FUNCTION_WORDS = {"di", "del", "della", "delle", "dei", "nella", "con", "da", "il", "gli", "e", "per", "sul"}

# Words that say nothing about the thing: file-name and metadata noise, credits and icon-set names; and
# keywords that only file the drawing ("symbol", "shapes", "menu")
NOISE = {"bw", "bwh", "aj", "bb", "fc", "md", "sm", "svg", "ganson", "aiga", "openclipart", "clipart", "hash", "icon",
         "icons", "appicon", "mimeicon", "illustration", "theme", "architetto", "gnome", "gtk", "stock", "mime", "fs",
         "etiquette"}
FILING_KEYWORDS = {"symbol", "symbols", "sign", "signs", "shape", "shapes", "unsorted", "menu", "mapsym", "cartooon",
                   "en"}
ARTICLES = {"a", "an", "the", "my", "another", "generic", "il", "lo", "la", "le", "un", "una", "uno"}
MODIFIERS = {"simple", "cartoon", "small", "big", "large", "little", "old", "cute", "happy", "angry", "sleeping",
             "stylized", "contour", "plain", "modern", "black", "white", "red", "blue", "green", "yellow", "orange",
             "purple", "pink", "brown", "grey", "gray", "gold", "golden", "silver", "color", "colour", "outline",
             "funny", "crazy", "glossy", "flat", "shiny", "cool", "revisited", "styled", "drawn"}
PHRASE_END = re.compile(r" (with|of|on|in|under|for|from|at|by) .*")

PLAIN_TEMPLATES = ("{n}", "{a}", "a picture of {a}")  # captions that do not name the style
KEYWORD_TEMPLATES = ("{a}, {k}", "{a}, {k}, " + STYLE_NAMES["clipart"])
MAX_KEYWORDS = 3


class Drawing(NamedTuple):
    """What one drawing shows: its names (the most specific first), concept key and caption keywords."""
    names: list[str]
    concept: str
    keywords: list[str]


def words(text: str) -> list[str]:
    """'CayennePepperRevisited', 'bee2 (B and W)' -> lower-case words; numbers, single letters and asides dropped."""
    text = re.sub(r"\(.*?\)|\[.*?\]|<.*?>|&\w+;", " ", text)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
    tokens = (w.rstrip("0123456789") for w in re.split(r"[^a-z0-9']+", text.lower()))  # "bee1", "tigre02"
    return [w for w in tokens if len(w) > 1 and not re.search(r"\d", w)]


def stem_name(stem: str, credits: set[str]) -> str:
    """A file name's words without the author's, the last one maybe cut short ("antilope_architetto_fran_01")."""
    tokens = [w for w in words(stem.replace("_", " ")) if w not in NOISE and w not in credits]
    if tokens and any(c.startswith(tokens[-1]) for c in credits | {"openclipart"}):
        tokens = tokens[:-1]
    return " ".join(tokens)


def title_name(title: str, credits: set[str]) -> str:
    """A title's first clause ("ear - body part" -> "ear"); an Italian title's head noun, in English."""
    clause = re.split(r" - |[,;:?!]", title)[0]
    tokens = [w for w in words(clause) if w not in credits]
    while tokens and tokens[0] in ARTICLES:
        tokens = tokens[1:]
    while tokens and tokens[-1] == "by":  # the author's name was after it
        tokens = tokens[:-1]
    if tokens and (tokens[0] in FOREIGN or FOREIGN_FUNCTION_WORDS & set(tokens)):
        return next((FOREIGN[w] for w in tokens if w in FOREIGN), tokens[0]).replace("_", " ")
    return " ".join(w for w in tokens if w not in NOISE)


def head_noun(name: str) -> str:
    """'angry monkey' -> 'monkey', 'bird of peace' -> 'bird': the thing, without its qualities."""
    core = PHRASE_END.sub("", name)
    return " ".join(w for w in core.split() if w not in MODIFIERS) or name


def kind_of(folder: str) -> str | None:
    return next((kind for f, kind in KINDS.items() if folder == f or folder.startswith(f + "/")), None)


def describe(path: str, meta: dict) -> Drawing | None:
    """Names, concept and keywords of the drawing at `path` (relative to the root), or None if it has no name.

    The concept is the folder's kind where the folder holds one kind of thing, else the head noun of the
    cleaned title (or file name, under a collection title): many drawings share one ("apple", "house")."""
    if meta["title"] in LEFT_OUT_TITLES:
        return None
    credits = set(words(meta["creator"]))
    folder, stem = path.rpartition("/")[0], Path(path).stem
    kind, title = kind_of(folder), meta["title"]
    if kind in QUALIFIED_KINDS:
        title = title.replace(" - ", " ")  # "France - Marche" is the flag of a region, not of France
    name = "" if COLLECTION_TITLE.search(title) else title_name(title, credits)
    name = name or stem_name(stem, credits)
    if not name and not kind:
        return None
    names = [name] if name else []
    if kind and kind.split()[-1] not in name.split():
        names = [f"{name} {kind}".strip()] if kind in QUALIFIED_KINDS else names + [kind]
    concept = (names[0] if kind in QUALIFIED_KINDS else kind) or head_noun(name)
    if concept not in names:
        names.append(concept)
    said = {w.rstrip("s") for n in names for w in n.split()}
    keywords = {}  # one of "mammal" and "mammals"; none the names already say
    for k in meta["keywords"] + [f.replace("_", " ") for f in reversed(folder.split("/"))]:
        k = clean_keyword(k, credits)
        if k and not set(w.rstrip("s") for w in k.split()) <= said:
            keywords.setdefault(k.rstrip("s"), k)
    return Drawing(names, concept, list(keywords.values())[:MAX_KEYWORDS])


def clean_keyword(keyword: str, credits: set[str]) -> str:
    """A keyword or folder name as caption words; "" for noise ("hash(0x8a39378)", "signs_and_symbols", credits,
    run-together tags such as "tigerorangegreenvector")."""
    tokens = words(keyword.replace("_", " "))
    if not tokens or len(tokens) > 2 or any(w in NOISE | FILING_KEYWORDS | credits or len(w) > 12 for w in tokens):
        return ""
    return " ".join(tokens)


def singular_concepts(concepts: list[str]) -> list[str]:
    """Merge 'dogs' into 'dog' (and 'berries' into 'berry') where both occur: one key for one thing."""
    known = set(concepts)
    def one(c):
        for plural, single in (("ies", "y"), ("es", ""), ("s", "")):
            if c.endswith(plural) and c[:-len(plural)] + single in known:
                return c[:-len(plural)] + single
        return c
    return [one(c) for c in concepts]


def clipart_captions(drawings: list[Drawing]) -> tuple[list[list[str]], list[list[str]]]:
    """Training captions, half of them naming the style ("a clip art drawing of a dog"), and held-out rewordings."""
    captions = [templated(d.names, PLAIN_TEMPLATES) + styled(d.names, "clipart")
                + templated(d.names[:1], KEYWORD_TEMPLATES, d.keywords) for d in drawings]
    training = {c for cs in captions for c in cs}
    heldout = [heldout_captions(d.names, training, d.keywords)
               + [c for c in styled(d.names[:1], "clipart", HELDOUT_STYLED_TEMPLATES) if c not in training]
               for d in drawings]
    return captions, heldout


DC, RDF, CC = "{http://purl.org/dc/elements/1.1/}", "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}", \
    "{http://web.resource.org/cc/}"


def svg_metadata(data: bytes) -> dict:
    """The drawing's title, creator and keywords from its RDF metadata (empty where it has none)."""
    work = ElementTree.fromstring(data).find(f".//{CC}Work")
    if work is None:
        return {"title": "", "creator": "", "keywords": []}
    text = lambda node: " ".join(t.strip() for t in node.itertext() if t.strip()) if node is not None else ""
    return {"title": text(work.find(f"{DC}title")), "creator": text(work.find(f"{DC}creator")),
            "keywords": [text(li) for li in work.iterfind(f"{DC}subject//{RDF}li") if text(li)]}


def svg_files(root: Path) -> list[Path]:
    """Every SVG outside the left-out folders, each content once: where the same file is in several folders,
    the most specific folder's copy (animals/mammals/dogs over animals)."""
    left_out = lambda p: any(p.parent.as_posix() == f or p.parent.as_posix().startswith(f + "/")
                             for f in LEFT_OUT_FOLDERS)
    paths = [p.relative_to(root) for p in sorted(root.rglob("*.svg")) if p.is_file()]
    paths = sorted((p for p in paths if not left_out(p)), key=lambda p: (-len(p.parts), p.as_posix()))
    first = {}
    for p in paths:
        first.setdefault(hashlib.sha256((root / p).read_bytes()).digest(), p)
    return sorted(first.values())


def import_cairosvg():
    """cairosvg, imported only to render (a cached set loads without it), or a one-line error naming the fix."""
    try:
        import cairosvg
    except ImportError:
        raise ImportError("rendering the clip art needs cairosvg: pip install cairosvg") from None
    except OSError:  # cairocffi found no cairo library to load
        raise ImportError("cairosvg cannot load the cairo library: apt-get install libcairo2") from None
    return cairosvg


def rasterize(data: bytes, width: int) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """The SVG's page `width` px wide over white, and the box of its drawn (not near-white) pixels, None if blank.

    cairosvg's defaults refuse XML entities and files or URLs the SVG names (only data: URLs are read)."""
    png = import_cairosvg().svg2png(bytestring=data, output_width=width)
    with Image.open(io.BytesIO(png)) as img:
        page = on_white(img).convert("RGB")
    return page, ImageOps.invert(page).point(lambda v: 255 if v > 8 else 0).getbbox()


def render_svg(data: bytes, size: int) -> Image.Image | None:
    """The drawing fitted into 90% of a white size x size square, centred, aspect kept; None if it draws nothing.

    Pages are often much larger than their drawing: one drawn small is rendered again, larger."""
    fit = 0.9 * size
    page, box = rasterize(data, SUPERSAMPLE * size)
    if box and max(box[2] - box[0], box[3] - box[1]) < SUPERSAMPLE * fit / 2:
        zoom = min(SUPERSAMPLE * fit / max(box[2] - box[0], box[3] - box[1]), 16)
        page, box = rasterize(data, round(SUPERSAMPLE * size * zoom))
    if box is None:
        return None
    drawing = page.crop(box)
    scale = fit / max(drawing.size)
    drawing = drawing.resize([max(1, round(s * scale)) for s in drawing.size], Image.Resampling.LANCZOS)
    out = Image.new("RGB", (size, size), "white")
    out.paste(drawing, ((size - drawing.width) // 2, (size - drawing.height) // 2))
    return out


def build_clipart(size: int = 32, cache_dir="data", root=OPENCLIPART_ROOT) -> Path:
    """Render every named drawing and write cache_dir/clipart_{size}.safetensors: the images and, as JSON metadata,
    each one's path and SVG metadata (captions are made from them on loading, so they can change without
    rendering again). Files that cannot be read or rendered, or render blank, are skipped and counted.

    One process: cairosvg parses in Python, so threads would not help, and this runs once (about 3 CPU minutes)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Open Clip Art Library not found at {root}; "
                                "install it with: apt-get install openclipart-svg")
    import_cairosvg()  # fail before reading thousands of files
    images, records, failures = [], [], []
    for path in tqdm(svg_files(root), desc=f"rendering clip art at {size} px", unit="svg", disable=None):
        try:
            data = (root / path).read_bytes()
            meta = svg_metadata(data)
            if describe(path.as_posix(), meta) is None:
                continue
            image = render_svg(data, size)
            if image is None:
                raise ValueError("it renders blank")
        except Exception as e:  # cairosvg reports broken files as ValueError, ZeroDivisionError, ParseError...
            failures.append(f"{path}: {type(e).__name__}: {e}")
            continue
        images.append(TF.pil_to_tensor(image))
        records.append({"path": path.as_posix(), **meta})
    if not images:
        raise ValueError(f"none of the SVG files under {root} could be rendered"
                         + (f", e.g. {failures[0]}" if failures else ""))
    if failures:
        warnings.warn(f"skipped {len(failures)} of {len(failures) + len(images)} clip art files that could not be "
                      f"rendered or rendered blank, e.g. {failures[0]}", stacklevel=2)
    out = Path(cache_dir) / f"clipart_{size}.safetensors"
    save_atomically({"images": torch.stack(images)}, out,
                    {"clipart": json.dumps(records, ensure_ascii=False), "skipped": str(len(failures))})
    return out


def clipart_dataset(size: int = 32, cache_dir="data", root=OPENCLIPART_ROOT) -> CaptionedImages:
    """The Open Clip Art Library at size x size px, rendered into cache_dir on first use (about 4,000 drawings)."""
    path = Path(cache_dir) / f"clipart_{size}.safetensors"
    if not path.exists():
        build_clipart(size, cache_dir, root)
    with safe_open(path, "pt") as f:
        images, metadata = f.get_tensor("images"), f.metadata()
    records = json.loads(metadata["clipart"])
    described = [(i, describe(r["path"], r)) for i, r in enumerate(records)]
    keep = [i for i, d in described if d is not None]  # a cache from older naming rules may hold unnamed ones
    drawings, records = [d for _, d in described if d is not None], [records[i] for i in keep]
    captions, heldout = clipart_captions(drawings)
    return CaptionedImages(images[keep], captions, "clipart", int(metadata["skipped"]) + len(described) - len(keep),
                           heldout, singular_concepts([d.concept for d in drawings]), ["clipart"] * len(records),
                           [r["path"].split("/")[0] for r in records])
