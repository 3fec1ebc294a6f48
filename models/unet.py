"""ConditionalUNet: predicts the noise in x_t given the timestep and a text condition."""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.modules import AttentionBlock, Downsample, ResBlock, Upsample, group_norm
from models.text_encoder import EMBED_DIM, TextCondition
from models.time_encoder import TimeEmbedding


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature-map sizes that get self+cross-attention
    num_heads: int = 4
    dropout: float = 0.0
    learn_sigma: bool = False  # also output the Improved-DDPM variance interpolation v
    context_dim: int = EMBED_DIM
    # Pixels per side folded into channels before the first conv (pixel-unshuffle), unfolded at the
    # end: patch_size 2 runs a 32x32 model on 16x16 feature maps, about 4x fewer FLOPs.
    patch_size: int = 1
    # Style names with a learned embedding each, added to the time embedding where a prompt names them
    # (TextCondition.style): a direct handle on the style, apart from the text. () for none.
    style_words: tuple[str, ...] = ()

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.style_words = tuple(self.style_words)
        factor = self.patch_size * 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} "
                             f"(patch size {self.patch_size}, {len(self.channel_mult)} resolution levels)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """A residual block, followed by attention at the resolutions that ask for it."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, use_attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout)
        self.attn = AttentionBlock(out_ch, cfg.num_heads, cfg.context_dim) if use_attention else None

    def forward(self, x, emb, context, mask):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, context, mask)


class Level(nn.Module):
    """The blocks of one resolution, then the down- or upsampling to the next (None at the ends)."""

    def __init__(self, blocks: list[Block], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_embed = TimeEmbedding(ch, emb_dim)
        self.pooled_proj = nn.Linear(cfg.context_dim, emb_dim)
        # zero at the start: a style embedding added to a trained model leaves its function unchanged
        self.style_embed = nn.Linear(len(cfg.style_words), emb_dim, bias=False) if cfg.style_words else None
        if self.style_embed is not None:
            nn.init.zeros_(self.style_embed.weight)
        self.context_norm = nn.LayerNorm(cfg.context_dim)
        # Always-attendable learned token: the whole condition of the empty prompt (CFG's null).
        self.null_token = nn.Parameter(torch.randn(1, 1, cfg.context_dim) * 0.02)
        p2 = cfg.patch_size ** 2
        self.input_conv = nn.Conv2d(cfg.in_channels * p2, ch, 3, padding=1)

        widths = [ch * m for m in cfg.channel_mult]
        self.down = nn.ModuleList()
        skip_channels, res, cur = [ch], cfg.image_size // cfg.patch_size, ch
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(Block(cur, width, emb_dim, cfg, res in cfg.attention_resolutions))
                cur = width
                skip_channels.append(cur)
            last = level == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(cur)))
            if not last:
                skip_channels.append(cur)
                res //= 2

        self.mid = nn.ModuleList([Block(cur, cur, emb_dim, cfg, True), Block(cur, cur, emb_dim, cfg, False)])

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(Block(cur + skip_channels.pop(), width, emb_dim, cfg, res in cfg.attention_resolutions))
                cur = width
            self.up.append(Level(blocks, Upsample(cur) if level > 0 else None))
            res *= 2

        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), nn.Conv2d(cur, cfg.out_channels * p2, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _context(self, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        b = cond.tokens.shape[0]
        context = torch.cat([self.null_token.expand(b, -1, -1), self.context_norm(cond.tokens)], dim=1)
        if cond.mask.dtype == torch.bool:
            return context, F.pad(cond.mask, (1, 0), value=True)
        return context, F.pad(cond.mask.float().log(), (1, 0))  # token weights -> additive scores (0 -> -inf)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps; cond: the prompts' TextCondition."""
        emb = self.time_embed(t) + self.pooled_proj(cond.pooled)
        if self.style_embed is not None and cond.style is not None:
            emb = emb + self.style_embed(cond.style.to(emb.dtype))
        context, mask = self._context(cond)
        h = self.input_conv(F.pixel_unshuffle(x, self.cfg.patch_size))
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb, context, mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb, context, mask)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)
            if level.resample is not None:
                h = level.resample(h)
        return F.pixel_shuffle(self.out(h), self.cfg.patch_size).contiguous()  # NCHW, whatever the model's layout
