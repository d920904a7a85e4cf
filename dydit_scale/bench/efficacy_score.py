"""Judge generated samples of the efficacy task, GenEval-style, without any downloaded weights.

No FID Inception or CLIP weights exist offline, so a small CNN trained here on the real synthetic
images reads each sample's four attributes: the share of samples whose attributes all match their
caption measures prompt-following, and its penultimate features stand in for FID's Inception
features in a Fréchet distance between generated and real images.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dydit_scale.bench.efficacy_data import ATTRIBUTES, Data

__all__ = ["FEATURES", "AttributeClassifier", "features", "frechet_distance", "predict", "prompt_score",
           "train_classifier"]

FEATURES = 64
_GRID = 4  # the pooled map keeps a 4×4 grid, so the place attribute stays readable


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeClassifier(nn.Module):
    """Three stride-2 conv blocks → a 4×4 adaptive pool → FEATURES dims → one linear head per attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(3, 32, 2), _block(32, 64, 2), _block(64, 64, 2),
                                  nn.AdaptiveAvgPool2d(_GRID), nn.Flatten(),
                                  nn.Linear(64 * _GRID * _GRID, FEATURES), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(FEATURES, len(values)) for values in ATTRIBUTES.values())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x)
        return [head(h) for head in self.heads]


def train_classifier(data: Data, *, steps: int = 600, batch: int = 64, lr: float = 2e-3,
                     seed: int = 0) -> tuple[AttributeClassifier, dict]:
    """Train on the real training images, with light Gaussian noise (std ~ U[0, 0.1] per image) so
    it also reads slightly noisy samples; no flips or crops, which would change the place.
    Returns the classifier in eval mode and its held-out accuracy (all four attributes right)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier()
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x_all, y_all = data.train_x, data.train_y
    model.train()
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="efficacy: classifier", unit="step", leave=False):
        idx = torch.randint(len(x_all), (batch,), generator=g)
        x, y = x_all[idx], y_all[idx]
        std = torch.rand(batch, 1, 1, 1, generator=g) * 0.1
        x = (x + std * torch.randn(x.shape, generator=g)).clamp(-1.0, 1.0)
        loss = sum(F.cross_entropy(logits, y[:, i]) for i, logits in enumerate(model(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    seconds = time.perf_counter() - start
    right = predict(model, data.held_x) == data.held_y
    per_attribute = {name: float(right[:, i].float().mean()) for i, name in enumerate(ATTRIBUTES)}
    return model, {"accuracy": float(right.all(dim=1).float().mean()), "per_attribute": per_attribute,
                   "steps": steps, "seconds": seconds}


@torch.no_grad()
def predict(classifier: AttributeClassifier, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Predicted attribute labels [N, 4] (columns in `ATTRIBUTES` order)."""
    rows = [torch.stack([logits.argmax(dim=1) for logits in classifier(chunk.float().clamp(-1.0, 1.0))], dim=1)
            for chunk in images.split(batch)]
    return torch.cat(rows)


@torch.no_grad()
def features(classifier: AttributeClassifier, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Penultimate features [N, FEATURES] (float32)."""
    return torch.cat([classifier.features(chunk.float().clamp(-1.0, 1.0)) for chunk in images.split(batch)])


def prompt_score(classifier: AttributeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose predicted attributes all equal their prompt's `labels` [N, 4]."""
    return float((predict(classifier, images) == labels).all(dim=1).float().mean())


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _cov(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    centred = x - mean
    return centred.T @ centred / (len(x) - 1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a [N, F] and b [M, F] (float64):
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), with unbiased covariances."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: need [N, F] and [M, F] features, got {list(a.shape)} and {list(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: need at least 2 rows per set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = _cov(a, mu_a), _cov(b, mu_b)
    root_a = _sqrtm(cov_a)
    cross = _sqrtm(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))
