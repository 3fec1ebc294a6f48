"""Training and sampling commands on a tiny image folder, on CPU, in seconds."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
from checkpoints import compact_history, load_checkpoint, load_weights, read_model_file, save_checkpoint
from guidance import DEFAULT_GUIDANCE
from models.text_encoder import TextCondition
from models.unet import ConditionalUNet, UNetConfig
from train_config import TrainConfig
from trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, batch_size=4, warmup_steps=2, precision="fp32",
                  device="cpu", sample_every=2, sample_prompts=("red square", "blue circle"))


def make_folder(root: Path) -> Path:
    """Two classes of 16x16 images: red squares and blue circles at random places."""
    rng = random.Random(0)
    for cls, color in [("red_square", (220, 30, 30)), ("blue_circle", (30, 30, 220))]:
        (root / cls).mkdir(parents=True)
        for k in range(6):
            img = Image.new("RGB", (16, 16), "white")
            x, y = rng.randint(0, 8), rng.randint(0, 8)
            from PIL import ImageDraw
            draw = ImageDraw.Draw(img)
            (draw.rectangle if cls == "red_square" else draw.ellipse)([x, y, x + 7, y + 7], fill=color)
            img.save(root / cls / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config(folder, cache_dir, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(data=str(folder), cache_dir=str(cache_dir), out_dir=str(out_dir), **{**TINY_MODEL, **overrides})


@pytest.fixture(scope="module")
def trained_run(folder, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(config(folder, cache_dir, out, epochs=2)).train()
    return out


def test_two_epoch_run_writes_checkpoints_plot_samples_and_gif(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"best.pt", "ema.safetensors", "loss.png", "samples_epoch0002.png", "samples_epoch0002.gif"} <= names
    ckpt = load_checkpoint(sorted(trained_run.glob("checkpoint_*.pt"))[-1])
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6  # 12 images / batch 4 = 3 steps per epoch
    assert ckpt["config"]["train"]["batch_size"] == 4 and ckpt["config"]["unet"]["base_channels"] == 16
    assert len(ckpt["history"]["val_loss"]) == 2 and all(map(torch.isfinite, map(torch.tensor, ckpt["history"]["loss"])))
    with Image.open(trained_run / "samples_epoch0002.gif") as gif:
        assert gif.n_frames == 26  # 25 denoising previews + the final grid
    shipped = load_weights(trained_run / "ema.safetensors")[1]["info"]["history"]  # the loss curve travels with the weights
    assert shipped["loss"] == pytest.approx(ckpt["history"]["loss"]) and shipped["val_loss"] == ckpt["history"]["val_loss"]


def test_compact_history_averages_the_training_loss_into_bins():
    history = {"step": list(range(1, 11)), "loss": [float(i) for i in range(1, 11)], "val_step": [5, 10], "val_loss": [1.0, 0.5]}
    small = compact_history(history, points=4)  # bins of 3: [1,2,3] [4,5,6] [7,8,9] [10]
    assert small == {"step": [3, 6, 9, 10], "loss": [2.0, 5.0, 8.0, 10.0], "val_step": [5, 10], "val_loss": [1.0, 0.5]}
    assert compact_history(history, points=400)["loss"] == history["loss"]


def weights(run_dir: Path) -> dict:
    return load_checkpoint(sorted(run_dir.glob("checkpoint_*.pt"))[-1])


def assert_same_training_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["history"]["loss"] == b["history"]["loss"]


def test_resume_after_one_epoch_equals_two_epochs_straight(folder, cache_dir, tmp_path):
    kw = dict(lr_decay="constant", sample_every=0)
    Trainer(config(folder, cache_dir, tmp_path / "straight", epochs=2, **kw)).train()
    Trainer(config(folder, cache_dir, tmp_path / "resumed", epochs=1, **kw)).train()
    Trainer(config(folder, cache_dir, tmp_path / "resumed", epochs=2, resume=True, **kw)).train()
    assert_same_training_state(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_resume_from_a_mid_epoch_stop_is_exact(folder, cache_dir, tmp_path):
    kw = dict(sample_every=0, epochs=2, dropout=0.1)  # cosine LR decay and dropout RNG both in play
    Trainer(config(folder, cache_dir, tmp_path / "straight", **kw)).train()
    Trainer(config(folder, cache_dir, tmp_path / "resumed", max_steps=4, **kw)).train()  # stops in epoch 2
    assert weights(tmp_path / "resumed")["batch_in_epoch"] == 1
    Trainer(config(folder, cache_dir, tmp_path / "resumed", resume=True, **kw)).train()
    assert_same_training_state(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_training_in_channels_last_matches_nchw_and_resumes_in_either_layout(folder, cache_dir, tmp_path, monkeypatch):
    # the layout is the CPU's choice (channels_last for bf16 with AMX): a checkpoint must resume on any machine
    import trainer as trainer_module
    kw = dict(lr_decay="constant", sample_every=0)
    Trainer(config(folder, cache_dir, tmp_path / "nchw", epochs=2, **kw)).train()
    monkeypatch.setattr(trainer_module, "training_memory_format", lambda device, dtype: torch.channels_last)
    first = Trainer(config(folder, cache_dir, tmp_path / "switched", epochs=1, **kw))
    for model in (first.model, first.ema.module):
        assert model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    first.train()
    monkeypatch.undo()
    resumed = Trainer(config(folder, cache_dir, tmp_path / "switched", epochs=2, resume=True, **kw))
    assert resumed.model.input_conv.weight.is_contiguous()
    for param, state in resumed.opt.state.items():
        assert state["exp_avg"].stride() == param.stride() and state["exp_avg_sq"].stride() == param.stride()
    resumed.train()
    a, b = weights(tmp_path / "nchw"), weights(tmp_path / "switched")
    # the same losses step by step (the resumed steps' too: AdamW's moments in the wrong layout change them), not
    # the same weights: Adam's first steps move every weight by about lr whatever its gradient's size, so where a
    # gradient is near zero the layouts' rounding decides the direction
    assert b["history"]["loss"] == pytest.approx(a["history"]["loss"], rel=1e-3)


def test_resume_with_a_different_model_is_refused(folder, cache_dir, tmp_path):
    Trainer(config(folder, cache_dir, tmp_path, epochs=1, sample_every=0)).train()
    with pytest.raises(ValueError, match="does not match"):
        Trainer(config(folder, cache_dir, tmp_path, epochs=2, resume=True, base_channels=32))


WRITER = """
import sys, torch
from checkpoints import save_checkpoint
path = sys.argv[1]
i = 0
while True:
    i += 1
    save_checkpoint({"i": i, "w": torch.full((4_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_init_from_warm_starts_from_a_model_file_and_refuses_another_architecture(trained_run, folder, cache_dir, tmp_path):
    weights = load_weights(trained_run / "ema.safetensors")[0]
    warm = Trainer(config(folder, cache_dir, tmp_path / "warm", init_from=str(trained_run / "ema.safetensors")))
    assert all(torch.equal(v, weights[k]) for k, v in warm.model.state_dict().items())
    assert warm.step == 0 and not warm.opt.state, "a fresh optimizer and schedule"
    with pytest.raises(ValueError, match=r"--init-from: .*base_channels: checkpoint 16, flags 8"):
        Trainer(config(folder, cache_dir, tmp_path / "other", base_channels=8, init_from=str(trained_run / "ema.safetensors")))
    with pytest.raises(ValueError, match=r"prediction: checkpoint 'eps', flags 'v'"):
        Trainer(config(folder, cache_dir, tmp_path / "v", prediction="v", init_from=str(trained_run / "ema.safetensors")))


def test_init_from_a_shallower_model_deepens_it_to_the_same_function(trained_run, folder, cache_dir, tmp_path):
    weights, saved, _ = read_model_file(trained_run / "ema.safetensors")
    shallow = ConditionalUNet(UNetConfig(**saved["unet"])).eval()
    shallow.load_state_dict(weights)
    deep = Trainer(config(folder, cache_dir, tmp_path / "deep", num_res_blocks=2,
                          init_from=str(trained_run / "ema.safetensors"))).model.eval()
    assert deep.cfg.num_res_blocks == 2 and deep.num_parameters() > shallow.num_parameters()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    cond = TextCondition(torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 384))
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, cond), shallow(x, t, cond), rtol=1e-5, atol=1e-5)


def test_init_from_refuses_a_shallower_model_of_other_widths_before_deepening_it(trained_run, folder, cache_dir,
                                                                                  tmp_path, monkeypatch):
    def fail(*args):
        raise AssertionError("deepened a model it then refuses")
    monkeypatch.setattr("warm_start.deepen", fail)
    with pytest.raises(ValueError, match=r"--init-from: .*base_channels: checkpoint 16, flags 8") as refused:
        Trainer(config(folder, cache_dir, tmp_path / "other", base_channels=8, num_res_blocks=2,
                       init_from=str(trained_run / "ema.safetensors")))
    assert "num_res_blocks" not in str(refused.value), "the depth may differ; only the widths are wrong"


def test_cond_noise_perturbs_real_tokens_by_the_asked_relative_size(folder, cache_dir, tmp_path):
    trainer = Trainer(config(folder, cache_dir, tmp_path, cond_noise=0.5))
    captions = ["red square", "a photo of a blue circle", "blue circle"]
    clean = trainer._condition(captions, torch.zeros(3, dtype=torch.bool))
    trainer.cfg.cond_noise = 0.0
    exact = trainer._condition(captions, torch.tensor([False, False, True]))
    trainer.cfg.cond_noise = 0.5
    mask = exact.mask[:2]
    delta = (clean.tokens - exact.tokens)[:2][mask]
    rel = delta.pow(2).mean(-1).sqrt() / exact.tokens[:2][mask].pow(2).mean(-1).sqrt()
    assert 0.4 < rel.mean().item() < 0.6, rel
    assert (clean.tokens[~clean.mask] == 0).all(), "padding stays zero"
    assert 0.4 < ((clean.pooled - exact.pooled)[:2].norm(dim=1) / exact.pooled[:2].norm(dim=1)).mean() < 0.6
    assert not exact.mask[2].any() and (exact.pooled[2] == 0).all(), "a dropped prompt stays the empty prompt"


def test_kill_during_checkpoint_writes_never_leaves_an_unreadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_00000001.pt"
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete write
        time.sleep(rng.uniform(0.0, 0.5))  # then kill at a random moment, usually mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)
        assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))
    assert [p.name for p in tmp_path.glob("checkpoint_*.pt")] == [path.name]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"i": 1}, path)

    def disk_full(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint({"i": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"i": 1} and list(tmp_path.iterdir()) == [path]


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated, corrupted"):
        load_checkpoint(bad)


def test_torchrun_two_cpu_processes_agree_on_weights(folder, cache_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "train.py", "--data", str(folder), "--cache-dir", str(cache_dir), "--out-dir", str(tmp_path),
           "--epochs", "2", "--image-size", "16", "--base-channels", "16", "--channel-mult", "1", "2",
           "--num-res-blocks", "1", "--attention-resolutions", "8", "--num-heads", "2", "--batch-size", "2",
           "--precision", "fp32", "--device", "cpu", "--sample-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranks agree on weights: True" in r.stdout + r.stderr
    ckpt = weights(tmp_path)
    assert ckpt["step"] == 6  # 12 images / (2 ranks x batch 2) = 3 steps per epoch


def test_sample_command_is_deterministic_and_writes_metadata(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square\nblue circle\n\nred square\n")
    for out in ("a", "b"):
        sample.main(["--checkpoint", str(trained_run), "--prompts-file", str(prompts), "--steps", "5",
                        "--seed", "7", "--out-dir", str(tmp_path / out), "--gif", "--device", "cpu"])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "grid.png", "process.gif"]
    for name in ("0000.png", "0001.png", "0002.png"):
        a, b = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "b" / name)
        assert a.size == (16, 16) and a.tobytes() == b.tobytes()
    meta = Image.open(tmp_path / "a" / "0001.png").text
    assert meta["prompt"] == "blue circle" and meta["seed"] == "7" and meta["sampler"] == "dpmpp_sde"
    assert meta["steps"] == "5" and meta["guidance"] == str(DEFAULT_GUIDANCE.scale)
    assert meta["checkpoint"].endswith("best.pt")
    with Image.open(tmp_path / "a" / "process.gif") as gif:
        assert gif.n_frames == 6
    sample.main(["--checkpoint", str(trained_run / "ema.safetensors"), "--prompt", "red square",
                    "--n", "2", "--steps", "5", "--seed", "8", "--out-dir", str(tmp_path / "c"), "--device", "cpu"])
    c0, c1 = (Image.open(tmp_path / "c" / f"000{i}.png").tobytes() for i in (0, 1))
    assert c0 != c1, "different images in one batch"
    sample.main(["--checkpoint", str(trained_run / "ema.safetensors"), "--prompt", "red square",
                    "--n", "2", "--steps", "5", "--seed", "9", "--out-dir", str(tmp_path / "d"), "--device", "cpu"])
    assert Image.open(tmp_path / "d" / "0000.png").tobytes() != c0, "a different seed gives different images"


def test_sample_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.main(["--checkpoint", str(tmp_path / "nope.pt"), "--prompt", "x"])


@pytest.mark.parametrize("flags, message", [
    (["--styled-captions", "1.5"], "--styled-captions must be in [0, 1], not 1.5"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), not 1.0"),
    (["--lr", "-0.001"], "--lr must be positive, not -0.001")])
def test_a_flag_out_of_its_range_is_a_usage_error_before_any_data_is_loaded(flags, message, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data", str(tmp_path / "never_read"), *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
