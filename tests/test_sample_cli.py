"""`python sample.py` with a negative prompt, an init image (image-to-image) and a mask (inpainting), end to end on
a tiny random model; every bad input is one line."""
import subprocess
import sys

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import sample
from pipeline import Pipeline
from sources.images import load_image
from tests.webserver import REPO, tiny_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 40x40 red disc on white, a mask of the same size (white right half: redraw), and bad inputs."""
    root = tmp_path_factory.mktemp("pictures")
    disc = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(disc).ellipse([5, 5, 35, 35], fill=(220, 30, 30))
    disc.save(root / "disc.png")
    mask = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(mask).rectangle([20, 0, 39, 39], fill=255)
    mask.save(root / "mask.png")
    Image.new("L", (30, 30), 0).save(root / "small_mask.png")
    (root / "notes.png").write_text("not a picture")
    (root / "cut.png").write_bytes((root / "disc.png").read_bytes()[:120])  # a header, then nothing
    return root


@pytest.fixture
def run(model_file, text_encoder, monkeypatch, tmp_path):
    """sample.main on the tiny model, sharing the session's text encoder; returns the output folder."""
    load = Pipeline.load
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: load(*a, **{**k, "encoder": text_encoder}))

    def main(*flags, out="out"):
        sample.main(["--checkpoint", str(model_file), "--prompt", "red apple", "--n", "2", "--steps", "5",
                     "--device", "cpu", "--out-dir", str(tmp_path / out), *flags])
        return tmp_path / out
    return main


def pixels(path) -> torch.Tensor:
    with Image.open(path) as img:
        return TF.pil_to_tensor(img.convert("RGB")).long()


def test_image_to_image_writes_its_settings_into_the_pngs(run, pictures):
    out = run("--init-image", str(pictures / "disc.png"), "--strength", "0.5", "--negative-prompt", "blue circle",
              "--seed", "3", "--gif")
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png", "process.gif"]
    meta = Image.open(out / "0001.png").text
    assert meta["init_image"] == str(pictures / "disc.png") and meta["strength"] == "0.5"
    assert meta["negative_prompt"] == "blue circle" and meta["seed"] == "3" and meta["image_seed"] == "4"
    assert "mask" not in meta
    plain = run("--seed", "3", out="plain")
    assert "init_image" not in Image.open(plain / "0001.png").text
    init = load_image(pictures / "disc.png", 16, grayscale=False)
    for name in ("0000.png", "0001.png"):
        edited = pixels(out / name)
        assert (edited - init).abs().float().mean() < (pixels(plain / name) - init).abs().float().mean()


def test_strength_zero_returns_the_init_image_at_the_models_size(run, pictures):
    out = run("--init-image", str(pictures / "disc.png"), "--strength", "0")
    assert torch.equal(pixels(out / "0000.png"), load_image(pictures / "disc.png", 16, grayscale=False).long())
    assert Image.open(out / "0000.png").text["steps"] == "0"


def test_inpainting_keeps_the_black_part_of_the_mask_pixel_for_pixel(run, pictures):
    out = run("--init-image", str(pictures / "disc.png"), "--mask", str(pictures / "mask.png"), "--resample", "2")
    init = load_image(pictures / "disc.png", 16, grayscale=False).long()
    keep = (load_image(pictures / "mask.png", 16, grayscale=True) < 128).expand(3, -1, -1)
    assert keep[:, :, :7].all() and not keep[:, :, 9:].any()
    for name in ("0000.png", "0001.png"):
        drawn = pixels(out / name)
        assert torch.equal(drawn[keep], init[keep]) and (drawn[~keep] - init[~keep]).abs().float().mean() > 5
    meta = Image.open(out / "0000.png").text
    assert meta["mask"] == str(pictures / "mask.png") and meta["resample"] == "2" and meta["strength"] == "1.0"


