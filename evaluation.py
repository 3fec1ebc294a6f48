"""How good is a trained model? Prompt adherence by retrieval, and Fréchet distance to the real images.

Adherence: for each evaluated caption, generate one image and find its nearest training images in
pixel space (L2 on the [-1, 1] images). Top-k counts a hit when one of the k nearest carries the
prompt among its captions: the model drew *that* image, not just something plausible. The same
retrieval at 16x16 (2x2 average pooling) forgives one-pixel shifts and fine texture. Two prompt sets:
training captions, and held-out rewordings (`CaptionedImages.heldout`: templates and keyword
combinations never used as training captions), which measure generalisation.

Fréchet distance (FID's formula) between generated and real images in one of two feature spaces:
- `RandomConvFeatures` (default, offline): a fixed, seeded, untrained conv net. Random conv features
  still respond to colour, edges and texture statistics (Naeem et al. 2020 use random embeddings for
  fidelity metrics); `tests/test_evaluation.py` checks that this distance ranks real < blurred < noise.
  Its values are only comparable with each other, not with published FIDs.
- `InceptionFeatures` (`--inception-weights PATH`): torchvision's Inception-v3 with ImageNet weights
  loaded from the user's file, pool3 (2048-d) at 299x299: the usual FID feature space.
"""
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from pipeline import Pipeline
from preprocess import CaptionedImages


@torch.no_grad()
def nearest_training_images(generated: torch.Tensor, train: torch.Tensor, k: int = 5, pool: int = 1) -> torch.Tensor:
    """(G, k) indices of the k training images nearest to each generated image (pixel L2, after
    `pool` x `pool` average pooling)."""
    g, t = (F.avg_pool2d(x.float(), pool).flatten(1) for x in (generated, train))
    return torch.cdist(g, t).topk(k, largest=False).indices


def adherence(neighbours: torch.Tensor, prompts: list[str], captions: list[list[str]]) -> dict[str, float]:
    """Top-1 and top-5 rate at which the retrieved training image carries the prompt."""
    hits = torch.tensor([[prompt in captions[j] for j in row] for prompt, row in zip(prompts, neighbours.tolist())])
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits[:, :5].any(1).float().mean().item()}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than dimensions make the product singular: expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # regularise, as pytorch-fid does
            eps = np.eye(len(s_a)) * 1e-6
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))


class RandomConvFeatures(torch.nn.Module):
    """Fixed random conv net (seed 0): 3 -> 64 -> 128 -> 256 channels, mean- and max-pooled (512-d)."""

    def __init__(self, in_channels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths = [in_channels, 64, 128, 256]
        self.convs = torch.nn.ModuleList()
        for cin, cout in zip(widths, widths[1:]):
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / (cin * 9)) ** 0.5
            conv.bias.data.zero_()
            self.convs.append(conv)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=32, mode="bilinear", antialias=True, align_corners=False)
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = F.avg_pool2d(x, 2)
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


class InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3 pool3 features (2048-d) from a weights file the user provides (no download)."""

    def __init__(self, weights_path):
        super().__init__()
        from torchvision.models import inception_v3
        # transform_input=False: the Google weights expect [-1, 1] input, which is what our images are
        self.net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state)
        except (RuntimeError, AttributeError) as error:
            raise ValueError(f"{weights_path} is not torchvision Inception-v3 weights "
                             f"(inception_v3_google-0cc3c7bd.pth): {str(error)[:200]}") from None
        self.net.fc = torch.nn.Identity()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(-1, 3, -1, -1)
        return torch.cat([self.net(F.interpolate(xb, size=299, mode="bilinear", align_corners=False))
                          for xb in x.split(32)])


def features(extractor: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Features of [-1, 1] images, batched."""
    return torch.cat([extractor(b) for b in images.split(batch)]).double().numpy()


@dataclass
class EvalRow:
    sampler: str
    steps: int
    top1: float
    top5: float
    top1_16px: float
    heldout_top1: float
    heldout_top1_16px: float
    fd: float
    seconds_per_image: float


