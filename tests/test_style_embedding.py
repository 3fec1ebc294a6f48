"""The style embedding: a learned vector per style name, added to the time embedding where a prompt names it."""
import pytest
import torch
from PIL import Image, ImageDraw

from diffusion import GaussianDiffusion
from models.growth import add_style_embedding
from models.text_encoder import (
    TextCondition,
    collate,
    concat_conditions,
    interpolate_conditions,
    null_condition,
    style_weights,
)
from models.unet import ConditionalUNet, UNetConfig
from pipeline import ModelFileError, Pipeline, unet_config
from tests.test_growth import trained_like
from train_config import TrainConfig
from trainer import Trainer

WORDS = ("Noto", "OpenMoji", "EmojiOne", "clip art")
SMALL = UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                   num_heads=2)


def random_condition(prompts, words=WORDS, seed=0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(4, 384, generator=g), torch.randn(384, generator=g)) for _ in prompts]
    return collate(pairs).with_style(prompts, words)


def test_style_weights_mark_the_style_words_a_prompt_names_as_whole_words_in_any_case():
    weights = style_weights(["an OpenMoji pizza", "a dog", "a cat, clip art", "NOTO heart", "a notorious clipart"], WORDS)
    assert weights.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert style_weights(["a dog"], ()).shape == (1, 0)
    cond = random_condition(["a dog"])
    assert cond.with_style(["a dog"], ()) is cond, "a model without style words gets no style weights"


def test_conditions_with_style_weights_concatenate_index_and_interpolate():
    styled, plain = random_condition(["an OpenMoji dog", "a Noto cat"]), null_condition(2)
    both = concat_conditions([styled, plain])
    assert both.style.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], "no style: zeros"
    assert concat_conditions([plain, plain]).style is None
    assert both.index([1]).style.tolist() == [[1, 0, 0, 0]] and both.to("cpu").style.shape == (4, 4)
    frames = interpolate_conditions(styled.index([0]), styled.index([1]), [0, 0.25, 1])
    torch.testing.assert_close(frames.style, torch.tensor([[0, 1, 0, 0], [0.25, 0.75, 0, 0], [1, 0, 0, 0.]]))


def test_a_new_style_embedding_is_zero_and_a_trained_one_moves_only_the_rows_naming_a_style():
    cfg = UNetConfig(**{**SMALL.to_dict(), "style_words": WORDS})
    fresh = ConditionalUNet(cfg)
    assert fresh.style_embed.weight.shape == (4 * 16, 4) and not fresh.style_embed.weight.any()
    model = trained_like(cfg)
    prompts = ["an OpenMoji dog", "a dog", "a dog, clip art"]
    cond = random_condition(prompts)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900])
    with torch.no_grad():
        styled, unstyled = model(x, t, cond), model(x, t, cond._replace(style=None))
    differs = (styled - unstyled).abs().amax((1, 2, 3))
    assert differs[0] > 1e-3 and differs[2] > 1e-3 and differs[1] == 0, differs


