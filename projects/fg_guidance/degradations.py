"""Differentiable degradations of a photographed part: ageing (temporal) and lighting (environmental).

The fine-grained guidance paper (Sec. 3) trains its generator so that an image keeps its fine-grained identity
when it is aged (Eq. 4: x' with rust, paint fading, tarnish, streaks) or relit (Eq. 5: A_e(x) with
overexposure, glare, low light). The same operations are photometric augmentations for the subtype classifiers,
so they live in a module of their own rather than inside the losses. Each one:

* takes a float batch (B, 3, H, W) in [0, 1] and a ``severity`` in [0, 1] (a float, or one value per image);
  severity 0 leaves the image unchanged, and the change grows monotonically with severity;
* is differentiable with respect to the image (torch ops only, no clamp where a smooth roll-off will do), so
  the loss can push gradients through ``A_e(x_hat)`` back into a generator;
* draws its randomness (where the rust grows, where the glare lands, the sensor noise) from an explicit
  ``torch.Generator`` on the CPU, so a seed reproduces the exact same degradation on any device;
* returns ``Degradation(image, mask)``: ``mask`` (B, 1, H, W) in [0, 1] is how strongly each pixel was
  changed (rust coverage, streak paths, the glare bloom, or the uniform strength of a global change). Eq. 4's
  optional masked variant evaluates the loss only where the mask is on.

Rust can be confined to a region (``region``, e.g. bolt boxes via `box_mask`): corrosion starts where water
sits, and the toy world draws it there too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ENVIRONMENTS",
    "TEMPORAL",
    "Degradation",
    "apply_degradation",
    "box_mask",
    "glare",
    "low_light",
    "overexposure",
    "paint_fading",
    "random_degradation",
    "rust",
    "streaks",
    "tarnish",
]


class Degradation(NamedTuple):
    image: torch.Tensor  # (B, 3, H, W) in [0, 1]
    mask: torch.Tensor  # (B, 1, H, W) in [0, 1]: how strongly each pixel was changed


def _check(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a batch of RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")


def _severity(severity: float | torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Severity as a (B, 1, 1, 1) tensor; values outside [0, 1] are a caller's mistake, not clipped silently."""
    s = torch.as_tensor(severity, dtype=images.dtype, device=images.device)
    if s.dim() == 0:
        s = s.expand(images.shape[0])
    if s.shape != (images.shape[0],):
        raise ValueError(
            f"severity must be a float or one value per image ({images.shape[0]}), got {s.shape}"
        )
    if bool(((s < 0) | (s > 1)).any()):
        raise ValueError(f"severity must be in [0, 1], got {s.tolist()}")
    return s.view(-1, 1, 1, 1)


def _rand(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) noise drawn on the CPU (device-independent for a seed), moved to the images' device."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _smooth_noise(images: torch.Tensor, cells: int, generator: torch.Generator | None) -> torch.Tensor:
    """A (B, 1, H, W) field in [0, 1] varying over about H/cells pixels: a bicubic upsampled random grid."""
    b, _, h, w = images.shape
    grid = _rand((b, 1, cells + 1, cells + 1), generator, images)
    field = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
    return field.clamp(0.0, 1.0)


