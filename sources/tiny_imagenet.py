"""Tiny ImageNet as unzipped: 200 classes of 64x64 photos, captioned from their WordNet synonyms."""
from pathlib import Path

from sources.captions import PHOTO_TEMPLATES, heldout_captions, templated
from sources.images import CaptionedImages, decode_images, image_files


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
