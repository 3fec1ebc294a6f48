"""Checkpoints: atomic writes, safe loading (weights_only / safetensors), run-folder bookkeeping."""
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_GLOB = "checkpoint_*.pt"
TEMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint or weights file could not be written (disk full, quota, permissions); the old one is intact."""


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as error:  # torch.save reports a full disk as RuntimeError, safetensors as its own errors
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise CheckpointWriteError(f"could not write {path} ({type(error).__name__}: {error}); is the disk full? "
                                   f"{kept}") from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(folder) -> None:
    """Delete temp files that a process killed mid-write left behind (`.<name>.<random>.tmp`)."""
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}") if Path(folder).is_dir() else []:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state: dict, path) -> None:
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path) -> dict:
    """Load a training checkpoint without executing pickled code (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:  # garbage, not a pickle
            raise ValueError(f"checkpoint {path} is truncated, corrupted or not a checkpoint of this project: {e}") from e
        # weights_only met a callable it will not build: it was never called
        raise ValueError(f"refused to load {path}: it holds pickled Python objects other than tensors and plain "
                         f"data (it names {found.group(1)}), which could run code. Checkpoints of this project "
                         "never do; nothing from the file was run.") from e
    except Exception as e:
        raise ValueError(f"checkpoint {path} is truncated, corrupted or not a checkpoint of this project: {e}") from e


def save_weights(state_dict: dict, metadata: dict, path) -> None:
    """Model weights as safetensors; `metadata` (config, training info) stored as JSON strings."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return load_file(str(path)), meta
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"weights file {path} is truncated or not a safetensors file: {e}") from e


def step_checkpoints(run_dir) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    return sorted(Path(run_dir).glob(CHECKPOINT_GLOB))


def resolve_checkpoint(path) -> Path:
    """A checkpoint file as given, or for a run folder its best, else latest, checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "best.pt").is_file():
            return path / "best.pt"
        found = step_checkpoints(path)
        if found:
            return found[-1]
        raise FileNotFoundError(f"no checkpoint in {path}: expected best.pt or {CHECKPOINT_GLOB} there")
    raise FileNotFoundError(f"checkpoint {path} does not exist (give a .pt/.safetensors file or a training run folder)")


def prune_checkpoints(run_dir, keep: int) -> None:
    for old in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink()


CHECKPOINT_KEYS = ("config", "model", "ema", "optimizer", "scaler", "lr_scheduler", "epoch", "step",
                   "batch_in_epoch", "history", "best_val", "rng")


def read_training_checkpoint(path: Path) -> dict:
    """load_checkpoint, plus a clear error if the file lacks what resuming needs."""
    ckpt = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a complete training checkpoint (missing: {', '.join(missing)})")
    return ckpt


def compact_history(history: dict, points: int = 400) -> dict:
    """The loss history with the training loss averaged into at most `points` bins: small enough to travel
    in the weights file's metadata, so the shipped model's loss curve can be redrawn without its run folder."""
    steps, loss = history["step"], history["loss"]
    k = max(1, -(-len(loss) // points))
    bins = range(0, len(loss), k)
    return {"step": [steps[min(i + k, len(loss)) - 1] for i in bins],
            "loss": [sum(loss[i:i + k]) / len(loss[i:i + k]) for i in bins],
            "val_step": list(history["val_step"]), "val_loss": list(history["val_loss"])}


def read_model_file(path) -> tuple[dict, dict, dict]:
    """(EMA weights, config, info) of a training checkpoint (.pt), a run folder or a .safetensors file."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        weights, meta = load_weights(path)
        config, info = meta.get("config"), meta.get("info", {})
    else:
        ckpt = load_checkpoint(path)
        config, info = ckpt.get("config"), ckpt.get("info", {})
        weights = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    if not config or "unet" not in config:
        raise ValueError(f"{path} holds no model config; is it a checkpoint of this project?")
    return weights, config, info
