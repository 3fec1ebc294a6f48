"""How good is a trained model? Adherence by retrieval, Fréchet distance, and concept, variety and style scores.

Adherence: for each evaluated caption, take the first image drawn for it and find its nearest training
images in pixel space (L2 on the [-1, 1] images). Top-k counts a hit when one of the k nearest carries the
prompt among its captions: the model drew *that* image, not just something plausible. The same
retrieval at 16x16 (2x2 average pooling) forgives one-pixel shifts and fine texture. Two prompt sets:
training captions, and held-out rewordings (`CaptionedImages.heldout`: templates and keyword
combinations never used as training captions), which measure generalisation.

Fréchet distance (FID's formula) between generated and real images in a feature space of `image_features`:
random conv features (default, offline) or Inception-v3 (`--inception-weights PATH`).

Concept scores (`ConceptRow`) of k images per prompt, in two spaces that do not reward pixel copying alone
(16 px pooled pixels, and the FD features), each image retrieved against the `Bank`: every training image
and the held-out (style, group) pairs' images. A prompt's answers are the pictures of its concept, in the
style it names if any.
- concept: a hit is any picture of the prompted concept, in any source, not only the prompt's own image.
- Vendi (Friedman & Dieng 2022) of a prompt's correct images, beside that of its answers: exp of the entropy
  of the eigenvalues of K/n, K the cosine similarities of the centred vectors (no bandwidth to pick, as an
  RBF kernel would need). The effective number of distinct images.
- coverage: the share of the answers that are the nearest picture of some image; Naeem et al.'s (2020)
  coverage with each picture's Voronoi cell for its k-NN ball (no k, and defined from 2 pictures up, where
  the k-NN radii of a concept's few pictures mean little).
- style hit, for prompts that name a style: the share of correct images whose nearest picture is in it; and
  the share that a `StyleProbe`, fitted on the training pictures (and jittered copies), puts in it: style judged
  apart from concept.
The real row's k images per prompt are nudged answers: each concept score's ceiling at this k.
"""
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from guidance import Guidance
from image_features import RandomConvFeatures, features, frechet_distance
from pipeline import Pipeline
from preprocess import CaptionedImages
from sources.captions import STYLE_NAMES
from style_probe import StyleProbe

STYLE_OF_WORD = {word.lower(): style for style, word in STYLE_NAMES.items()}
STYLE_WORDS = re.compile(r"\b(" + "|".join(map(re.escape, STYLE_NAMES.values())) + r")\b", re.IGNORECASE)


@torch.no_grad()
def nearest_training_images(generated: torch.Tensor, train: torch.Tensor, k: int = 5, pool: int = 1) -> torch.Tensor:
    """(G, k) indices of the k training images nearest to each generated image (pixel L2, `pool`-average-pooled)."""
    g, t = (F.avg_pool2d(x.float(), pool).flatten(1) for x in (generated, train))
    return torch.cdist(g, t).topk(k, largest=False).indices


def adherence(neighbours: torch.Tensor, prompts: list[str], captions: list[list[str]]) -> dict[str, float]:
    """Top-1 and top-5 rate at which the retrieved training image carries the prompt."""
    hits = torch.tensor([[prompt in captions[j] for j in row] for prompt, row in zip(prompts, neighbours.tolist())])
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits[:, :5].any(1).float().mean().item()}


# --- concept scores ------------------------------------------------------------------------------

def named_style(prompt: str) -> str | None:
    """The style a prompt names in a whole word ("an OpenMoji pizza" -> "openmoji"), or None."""
    found = STYLE_WORDS.search(prompt)
    return STYLE_OF_WORD[found.group(1).lower()] if found else None


def vendi_score(x: torch.Tensor) -> float:
    """Friedman & Dieng's (2022) Vendi score of the rows of x: exp of the Shannon entropy of the eigenvalues of
    K / n, K their cosine similarities. The effective number of distinct items: 1 for n copies, n for n orthogonal."""
    x = F.normalize(x.double(), dim=1)
    gram = x @ x.T if len(x) <= x.shape[1] else x.T @ x  # the same non-zero eigenvalues: take the smaller matrix
    w = torch.linalg.eigvalsh(gram / len(x))
    w = w[w > 1e-12]  # zeros add nothing to the entropy (and round-off makes some slightly negative)
    return math.exp(-(w * w.log()).sum().item())


def coverage(nearest: list[int], answers: list[int]) -> float:
    """Share of the pictures `answers` that are the nearest picture of at least one generated image."""
    return len(set(nearest) & set(answers)) / len(answers)


