"""The clip art source on a hand-written miniature of the Open Clip Art Library (never the installed package)."""
import os
import sys
import warnings

import pytest
import torch

from sources import clipart
from sources.clipart import clipart_dataset, describe

RED_BOX = '<rect x="0" y="0" width="40" height="20" fill="#ff0000"/>'


def svg(title, creator, keywords, body=RED_BOX, size='width="40" height="20"') -> str:
    """An SVG with Open Clip Art's metadata: title, keywords (rdf:li in dc:subject) and creator."""
    subject = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" {size}>
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{subject}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>"""


def write(root, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def library(tmp_path):
    """Four drawings (one filed twice), and a pattern that is no drawing of a thing."""
    root = tmp_path / "svg"
    puppy = svg("Bulldog Puppy by Gerald G.", "Gerald G.", ["mammal", "dog", "hash(0x8a3ecd4)"])
    write(root, "animals/bulldog_puppy_gerald_g._01.svg", puppy)
    write(root, "animals/mammals/dogs/bulldog_puppy_gerald_g._01.svg", puppy)
    write(root, "food/fruit/pera_architetto_frances_01.svg",
          svg("Pera Architetto Francesco Rollandin", "Architetto Francesco Rollandin",
              ["fruit", "architetto francesco rollandin"], '<circle cx="10" cy="10" r="9" fill="green"/>',
              'width="20" height="20"'))
    write(root, "food/fruit/apple.svg", svg("Clipart by Nicu Buculei - pear", "Nicu Buculei", ["food", "fruit"]))
    write(root, "signs_and_symbols/flags/europe/ireland.svg", svg("ireland", "Caleb Moore", ["flag", "europe"]))
    write(root, "special/patterns/pattern-dots-1.svg", svg("dots pattern", "Alan Horkan", ["pattern"]))
    return root


def quietly(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the miniature has no broken file: no warning either
        return clipart_dataset(*args)


def by_concept(ds) -> dict[str, int]:
    return {c: i for i, c in enumerate(ds.concepts)}


def test_renders_captions_concepts_and_groups(library, tmp_path):
    ds = quietly(32, tmp_path / "cache", library)
    at = by_concept(ds)
    assert sorted(at) == ["apple", "dog", "ireland flag", "pear"]  # the puppy once, the pattern left out
    assert ds.skipped == 0 and ds.images.shape == (4, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert set(ds.styles) == {"clipart"}
    assert ds.groups[at["dog"]] == "animals" and ds.groups[at["ireland flag"]] == "signs_and_symbols"

    red = ds.images[at["dog"]]  # the 40x20 red box fitted into 90% of 32 px, centred, aspect kept
    drawn = ((red != 255).any(0)).nonzero()
    height, width = (drawn.max(0).values - drawn.min(0).values + 1).tolist()
    assert abs(width - 29) <= 1 and abs(height - 14) <= 1
    assert red[:, 16, 16].tolist() == [255, 0, 0] and red[:, 1, 1].tolist() == [255, 255, 255]

    dog = ds.captions[at["dog"]]
    assert "bulldog puppy" in dog and "a clip art drawing of a bulldog puppy" in dog and "a dog" in dog
    assert 0.3 < sum("clip art" in c for c in dog) / len(dog) < 0.7  # about half name the style
    assert "ireland flag" in ds.captions[at["ireland flag"]] and "an apple" in ds.captions[at["apple"]]
    assert "a pear" in ds.captions[at["pear"]]  # the Italian title's head noun, in English
    every = " ".join(ds.all_captions())
    for noise in ("gerald", "rollandin", "architetto", "francesco", "hash", "buculei", " by", "0x", "01"):
        assert noise not in every


def test_heldout_rewordings_are_never_training_captions(library, tmp_path):
    ds = quietly(32, tmp_path / "cache", library)
    training = set(ds.all_captions())
    assert all(ds.heldout) and not training & {c for cs in ds.heldout for c in cs}
    assert "a drawing of a bulldog puppy" in ds.heldout[by_concept(ds)["dog"]]


def test_broken_and_blank_files_are_skipped_and_counted(library, tmp_path):
    write(library, "food/not_xml.svg", "<svg this is not XML")
    write(library, "food/percent.svg", svg("Cake", "Somebody", ["food"], size='width="100%" height="100%"'))
    write(library, "food/blank.svg", svg("Bowl", "Somebody", ["food"], body=""))
    with pytest.warns(UserWarning, match=r"skipped 3 of 7 clip art files .* e\.g\. food/"):
        ds = clipart_dataset(32, tmp_path / "cache", library)
    assert ds.skipped == 3 and sorted(ds.concepts) == ["apple", "dog", "ireland flag", "pear"]
    assert clipart_dataset(32, tmp_path / "cache", library).skipped == 3  # recorded in the cache too


def test_missing_library_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-svg") as error:
        clipart_dataset(32, tmp_path / "cache", tmp_path / "no-such-folder")
    assert "\n" not in str(error.value)


def test_missing_cairosvg_names_the_package(library, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # makes `import cairosvg` raise ImportError
    with pytest.raises(ImportError, match="pip install cairosvg") as error:
        clipart_dataset(32, tmp_path / "cache", library)
    assert "\n" not in str(error.value)


def test_missing_libcairo_names_the_package(library, tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "cairosvg.py").write_text("raise OSError('no library called \"cairo-2\" was found')\n")
    monkeypatch.delitem(sys.modules, "cairosvg", raising=False)
    monkeypatch.syspath_prepend(str(fake))
    with pytest.raises(ImportError, match="apt-get install libcairo2"):
        clipart_dataset(32, tmp_path / "cache", library)


def test_cache_is_written_once_and_reused(library, tmp_path, monkeypatch):
    first = quietly(32, tmp_path / "cache", library)
    cache = tmp_path / "cache" / "clipart_32.safetensors"
    written = os.stat(cache).st_mtime_ns

    def never(*args):
        raise AssertionError("rendered again although the cache exists")
    monkeypatch.setattr(clipart, "render_svg", never)
    monkeypatch.setattr(clipart, "import_cairosvg", never)
    second = quietly(32, tmp_path / "cache", library)
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    assert os.stat(cache).st_mtime_ns == written
    monkeypatch.setattr(clipart, "LEFT_OUT_TITLES", {"ireland"})  # naming rules changed since the cache was written
    third = quietly(32, tmp_path / "cache", library)
    assert len(third) == len(first) - 1 and third.skipped == first.skipped + 1 and "ireland flag" not in third.concepts


@pytest.mark.parametrize("path, title, creator, names, concept", [
    ("animals/mammals/antilope_architetto_fran_01.svg", "Antilope", "Architetto Francesco Rollandin",
     ["antelope"], "antelope"),
    ("animals/mammals/dogs/beagle_copper_ganson.svg", "Copper the Beagle", "Gerald G.",
     ["copper the beagle", "dog"], "dog"),
    ("animals/mammals/contour_giraffe.svg", "Clipart by Nicu Buculei - contour_chipmunk", "Nicu Buculei",
     ["contour giraffe", "giraffe"], "giraffe"),
    ("food/fruit/apple_bw.svg", "Apple (B and W)", "Gerald G.", ["apple"], "apple"),
    ("animals/fish/bluewhale-md.svg", "", "", ["bluewhale"], "bluewhale"),
    ("people/clothing/hats/hat_-_clothing_nicu_bucu_01.svg", "hat - clothing", "Nicu Buculei", ["hat"], "hat"),
])
def test_names_drop_authors_and_file_name_noise(path, title, creator, names, concept):
    drawing = describe(path, {"title": title, "creator": creator, "keywords": []})
    assert drawing.names == names and drawing.concept == concept


def test_generated_stars_and_authors_only_names_are_left_out():
    assert describe("shapes/stars/star_05pt02step.svg", {"title": "gramastar", "creator": "x", "keywords": []}) is None
    assert describe("people/architetto_francesco_ro_01.svg", {"title": "Architetto Francesco Rollandin",
                    "creator": "Architetto Francesco Rollandin", "keywords": ["people"]}) is None
