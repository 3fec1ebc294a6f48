"""The evaluation metrics against closed forms and known orderings; `evaluate.py` end to end."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from evaluate import main, parse_settings
from evaluation import (
    Bank,
    adherence,
    evaluate,
    jittered,
    markdown_table,
    named_style,
    nearest_training_images,
    set_scores,
    summary,
    vendi_score,
)
from image_features import RandomConvFeatures, features, frechet_distance
from pipeline import Pipeline
from sources.captions import STYLE_NAMES
from sources.emoji_font import emoji_dataset
from sources.images import CaptionedImages
from style_probe import StyleProbe
from tests.webserver import tiny_model


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # N(mu_a, diag(va)) vs N(mu_b, diag(vb)): |mu_a - mu_b|^2 + sum(va + vb - 2 sqrt(va vb))
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    a = mu_a + rng.standard_normal((200_000, 3)) * np.sqrt(va)
    b = mu_b + rng.standard_normal((200_000, 3)) * np.sqrt(vb)
    exact = ((mu_a - mu_b) ** 2).sum() + (va + vb - 2 * np.sqrt(va * vb)).sum()
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_nearest_images_and_adherence_on_known_retrievals():
    train = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    captions = [["black"], ["grey", "gray"], ["white"]]
    near = nearest_training_images(train + 0.01, train, k=2)
    assert near[:, 0].tolist() == [0, 1, 2]
    assert adherence(near, ["black", "gray", "white"], captions) == {"top1": 1.0, "top5": 1.0}
    wrong = adherence(near, ["white", "black", "grey"], captions)
    assert wrong["top1"] == 0.0 and wrong["top5"] == pytest.approx(1 / 3)  # grey's 2nd neighbour is black or white


@pytest.fixture(scope="module")
def emoji_data(emoji_dir):
    return emoji_dataset(32, emoji_dir)


@pytest.fixture(scope="module")
def emoji(emoji_data):
    return emoji_data.images.float() / 127.5 - 1, emoji_data.captions


def test_random_conv_distance_ranks_real_below_blurred_below_noise(emoji):
    images, _ = emoji
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    a, b = images[order[:600]], images[order[600:1200]]
    blurred = F.avg_pool2d(F.pad(b, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noisy = (b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    extractor = RandomConvFeatures()
    ref = features(extractor, a)
    fd = {name: frechet_distance(features(extractor, x), ref)
          for name, x in [("real", b), ("blurred", blurred), ("noisy", noisy), ("noise", torch.rand_like(b) * 2 - 1)]}
    assert fd["real"] < fd["blurred"] < fd["noise"] and fd["real"] < fd["noisy"] < fd["noise"], fd


class OraclePipe:
    """Draws the training image of the prompt (or of the next image, when `shift`): a perfect or a useless model."""

    def __init__(self, data, shift=0):
        images = data.images.float() / 127.5 - 1
        self.index = {c: i % len(images) for i, cs in enumerate(data.captions + data.heldout) for c in cs}
        self.images, self.shift, self.calls = images, shift, []

    def generate(self, prompts, sampler, steps, guidance, seed):
        self.calls.append((list(prompts), sampler, steps, seed))
        return self.images[[(self.index[p] + self.shift) % len(self.images) for p in prompts]]


def test_evaluate_scores_a_perfect_model_one_and_a_shifted_one_near_zero(emoji_data):
    perfect = OraclePipe(emoji_data)
    rows = evaluate(perfect, emoji_data, [("dpmpp", 7)], num_prompts=60, batch=25, images_per_prompt=2)
    real, model = rows
    assert (real.sampler, model.sampler, model.steps) == ("real", "dpmpp", 7)
    assert 0.75 < real.top1 < 1 and real.top1_16px > 0.8, "nudged real images: a ceiling that can fall short of 1"
    assert model.top1 > 0.95 and model.top5 > 0.95 and model.top1_16px > 0.9
    assert model.heldout_top1 > 0.95 and model.heldout_top1_16px > 0.9
    main_calls = perfect.calls[:5]  # 2 images for each of 60 prompts, 25 at a time, k-major
    assert [len(c[0]) for c in main_calls] == [25, 25, 25, 25, 20] and [c[3] for c in main_calls] == [0, 25, 50, 75, 100]
    asked = [p for c in main_calls for p in c[0]]
    assert asked[:60] == asked[60:], "round 0 holds every prompt once, as before there were k images"
    assert sum(len(c[0]) for c in perfect.calls[5:]) > 2 * 50, "held-out rewordings of most picked images"
    for c in model.concepts:  # one picture per concept: a copy of it is a hit, and k copies are 1 distinct image
        assert c.concept > 0.95 and c.heldout_concept > 0.95 and c.vendi == pytest.approx(1), c
        assert c.vendi_ratio == pytest.approx(1, abs=0.02) and math.isnan(c.pairs_concept), c
    shifted = evaluate(OraclePipe(emoji_data, shift=1), emoji_data, [("dpmpp", 7)], num_prompts=60, images_per_prompt=2)
    assert shifted[1].top1 < 0.1 and shifted[1].heldout_top1 < 0.1 and shifted[1].top1_16px < 0.1
    assert all(c.concept < 0.1 and c.heldout_concept < 0.1 for c in shifted[1].concepts)
    # the same images drawn for other prompts have the same statistics: only retrieval tells them apart
    assert shifted[1].fd == pytest.approx(model.fd, rel=0.5)
    table = markdown_table(rows, "FD")
    assert "| concept | held-out concept |" in table and "held-out pairs" not in table and "style hit" not in table


def test_vendi_score_matches_its_closed_forms():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, generator=rng)
    assert vendi_score(x.repeat(5, 1) * torch.arange(1.0, 6.0)[:, None]) == pytest.approx(1), "5 copies (at any scale)"
    assert vendi_score(torch.eye(6)[:4] * 3) == pytest.approx(4), "4 orthogonal items"
    assert vendi_score(torch.eye(3).repeat(2, 1)) == pytest.approx(3), "3 items twice each (more items than dimensions)"
    # two items at cosine c: eigenvalues of K/2 are (1 +- c) / 2
    pair = torch.tensor([[1.0, 0.0], [0.5, 0.75 ** 0.5]])
    assert vendi_score(pair) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_a_prompt_names_a_style_in_whole_words():
    assert named_style("an OpenMoji pizza") == "openmoji" and named_style("a dog, EMOJIONE style") == "emojione"
    assert named_style("a clip art drawing of a dog") == "clipart" and named_style("Noto red apple") == "noto"
    assert named_style("a notorious openmojis cat") is None and named_style("red apple") is None


# Toy data of 3 concepts in 2 styles at 16 px: clip art outlines (two drawings per concept) and filled Noto shapes
CONCEPTS = {"red apple": ("ellipse", (220, 30, 30)), "blue fish": ("rectangle", (30, 30, 220)),
            "green tree": ("ellipse", (30, 160, 30))}


def picture(concept: str, style: str, at: int) -> torch.Tensor:
    shape, colour = CONCEPTS[concept]
    img = Image.new("RGB", (16, 16), "white")
    filled = style == "noto"
    getattr(ImageDraw.Draw(img), shape)([at, at, at + 8, at + 8], fill=colour if filled else None, outline=colour,
                                        width=1 if filled else 2)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def toy_set(pictures: list[tuple[str, str, int]], name: str) -> CaptionedImages:
    named = {"noto": "Noto {}", "clipart": "a clip art drawing of a {}"}
    return CaptionedImages(torch.stack([picture(*p) for p in pictures]),
                           [[c, named[s].format(c)] for c, s, _ in pictures], name,
                           heldout=[[f"a drawing of a {c}", f"a {c} drawn in {STYLE_NAMES[s]} style"] for c, s, _ in pictures],
                           concepts=[c for c, _, _ in pictures], styles=[s for _, s, _ in pictures],
                           groups=["Food & Drink" if c == "red apple" else "Animals & Nature" for c, _, _ in pictures])


@pytest.fixture(scope="module")
def toy():
    """Training: two clip-art drawings of each concept, a Noto fish and tree; held out: the Noto apple."""
    train = toy_set([(c, "clipart", at) for c in CONCEPTS for at in (1, 7)]
                    + [("blue fish", "noto", 4), ("green tree", "noto", 4)], "toy")
    return train, toy_set([("red apple", "noto", 4)], "toy pairs")


@pytest.fixture(scope="module")
def bank(toy):
    return Bank(*toy, RandomConvFeatures())


def scores(bank, prompt, pictures):
    """Summary in each space of one prompt whose images are copies of bank pictures."""
    return {space: summary(s) for space, s in set_scores([prompt], bank.images[pictures], bank).items()}


def test_concept_adherence_counts_any_picture_of_the_concept(bank):
    apples, fish = bank.by_concept["red apple"], bank.by_concept["blue fish"]
    assert len(apples) == 3 and bank.styles[apples[2]] == "noto", "the held-out pairs' pictures are in the bank"
    prompt = bank.prompt("red apple", "red apple", "clipart")  # the caption of the first clip-art apple
    for s in scores(bank, prompt, [apples[1], apples[2], fish[0], apples[1]]).values():
        assert s["concept"] == 0.75 and math.isnan(s["style_hit"]), s


def test_coverage_is_one_for_the_real_pictures_and_falls_when_images_collapse(bank):
    apples, fish = bank.by_concept["red apple"], bank.by_concept["blue fish"]
    clip_art = bank.prompt("a clip art drawing of a red apple", "red apple", "clipart")
    assert clip_art.answers == apples[:2], "a prompt naming a style is answered by that style's pictures"
    assert bank.prompt("red apple", "red apple", "clipart").answers == apples[:2], "not by the never-trained Noto one"
    any_fish = bank.prompt("blue fish", "blue fish", "clipart")
    for prompt, every in [(clip_art, apples[:2]), (any_fish, fish)]:
        for s in scores(bank, prompt, every).values():
            assert s["coverage"] == 1 and s["vendi"] > 1.3 and s["vendi_ratio"] == pytest.approx(1), s
        for s in scores(bank, prompt, [every[0]] * len(every)).values():
            assert s["coverage"] == pytest.approx(1 / len(every)) and s["vendi"] == pytest.approx(1), s
            assert s["vendi_real"] > 1.3 and s["vendi_ratio"] < 0.8, s
    for s in scores(bank, clip_art, [apples[0], apples[2], fish[0]]).values():
        assert s["coverage"] == 0.5, "only pictures that answer the prompt are covered (not a Noto apple, nor a fish)"


def test_style_hit_is_the_share_of_correct_images_in_the_named_style(bank):
    fish, tree = bank.by_concept["blue fish"], bank.by_concept["green tree"]
    assert bank.styles[fish[2]] == bank.styles[tree[2]] == "noto"
    noto_fish = bank.prompt("Noto blue fish", "blue fish", "noto")
    assert noto_fish.style == "noto" and noto_fish.answers == [fish[2]]
    images = [fish[2], fish[2], fish[0], tree[2]]  # 3 fish, 2 of them Noto; and a Noto tree, no hit
    for space, s in scores(bank, noto_fish, images).items():
        assert s["concept"] == 0.75 and s["style_hit"] == pytest.approx(2 / 3), space
        unstyled = set_scores([bank.prompt("blue fish", "blue fish", "noto")], bank.images[images], bank)[space]
        both = summary(set_scores([noto_fish], bank.images[images], bank)[space] + unstyled)
        assert both["style_hit"] == pytest.approx(2 / 3) and both["concept"] == 0.75, "only prompts naming a style count"


def drawings(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` Noto-filled and `count` clip-art-outlined shapes at 16 px, each pair in a random colour and place."""
    g, images, styles = torch.Generator().manual_seed(seed), [], []
    for i in range(count):
        colour, at = tuple(torch.randint(0, 200, (3,), generator=g).tolist()), torch.randint(0, 8, (), generator=g).item()
        for style in ("noto", "clipart"):
            img = Image.new("RGB", (16, 16), "white")
            getattr(ImageDraw.Draw(img), ("ellipse", "rectangle")[i % 2])(
                [at, at, at + 8, at + 8], fill=colour if style == "noto" else None, outline=colour,
                width=1 if style == "noto" else 2)
            images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float().flatten() / 127.5 - 1)
            styles.append(style)
    return torch.stack(images), styles


