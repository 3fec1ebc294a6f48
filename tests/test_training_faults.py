"""Training under faults: stop signals, kills at random moments, non-finite losses, bad checkpoints, a full disk."""
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoints import load_checkpoint, save_checkpoint, step_checkpoints
from diffusion import GaussianDiffusion
from tests.test_training import ROOT, TINY_MODEL, assert_same_training_state, config, make_folder
from tests.waits import wait_for
from trainer import Interrupted, Trainer, TrainingStopped

# one thread: the same floating-point results in every process, and no spinning threads on a shared CPU
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def newest(run_dir: Path) -> dict:
    return load_checkpoint(step_checkpoints(run_dir)[-1])


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --- SIGINT / SIGTERM --------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(folder, cache_dir, tmp_path,
                                                                              monkeypatch, signum):
    trainer = Trainer(config(folder, cache_dir, tmp_path, epochs=3, sample_every=0))  # 3 steps per epoch
    step, handler_before = trainer.train_step, signal.getsignal(signum)

    def step_then_signal(*args):
        loss = step(*args)
        if trainer.step == 4:  # mid-epoch, where no checkpoint is due
            os.kill(os.getpid(), signum)
        return loss
    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    with pytest.raises(Interrupted) as stopped:
        trainer.train()
    assert stopped.value.code == 128 + signum
    ckpt = newest(tmp_path)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (4, 1, 1)
    assert signal.getsignal(signum) is handler_before  # the process's own handling is back


def test_a_second_stop_signal_stops_at_once(folder, cache_dir, tmp_path, monkeypatch):
    trainer = Trainer(config(folder, cache_dir, tmp_path, epochs=2, sample_every=0))
    step = trainer.train_step

    def impatient(*args):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return step(*args)
    monkeypatch.setattr(trainer, "train_step", impatient)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not step_checkpoints(tmp_path)  # stopped before the first step finished: nothing to save


# --- non-finite losses -------------------------------------------------------------------------------

def poison_losses(monkeypatch, bad_calls: set[int] | None = None, bad_from: int | None = None) -> list:
    """Make the training loss NaN on the given training calls (counted from 1; validation is not counted)."""
    calls, loss = [], GaussianDiffusion.training_loss

    def training_loss(self, *args, **kwargs):
        out = loss(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            n = len(calls)
            if n in (bad_calls or ()) or (bad_from is not None and n >= bad_from):
                return out * float("nan")
        return out
    monkeypatch.setattr(GaussianDiffusion, "training_loss", training_loss)
    return calls


def test_non_finite_losses_are_skipped_and_counted(folder, cache_dir, tmp_path, monkeypatch):
    calls = poison_losses(monkeypatch, bad_calls={2, 3, 5})
    trainer = Trainer(config(folder, cache_dir, tmp_path, epochs=2, sample_every=0, max_bad_steps=3))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    ckpt = newest(tmp_path)
    assert len(calls) == 6 and ckpt["skipped_steps"] == 3 and ckpt["step"] == 3  # 6 batches, 3 applied
    assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])
    assert all(map(torch.isfinite, map(torch.tensor, ckpt["history"]["loss"]))) and len(ckpt["history"]["loss"]) == 3
    assert any(not torch.equal(before[k], v) for k, v in ckpt["model"].items())  # the good steps did train


def test_consecutive_non_finite_losses_stop_training_and_keep_the_last_good_checkpoint(folder, cache_dir, tmp_path,
                                                                                        monkeypatch):
    poison_losses(monkeypatch, bad_from=5)
    trainer = Trainer(config(folder, cache_dir, tmp_path, epochs=5, sample_every=0, max_bad_steps=3,
                             save_every_steps=1, keep_last=10))
    with pytest.raises(TrainingStopped, match=r"not finite .* for 3 steps in a row .* step 4, the last good one") as stop:
        trainer.train()
    assert "checkpoint_00000004.pt, holds them" in str(stop.value)
    ckpt = newest(tmp_path)
    assert step_checkpoints(tmp_path)[-1].name == "checkpoint_00000004.pt" and all_finite(ckpt["model"])
    for name, value in trainer.model.state_dict().items():  # the skipped steps did not touch the weights
        assert torch.equal(value, ckpt["model"][name]), name


# --- unusable checkpoints ----------------------------------------------------------------------------

@pytest.fixture
def two_epoch_run(folder, cache_dir, tmp_path):
    Trainer(config(folder, cache_dir, tmp_path, epochs=2, sample_every=0)).train()  # checkpoints at steps 3 and 6
    return tmp_path


def test_truncated_newest_checkpoint_is_named_and_fallback_resumes_from_the_one_before(folder, cache_dir, two_epoch_run):
    path = two_epoch_run / "checkpoint_00000006.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"(?s)checkpoint_00000006\.pt is truncated.*--resume-fallback"):
        Trainer(config(folder, cache_dir, two_epoch_run, epochs=3, sample_every=0, resume=True))
    trainer = Trainer(config(folder, cache_dir, two_epoch_run, epochs=3, sample_every=0, resume=True,
                             resume_fallback=True))
    assert trainer.step == 3
    trainer.train()
    assert newest(two_epoch_run)["step"] == 9


