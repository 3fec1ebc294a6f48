"""Checkpoints: atomic writes, safe loading (weights_only / safetensors), run-folder bookkeeping."""
import errno
import json
import math
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_GLOB = "checkpoint_*.pt"
TEMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint or weights file could not be written (disk full, quota, permissions); the old one is intact."""


MAX_WEIGHT_BYTES = 4_000_000_000  # a model file's tensors, at most: 1e9 float32 parameters (pipeline.MAX_PARAMETERS)


class ModelFileError(ValueError):
    """A model file that cannot be used: one line naming the file and what is wrong with it."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """No model file at the path given (also a FileNotFoundError, for callers that catch that)."""


def error_line(error: Exception, limit: int = 300) -> str:
    """An exception as one short line: the type and the first `limit` characters of its message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


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
        # torch words it "Unsupported global: GLOBAL os.system" or "unsupported GLOBAL posix.system whose module ..."
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        if not found:  # garbage, not a pickle; torch's own advice (weights_only=False) is not repeated
            reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
            raise ModelFileError(f"checkpoint {path} is truncated, corrupted or not a checkpoint of this project "
                                 f"({' '.join(reason.group(1).split())[:200] if reason else error_line(e)})") from e
        # weights_only met a callable it will not build: it was never called
        raise ModelFileError(f"refused to load {path}: it holds pickled Python objects other than tensors and plain "
                             f"data (it names {found.group(1)}), which could run code. Checkpoints of this project "
                             "never do; nothing from the file was run.") from e
    except OSError as e:
        raise ModelFileError(f"cannot read checkpoint {path}: {e.strerror or error_line(e)}") from e
    except Exception as e:
        raise ModelFileError(f"checkpoint {path} is truncated, corrupted or not a checkpoint of this project "
                             f"({error_line(e)})") from e


def save_weights(state_dict: dict, metadata: dict, path) -> None:
    """Model weights as safetensors; `metadata` (config, training info) stored as JSON strings."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


# safetensors dtype -> (torch's name for it, bytes per element)
SAFETENSORS_DTYPES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": ("float8_e4m3fn", 1),
                      "F8_E5M2": ("float8_e5m2", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
                      "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
                      "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8)}


def weights_header(path) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """({tensor name: (dtype as torch names it, shape)}, metadata with its JSON values decoded) of a safetensors
    file, from its header alone (no tensor is read); ModelFileError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices, raw = {k: f.get_slice(k) for k in f.keys()}, f.metadata() or {}
            header = {k: (SAFETENSORS_DTYPES.get(t.get_dtype(), (t.get_dtype(), 8))[0], tuple(t.get_shape()))
                      for k, t in slices.items()}
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModelFileError(f"cannot read weights file {path}: {e.strerror or error_line(e)}") from e
    except Exception as e:  # safetensors reports forged headers, bad offsets and unknown dtypes as its own errors
        raise ModelFileError(f"weights file {path} is truncated or not a safetensors file ({error_line(e)})") from e
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (ValueError, RecursionError) as e:  # also a number too long to convert, or arrays nested too deep
            raise ModelFileError(f"weights file {path}: its metadata entry {key!r} is not valid JSON ({error_line(e, 80)})") from e
    return header, meta


def declared_bytes(header: dict[str, tuple[str, tuple]]) -> int:
    """Bytes the tensors of a weights_header declare."""
    sizes = dict(SAFETENSORS_DTYPES.values())
    return sum(math.prod(shape) * sizes.get(dtype, 8) for dtype, shape in header.values())


def read_tensors(path, header: dict) -> dict:
    """The tensors of a safetensors file whose weights_header is `header`; refused before any is read if the
    header declares more than MAX_WEIGHT_BYTES."""
    size = declared_bytes(header)
    if size > MAX_WEIGHT_BYTES:
        raise ModelFileError(f"weights file {path} declares {size / 1e9:,.1f} GB of tensors; refused before "
                             f"reading any, the limit is {MAX_WEIGHT_BYTES / 1e9:.0f} GB")
    try:
        return load_file(str(path))
    except OSError as e:
        raise ModelFileError(f"cannot read weights file {path}: {e.strerror or error_line(e)}") from e
    except Exception as e:  # data that does not match a header that parsed
        raise ModelFileError(f"weights file {path} is truncated or not a safetensors file ({error_line(e)})") from e


def load_weights(path) -> tuple[dict, dict]:
    """(tensors, metadata with its JSON values decoded) of a safetensors file; ModelFileError if it is not one, or
    if its header declares more than MAX_WEIGHT_BYTES (refused before any tensor is read)."""
    header, meta = weights_header(path)
    return read_tensors(path, header), meta


def step_checkpoints(run_dir) -> list[Path]:
    """The run's step checkpoints, oldest first (files only: a folder of that name is no checkpoint)."""
    return sorted(p for p in Path(run_dir).glob(CHECKPOINT_GLOB) if p.is_file())