def nudged(images: torch.Tensor) -> torch.Tensor:
    """Real images moved by one pixel and slightly tinted: a drawing of the right emoji that is not pixel-perfect.
    Their retrieval rate is the ceiling a model can reach on this metric (unmoved, they would find themselves)."""
    cast = torch.tensor([0.04, -0.03, 0.02][: images.shape[1]]).view(1, -1, 1, 1)
    return (0.95 * torch.roll(images, shifts=(1, 1), dims=(2, 3)) + cast).clamp(-1, 1)


def heldout_prompts(data: CaptionedImages, pick: list[int], seed: int) -> list[tuple[int, str]]:
    """One held-out rewording (seeded choice) for each picked image that has any."""
    g = torch.Generator().manual_seed(seed + 1)
    return [(i, data.heldout[i][torch.randint(len(data.heldout[i]), (), generator=g).item()])
            for i in pick if data.heldout[i]]


def evaluate(pipe: Pipeline, data: CaptionedImages, settings: list[tuple[str, int]], num_prompts: int = 200,
             guidance: float = 3.0, seed: int = 0, batch: int = 100,
             extractor: torch.nn.Module | None = None, sampler_options: dict | None = None) -> list[EvalRow]:
    """Adherence and Fréchet distance for each (sampler, steps), on one fixed random subset of images:
    their first training caption, and one held-out rewording each (held-out columns are NaN without any).

    The first row, sampler "real", scores as many *other* training images as there are prompts: the
    floor of the Fréchet distance at this sample size (small sets inflate it), and, `nudged`, the
    retrieval ceiling.
    """
    real = data.images.float() / 127.5 - 1
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).tolist()
    pick, others = order[:num_prompts], order[num_prompts:2 * num_prompts]
    prompts = [data.captions[i][0] for i in pick]
    heldout = heldout_prompts(data, pick, seed)
    held_idx, held_asked = [i for i, _ in heldout], [p for _, p in heldout]
    extractor = extractor or RandomConvFeatures(real.shape[1])
    real_features = features(extractor, real)

    def rates(generated, asked, captions):
        if not asked:
            return float("nan"), float("nan"), float("nan")
        full = adherence(nearest_training_images(generated, real), asked, captions)
        low = adherence(nearest_training_images(generated, real, pool=2), asked, captions)
        return full["top1"], full["top5"], low["top1"]

    def generate(asked, sampler, steps):
        return torch.cat([pipe.generate(asked[i:i + batch], sampler, steps, guidance, seed + i, **(sampler_options or {}))
                          for i in range(0, len(asked), batch)] or [real[:0]]).float().cpu()

    own = rates(nudged(real[others]), [data.captions[i][0] for i in others], data.captions)
    held_real = rates(nudged(real[held_idx]), held_asked, data.heldout)
    rows = [EvalRow("real", 0, *own, held_real[0], held_real[2],
                    frechet_distance(features(extractor, real[others]), real_features), 0.0)]
    for sampler, steps in settings:
        start = time.perf_counter()
        generated = generate(prompts, sampler, steps)
        seconds = (time.perf_counter() - start) / len(prompts)
        reworded = generate(held_asked, sampler, steps)
        top1, top5, top1_16 = rates(generated, prompts, data.captions)
        held = rates(reworded, held_asked, data.heldout)
        fd = frechet_distance(features(extractor, generated), real_features)
        rows.append(EvalRow(sampler, steps, top1, top5, top1_16, held[0], held[2], fd, seconds))
    return rows


def markdown_table(rows: list[EvalRow], fd_name: str) -> str:
    lines = [f"| sampler | steps | top-1 | top-5 | top-1 16px | held-out top-1 | held-out top-1 16px | {fd_name} "
             "| s/image |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps, seconds = (r.steps, f"{r.seconds_per_image:.3f}") if r.sampler != "real" else ("-", "-")
        lines.append(f"| {r.sampler} | {steps} | {r.top1:.3f} | {r.top5:.3f} | {r.top1_16px:.3f} | "
                     f"{r.heldout_top1:.3f} | {r.heldout_top1_16px:.3f} | {r.fd:.2f} | {seconds} |")
    return "\n".join(lines)