def test_style_probe_tells_a_style_in_colours_and_places_it_was_not_fitted_on():
    probe = StyleProbe(*drawings(40, seed=0))
    new, truth = drawings(20, seed=1)
    assert sum(a == b for a, b in zip(probe(new), truth)) >= 0.9 * len(truth)
    assert StyleProbe(new[:3], ["noto"] * 3)(new) == ["noto"] * len(new), "one style: every image is in it"


def test_jittered_images_move_at_most_a_pixel_and_a_little_in_contrast_and_tint():
    flat = torch.full((64, 3, 8, 8), 0.5)
    out = jittered(flat)
    assert torch.equal(out, jittered(flat)) and not torch.equal(out, jittered(flat, seed=1)), "seeded"
    assert (out.amax((2, 3)) == out.amin((2, 3))).all(), "a flat image stays flat: a roll moves pixels, no more"
    assert out.min() >= 0.9 * 0.5 - 0.05 and out.max() <= 0.5 + 0.05 and out.std() > 0.01
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 4, 4] = 1
    peaks = [divmod(jittered(dot, seed).flatten().argmax().item(), 8) for seed in range(20)]
    assert all(abs(r - 4) <= 1 and abs(c - 4) <= 1 for r, c in peaks) and len(set(peaks)) > 1


