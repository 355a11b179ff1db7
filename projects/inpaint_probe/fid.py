"""FID between the originals and the inpainted results of one set (paper 003 Sec. 5.2, Table 2).

Features are extracted once per image (torchmetrics' Inception-v3, the torch-fidelity port of TF-FID, when its
weights are present) and the Fréchet distance of any subset (a hole-ratio bucket, the whole set) is computed from
them by `frechet_distance`, which equals torchmetrics' `FrechetInceptionDistance` on the same features (tested)
but takes milliseconds for small sets instead of a 2048 x 2048 eigendecomposition per bucket.

The features are the standard ones only when torch-fidelity's Inception-v3 weights
(`weights-inception-2015-12-05-6726825d.pth`, the TF-FID port torchmetrics uses) are on disk: we never download
them implicitly. Without them, `features: auto` falls back to a clearly named substitute (`RandomConvFeatures`,
"random_conv_features_seed0") whose distance is never called FID: every output names it `fd_randconv`
(CSV columns, report.json, W&B keys, Markdown "FD_randconv") and carries "not comparable to published FID";
`features: inception` fails with instructions instead.

Torchmetrics' Inception resizes to 299 px with an antialiased bilinear filter by default; we pass
`antialias=False`, its TF-1.x-compatible bilinear resize, so the features equal torch-fidelity's (and TF-FID's)
on the same weights (tested).

A Fréchet distance is reported only for cells of more than `d` images per set (`min_images`, default d + 1):
with fewer, both covariances are rank-deficient and the value is dominated by the sample size (FID of 10 images
in 2048 dimensions is a number, not a measurement). Smaller cells are NaN / "n/a".
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones.presets import seeded
from common.errors import ConfigError, ForgelabError

log = logging.getLogger("forgelab.inpaint_probe")

FeatureMode = Literal["auto", "inception", "substitute"]
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
SUBSTITUTE_NAME = "random_conv_features_seed0"
NOT_COMPARABLE = "not comparable to published FID"
INCEPTION_DIM = 2048
FID_METRIC, FID_LABEL = "fid", "FID"
# the distance on the substitute features: a Fréchet distance, but not FID; named so in every output
SUBSTITUTE_METRIC, SUBSTITUTE_LABEL = "fd_randconv", "FD_randconv"


@dataclass(frozen=True)
class FeatureExtractorInfo:
    """What produced the Fréchet-distance features, for the report.

    metric: the key of the distance in every output (CSV column, JSON, W&B): "fid" only for the standard
    Inception features, "fd_randconv" for the substitute. label: its name in Markdown and plots. dim: the
    feature dimension d."""

    name: str
    comparable: bool
    note: str
    metric: str = FID_METRIC
    label: str = FID_LABEL
    dim: int = INCEPTION_DIM

    def min_images(self, configured: int | None) -> int:
        """The smallest set size a distance is reported for: `configured`, or d + 1 (full-rank covariances)."""
        if configured is None:
            return self.dim + 1
        if configured < 2:
            raise ConfigError(
                f"probe.fid.min_images must be >= 2 (a covariance needs two images), got {configured}"
            )
        return configured


class FIDWeightsMissing(ForgelabError):
    """torch-fidelity's Inception weights are not on this machine."""