def space_vectors(images: torch.Tensor, extractor: torch.nn.Module,
                  conv: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Images in the spaces of the concept scores, neither of which rewards pixel copying alone: average-pooled to
    16 px, and `extractor`'s features (`conv`, when already computed)."""
    conv = features(extractor, images) if conv is None else conv
    pooled = F.avg_pool2d(images.float(), max(1, images.shape[-1] // 16)).flatten(1)
    return {"16px": pooled, getattr(extractor, "space", "features"): torch.from_numpy(conv).float()}


@dataclass
class ConceptPrompt:
    """A prompt of the concept scores: what it asks for (a concept, and the style it names or None), the style of
    the picture it was written for, and the bank pictures that answer it (`Bank.prompt`)."""
    text: str
    concept: str
    style: str | None
    source: str
    answers: list[int]


class Bank:
    """What generated images are retrieved against: every training image, then the held-out pairs' images (the only
    pictures of what their prompts ask for), with concepts and styles. Vectors are centred on the bank's mean, so
    that cosine similarity (Vendi's kernel) compares what sets pictures apart, not the white background and the
    positive (ReLU) features they all share."""

    def __init__(self, data: CaptionedImages, pairs: CaptionedImages | None, extractor: torch.nn.Module):
        parts, self.trained = [data] + ([pairs] if pairs is not None else []), len(data)
        self.images = torch.cat([p.images for p in parts]).float() / 127.5 - 1
        self.concepts, self.styles = ([x for p in parts for x in getattr(p, f)] for f in ("concepts", "styles"))
        self.extractor, self.features = extractor, features(extractor, self.images)
        vectors = space_vectors(self.images, extractor, self.features)
        self.means = {name: v.mean(0) for name, v in vectors.items()}
        self.vectors = {name: v - self.means[name] for name, v in vectors.items()}
        self.style_space = getattr(extractor, "space", "features")  # pooled pixels blur the outlines styles differ by
        styles, looks = self.styles[:self.trained], [self.vectors[self.style_space][:self.trained]]
        if len(set(styles)) > 1:  # and a jittered copy, so that no tint or one-pixel shift decides the style
            looks.append(self.embed(jittered(self.images[:self.trained]))[self.style_space])
        self.probe = StyleProbe(torch.cat(looks), styles * len(looks))
        self.by_concept = defaultdict(list)
        for j, concept in enumerate(self.concepts):
            self.by_concept[concept].append(j)
        self.answers_vendi_cache: dict[tuple, float] = {}

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: v - self.means[name] for name, v in space_vectors(images, self.extractor).items()}

    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor, space: str, chunk: int = 1024) -> torch.Tensor:
        """Index of the nearest bank picture (L2) to each row of `vectors`, chunked to bound the distance matrix."""
        return torch.cat([torch.cdist(v, self.vectors[space]).argmin(1) for v in vectors.split(chunk)])

    def prompt(self, text: str, concept: str, source: str) -> ConceptPrompt:
        """Answered by the concept's pictures in the style the text names (held out or not), or, naming none, by its
        training pictures: what the model learned to draw, the reference of variety and coverage."""
        style, pictures = named_style(text), self.by_concept[concept]
        styled = [j for j in pictures if self.styles[j] == style]
        return ConceptPrompt(text, concept, style, source, styled or [j for j in pictures if j < self.trained])

    def answers_vendi(self, prompt: ConceptPrompt, space: str) -> float:
        """Vendi score of the pictures that answer a prompt: the same for every row, so computed once."""
        key = (tuple(prompt.answers), space)
        if key not in self.answers_vendi_cache:
            self.answers_vendi_cache[key] = vendi_score(self.vectors[space][prompt.answers])
        return self.answers_vendi_cache[key]

    def stand_ins(self, prompts: list[ConceptPrompt], k: int, seed: int) -> torch.Tensor:
        """The real row's images: for each prompt k of the pictures that answer it (each once before any repeats),
        nudged, and k-major like generated ones."""
        g = torch.Generator().manual_seed(seed + 2)
        picks = []
        for p in prompts:
            order = torch.randperm(len(p.answers), generator=g).tolist()
            picks.append([p.answers[order[r % len(order)]] for r in range(k)])
        return nudged(self.images[[row[r] for r in range(k) for row in picks]])


def score_prompt(prompt: ConceptPrompt, nearest: list[int], vectors: torch.Tensor, looks: list[str], bank: Bank,
                 space: str) -> dict:
    """One prompt's k images in one space: concept hits, style hits among them (by nearest picture, and by the style
    each image `looks` to the bank's probe), the Vendi score of the correct ones and of the answers, and the answers'
    coverage (NaN with fewer than 2, where it would be 0 or 1)."""
    hits = [bank.concepts[j] == prompt.concept for j in nearest]
    correct = vectors[torch.tensor(hits, dtype=torch.bool)]
    return {"images": len(nearest), "hits": sum(hits), "named": prompt.style is not None, "source": prompt.source,
            "style_hits": sum(h and bank.styles[j] == prompt.style for h, j in zip(hits, nearest)),
            "probe_style_hits": sum(h and s == prompt.style for h, s in zip(hits, looks)),
            "vendi": vendi_score(correct) if len(correct) else math.nan,
            "vendi_real": bank.answers_vendi(prompt, space),
            "coverage": coverage(nearest, prompt.answers) if len(prompt.answers) > 1 else math.nan}


def set_scores(prompts: list[ConceptPrompt], images: torch.Tensor, bank: Bank) -> dict[str, list[dict]]:
    """Each prompt's scores in each space; `images` k-major: row r * len(prompts) + p is prompt p's r-th image."""
    if not prompts:
        return {space: [] for space in bank.vectors}
    out, vectors = {}, bank.embed(images)
    looks = bank.probe(vectors[bank.style_space])
    looks = [looks[p::len(prompts)] for p in range(len(prompts))]
    for space, v in vectors.items():
        nearest = bank.nearest(v, space).view(-1, len(prompts)).T.tolist()
        per_prompt = v.view(-1, len(prompts), v.shape[1]).transpose(0, 1)
        out[space] = [score_prompt(p, n, x, lk, bank, space) for p, n, x, lk in zip(prompts, nearest, per_prompt, looks)]
    return out


def mean(values: list[float]) -> float:
    """Mean of the values that are not NaN; NaN if none is."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summary(scores: list[dict]) -> dict[str, float]:
    """Some prompts' scores pooled: concept and style hits over their images, Vendi and coverage as means over
    prompts (Vendi's over those with a correct image, so that the generated and real means are comparable)."""
    share = lambda key, of, ss: sum(s[key] for s in ss) / sum(s[of] for s in ss) if sum(s[of] for s in ss) else math.nan
    varied, named = [s for s in scores if s["hits"]], [s for s in scores if s["named"]]
    return {"concept": share("hits", "images", scores), "style_hit": share("style_hits", "hits", named),
            "style_probe": share("probe_style_hits", "hits", named),
            "vendi": mean([s["vendi"] for s in varied]), "vendi_real": mean([s["vendi_real"] for s in varied]),
            "vendi_ratio": mean([s["vendi"] / s["vendi_real"] for s in varied]),
            "coverage": mean([s["coverage"] for s in scores])}


@dataclass
class ConceptRow:
    """Concept scores of one row in one feature space; NaN where the data has no such prompts."""
    sampler: str
    steps: int
    space: str
    concept: float  # share of images whose nearest picture shows the prompted concept (first training captions)
    heldout_concept: float  # the same for the held-out rewordings
    clipart_concept: float  # ... for held-out rewordings of clip-art pictures
    vendi: float  # mean over prompts of the Vendi score of their correct images
    vendi_real: float  # ... of the pictures that answer them
    vendi_ratio: float  # mean over prompts of the ratio of the two
    coverage: float  # mean over prompts with >= 2 answering pictures
    style_hit: float  # over correct images of prompts naming a style (training captions and rewordings)
    pairs_concept: float  # concept adherence on the held-out (style, group) pairs
    pairs_style_hit: float  # style hit on them
    style_probe: float  # the share of style_hit's correct images that Bank.probe puts in the named style
    pairs_style_probe: float  # ... on the held-out pairs


def concept_rows(sampler: str, steps: int, sets: dict[str, list[ConceptPrompt]], images: dict[str, torch.Tensor],
                 bank: Bank) -> list[ConceptRow]:
    """One ConceptRow per space from the k-major images drawn for each prompt set (main, heldout, pairs)."""
    scores = {name: set_scores(prompts, images[name], bank) for name, prompts in sets.items()}
    rows = []
    for space in bank.vectors:
        main, held, pairs = (scores[name][space] for name in ("main", "heldout", "pairs"))
        clip_art = [s for s in held if s["source"] == "clipart"]
        m, h, c, p, named = (summary(s) for s in (main, held, clip_art, pairs, main + held))
        rows.append(ConceptRow(sampler, steps, space, m["concept"], h["concept"], c["concept"],
                               m["vendi"], m["vendi_real"], m["vendi_ratio"], m["coverage"], named["style_hit"],
                               p["concept"], p["style_hit"], named["style_probe"], p["style_probe"]))
    return rows


# --- the evaluation ------------------------------------------------------------------------------

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
    concepts: list[ConceptRow] = field(default_factory=list)


def nudged(images: torch.Tensor) -> torch.Tensor:
    """Real images moved by one pixel and slightly tinted: a drawing of the right emoji that is not pixel-perfect.
    Their retrieval rate is the ceiling a model can reach on this metric (unmoved, they would find themselves)."""
    cast = torch.tensor([0.04, -0.03, 0.02][: images.shape[1]]).view(1, -1, 1, 1)
    return (0.95 * torch.roll(images, shifts=(1, 1), dims=(2, 3)) + cast).clamp(-1, 1)


def jittered(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image rolled by up to a pixel each way, its contrast scaled by 0.9 to 1 and each channel shifted by up to
    0.05 (seeded): the kind of change `nudged` makes, at random."""
    g = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-1, 2, (len(images), 2), generator=g).tolist()
    rolled = torch.stack([torch.roll(x, tuple(s), dims=(1, 2)) for x, s in zip(images, shifts)])
    contrast = 0.9 + 0.1 * torch.rand(len(images), 1, 1, 1, generator=g)
    return (contrast * rolled + 0.1 * torch.rand(len(images), images.shape[1], 1, 1, generator=g) - 0.05).clamp(-1, 1)


def heldout_prompts(data: CaptionedImages, pick: list[int], seed: int) -> list[tuple[int, str]]:
    """One held-out rewording (seeded choice) for each picked image that has any."""
    g = torch.Generator().manual_seed(seed + 1)
    return [(i, data.heldout[i][torch.randint(len(data.heldout[i]), (), generator=g).item()])
            for i in pick if data.heldout[i]]


def pair_prompts(pairs: CaptionedImages | None, num_prompts: int, seed: int) -> list[tuple[str, str, str]]:
    """(caption, concept, style) of up to num_prompts held-out pairs' images (a seeded subset), each prompted by
    its first caption that names its style ("an OpenMoji pizza")."""
    if pairs is None:
        return []
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + 3)).tolist()
    named = [(next((c for c in pairs.captions[i] if named_style(c) == pairs.styles[i]), None), i) for i in order]
    return [(c, pairs.concepts[i], pairs.styles[i]) for c, i in named if c][:num_prompts]


def concept_sets(data: CaptionedImages, pick: list[int], heldout: list[tuple[int, str]], pairs: CaptionedImages | None,
                 bank: Bank, num_prompts: int, seed: int) -> dict[str, list[ConceptPrompt]]:
    """The prompt sets of the concept scores: the picked images' first captions and held-out rewordings (those of
    the image scores), and style-naming captions of the held-out pairs' images."""
    return {"main": [bank.prompt(data.captions[i][0], data.concepts[i], data.styles[i]) for i in pick],
            "heldout": [bank.prompt(text, data.concepts[i], data.styles[i]) for i, text in heldout],
            "pairs": [bank.prompt(*p) for p in pair_prompts(pairs, num_prompts, seed)]}


def evaluate(pipe: Pipeline, data: CaptionedImages, settings: list[tuple[str, int]], num_prompts: int = 200,
             guidance: float | Guidance = 3.0, seed: int = 0, batch: int = 100, extractor: torch.nn.Module | None = None,
             sampler_options: dict | None = None, images_per_prompt: int = 8,
             heldout_pairs_data: CaptionedImages | None = None) -> list[EvalRow]:
    """Adherence and Fréchet distance for each (sampler, steps), on one fixed random subset of images:
    their first training caption, and one held-out rewording each (held-out columns are NaN without any);
    and the concept scores of `images_per_prompt` (k) images per prompt, also on the images of the held-out
    (style, group) pairs `heldout_pairs_data` (never trained on).

    Images are drawn k-major (prompt p's r-th image has seed + r * prompts + p), so the first image of each
    prompt is the one image it had before k was a parameter: the image scores and FD use those alone.

    The first row, sampler "real", scores as many *other* training images as there are prompts: the
    floor of the Fréchet distance at this sample size (small sets inflate it), and, `nudged`, the
    retrieval ceiling; its concept scores, k nudged pictures that answer each prompt (`Bank.stand_ins`).
    """
    extractor, k = extractor or RandomConvFeatures(data.channels), images_per_prompt
    bank = Bank(data, heldout_pairs_data, extractor)
    real, real_features = bank.images[:len(data)], bank.features[:len(data)]
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).tolist()
    pick, others = order[:num_prompts], order[num_prompts:2 * num_prompts]
    prompts = [data.captions[i][0] for i in pick]
    heldout = heldout_prompts(data, pick, seed)
    held_idx, held_asked = [i for i, _ in heldout], [p for _, p in heldout]
    sets = concept_sets(data, pick, heldout, heldout_pairs_data, bank, num_prompts, seed)

    def rates(generated, asked, captions):
        if not asked:
            return float("nan"), float("nan"), float("nan")
        full = adherence(nearest_training_images(generated, real), asked, captions)
        low = adherence(nearest_training_images(generated, real, pool=2), asked, captions)
        return full["top1"], full["top5"], low["top1"]

    def generate(asked, sampler, steps):  # k images per prompt, k-major
        asked = asked * k
        return torch.cat([pipe.generate(asked[i:i + batch], sampler, steps, guidance, seed + i, **(sampler_options or {}))
                          for i in range(0, len(asked), batch)] or [real[:0]]).float().cpu()

    own = rates(nudged(real[others]), [data.captions[i][0] for i in others], data.captions)
    held_real = rates(nudged(real[held_idx]), held_asked, data.heldout)
    fd_real = frechet_distance(features(extractor, real[others]), real_features)
    stand_ins = {name: bank.stand_ins(ps, k, seed) for name, ps in sets.items()}
    rows = [EvalRow("real", 0, *own, held_real[0], held_real[2], fd_real, 0.0,
                    concept_rows("real", 0, sets, stand_ins, bank))]
    for sampler, steps in settings:
        start = time.perf_counter()
        generated = generate(prompts, sampler, steps)
        seconds = (time.perf_counter() - start) / len(generated)
        drawn = {"main": generated, "heldout": generate(held_asked, sampler, steps),
                 "pairs": generate([p.text for p in sets["pairs"]], sampler, steps)}
        top1, top5, top1_16 = rates(generated[:len(prompts)], prompts, data.captions)
        held = rates(drawn["heldout"][:len(held_asked)], held_asked, data.heldout)
        fd = frechet_distance(features(extractor, generated[:len(prompts)]), real_features)
        rows.append(EvalRow(sampler, steps, top1, top5, top1_16, held[0], held[2], fd, seconds,
                            concept_rows(sampler, steps, sets, drawn, bank)))
    return rows


CONCEPT_COLUMNS = {"concept": "concept", "heldout_concept": "held-out concept",
                   "clipart_concept": "clip-art held-out concept", "vendi": "Vendi", "vendi_real": "Vendi real",
                   "vendi_ratio": "Vendi ratio", "coverage": "coverage", "style_hit": "style hit",
                   "style_probe": "style hit, probe", "pairs_concept": "held-out pairs concept",
                   "pairs_style_hit": "held-out pairs style hit", "pairs_style_probe": "held-out pairs style hit, probe"}


def cell(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def concept_table(rows: list[EvalRow]) -> str:
    """The concept scores, a line per row and space; columns with no value on any line (no clip art...) left out."""
    lines = [c for r in rows for c in r.concepts]
    columns = [key for key in CONCEPT_COLUMNS if any(not math.isnan(getattr(c, key)) for c in lines)]
    out = ["| sampler | steps | features | " + " | ".join(CONCEPT_COLUMNS[key] for key in columns) + " |",
           "|---|---:|---|" + "---:|" * len(columns)]
    for c in lines:
        values = [cell(getattr(c, key), 2 if key.startswith("vendi") else 3) for key in columns]
        out.append(f"| {c.sampler} | {c.steps if c.sampler != 'real' else '-'} | {c.space} | {' | '.join(values)} |")
    return "\n".join(out)


def markdown_table(rows: list[EvalRow], fd_name: str) -> str:
    """The image scores, then (when there are any) the concept scores."""
    lines = [f"| sampler | steps | top-1 | top-5 | top-1 16px | held-out top-1 | held-out top-1 16px | {fd_name} "
             "| s/image |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps, seconds = (r.steps, f"{r.seconds_per_image:.3f}") if r.sampler != "real" else ("-", "-")
        lines.append(f"| {r.sampler} | {steps} | {r.top1:.3f} | {r.top5:.3f} | {r.top1_16px:.3f} | "
                     f"{r.heldout_top1:.3f} | {r.heldout_top1_16px:.3f} | {r.fd:.2f} | {seconds} |")
    return "\n".join(lines) + (f"\n\n{concept_table(rows)}" if any(r.concepts for r in rows) else "")