def test_probe_style_hit_counts_the_correct_images_the_probe_puts_in_the_named_style(toy):
    bank = Bank(*toy, RandomConvFeatures())  # its own: the probe is replaced by one that knows the Noto pictures
    apples, fish = bank.by_concept["red apple"], bank.by_concept["blue fish"]
    noto = bank.vectors[bank.style_space][[apples[2], fish[2]]]
    bank.probe = lambda v: ["noto" if (noto - x).abs().amax(1).min() < 1e-4 else "clipart" for x in v]
    prompts = [bank.prompt("Noto red apple", "red apple", "noto"), bank.prompt("Noto blue fish", "blue fish", "noto")]
    images = bank.images[[apples[2], fish[0], apples[2], fish[2]]]  # k-major: apple, fish; then apple, fish
    for space, (apple, fish_scores) in set_scores(prompts, images, bank).items():
        assert apple["hits"] == fish_scores["hits"] == 2, space
        assert (apple["probe_style_hits"], fish_scores["probe_style_hits"]) == (2, 1), space
    wrong = bank.images[[fish[2], apples[0]]]  # a Noto fish for the apple: the probe's "noto" is no style hit
    for s in set_scores(prompts[:1], wrong, bank).values():
        assert summary(s)["concept"] == 0.5 and summary(s)["style_probe"] == 0, s