def test_any_image_is_redrawn_alone_from_its_image_seed(run):
    batch = run("--n", "3", "--seed", "5", out="batch")
    alone = run("--n", "1", "--seed", Image.open(batch / "0002.png").text["image_seed"], out="alone")
    assert (pixels(alone / "0000.png") - pixels(batch / "0002.png")).abs().max() <= 1  # bf16/fp32 rounding at most


def test_the_guidance_interval_and_cads_change_the_images_and_are_written_into_the_pngs(run):
    plain = run("--seed", "3", "--guidance", "3", out="plain")
    varied = run("--seed", "3", "--guidance", "3", "--guidance-interval", "0.2", "0.8", "--cads", "0.6", "0.9", out="varied")
    meta = Image.open(varied / "0000.png").text
    assert meta["guidance"] == "3.0" and meta["guidance_details"] == "guidance 3 in t/T 0.2-0.8, CADS 0.6-0.9 (s 0.25)"
    assert "guidance_details" not in Image.open(plain / "0000.png").text
    assert (pixels(varied / "0000.png") - pixels(plain / "0000.png")).abs().max() > 10
    again = run("--seed", "3", "--guidance", "3", "--guidance-interval", "0.2", "0.8", "--cads", "0.6", "0.9", out="again")
    assert torch.equal(pixels(again / "0001.png"), pixels(varied / "0001.png"))  # CADS's noise is seeded too


BAD = [
    (["--init-image", "{p}/missing.png"], "cannot read --init-image {p}/missing.png: No such file or directory"),
    (["--init-image", "{p}"], "cannot read --init-image {p}: Is a directory"),
    (["--init-image", "{p}/notes.png"], "cannot read --init-image {p}/notes.png: not an image Pillow can read"),
    (["--init-image", "{p}/disc.png", "--mask", "{p}/notes.png"], "cannot read --mask {p}/notes.png: not an image"),
    (["--init-image", "{p}/disc.png", "--mask", "{p}/small_mask.png"],
     "--mask is 30x30 pixels but --init-image is 40x40"),
    (["--init-image", "{p}/disc.png", "--strength", "1.5"], "--strength must be between 0 and 1, got 1.5"),
    (["--init-image", "{p}/disc.png", "--strength", "-0.2"], "--strength must be between 0 and 1, got -0.2"),
    (["--init-image", "{p}/disc.png", "--strength", "nan"], "--strength must be between 0 and 1, got nan"),
    (["--init-image", "{p}/disc.png", "--mask", "{p}/mask.png", "--resample", "0"], "--resample must be 1 or more"),
    (["--mask", "{p}/mask.png"], "--strength and --mask need --init-image"),
    (["--strength", "0.5"], "--strength and --mask need --init-image"),
    (["--init-image", "{p}/cut.png"], "cannot read --init-image {p}/cut.png: "),  # found only when decoded
    (["--guidance-interval", "0.8", "0.2"], "guidance interval must be 0 <= low <= high <= 1 (of t/T), got (0.8, 0.2)"),
    (["--cads", "0.9", "0.6"], "condition annealing needs 0 <= tau1 < tau2 <= 1 (of t/T), got (0.9, 0.6)"),
    (["--cads", "0.6", "0.9", "--cads-noise", "-1"], "condition noise must be >= 0, got -1.0"),
]


@pytest.mark.parametrize("flags,message", BAD)
def test_bad_edit_inputs_are_one_line_errors(run, pictures, flags, message):
    with pytest.raises(SystemExit) as error:
        run(*(f.format(p=pictures) for f in flags))
    text = str(error.value.code)
    assert text.startswith("error: " + message.format(p=pictures)) and "\n" not in text, text


def test_a_bad_init_image_exits_with_status_1_and_one_line(model_file, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(model_file), "--prompt", "x",
                        "--init-image", str(tmp_path / "missing.png")], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: cannot read --init-image {tmp_path / 'missing.png'}: "
                                             "No such file or directory"]
