import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import models.text_encoder
import sources.emoji_font
from preprocess import dataset_styles, embed_captions, load_dataset
from sources.captions import styled, with_style
from sources.emoji_font import build_emoji, emoji_dataset
from sources.image_folder import image_folder
from sources.images import CaptionedImages
from sources.tiny_imagenet import tiny_imagenet

WNIDS = {"n01443537": "goldfish, Carassius auratus", "n02123045": "tabby, tabby cat", "n07747607": "orange"}
COLOURS = {"n01443537": (230, 120, 20), "n02123045": (120, 120, 120), "n07747607": (250, 160, 0)}


def save(path, size=(16, 16), colour=(200, 30, 30), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, fmt)
    return path


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A miniature tiny-imagenet-200 in the real layout: 3 classes x 3 train images, 4 val images."""
    root = tmp_path_factory.mktemp("ti") / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    extra = {"n00001740": "entity", "n02124075": "Egyptian cat", "n04067472": "reel"}
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in sorted({**WNIDS, **extra}.items())))
    for w, colour in COLOURS.items():
        for k in range(3):
            save(root / "train" / w / "images" / f"{w}_{k}.JPEG", (64, 64), colour, fmt="JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    save(root / "train" / "n02123045" / "images" / "n02123045_0.JPEG", (64, 64), 90, mode="L", fmt="JPEG")
    val = ["n01443537", "n07747607", "n07747607", "n02123045"]
    for k in range(len(val)):
        save(root / "val" / "images" / f"val_{k}.JPEG", (64, 64), COLOURS[val[k]], fmt="JPEG")
    (root / "val" / "val_annotations.txt").write_text("".join(f"val_{k}.JPEG\t{w}\t0\t32\t44\t62\n" for k, w in enumerate(val)))
    return root


def test_tiny_imagenet_splits_shapes_and_range(tiny_root):
    train, val = tiny_imagenet(tiny_root, "train"), tiny_imagenet(tiny_root, "val")
    assert (len(train), len(val)) == (9, 4) and train.skipped == val.skipped == 0
    assert train.images.shape == (9, 3, 64, 64) and (train.channels, train.image_size) == (3, 64)
    image, caption = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert -1 <= image.min() and image.max() <= 1 and isinstance(caption, str)
    assert tiny_imagenet(tiny_root, "val", image_size=32)[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        tiny_imagenet(tiny_root, "test")


def test_tiny_imagenet_captions_come_from_words_txt(tiny_root):
    val = tiny_imagenet(tiny_root, "val")
    goldfish, orange = val.captions[0], val.captions[1]
    assert goldfish[0] == "goldfish" and set(goldfish) == {
        f"{t}{name}" for name in ("goldfish", "Carassius auratus") for t in ("", "a ")} | {
        f"a {t}photo of a {name}" for name in ("goldfish", "Carassius auratus") for t in ("", "close-up ")}
    assert "an orange" in orange and "a photo of an orange" in orange
    assert val.heldout[0] == ["a drawing of a goldfish", "goldfish symbol"], "held-out rewordings of the first name"
    assert not set(val.heldout[0]) & set(goldfish)
    captions = set(tiny_imagenet(tiny_root).all_captions())
    assert "a tabby cat" in captions and not any("entity" in c or "Egyptian" in c for c in captions)


def test_tiny_imagenet_grayscale_jpeg_becomes_rgb(tiny_root):
    train = tiny_imagenet(tiny_root)
    gray = train.images[3]  # n02123045_0, saved as a one-channel JPEG
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert abs(gray.float().mean() - 90) < 3


def test_load_dataset_finds_tiny_imagenet_in_its_folder_or_the_parent(tiny_root):
    for spec in (tiny_root, tiny_root.parent, str(tiny_root)):
        data = load_dataset(spec, split="val")
        assert data.name == "tiny-imagenet" and len(data) == 4 and data.image_size == 64
    assert load_dataset(tiny_root, 32, grayscale=True).images.shape == (9, 1, 32, 32)


# --- image folders --------------------------------------------------------------------------------

def test_image_folder_captions_class_names_jsonl_and_sidecars(tmp_path):
    save(tmp_path / "red_apple" / "a.png")
    save(tmp_path / "red_apple" / "b.PNG")
    save(tmp_path / "sea-lion" / "c.jpg", fmt="JPEG")
    save(tmp_path / "sea-lion" / "d.bmp")
    (tmp_path / "sea-lion" / "d.txt").write_text("a sea lion on a rock\n\na wet sea lion\n")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "red_apple/b.PNG", "caption": "a shiny apple"}) + "\n"
                                             + json.dumps({"file": "sea-lion/c.jpg", "captions": ["one", "two"]}) + "\n")
    data = image_folder(tmp_path)
    apple = ["red apple", "a red apple", "a photo of a red apple", "a close-up photo of a red apple"]
    assert data.captions == [apple, ["a shiny apple"], ["one", "two"], ["a sea lion on a rock", "a wet sea lion"]]
    assert data.name == tmp_path.name and data.images.shape == (4, 3, 32, 32)
    assert data.all_captions() == sorted({*apple, "a shiny apple", "one", "two", "a sea lion on a rock", "a wet sea lion"})
    assert data.heldout[0] == ["a drawing of a red apple", "red apple symbol"]


def test_image_folder_grayscale_28px(tmp_path):
    for digit in range(3):
        for k in range(2):
            save(tmp_path / str(digit) / f"{k}.png", (28, 28), 40 * digit + k, mode="L")
    data = load_dataset(tmp_path, image_size=28, grayscale=True)
    assert data.images.shape == (6, 1, 28, 28) and data.channels == 1 and data.image_size == 28
    image, caption = data[2]
    assert image.shape == (1, 28, 28) and caption.endswith("1")
    assert data.images[2].unique().tolist() == [40]  # no resampling at the native size


def test_image_folder_resizes_with_a_centre_crop(tmp_path):
    img = Image.new("RGB", (90, 30), "red")
    img.paste((0, 200, 0), (30, 0, 60, 30))  # green middle third: all that survives the centre crop
    img.paste((0, 0, 255), (60, 0, 90, 30))
    (tmp_path / "stripes").mkdir()
    img.save(tmp_path / "stripes" / "wide.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "stripes" / "transparent.png")
    data = image_folder(tmp_path, image_size=16)
    assert data.images.shape == (2, 3, 16, 16)
    transparent, wide = data.images
    assert (transparent == 255).all(), "transparent pixels become white, not black"
    assert wide[1].float().mean() > 190 and wide[0].float().mean() < 10 and wide[2].float().mean() < 10


def test_unreadable_files_are_skipped_and_counted(tmp_path, monkeypatch):
    for k in range(3):
        save(tmp_path / "cat" / f"good{k}.png")
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "cat" / "text.jpg").write_text("not an image at all")
    (tmp_path / "cat" / "noise.webp").write_bytes(bytes(range(256)) * 4)
    jpeg = save(tmp_path / "dog" / "truncated.jpg", (64, 64), fmt="JPEG").read_bytes()
    (tmp_path / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    save(tmp_path / "dog" / "bomb.png", (200, 200))
    save(tmp_path / "dog" / "fine.gif", colour=(0, 0, 255))
    (tmp_path / "dog" / "notes.md").write_text("not an image extension: ignored, not counted")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # Pillow refuses images over twice this
    with pytest.warns(UserWarning, match="skipped 5 of 9 files"):
        data = image_folder(tmp_path)
    assert data.skipped == 5 and len(data) == 4 and [c[0] for c in data.captions] == ["cat"] * 3 + ["dog"]
    assert data.images[-1, 2].float().mean() > 250


def test_folder_of_only_broken_files_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 image files could be read"):
        image_folder(tmp_path)


def test_wrong_paths_and_empty_folders_show_the_expected_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "loose.png").touch()  # images must sit in class sub-folders
    with pytest.raises(ValueError) as empty:
        load_dataset(tmp_path)
    for error in (missing, empty):
        message = str(error.value)
        assert "<class_name>/<image>" in message and "wnids.txt" in message and "emoji" in message
    with pytest.raises(ValueError, match="only a 'train' split"):
        load_dataset(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match="'noto', 'openmoji', 'emojione', 'clipart', 'mix'|neither a source"):
        load_dataset("emoji+nothing")


def test_jsonl_errors_name_the_line(tmp_path):
    save(tmp_path / "cat" / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "cat/a.png", "caption": "ok"}\n{"file": "cat/a.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: expected"):
        image_folder(tmp_path)


# --- caption choice --------------------------------------------------------------------------------

def test_caption_choice_is_uniform_and_reproducible_under_manual_seed():
    data = CaptionedImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [["a", "b", "c"], ["only"]], "toy")
    draw = lambda: [data[0][1] for _ in range(300)]
    torch.manual_seed(0)
    first = draw()
    torch.manual_seed(0)
    assert draw() == first and data[1][1] == "only"
    assert all(80 < first.count(c) < 120 for c in "abc")
    assert data[0][0].eq(-1).all()


def test_favour_styled_draws_captions_that_name_the_pictures_style_at_the_asked_share():
    captions = [["a dog", "OpenMoji dog", "a dog, openmoji style", "dog icon"], ["a cat"], ["Notorious cat", "a Noto cat"]]
    data = CaptionedImages(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), captions, "toy",
                           styles=["openmoji", "openmoji", "noto"])
    data.favour_styled(0.75)
    torch.manual_seed(0)
    draws = [data[0][1] for _ in range(800)]
    assert 540 < sum(c in captions[0][1:3] for c in draws) < 660, "3/4 name the style"
    assert {c for c in draws if c in captions[0][1:3]} == set(captions[0][1:3]), "uniform within each kind"
    assert data[1][1] == "a cat", "a picture without a caption naming its style keeps its captions"
    assert 255 < [data[2][1] for _ in range(400)].count("a Noto cat") < 345, "'Notorious' does not name Noto"
    data.favour_styled(1.0)
    assert all(data[0][1] in captions[0][1:3] for _ in range(100))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], not -0.5"):
        data.favour_styled(-0.5)


# --- emoji ----------------------------------------------------------------------------------------

def test_emoji_set_renders_named_glyphs_on_white(emoji_dir):
    data = emoji_dataset(32, emoji_dir)
    assert 1700 <= len(data) <= 2100 and data.images.shape[1:] == (3, 32, 32) and data.name == "emoji"
    apple = data.images[next(i for i, c in enumerate(data.captions) if c[0] == "red apple")].float()
    assert "apple" in data.captions[[c[0] for c in data.captions].index("red apple")]  # alias kept
    red = (apple[0] > 150) & (apple[1] < 100) & (apple[2] < 100)
    assert red.float().mean() > 0.3, "the red apple is mostly red"
    assert (data.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]] == 255).all(), "corners are white background"
    assert "tropical fish" in data.all_captions()
    assert not any("skin tone" in c for c in data.all_captions())


def test_emoji_captions_cover_cldr_names_keywords_and_templates_and_hold_out_rewordings(emoji_dir):
    data = emoji_dataset(32, emoji_dir)
    apple = data.captions[[c[0] for c in data.captions].index("red apple")]
    assert {"red apple", "a red apple", "an emoji of a red apple", "red apple icon", "a red apple, fruit"} <= set(apple)
    assert not {"fruit", "red", "a red apple, red"} & set(apple), "bare keywords, and keywords of the name, are not captions"
    dog = data.heldout[[c[0] for c in data.captions].index("dog")]
    assert {"a drawing of a dog", "a pet dog"} <= set(dog)
    training = set(data.all_captions())
    assert not training & {c for h in data.heldout for c in h}, "held-out rewordings are never training captions"
    assert sum(bool(h) for h in data.heldout) > 0.95 * len(data) and len(training) > 5 * len(data)


def test_emoji_cache_lists_its_glyphs_sorted_and_is_reused(emoji_dir, monkeypatch):
    with safe_open(emoji_dir / "emoji_32.safetensors", "pt") as f:
        chars = json.loads(f.metadata()["emoji"])
    assert chars == sorted(chars) and "\N{RED APPLE}" in chars and "\N{TROPICAL FISH}" in chars
    assert not any(chr(c) in e for e in chars for c in range(0x1F3FB, 0x1F400)), "no skin-tone variants"
    monkeypatch.setattr(sources.emoji_font, "build_emoji", lambda *a: pytest.fail("cache not reused"))
    assert len(load_dataset("emoji", 32, cache_dir=emoji_dir)) == len(chars)
    assert load_dataset("emoji", 32, grayscale=True, cache_dir=emoji_dir).images.shape[1] == 1
    with pytest.raises(ValueError, match="has a 'train' and a 'heldout_pairs' split, not 'val'"):
        load_dataset("emoji", split="val", cache_dir=emoji_dir)


def test_missing_emoji_font_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        build_emoji(32, tmp_path, font_path=tmp_path / "missing.ttf")


# --- caption embeddings ----------------------------------------------------------------------------

def test_embed_captions_caches_and_only_loads_the_encoder_for_new_captions(tmp_path, monkeypatch, text_encoder):
    created = []
    monkeypatch.setattr(models.text_encoder, "TextEncoder", lambda: created.append(1) or text_encoder)
    cache = tmp_path / "captions.safetensors"
    captions = ["a red apple", "tropical fish", "a red apple", ""]
    first = embed_captions(captions, cache, chunk_size=2)
    assert len(created) == 1 and cache.exists() and set(first) == set(captions)
    tokens, pooled = first["tropical fish"]
    assert tokens.dtype == pooled.dtype == torch.float32 and tokens.shape[1] == 384 and pooled.shape == (384,)
    assert first[""][0].shape == (0, 384)
    expected = text_encoder.encode_each(["tropical fish"])[0]
    torch.testing.assert_close(tokens, expected[0])
    torch.testing.assert_close(pooled, expected[1])

    again = embed_captions(captions[:2], cache)  # everything cached: no encoder
    assert len(created) == 1 and all(torch.equal(again[c][0], first[c][0]) for c in again)
    grown = embed_captions(["a green apple", "tropical fish"], cache)
    assert len(created) == 2 and grown["a green apple"][0].shape[1] == 384
    embed_captions(["a green apple", "a red apple"], cache)
    assert len(created) == 2, "the grown cache kept old and new captions"


# --- the style a prompt asks for ---------------------------------------------------------------------

@pytest.mark.parametrize("prompt, style, expected", [
    ("a dog", "openmoji", "a dog, OpenMoji style"),
    ("a dog, OpenMoji style", "clipart", "a dog, clip art"),
    ("a dog, clip art  ", "noto", "a dog, Noto style"),
    ("a dog, emojione STYLE", None, "a dog"),
    ("a dog", None, "a dog"),
    ("an OpenMoji dog", "emojione", "an OpenMoji dog, EmojiOne style"),  # only the words at the end are the choice's
])
def test_with_style_ends_the_prompt_in_the_styles_words_as_training_captions_do(prompt, style, expected):
    assert with_style(prompt, style) == expected
    if style:
        words = with_style(prompt, style).removeprefix(with_style(prompt, None))
        assert any(c.endswith(words) for c in styled(["dog"], style))  # as a training caption ends


def test_a_style_choice_is_offered_for_mixes_of_styles_only():
    assert dataset_styles("mix") == ["noto", "openmoji", "emojione", "clipart"]
    assert dataset_styles("noto+clipart") == ["noto", "clipart"]
    assert dataset_styles("emoji") == [] and dataset_styles("noto") == []  # one style: nothing to choose
    assert dataset_styles("/no/such/folder") == [] and dataset_styles("") == []
