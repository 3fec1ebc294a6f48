"""U-Net building blocks: residual block with timestep scale-shift, self/cross-attention, resampling."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class _Relayout(torch.autograd.Function):
    """x in `layout`, its gradient back in the layout x came in: a plain .contiguous() hands the gradient back
    in the new layout, and every op behind it then converts again or adds tensors of mixed layouts (slow)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        ctx.back = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
        return x.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.back), None


# Feature maps of at least this many pixels are normalized by PyTorch's own channels_last GroupNorm kernel when
# no gradient is needed: its forward is as fast as the NCHW one there, and the relayout copies cost about 7x the
# kernel. On smaller maps (3-5x) and in every backward pass (1.5-8x) the channels_last kernel is slower than the
# relayout (`python bench/layout.py`, its GroupNorm tables, with AMX and without).
CHANNELS_LAST_GROUP_NORM_MIN_PIXELS = 32 * 32


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that hands a channels_last input back in channels_last. Where PyTorch's channels_last kernel is
    slow (small maps; any backward pass) it runs the NCHW kernel on an NCHW copy, the gradient going back the same
    way, so that the rest of the U-Net (convolutions, SiLU, residual adds, the attention's token views) keeps
    whichever layout it is given, forward and backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not needs_grad and x.shape[2] * x.shape[3] >= CHANNELS_LAST_GROUP_NORM_MIN_PIXELS:
            return super().forward(x)
        y = super().forward(_Relayout.apply(x, torch.contiguous_format))
        return _Relayout.apply(y, torch.channels_last)


def group_norm(channels: int) -> GroupNorm:
    return GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time/text embedding scales and shifts the second norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable deep training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# Score matrices up to this many entries (queries x keys) are computed as two plain matrix products
# when the attention runs in bf16 on a CPU: there PyTorch's fused CPU kernel is slower for them (its
# backward 3-7x at 64x64, measured on 2 cores; forward up to 1.5x for cross-attention to a prompt).
# Larger ones (self-attention over 16x16 feature maps and up) use the fused kernel.
SMALL_ATTENTION = 128 * 128


def _runs_in_bf16(x: torch.Tensor) -> bool:
    dev = x.device.type
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over (B, heads, N, d) tensors; `mask` is True where attention is allowed,
    or a float added to the scores (the log of each key's weight)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] > SMALL_ATTENTION or not _runs_in_bf16(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1).to(v.dtype) @ v  # bf16 softmax accumulates in fp32 internally


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C/heads)"""
    b, n, c = x.shape
    return x.view(b, n, n_heads, c // n_heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention of image tokens over themselves (context=None) or over text tokens.

    `mask` (B, L) is True for real text tokens (padding never receives attention weight), or log-weights to add.
    """

    def __init__(self, channels: int, n_heads: int, context_dim: int | None = None):
        super().__init__()
        assert channels % n_heads == 0, f"channels {channels} not divisible by heads {n_heads}"
        self.n_heads = n_heads
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim or channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        source = tokens if context is None else context
        k, v = self.to_kv(source).chunk(2, dim=-1)
        q, k, v = (_heads(z, self.n_heads) for z in (self.to_q(tokens), k, v))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = attention(q, k, v, attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    """Self-attention over the image, then cross-attention to the prompt's tokens."""

    def __init__(self, channels: int, n_heads: int, context_dim: int):
        super().__init__()
        self.self_attn = Attention(channels, n_heads)
        self.cross_attn = Attention(channels, n_heads, context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cross_attn(self.self_attn(x), context, mask)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