def default_inception_path() -> Path:
    """Where torch-fidelity's download would have cached the weights (torch hub's checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(explicit: str | None) -> Path | None:
    """The explicit file (which must exist), else the torch hub cache copy, else None."""
    if explicit:
        path = Path(os.path.expanduser(explicit))
        if not path.is_file():
            raise ConfigError(f"probe.fid.inception_weights: {path} does not exist")
        return path
    cached = default_inception_path()
    return cached if cached.is_file() else None


class RandomConvFeatures(nn.Module):
    """The substitute: a fixed, randomly initialised (Kaiming normal, seed 0) five-stage convolutional network
    (3x3 stride-2 convolutions + ReLU, 32-64-128-256-512 channels) whose stage outputs are mean-pooled and
    concatenated (992-d), on uint8 images scaled to [-1, 1] at their own resolution.

    Why this and not a random-weight Inception-v3: random deep networks collapse towards image-independent
    features (pool3 of a random Inception varies by <1 % across images) and cost ~6 GFLOPs per image, while
    shallow random ReLU features are random projections of local patch statistics at five scales, respond to
    colour, blur and texture, and cost ~0.3 GFLOPs. Random embeddings as FID/precision-recall features:
    Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics for Generative Models"). Values are only
    comparable within one table made with this extractor."""

    num_features = 32 + 64 + 128 + 256 + 512

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, 256, 512)
        with seeded(seed):
            self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in itertools.pairwise(widths))
            for conv in self.stages:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - 127.5) / 127.5
        pooled = []
        for conv in self.stages:
            x = F.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def _inception_from_file(path: Path) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:  # weights_only first: a file that needs more than tensors to load is rejected before torch-fidelity
        torch.load(path, map_location="cpu", weights_only=True)  # re-reads it with weights_only=False
    except Exception as err:
        raise ConfigError(
            f"{path} is not a plain state dict of tensors ({type(err).__name__}: {err})"
        ) from None
    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(INCEPTION_DIM)],
        feature_extractor_weights_path=str(path),
        antialias=False,  # torch-fidelity's / TF-FID's resize; torchmetrics' default antialias=True is not
    )


def build_feature_extractor(
    mode: FeatureMode = "auto", inception_weights: str | None = None
) -> tuple[nn.Module, FeatureExtractorInfo]:
    """(module mapping uint8 (B, 3, H, W) to (B, d) features, what it is)."""
    if mode not in ("auto", "inception", "substitute"):
        raise ConfigError(f"probe.fid.features must be auto, inception or substitute; got {mode!r}")
    path = find_inception_weights(inception_weights) if mode != "substitute" else None
    if path is not None:
        info = FeatureExtractorInfo("inception_v3_tf_fid", True, f"torch-fidelity Inception-v3 ({path.name})")
        return _inception_from_file(path), info
    if mode == "inception":
        raise FIDWeightsMissing(
            f"FID needs torch-fidelity's Inception-v3 weights {INCEPTION_FILE}, not found at "
            f"{default_inception_path()} and fid.inception_weights is not set. Download {INCEPTION_URL} on a "
            f"machine with network access and put it there (or pass --probe.fid.inception_weights=<file>), or run with "
            f"--probe.fid.features=substitute (random features, {NOT_COMPARABLE})."
        )
    if mode == "auto":
        log.warning(
            "FID: Inception weights %s not found; using the substitute %s (%s)",
            INCEPTION_FILE,
            SUBSTITUTE_NAME,
            NOT_COMPARABLE,
        )
    return RandomConvFeatures(), FeatureExtractorInfo(
        SUBSTITUTE_NAME,
        False,
        f"random-weight 5-stage convolutional features, seed 0, {RandomConvFeatures.num_features}-d",
        metric=SUBSTITUTE_METRIC,
        label=SUBSTITUTE_LABEL,
        dim=RandomConvFeatures.num_features,
    )


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[0, 1] float images (N, 3, H, W) -> (N, d) float64 features (images quantised to uint8 first, as saved)."""
    outputs = []
    device = next(extractor.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        chunk = (images[start : start + batch_size].clamp(0, 1) * 255).round().to(device, torch.uint8)
        outputs.append(extractor(chunk).double().reshape(chunk.shape[0], -1).cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, 0, dtype=torch.float64)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, min_samples: int = 2) -> float:
    """The Fréchet distance of two Gaussians fitted to feature sets (Heusel et al. 2017, FID):
    ||μ_r - μ_f||² + Tr(Σ_r) + Tr(Σ_f) - 2 Tr((Σ_r Σ_f)^½), unbiased covariances, float64.

    Tr((Σ_r Σ_f)^½) is the sum of the square roots of the eigenvalues of Σ_r Σ_f. With n samples per set
    and d features, those eigenvalues are the squared singular values of A B^T / sqrt((n_r - 1)(n_f - 1)) for the
    centred feature matrices A (n_r x d) and B (n_f x d): an n_r x n_f problem instead of torchmetrics'
    d x d general eigendecomposition (2048 x 2048 per bucket), with the same value (tested against
    torchmetrics' FrechetInceptionDistance). Sets larger than d use the symmetric d x d form
    Tr((Σ_r^½ Σ_f Σ_r^½)^½). NaN when either set has fewer than `min_samples` samples (at least two: a
    covariance needs two; the probe passes d + 1 by default, see the module docstring).
    """
    if min(real.shape[0], fake.shape[0]) < max(2, min_samples):
        return math.nan
    real, fake = real.double(), fake.double()
    a, b = real - real.mean(0), fake - fake.mean(0)
    n_r, n_f, d = real.shape[0] - 1, fake.shape[0] - 1, real.shape[1]
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    trace_term = a.square().sum() / n_r + b.square().sum() / n_f
    if min(n_r, n_f) < d:
        cross = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt(n_r * n_f)
    else:
        eigenvalues, vectors = torch.linalg.eigh(a.T @ a / n_r)
        root = vectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ vectors.T
        cross = torch.linalg.eigvalsh(root @ (b.T @ b / n_f) @ root).clamp(min=0).sqrt().sum()
    return max(float(mean_term + trace_term - 2 * cross), 0.0)  # rounding can leave equal sets a hair below 0
