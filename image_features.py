"""Image feature spaces and the Fréchet distance between two sets of features.


Fréchet distance (FID's formula) between generated and real images in one of two feature spaces:
- `RandomConvFeatures` (default, offline): a fixed, seeded, untrained conv net. Random conv features
  still respond to colour, edges and texture statistics (Naeem et al. 2020 use random embeddings for
  fidelity metrics); `tests/test_evaluation.py` checks that this distance ranks real < blurred < noise.
  Its values are only comparable with each other, not with published FIDs.
- `InceptionFeatures` (`--inception-weights PATH`): torchvision's Inception-v3 with ImageNet weights
  loaded from the user's file, pool3 (2048-d) at 299x299: the usual FID feature space.
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


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
    space = "random conv"  # its name as a feature space of the concept scores

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
    space = "Inception-v3"

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