def test_evaluate_scores_concepts_styles_and_held_out_pairs_of_a_tiny_model(tmp_path, toy):
    train, pairs = toy
    pipe = Pipeline.load(tiny_model(tmp_path / "tiny.safetensors"), "cpu")
    real, model = evaluate(pipe, train, [("dpmpp", 2)], num_prompts=4, batch=16, images_per_prompt=2,
                           heldout_pairs_data=pairs)
    assert [c.space for c in real.concepts] == [c.space for c in model.concepts] == ["16px", "random conv"]
    for c in real.concepts:  # nudged pictures find themselves: the ceiling
        assert c.concept == 1 and c.pairs_concept == 1 and c.pairs_style_hit == 1, c
        assert 0 <= c.style_probe <= 1 and 0 <= c.pairs_style_probe <= 1, c
        assert 2 / 3 - 1e-9 <= c.coverage < 1, "2 distinct images for the 2 or 3 pictures of each concept"
    for c in model.concepts:
        shares = [c.concept, c.heldout_concept, c.clipart_concept, c.pairs_concept, c.coverage]
        assert all(0 <= x <= 1 for x in shares) and not math.isnan(c.clipart_concept), c
        assert all(math.isnan(x) or x >= 1 - 1e-9 for x in (c.vendi, c.vendi_real)), c
    assert model.seconds_per_image > 0
    table = markdown_table([real, model], "FD")
    assert "| clip-art held-out concept |" in table and "| held-out pairs style hit |" in table
    assert "| style hit, probe |" in table and "| held-out pairs style hit, probe |" in table


def test_settings_are_parsed_or_refused_clearly():
    assert parse_settings(["dpmpp:25", "ddpm:1000"]) == [("dpmpp", 25), ("ddpm", 1000)]
    for bad in ["dpmpp", "euler:10", "ddim:0", "ddim:x"]:
        with pytest.raises(SystemExit, match="not sampler:steps"):
            parse_settings([bad])


def test_evaluate_command_writes_its_table_with_the_command(tmp_path, capsys):
    from tests.test_training import make_folder
    folder = make_folder(tmp_path / "shapes")
    ckpt = tiny_model(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval.md"
    argv = ["--checkpoint", str(ckpt), "--data", str(folder), "--num-prompts", "4", "--images-per-prompt", "2",
            "--settings", "dpmpp:2", "ddim:3", "--out", str(out), "--device", "cpu"]
    main(argv)
    text = out.read_text()
    assert text.startswith("`python evaluate.py --checkpoint") and "4 prompts of shapes (2 images each" in text
    images, concepts = ([line for line in block.splitlines() if line.startswith("| ")]
                        for block in text.split("\n\n")[2:4])
    assert [line.split("|")[1:3] for line in images[1:]] == [[" real ", " - "], [" dpmpp ", " 2 "], [" ddim ", " 3 "]]
    assert [line.split("|")[1:4] for line in concepts[1::2]] == [[" real ", " - ", " 16px "], [" dpmpp ", " 2 ", " 16px "],
                                                                [" ddim ", " 3 ", " 16px "]]
    assert "| random conv |" in concepts[2] and "Vendi" in concepts[0] and "style hit" not in concepts[0]
    assert "FD (random conv)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--num-prompts must be from 1 to 6"):
        main(argv[:4] + ["--num-prompts", "7"])
    with pytest.raises(SystemExit, match="--images-per-prompt must be at least 1"):
        main(argv[:6] + ["--images-per-prompt", "0"])