def test_adding_a_style_embedding_to_a_trained_model_keeps_its_function():
    old = trained_like(SMALL)
    weights, cfg = add_style_embedding(old.state_dict(), SMALL, WORDS)
    assert cfg.style_words == WORDS
    new = ConditionalUNet(cfg).eval()
    new.load_state_dict(weights)  # strict: every key, the style embedding's included
    cond = random_condition(["an OpenMoji dog", "a Noto cat", "a cat"])
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900])
    with torch.no_grad():
        torch.testing.assert_close(new(x, t, cond), old(x, t, cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has a style embedding"):
        add_style_embedding(weights, cfg, WORDS)


@pytest.mark.parametrize("words, problem", [("OpenMoji", "style_words"), (["Noto", "Noto"], "different names"),
                                            ([["a"]], "style_words"), ([""], "1 to 40 characters")])
def test_a_model_file_with_bad_style_words_is_refused_with_a_clear_error(words, problem):
    with pytest.raises(ModelFileError, match=problem):
        unet_config({**SMALL.to_dict(), "style_words": words}, "model.safetensors")
    assert unet_config({**SMALL.to_dict(), "style_words": list(WORDS)}, "m").style_words == WORDS


def test_the_pipeline_conditions_prompts_and_negative_prompts_on_the_styles_they_name():
    model = trained_like(UNetConfig(**{**SMALL.to_dict(), "style_words": WORDS}))
    encoder = lambda prompts: random_condition(prompts, words=())
    pipe = Pipeline(model, GaussianDiffusion.from_name("cosine", 1000), encoder)
    assert pipe.condition(["a dog, OpenMoji style", "a dog"]).style.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    draw = lambda prompt, negative="": pipe.generate([prompt], "ddim", 4, 3.0, seed=1, negative_prompts=negative)
    assert not torch.equal(draw("a dog, OpenMoji style"), draw("a dog, EmojiOne style"))
    assert not torch.equal(draw("a dog", "EmojiOne"), draw("a dog", "Noto")), "negative prompts' styles count too"


# --- training ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def styled_folder(tmp_path_factory):
    """Two classes whose names name a style: their captions are "openmoji red square" and "noto blue circle"."""
    root = tmp_path_factory.mktemp("styled") / "shapes"
    for cls, color in [("openmoji_red_square", (220, 30, 30)), ("noto_blue_circle", (30, 30, 220))]:
        (root / cls).mkdir(parents=True)
        for k in range(4):
            img = Image.new("RGB", (16, 16), "white")
            (ImageDraw.Draw(img).rectangle if "square" in cls else ImageDraw.Draw(img).ellipse)(
                [k, k, k + 7, k + 7], fill=color)
            img.save(root / cls / f"{k}.png")
    return root


def styled_config(folder, tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(data=str(folder), cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                       image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_heads=2, batch_size=4, warmup_steps=1, precision="fp32",
                       device="cpu", sample_every=0, **overrides)


@pytest.fixture
def folder_of_styles(monkeypatch):
    """The folder counts as a mix of Noto and OpenMoji pictures (as "noto+openmoji" would)."""
    monkeypatch.setattr("trainer.dataset_styles", lambda spec: ["noto", "openmoji"])


def test_training_conditions_on_the_style_a_caption_names_and_learns_its_embedding(styled_folder, tmp_path,
                                                                                   folder_of_styles):
    trainer = Trainer(styled_config(styled_folder, tmp_path, style_embedding=True, lr=1e-2))
    assert trainer.model.cfg.style_words == ("Noto", "OpenMoji")
    cond = trainer._condition(["openmoji red square", "noto blue circle", "noto blue circle"],
                              torch.tensor([False, False, True]))
    assert cond.style.tolist() == [[0, 1], [1, 0], [0, 0]], "a dropped caption is the empty prompt: no style"
    with torch.no_grad():  # trained weights (none zero), so that the style embedding gets a gradient
        for name, p in trainer.model.named_parameters():
            if name != "style_embed.weight":
                p.normal_(std=0.2)
    images, captions = next(iter(trainer.loader))
    assert trainer.train_step(images, captions) is not None
    assert trainer.model.style_embed.weight.abs().sum(0).gt(0).all(), "both styles' embeddings learn"


@pytest.mark.parametrize("flag, value", [("style_embedding", True), ("styled_captions", 0.5)])
def test_style_flags_need_data_of_several_styles(styled_folder, tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} needs data of several styles"):
        Trainer(styled_config(styled_folder, tmp_path, **{flag: value}))


def test_styled_captions_sets_the_share_the_training_data_draws(styled_folder, tmp_path, folder_of_styles):
    assert Trainer(styled_config(styled_folder, tmp_path, styled_captions=0.75)).data.styled_share == 0.75


def test_init_from_a_model_without_style_embedding_adds_it_at_zero(styled_folder, tmp_path, folder_of_styles):
    plain = Trainer(styled_config(styled_folder, tmp_path / "plain", epochs=1))
    plain.train()
    warm = Trainer(styled_config(styled_folder, tmp_path / "warm", style_embedding=True, epochs=1,
                                 init_from=str(tmp_path / "plain" / "run" / "ema.safetensors")))
    old, new = plain.ema.module.eval(), warm.model.eval()
    assert not new.style_embed.weight.any() and old.style_embed is None
    cond = random_condition(["openmoji red square", "noto blue circle"], words=("Noto", "OpenMoji"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(new(x, t, cond), old(x, t, cond), rtol=0, atol=0)
    warm.train()
    shipped = Pipeline.load(tmp_path / "warm" / "run" / "ema.safetensors", "cpu", encoder=lambda prompts: None)
    assert shipped.model.cfg.style_words == ("Noto", "OpenMoji") and shipped.model.style_embed.weight.any()
    with pytest.raises(ValueError, match=r"style_words: checkpoint \('Noto', 'OpenMoji'\), flags \(\)"):
        Trainer(styled_config(styled_folder, tmp_path / "back", init_from=str(tmp_path / "warm" / "run" / "ema.safetensors")))
