"""`python showcase.py` redraws the showcase from a model file alone (plus its data set)."""
import numpy as np
from PIL import Image, ImageSequence

from plot_func import save_gif
from showcase import main, slug
from tests.test_training import make_folder
from tests.webserver import tiny_model


def test_slug_makes_prompts_safe_file_names():
    assert slug("Red apple!") == "red_apple" and slug("../../etc/passwd") == "etc_passwd" and slug("???") == "prompt"


def test_a_gif_keeps_every_frame_its_colours_and_its_timing(tmp_path):
    rng = np.random.default_rng(0)  # frames of thousands of colours, as previews have: each needs its own palette
    frames = [Image.fromarray(np.kron(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                                      np.ones((8, 8, 1), dtype=np.uint8))) for _ in range(5)]
    save_gif(frames, tmp_path / "a.gif", frame_ms=80, hold_last_ms=1500)
    with Image.open(tmp_path / "a.gif") as gif:
        read = [(np.asarray(f.convert("RGB"), dtype=float), f.info["duration"]) for f in ImageSequence.Iterator(gif)]
    assert [ms for _, ms in read] == [80, 80, 80, 80, 1500]
    for frame, (back, _) in zip(frames, read):
        assert np.abs(back - np.asarray(frame, dtype=float)).mean() < 12  # 256 colours of 576: close, not exact


def test_showcase_writes_every_figure_from_the_model_file(tmp_path):
    history = {"step": [10, 20, 30], "loss": [0.9, 0.5, 0.3], "val_step": [15, 30], "val_loss": [0.8, 0.4]}
    ckpt = tiny_model(tmp_path / "tiny.safetensors", history=history)
    folder = make_folder(tmp_path / "shapes")
    out = tmp_path / "show"
    main(["--checkpoint", str(ckpt), "--data", str(folder), "--out-dir", str(out), "--prompts", "red square",
          "blue circle", "--n", "3", "--steps", "4", "--device", "cpu"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["blue_circle_generation.gif", "final_blue_circle.png", "final_red_square.png",
                     "forward_diffusion.png", "loss.png", "red_square_generation.gif"]
    final = Image.open(out / "final_red_square.png")
    assert final.text["prompt"] == "red square" and final.text["steps"] == "4"
    assert final.width > 3 * final.height - 20  # one row of 3 images
    gif = Image.open(out / "red_square_generation.gif")
    assert gif.n_frames == 5  # a preview per step, then the final frame


def test_showcase_without_a_saved_history_skips_only_the_loss_curve(tmp_path):
    ckpt = tiny_model(tmp_path / "tiny.safetensors")
    folder = make_folder(tmp_path / "shapes")
    main(["--checkpoint", str(ckpt), "--data", str(folder), "--out-dir", str(tmp_path / "show"),
          "--prompts", "red square", "--n", "1", "--steps", "2", "--device", "cpu"])
    assert not (tmp_path / "show" / "loss.png").exists() and (tmp_path / "show" / "forward_diffusion.png").exists()


def test_a_model_of_several_styles_gets_a_row_per_style_and_its_held_out_pairs(tmp_path):
    ckpt = tiny_model(tmp_path / "tiny.safetensors", dataset="openmoji+clipart")
    out = tmp_path / "show"
    main(["--checkpoint", str(ckpt), "--data", str(make_folder(tmp_path / "shapes")), "--out-dir", str(out),
          "--prompts", "sun", "--n", "3", "--steps", "2", "--device", "cpu"])
    styles = Image.open(out / "styles_a_dog.png")
    assert styles.text["rows"] == "a dog, OpenMoji style | a dog, clip art" and styles.text["seeds"] == "0 to 2"
    assert abs(styles.width / styles.height - 3 / 2) < 0.1  # 2 rows (styles) of 3 seeds
    pairs = Image.open(out / "heldout_pairs.png")
    assert pairs.text["rows"] == "an OpenMoji pizza | an OpenMoji red apple"  # EmojiOne is not among its styles
    assert (out / "styles_an_apple.png").exists()
