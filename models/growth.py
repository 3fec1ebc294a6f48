"""Grow a trained U-Net without changing what it computes, as a warm start: more residual blocks per level, or a
style embedding.

A new block starts as the identity, so the grown network's output equals the old one's and training goes
on from there (as Net2DeeperNet, Chen et al. 2016). In a down level the new blocks follow the old ones: a
ResBlock whose second conv is zero, and attention whose output projections are zero, pass their input
through. Each pushes a skip equal to the last old block's. The up level pops those skips first: its first
block is the old first block (its skip is the same tensor), the new identity blocks come next and ignore
their skips (1x1 skip conv [I 0]), then the remaining old blocks see the skips they always saw.
"""
from dataclasses import replace

import torch

from models.unet import ConditionalUNet, UNetConfig


def _copy_block(new: dict, old: dict, new_prefix: str, old_prefix: str) -> None:
    for key, value in old.items():
        if key.startswith(old_prefix):
            new[new_prefix + key[len(old_prefix):]] = value.clone()


def _identity_block(new: dict, prefix: str) -> None:
    """Make the (freshly initialised) block at `prefix` the identity of its input's first channels."""
    conv2 = new[f"{prefix}res.conv2.weight"]
    new[f"{prefix}res.conv2.weight"] = torch.zeros_like(conv2)
    new[f"{prefix}res.conv2.bias"] = torch.zeros_like(new[f"{prefix}res.conv2.bias"])
    if f"{prefix}res.skip.weight" in new:  # up blocks: [h, skip] -> h
        skip = new[f"{prefix}res.skip.weight"]
        out_ch, in_ch = skip.shape[:2]
        new[f"{prefix}res.skip.weight"] = torch.eye(out_ch, in_ch, dtype=skip.dtype)[:, :, None, None]
        new[f"{prefix}res.skip.bias"] = torch.zeros_like(new[f"{prefix}res.skip.bias"])
    for attn in ("self_attn", "cross_attn"):
        for name in ("weight", "bias"):
            key = f"{prefix}attn.{attn}.proj.{name}"
            if key in new:
                new[key] = torch.zeros_like(new[key])


def deepen(weights: dict[str, torch.Tensor], cfg: UNetConfig, num_res_blocks: int,
           seed: int = 0) -> tuple[dict[str, torch.Tensor], UNetConfig]:
    """The state dict and config of `cfg`'s model with `num_res_blocks` per level (at least `cfg`'s), computing
    the same function as `weights`. New blocks' other weights get the model's usual initialisation."""
    old_n = cfg.num_res_blocks
    if num_res_blocks < old_n:
        raise ValueError(f"can only add residual blocks: the model has {old_n} per level, asked for {num_res_blocks}")
    new_cfg = replace(cfg, num_res_blocks=num_res_blocks)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new = ConditionalUNet(new_cfg).state_dict()
    added = num_res_blocks - old_n
    for key, value in weights.items():
        if not key.startswith(("down.", "up.")) or ".blocks." not in key:
            new[key] = value.clone()  # stem, time and text embeddings, mid, resampling, output head
    for level in range(len(cfg.channel_mult)):
        for i in range(old_n):
            _copy_block(new, weights, f"down.{level}.blocks.{i}.", f"down.{level}.blocks.{i}.")
        for i in range(old_n, num_res_blocks):
            _identity_block(new, f"down.{level}.blocks.{i}.")
        # up level: old block 0, then the identities, then old blocks 1..old_n
        _copy_block(new, weights, f"up.{level}.blocks.0.", f"up.{level}.blocks.0.")
        for i in range(1, 1 + added):
            _identity_block(new, f"up.{level}.blocks.{i}.")
        for i in range(1, old_n + 1):
            _copy_block(new, weights, f"up.{level}.blocks.{i + added}.", f"up.{level}.blocks.{i}.")
    return new, new_cfg


def add_style_embedding(weights: dict[str, torch.Tensor], cfg: UNetConfig,
                        style_words: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], UNetConfig]:
    """The state dict and config of `cfg`'s model (which has no style embedding) with one for `style_words`, at
    zero: the same function until training moves it."""
    if cfg.style_words:
        raise ValueError(f"the model already has a style embedding (for {', '.join(cfg.style_words)})")
    new_cfg = replace(cfg, style_words=tuple(style_words))
    emb_dim = weights["pooled_proj.weight"].shape[0]
    dtype = weights["pooled_proj.weight"].dtype
    return {**weights, "style_embed.weight": torch.zeros(emb_dim, len(style_words), dtype=dtype)}, new_cfg
