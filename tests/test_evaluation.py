"""The evaluation metrics against closed forms and known orderings; `evaluate.py` end to end."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluate import main, parse_settings
from evaluation import RandomConvFeatures, adherence, evaluate, features, frechet_distance, nearest_training_images
from preprocess import emoji_dataset
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
        self.calls.append((len(prompts), sampler, steps, seed))
        return self.images[[(self.index[p] + self.shift) % len(self.images) for p in prompts]]


def test_evaluate_scores_a_perfect_model_one_and_a_shifted_one_near_zero(emoji_data):
    perfect = OraclePipe(emoji_data)
    rows = evaluate(perfect, emoji_data, [("dpmpp", 7)], num_prompts=60, batch=25)
    real, model = rows
    assert (real.sampler, model.sampler, model.steps) == ("real", "dpmpp", 7)
    assert 0.75 < real.top1 < 1 and real.top1_16px > 0.8, "nudged real images: a ceiling that can fall short of 1"
    assert model.top1 > 0.95 and model.top5 > 0.95 and model.top1_16px > 0.9
    assert model.heldout_top1 > 0.95 and model.heldout_top1_16px > 0.9
    assert [c[0] for c in perfect.calls[:3]] == [25, 25, 10] and [c[3] for c in perfect.calls[:3]] == [0, 25, 50]
    assert sum(c[0] for c in perfect.calls[3:]) > 50, "held-out rewordings of most picked images"
    shifted = evaluate(OraclePipe(emoji_data, shift=1), emoji_data, [("dpmpp", 7)], num_prompts=60)
    assert shifted[1].top1 < 0.1 and shifted[1].heldout_top1 < 0.1 and shifted[1].top1_16px < 0.1
    # the same images drawn for other prompts have the same statistics: only retrieval tells them apart
    assert shifted[1].fd == pytest.approx(model.fd, rel=0.5)


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
    argv = ["--checkpoint", str(ckpt), "--data", str(folder), "--num-prompts", "4",
            "--settings", "dpmpp:2", "ddim:3", "--out", str(out), "--device", "cpu"]
    main(argv)
    text = out.read_text()
    assert text.startswith("`python evaluate.py --checkpoint") and "4 prompts of shapes" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1:3] for line in lines[1:]] == [[" real ", " - "], [" dpmpp ", " 2 "], [" ddim ", " 3 "]]
    assert "FD (random conv)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--num-prompts must be from 1 to 6"):
        main(argv[:4] + ["--num-prompts", "7"])
