"""Any folder of class sub-folders, captioned by class name or by each image's own captions."""
import json
import warnings
from pathlib import Path

from sources.captions import PHOTO_TEMPLATES, heldout_captions, templated
from sources.images import CaptionedImages, decode_images, image_files

DATA_LAYOUT = """  path/to/folder               one sub-folder per class, images directly inside:
                                 folder/<class_name>/<image>.png|jpg|jpeg|bmp|gif|webp
                               caption: the class name ('_' and '-' become spaces), unless the image has
                               its own: <image stem>.txt beside it (one caption per line), or lines
                               {"file": "<class_name>/<image>", "caption": "..."} in folder/captions.jsonl"""


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


def image_folder(root, image_size: int = 32, grayscale: bool = False, layouts: str = DATA_LAYOUT) -> CaptionedImages:
    """root/<class_name>/<image>: captioned by class name, or by the image's own captions where it has any.
    `layouts`: the accepted data layouts an error shows."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder.\n{layouts}")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))  # not .ipynb_checkpoints
    files = [p for d in classes for p in image_files(d)]
    if not files:
        raise ValueError(f"{root} has no images in class sub-folders ({len(classes)} sub-folders found).\n{layouts}")
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