def _luminance(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _colour(rgb: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rgb, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def _soft_clip(y: torch.Tensor, knee: torch.Tensor) -> torch.Tensor:
    """Identity below ``knee``, then a tanh shoulder that approaches 1: highlights roll off instead of clipping
    (and keep a gradient). With knee = 1 it is the identity on [0, 1]."""
    room = (1.0 - knee).clamp_min(1e-3)
    shoulder = knee + room * torch.tanh((y - knee) / room)
    return torch.where(y > knee, shoulder, y)


# -- temporal deterioration (Eq. 4) ---------------------------------------------------------------------------

RUST_RGB = (0.50, 0.23, 0.08)


def rust(
    images: torch.Tensor,
    severity: float | torch.Tensor,
    generator: torch.Generator | None = None,
    region: torch.Tensor | None = None,
) -> Degradation:
    """Textured rust patches: a two-scale noise field thresholded at ``1 - severity`` decides where corrosion
    grows (more of it as severity rises), coloured cinnamon-brown with pitted speckle and the local shading.

    ``region`` (B, 1, H, W) in [0, 1] confines the rust (e.g. `box_mask` of the bolts); the returned mask is
    the rust coverage, zero outside the region.
    """
    _check(images)
    s = _severity(severity, images)
    h = images.shape[-2]
    field = 0.6 * _smooth_noise(images, max(2, h // 16), generator) + 0.4 * _smooth_noise(
        images, max(2, h // 4), generator
    )
    # Linear ramp over 0.1 of the field: coverage is exactly 0 at severity 0 and grows with it.
    mask = ((field - (1.0 - s)) / 0.1).clamp(0.0, 1.0)
    if region is not None:
        if region.shape != mask.shape:
            raise ValueError(f"region must have shape {tuple(mask.shape)}, got {tuple(region.shape)}")
        mask = mask * region.to(mask)
    speckle = 0.7 + 0.6 * _rand(mask.shape, generator, images)
    colour = _colour(RUST_RGB, images) * (0.55 + 0.7 * _luminance(images)) * speckle
    out = images + 0.85 * mask * (colour - images)
    return Degradation(out.clamp(0.0, 1.0), mask)


def paint_fading(
    images: torch.Tensor, severity: float | torch.Tensor, generator: torch.Generator | None = None
) -> Degradation:
    """Sun-bleached paint: colours lose saturation and drift towards a chalky light grey, unevenly."""
    _check(images)
    s = _severity(severity, images)
    amount = s * 0.7 * (0.7 + 0.3 * _smooth_noise(images, 3, generator))
    chalk = 0.8 * _luminance(images) + 0.18
    out = images + amount * (chalk - images)
    return Degradation(out, amount / 0.7)


def tarnish(
    images: torch.Tensor, severity: float | torch.Tensor, generator: torch.Generator | None = None
) -> Degradation:
    """Tarnish and oxidation: the surface darkens towards a dull brown-grey, more in some places than others."""
    _check(images)
    s = _severity(severity, images)
    amount = s * 0.6 * (0.6 + 0.4 * _smooth_noise(images, 4, generator))
    tint = _colour((0.55, 0.47, 0.36), images)
    out = images * (1.0 - amount * (1.0 - tint))
    return Degradation(out, amount / 0.6)


def streaks(
    images: torch.Tensor,
    severity: float | torch.Tensor,
    generator: torch.Generator | None = None,
    max_streaks: int = 12,
) -> Degradation:
    """Run-off streaks: thin vertical stains that start at random points and fade downwards (rust or grime).

    The candidate streaks are drawn once; severity switches them on one after another (and darkens them), so a
    higher severity always means a superset of the lower one's streaks.
    """
    _check(images)
    s = _severity(severity, images)
    b, _, h, w = images.shape
    n = max_streaks
    params = _rand((b, n, 5), generator, images)
    x0 = params[..., 0] * w  # column
    width = (0.006 + 0.02 * params[..., 1]) * w
    y0 = params[..., 2] * 0.6 * h  # where the stain starts
    length = (0.2 + 0.5 * params[..., 3]) * h
    ys = torch.arange(h, dtype=images.dtype, device=images.device).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w, dtype=images.dtype, device=images.device).view(1, 1, 1, w) + 0.5
    across = torch.exp(-0.5 * ((xs - x0[..., None, None]) / width[..., None, None]) ** 2)
    down = (ys - y0[..., None, None]) / length[..., None, None]
    along = torch.where((down >= 0) & (down <= 1), 1.0 - down, torch.zeros_like(down))
    # streak i is fully on once severity * n passes i + 1
    on = (s.view(b, 1) * n - torch.arange(n, dtype=images.dtype, device=images.device)).clamp(0.0, 1.0)
    mask = (across * along * on[..., None, None] * (0.6 + 0.4 * params[..., 4, None, None])).sum(1, True)
    mask = mask.clamp(0.0, 1.0)
    colour = _colour((0.36, 0.22, 0.12), images)
    out = images + 0.75 * mask * (colour - images)
    return Degradation(out, mask)


# -- environmental variation A_e (Eq. 5) ----------------------------------------------------------------------


def overexposure(
    images: torch.Tensor, severity: float | torch.Tensor, generator: torch.Generator | None = None
) -> Degradation:
    """Overexposure: up to +1.5 EV of gain and lens flare lifting the blacks; highlights roll off smoothly."""
    _check(images)
    s = _severity(severity, images)
    gain = torch.pow(2.0, 1.5 * s)
    y = images * gain + 0.06 * s
    out = _soft_clip(y, 1.0 - 0.3 * s)
    return Degradation(out, s.expand(-1, 1, *images.shape[-2:]).clone())


def glare(
    images: torch.Tensor, severity: float | torch.Tensor, generator: torch.Generator | None = None
) -> Degradation:
    """Specular glare: a warm-white bloom at a random spot plus a veil of scattered light over the frame."""
    _check(images)
    s = _severity(severity, images)
    b, _, h, w = images.shape
    params = _rand((b, 3), generator, images)
    cx, cy = 0.2 + 0.6 * params[:, 0], 0.2 + 0.6 * params[:, 1]
    radius = 0.08 + 0.12 * params[:, 2]
    ys = (torch.arange(h, dtype=images.dtype, device=images.device) + 0.5) / h
    xs = (torch.arange(w, dtype=images.dtype, device=images.device) + 0.5) / w
    d2 = (ys.view(1, h, 1) - cy.view(b, 1, 1)) ** 2 + (xs.view(1, 1, w) - cx.view(b, 1, 1)) ** 2
    bloom = torch.exp(-d2 / (2 * radius.view(b, 1, 1) ** 2)).unsqueeze(1)
    y = images + s * (0.9 * bloom * _colour((1.0, 0.98, 0.92), images) + 0.08)
    out = _soft_clip(y, 1.0 - 0.15 * s)
    return Degradation(out, (s * bloom).clamp(0.0, 1.0))


def low_light(
    images: torch.Tensor, severity: float | torch.Tensor, generator: torch.Generator | None = None
) -> Degradation:
    """Low light: exposure down to 15 %, a cool cast, and signal-dependent sensor noise (shot + read noise,
    the Poisson-Gaussian model, reparameterised so gradients pass)."""
    _check(images)
    s = _severity(severity, images)
    cast = torch.pow(_colour((0.92, 0.97, 1.08), images), s)
    dark = images * (1.0 - 0.85 * s) * cast
    sigma = torch.sqrt(0.01 * s * dark.clamp_min(0.0) + (0.02 * s) ** 2 + 1e-12)
    out = dark + sigma * _randn(images.shape, generator, images)
    return Degradation(out.clamp(0.0, 1.0), s.expand(-1, 1, *images.shape[-2:]).clone())


DegradationFn = Callable[..., Degradation]
TEMPORAL: dict[str, DegradationFn] = {
    "rust": rust,
    "fading": paint_fading,
    "tarnish": tarnish,
    "streaks": streaks,
}
ENVIRONMENTS: dict[str, DegradationFn] = {
    "overexposure": overexposure,
    "glare": glare,
    "low_light": low_light,
}
_ALL = {**TEMPORAL, **ENVIRONMENTS}


def apply_degradation(
    name: str,
    images: torch.Tensor,
    severity: float | torch.Tensor,
    generator: torch.Generator | None = None,
    **kwargs: torch.Tensor,
) -> Degradation:
    """Apply the degradation called ``name`` (a key of TEMPORAL or ENVIRONMENTS)."""
    if name not in _ALL:
        raise ValueError(f"unknown degradation {name!r}; choose from {sorted(_ALL)}")
    return _ALL[name](images, severity, generator, **kwargs)


def random_degradation(
    images: torch.Tensor,
    names: Sequence[str],
    severity_range: tuple[float, float] = (0.3, 0.8),
    generator: torch.Generator | None = None,
) -> tuple[Degradation, list[str]]:
    """One degradation per image, drawn uniformly from ``names``, with a uniform severity in the range.

    Returns the degraded batch, its masks, and the name applied to each image.
    """
    _check(images)
    if not names:
        raise ValueError("random_degradation needs at least one degradation name")
    unknown = sorted(set(names) - set(_ALL))
    if unknown:
        raise ValueError(f"unknown degradation(s) {unknown}; choose from {sorted(_ALL)}")
    low, high = severity_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"severity_range must satisfy 0 <= low <= high <= 1, got {severity_range}")
    b = images.shape[0]
    picks = torch.randint(len(names), (b,), generator=generator).tolist()
    severity = low + (high - low) * torch.rand(b, generator=generator)
    out_parts: list[torch.Tensor] = [images[0]] * b
    mask_parts: list[torch.Tensor] = [images[0, :1]] * b
    for k, name in enumerate(names):
        rows = [i for i, p in enumerate(picks) if p == k]
        if not rows:
            continue
        index = torch.tensor(rows, device=images.device)
        done = _ALL[name](images[index], severity[rows].to(images), generator)
        for j, i in enumerate(rows):
            out_parts[i], mask_parts[i] = done.image[j], done.mask[j]
    return Degradation(torch.stack(out_parts), torch.stack(mask_parts)), [names[p] for p in picks]


def box_mask(boxes: Sequence[Sequence[Sequence[float]]], size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) mask that is 1 inside any of each image's [x0, y0, x1, y1] pixel boxes (x1, y1 exclusive)."""
    h, w = size
    mask = torch.zeros(len(boxes), 1, h, w)
    for i, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes:
            c0, r0 = max(int(x0), 0), max(int(y0), 0)
            c1, r1 = min(round(x1), w), min(round(y1), h)
            if c1 > c0 and r1 > r0:
                mask[i, 0, r0:r1, c0:c1] = 1.0
    return mask