def test_incomplete_checkpoint_and_mismatched_settings_are_clear_errors(folder, cache_dir, two_epoch_run):
    save_checkpoint({"model": {}}, two_epoch_run / "checkpoint_00000007.pt")
    with pytest.raises(ValueError, match=r"not a complete training checkpoint \(missing: config, ema, optimizer"):
        Trainer(config(folder, cache_dir, two_epoch_run, epochs=3, resume=True))
    (two_epoch_run / "checkpoint_00000007.pt").unlink()
    with pytest.raises(ValueError, match=r"does not match the flags \(lr: checkpoint 0.0002, flags 0.001; "
                                         r"schedule: checkpoint 'cosine', flags 'linear'\)"):
        Trainer(config(folder, cache_dir, two_epoch_run, epochs=3, resume=True, lr=1e-3, schedule="linear"))
    Trainer(config(folder, cache_dir, two_epoch_run, epochs=3, resume=True, keep_last=5))  # harmless changes are fine


# --- a full disk ------------------------------------------------------------------------------------

def train_cli(folder, cache_dir, out_dir, *extra: str) -> list[str]:
    sizes = {"image_size": "--image-size", "base_channels": "--base-channels", "num_res_blocks": "--num-res-blocks",
             "num_heads": "--num-heads", "warmup_steps": "--warmup-steps", "precision": "--precision", "device": "--device"}
    args = [sys.executable, "train.py", "--data", str(folder), "--cache-dir", str(cache_dir),
            "--out-dir", str(out_dir), "--channel-mult", "1", "2", "--attention-resolutions", "8", "--sample-every", "0"]
    for key, flag in sizes.items():
        args += [flag, str(TINY_MODEL[key])]
    return args + list(extra)


def limit_file_size(max_bytes: int):
    """For a child process: writes past max_bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def test_full_disk_during_a_checkpoint_stops_with_a_clear_message_and_keeps_the_previous_one(folder, cache_dir,
                                                                                             two_epoch_run):
    previous = (two_epoch_run / "checkpoint_00000006.pt").read_bytes()
    cmd = train_cli(folder, cache_dir, two_epoch_run, "--epochs", "3", "--batch-size", "4", "--resume")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
                       preexec_fn=limit_file_size(200_000))  # the tiny model's checkpoints are ~1.5 MB
    assert r.returncode == 1, r.stderr[-3000:]
    assert "training stopped at step 9: could not write" in r.stderr and "is the disk full?" in r.stderr
    assert "Traceback" not in r.stderr
    assert (two_epoch_run / "checkpoint_00000006.pt").read_bytes() == previous
    assert [p.name for p in step_checkpoints(two_epoch_run)] == ["checkpoint_00000003.pt", "checkpoint_00000006.pt"]
    assert not list(two_epoch_run.glob(".*.tmp"))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)  # space again
    assert r.returncode == 0, r.stderr[-3000:]
    assert newest(two_epoch_run)["step"] == 9


# --- kills at random moments -------------------------------------------------------------------------

CHAOS_SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGKILL]


def newest_step(run_dir: Path) -> int:
    """Step of the newest checkpoint, loaded in full: a torn file fails here."""
    for path in reversed(step_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)["step"]
        except FileNotFoundError:  # pruned by the running trainer between the listing and the load
            continue
    return 0


@pytest.mark.slow
def test_training_killed_at_random_moments_loses_nothing_after_resume(folder, cache_dir, tmp_path):
    """SIGKILL (no chance to clean up), SIGTERM and SIGINT at random moments of a real training process, then
    --resume each time: the final weights must equal those of an uninterrupted run, bit for bit."""
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 10 ** 6))
    rng = random.Random(seed)
    args = ["--epochs", "6", "--batch-size", "2", "--save-every-steps", "1", "--keep-last", "2"]  # 36 steps
    straight = subprocess.run(train_cli(folder, cache_dir, tmp_path / "straight", *args), cwd=ROOT, env=SUBPROCESS_ENV,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "chaos"
    log = []
    for attempt, signum in enumerate(CHAOS_SIGNALS):
        before = newest_step(run)
        cmd = train_cli(folder, cache_dir, run, *args, *(["--resume"] if before else []))
        out = open(tmp_path / f"attempt{attempt}.log", "w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=SUBPROCESS_ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            if signum == signal.SIGKILL and rng.random() < 0.3:  # sometimes while it starts or loads the checkpoint
                time.sleep(rng.uniform(0, 4))
            else:  # otherwise once it trains, at a random moment (often mid-write: it checkpoints every step)
                wait_for(lambda: newest_step(run) > before or proc.poll() is not None, 120, "a new checkpoint")
                time.sleep(rng.uniform(0, 1.0))
            proc.send_signal(signum)
            rc = proc.wait(timeout=60)
        finally:
            proc.kill()
            out.seek(0)
            text = out.read()
            out.close()
        after = newest_step(run)
        assert after >= before, f"seed {seed}: a checkpoint was lost ({before} -> {after})"
        if signum != signal.SIGKILL and rc != 0:  # a clean stop at the step it was on, unless it had finished
            assert rc == 128 + signum and f"interrupted by {signum.name} at step {after}," in text, text[-2000:]
            assert "Traceback" not in text, text[-2000:]
        log.append(f"{signum.name}: checkpoint step {before} -> {after}, exit {rc}")
    final = subprocess.run(train_cli(folder, cache_dir, run, *args, "--resume"), cwd=ROOT, env=SUBPROCESS_ENV,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"chaos seed {seed}:", *log, sep="\n  ")
    assert_same_training_state(newest(tmp_path / "straight"), newest(run))
    assert not list(run.glob(".*.tmp")), "temp files of killed writes are cleaned up"