def resolve_checkpoint(path) -> Path:
    """A checkpoint file as given, or for a run folder its best, else latest, checkpoint.
    ModelFileNotFoundError if there is none; ModelFileError for a symlink loop or something not a file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModelFileError(f"checkpoint {path} is a symlink loop (following its links leads back to "
                                 "itself); point it at a real file") from None
        if path.is_symlink():
            raise ModelFileNotFoundError(f"checkpoint {path} is a symlink to {os.readlink(path)}, which does not "
                                         "exist") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ModelFileNotFoundError(f"checkpoint {path} does not exist (give a .pt/.safetensors file or a "
                                         "training run folder)") from None
        raise ModelFileError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        if (path / "best.pt").is_file():
            return path / "best.pt"
        found = step_checkpoints(path)
        if found:
            return found[-1]
        raise ModelFileNotFoundError(f"no checkpoint in {path}: expected best.pt or {CHECKPOINT_GLOB} there")
    raise ModelFileError(f"checkpoint {path} is not a regular file (a FIFO, socket or device); give a "
                         ".pt/.safetensors file or a training run folder")


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


WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# what the info of a model file may hold, and the type of each entry (checked: the app and showcase show them)
INFO_TYPES = {"dataset": (str,), "image_size": (int,), "steps": (int,), "epochs": (int,), "example_prompts": (list, tuple),
              "history": (dict,)}
HISTORY_KEYS = ("step", "loss", "val_step", "val_loss")


def _check_info(info, path) -> dict:
    if not isinstance(info, dict):
        raise ModelFileError(f"{path}: its info is a {type(info).__name__}, not a mapping")
    for key, kinds in INFO_TYPES.items():
        value = info.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise ModelFileError(f"{path}: its info entry {key!r} should be a {kinds[0].__name__}, not a "
                                 f"{type(value).__name__}")
    if not all(isinstance(p, str) for p in info.get("example_prompts") or []):
        raise ModelFileError(f"{path}: its info entry 'example_prompts' should hold text only")
    history = info.get("history")
    if history is not None:
        series = [history.get(k) for k in HISTORY_KEYS]
        numbers = all(isinstance(s, list | tuple) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in s)
                      for s in series)
        if not numbers or len(series[0]) != len(series[1]) or len(series[2]) != len(series[3]):
            raise ModelFileError(f"{path}: its info entry 'history' should hold number lists {', '.join(HISTORY_KEYS)} "
                                 "(steps and losses of equal length)")
    return info


def _check_dtypes(dtypes: dict[str, str], path) -> None:
    """Every weight floating point: `dtypes` maps weight names to dtypes as torch names them (float32, ...)."""
    for name, dtype in dtypes.items():
        if dtype not in WEIGHT_DTYPES:
            raise ModelFileError(f"{path}: weight {name} has dtype {dtype}; model weights are floating point "
                                 "(float32, float16, bfloat16 or float64)")


def _check_weights(weights: dict, path) -> dict:
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"{path}: its weights should map names to tensors; found {type(name).__name__} -> "
                                 f"{type(tensor).__name__}")
    _check_dtypes({name: str(t.dtype).removeprefix("torch.") for name, t in weights.items()}, path)
    for name, tensor in weights.items():
        if not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: weight {name} holds NaN or infinite values")
    return weights


def _checked_config(config, path) -> dict:
    if not isinstance(config, dict) or not isinstance(config.get("unet"), dict):
        raise ModelFileError(f"{path} holds no model config; is it a checkpoint of this project?")
    return config


def _checkpoint_contents(path) -> tuple[dict, dict, dict]:
    """(weights, config, info) of a training checkpoint (.pt)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ModelFileError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this project (a "
                             "mapping with config and ema)")
    missing = [k for k in ("config", "ema") if k not in ckpt]
    if missing:
        raise ModelFileError(f"{path} is not a complete checkpoint of this project (missing: {', '.join(missing)})")
    if not isinstance(ckpt["ema"], dict):
        raise ModelFileError(f"{path}: its ema entry is a {type(ckpt['ema']).__name__}, not a mapping of weights")
    weights = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()
               if isinstance(k, str) and k.startswith("module.")}
    if not weights:
        raise ModelFileError(f"{path}: its ema entry holds no model weights")
    return _check_weights(weights, path), _checked_config(ckpt["config"], path), ckpt.get("info", {})


def read_model_file(path, fits=None) -> tuple[dict, dict, dict]:
    """(EMA weights, config, info) of a training checkpoint (.pt), a run folder or a .safetensors file.

    Whatever is wrong with the file (missing, a symlink loop, not a checkpoint, pickled code, a forged header,
    wrong types or dtypes) is one ModelFileError naming it. `fits(config, {weight name: shape})`, if given,
    checks that the weights fit the config (pipeline.load_model's check): for a .safetensors file it runs on
    the header, before any tensor is read, so a file with an extra or oversized tensor allocates nothing."""
    path = resolve_checkpoint(path)
    if path.suffix != ".safetensors":
        weights, config, info = _checkpoint_contents(path)
        if fits is not None:
            fits(config, {name: tuple(t.shape) for name, t in weights.items()})
        return weights, config, _check_info(info, path)
    header, meta = weights_header(path)
    config, info = _checked_config(meta.get("config"), path), _check_info(meta.get("info", {}), path)
    _check_dtypes({name: dtype for name, (dtype, _) in header.items()}, path)
    if fits is not None:
        fits(config, {name: shape for name, (_, shape) in header.items()})
    return _check_weights(read_tensors(path, header), path), config, info
