"""The shipped default model: loads by default, is small, safe to load, and draws what it is asked for."""

from evaluation import adherence, nearest_training_images
from pipeline import DEFAULT_MODEL, Pipeline
from samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from sources.emoji_font import emoji_dataset


def test_default_model_is_a_small_safetensors_file_that_loads_without_a_flag(text_encoder):
    assert DEFAULT_MODEL.suffix == ".safetensors" and DEFAULT_MODEL.stat().st_size < 40e6
    pipe = Pipeline.load(device="cpu", encoder=text_encoder)
    assert pipe.info["dataset"] == "emoji" and pipe.model.cfg.image_size == 32 and pipe.info["steps"] > 0
    # trained: an untrained network (zero output) has a noise-prediction loss of 1.0
    assert max(pipe.info["history"]["val_loss"][-3:]) < 0.05


def test_default_model_draws_the_prompted_emoji(text_encoder, emoji_dir):
    pipe = Pipeline.load(device="cpu", encoder=text_encoder)
    data = emoji_dataset(32, emoji_dir)
    prompts = [p for p in ["red apple", "rocket", "tropical fish", "grinning face"] for _ in range(2)]
    reworded = [p for p in ["a crimson apple", "a red heart", "the face of a dog", "a slice of pizza"] for _ in range(2)]
    images = pipe.generate(prompts + reworded, DEFAULT_SAMPLER, DEFAULT_STEPS, 3.0, seed=0).float()
    near = nearest_training_images(images, data.images.float() / 127.5 - 1, k=5)
    top5 = adherence(near[:8], prompts, data.captions)["top5"]
    # top-5 retrieval of the prompted glyph; a model ignoring the prompt hits about 5 / 1,900 per image
    assert top5 * len(prompts) >= 6, top5
    names = ["red apple"] * 2 + ["red heart"] * 2 + ["dog face"] * 2 + ["pizza"] * 2  # the emoji meant
    assert adherence(near[8:], names, data.captions)["top5"] * len(names) >= 4, "rewordings draw the emoji meant"
