"""How a saved model fits the flags of a run: `--init-from`'s weights, grown where that keeps the model's function,
and the config differences that `--init-from` and `--resume` refuse."""
from dataclasses import asdict

import torch

from checkpoints import read_model_file
from models.growth import add_style_embedding, deepen
from models.unet import UNetConfig
from train_config import TrainConfig


def config_diffs(config: dict, cfg: TrainConfig, unet_cfg: UNetConfig, train_keys=()) -> list[str]:
    """Differences between a saved config and the flags: architecture, schedule, prediction, `train_keys`."""
    saved = {**UNetConfig(**config["unet"]).to_dict(), "schedule": config.get("schedule"),
             "timesteps": config.get("timesteps"), "prediction": config.get("prediction", "eps")}
    wanted = {**unet_cfg.to_dict(), "schedule": cfg.schedule, "timesteps": cfg.timesteps, "prediction": cfg.prediction}
    saved_train, flags = config.get("train", {}), asdict(cfg)
    saved.update({k: saved_train[k] for k in train_keys if k in saved_train})
    wanted.update({k: flags[k] for k in train_keys if k in saved_train})
    return [f"{k}: checkpoint {saved.get(k)!r}, flags {wanted.get(k)!r}"
            for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]


def warm_start_weights(path, cfg: TrainConfig, unet_cfg: UNetConfig) -> tuple[dict[str, torch.Tensor], str]:
    """--init-from: the EMA weights of a model whose architecture matches the flags, or of a shallower one, deepened
    to the flags' --num-res-blocks as the same function, or of one without the style embedding that
    --style-embedding asks for (added at zero); and a note of what was grown ("" if nothing)."""
    weights, config, _ = read_model_file(path)
    saved, target = UNetConfig(**config["unet"]), unet_cfg.num_res_blocks
    deeper = saved.num_res_blocks < target  # grown below to the same function (models/growth.py)
    styled = not saved.style_words and bool(unet_cfg.style_words)  # likewise
    as_grown = {**saved.to_dict(), "num_res_blocks": max(target, saved.num_res_blocks),
                "style_words": saved.style_words or unet_cfg.style_words}
    diffs = config_diffs({**config, "unet": as_grown}, cfg, unet_cfg)  # before any work: other widths are refused
    if diffs:
        raise ValueError(f"--init-from: {path} does not match the flags ({'; '.join(diffs)}). Give the "
                         "architecture flags the model was trained with (its model card lists them); "
                         "only --num-res-blocks may be larger, and --style-embedding be added.")
    grown = ""
    if deeper:
        grown = f", deepened from {saved.num_res_blocks} to {target} residual blocks per level"
        weights, saved = deepen(weights, saved, target, cfg.seed)
    if styled:
        grown += f", a style embedding added for {', '.join(unet_cfg.style_words)}"
        weights, saved = add_style_embedding(weights, saved, unet_cfg.style_words)
    return weights, grown
