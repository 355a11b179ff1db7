"""Image perturbations of the robustness protocol (CNNDetection; ITEM Fig. 4) and of the degradation studies.

All functions take and return a float image tensor (C, H, W) or batch (N, C, H, W) in [0, 1]. They are applied to
the image *before* any model preprocessing (resize, crop, normalisation), which is what the protocol specifies:
the perturbation is part of the data, not of the model. Noise is left unquantised (sigma 0.001 would round away on
8-bit pixels); JPEG necessarily round-trips through 8 bits.

A perturbation is named by a short spec string so that configs, cache keys and result tables share one
vocabulary: "none", "noise:0.005", "blur:2", "jpeg:50".
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ITEM Fig. 4 / CNNDetection robustness grid.
ROBUSTNESS_GRID: dict[str, tuple[float, ...]] = {
    "noise": (0.001, 0.005, 0.01),
    "blur": (1.0, 2.0, 3.0),
    "jpeg": (75.0, 50.0, 25.0),
}


def gaussian_noise(
    image: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Additive white Gaussian noise of standard deviation `sigma` (in [0, 1] units), clipped to [0, 1]."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device="cpu").to(image.device)
    return (image + sigma * noise).clamp_(0.0, 1.0)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian taps with radius round(truncate * sigma), as scipy.ndimage.gaussian_filter."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel with mirror ('reflect' in scipy, 'symmetric') borders.

    Matches `scipy.ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="reflect")`, the operation the
    CNNDetection robustness code applies.
    """
    if sigma <= 0:
        return image.clone()
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    n, c, h, w = x.shape
    kernel = gaussian_kernel1d(sigma).to(dtype=x.dtype, device=x.device)
    radius = kernel.numel() // 2
    y = x.reshape(n * c, 1, h, w)
    y = _symmetric_pad(y, radius)
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    y = F.conv2d(y, kernel.view(1, 1, -1, 1))
    y = y.reshape(n, c, h, w)
    return y if batched else y.squeeze(0)


def _symmetric_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Half-sample symmetric padding (edge pixel repeated), valid for pads longer than the image too."""
    h, w = x.shape[-2:]
    rows = _symmetric_index(h, pad, x.device)
    cols = _symmetric_index(w, pad, x.device)
    return x[..., rows[:, None], cols[None, :]]


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(-pad, n + pad, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip through Pillow's baseline JPEG encoder at `quality` (4:2:0 subsampling, Pillow defaults)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    if image.dim() == 4:
        return torch.stack([jpeg_compress(im, quality) for im in image])
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded).permute(2, 0, 1).to(dtype=image.dtype, device=image.device)


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation: kind in {none, noise, blur, jpeg} and its level."""

    kind: str = "none"
    level: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> Perturbation:
        """Parse "none", "noise:0.005", "blur:2", "jpeg:50" (clear errors for anything else)."""
        if spec is None or str(spec).strip().lower() in ("", "none", "clean"):
            return cls()
        kind, sep, value = str(spec).strip().lower().partition(":")
        if kind not in ROBUSTNESS_GRID or not sep:
            raise ValueError(
                f"unknown perturbation {spec!r}: expected 'none' or one of "
                f"{', '.join(k + ':<level>' for k in ROBUSTNESS_GRID)} (e.g. 'jpeg:75')"
            )
        try:
            level = float(value)
        except ValueError:
            raise ValueError(f"perturbation {spec!r}: level {value!r} is not a number") from None
        if not math.isfinite(level) or level < 0:
            raise ValueError(f"perturbation {spec!r}: level must be a finite non-negative number")
        if kind == "jpeg" and not 1 <= level <= 100:
            raise ValueError(f"perturbation {spec!r}: JPEG quality must be in [1, 100]")
        return cls(kind, level)

    @property
    def spec(self) -> str:
        if self.kind == "none":
            return "none"
        level = int(self.level) if self.kind == "jpeg" or self.level.is_integer() else self.level
        return f"{self.kind}:{level}"

    def __call__(self, image: torch.Tensor, seed_key: str = "") -> torch.Tensor:
        """Apply to a [0, 1] image. Noise is seeded from `seed_key` (e.g. the file's content hash) so that the
        same image gets the same noise in every run, which cached features rely on."""
        if self.kind == "none":
            return image
        if self.kind == "noise":
            generator = torch.Generator().manual_seed(_stable_seed(seed_key or self.spec))
            return gaussian_noise(image, self.level, generator)
        if self.kind == "blur":
            return gaussian_blur(image, self.level)
        return jpeg_compress(image, int(self.level))


def robustness_specs(grid: dict[str, tuple[float, ...]] = ROBUSTNESS_GRID) -> list[str]:
    """The clean condition plus every (kind, level) of the grid, as spec strings."""
    return ["none"] + [
        Perturbation(kind, float(level)).spec for kind, levels in grid.items() for level in levels
    ]


def parse_test_conditions(specs: list[str]) -> list[str]:
    """Validate a list of test conditions (one test dataloader each): canonical specs, no repeats, the clean
    condition "none" first (it is the main test report; the others are compared with it)."""
    if isinstance(specs, str) or not specs:
        raise ValueError(f"test_perturbations must be a non-empty list of specs, got {specs!r}")
    conditions = [Perturbation.parse(spec).spec for spec in specs]
    if len(set(conditions)) != len(conditions):
        raise ValueError(f"test_perturbations has repeats: {conditions}")
    if conditions[0] != "none":
        raise ValueError(
            f"test_perturbations must start with 'none' (the clean test is the main report), got {conditions}"
        )
    return conditions


def _stable_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
