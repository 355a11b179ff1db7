"""Hole masks for inpainting: DeepFill v2's free-form brush strokes, its random rectangles, object masks (MS-COCO
instance annotations or a folder of mask files: paper 003's object removal, object_masks.py), mask files, and the
hole ratio every result is bucketed by.

Convention used throughout this project: a mask is a float tensor (1, H, W) or (B, 1, H, W) with **1 in the hole**
(pixels to fill) and 0 where the image is known, as DeepFill v2 and diffusers use it. Liu et al.'s partial
convolution writes M = 1 for *valid* pixels; its code converts with `valid = 1 - hole` at the boundary and names
the variable `valid`, never `mask`.

Every generator here draws from an explicit `np.random.Generator`, so the masks of a probe (image i gets mask i in
every set) and of validation/test epochs are the same on every run and machine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from common.errors import ConfigError

MaskKind = Literal["free_form", "rectangle", "free_form+rectangle", "coco_objects", "mask_folder"]
MASK_KINDS: tuple[str, ...] = ("free_form", "rectangle", "free_form+rectangle", "coco_objects", "mask_folder")
SOURCE_KINDS: tuple[str, ...] = ("coco_objects", "mask_folder")

# Liu et al. (2018) Table 1 reports results by hole-to-image area ratio in these bins; the probe uses them too.
DEFAULT_BUCKET_EDGES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0)

# DeepFill v2's brush-stroke constants (Yu et al. 2019, Algorithm 1; official code `brush_stroke_mask`), defined
# for 256 x 256 images. Stroke widths scale with the shorter side for other sizes; the stroke length already
# scales with the image diagonal in the original.
_REFERENCE_SIDE = 256
_MIN_VERTICES, _MAX_VERTICES = 4, 12  # numpy randint upper bound: 4-11 vertices
_MEAN_ANGLE = 2 * math.pi / 5
_ANGLE_RANGE = 2 * math.pi / 15
_MIN_WIDTH, _MAX_WIDTH = 12, 40
_MAX_STROKES = 4  # randint(1, 4): 1-3 strokes


class MaskError(ValueError):
    """A mask that cannot be used: `reason` is a short stable tag for skip counts (empty, full, not_an_image...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class MaskConfig:
    """How holes are drawn.

    kind: "free_form" (DeepFill v2 brush strokes), "rectangle" (DeepFill v2's random box), or
        "free_form+rectangle" (their union: what DeepFill v2 trains on).
    rect_fraction: side of the rectangle relative to the image side before shrinking (128/256 in DeepFill v2).
    rect_max_delta: the rectangle shrinks by up to this fraction of the side, on each axis (32/256).
    min_ratio, max_ratio: hole ratios outside this range are redrawn (an empty or nearly full mask is no test).
    source: for "coco_objects" an instances_*.json (each draw: one annotated object, polygon or RLE, resized to
        the image), for "mask_folder" a folder of mask files (each draw: one file); see `image_mask` for masks
        matched to an image by file stem.
    object_choice: which objects of a stem-matched COCO image make its hole: "largest" (by COCO's area) or "all".
    dilate: grow object / folder masks by this many pixels after resizing (0: the outline as annotated).
    """

    kind: MaskKind = "free_form"
    rect_fraction: float = 0.5
    rect_max_delta: float = 0.125
    min_ratio: float = 0.01
    max_ratio: float = 0.9
    source: str | None = None
    object_choice: Literal["largest", "all"] = "largest"
    dilate: int = 0

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {', '.join(MASK_KINDS)}; got {self.kind!r}")
        if (self.kind in SOURCE_KINDS) != (self.source is not None):
            raise ConfigError(
                f"mask source is needed by kinds {', '.join(SOURCE_KINDS)} and only by them (kind {self.kind!r}, "
                f"source {self.source!r})"
            )
        if self.object_choice not in ("largest", "all"):
            raise ValueError(f"object_choice must be largest or all, got {self.object_choice!r}")
        if self.dilate < 0:
            raise ValueError(f"dilate must be >= 0, got {self.dilate}")
        if not 0.0 < self.rect_fraction <= 1.0:
            raise ValueError(f"rect_fraction must be in (0, 1], got {self.rect_fraction}")
        if not 0.0 <= self.rect_max_delta < self.rect_fraction:
            raise ValueError(f"rect_max_delta must be in [0, rect_fraction), got {self.rect_max_delta}")
        if not 0.0 <= self.min_ratio < self.max_ratio <= 1.0:
            raise ValueError(f"need 0 <= min_ratio < max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")


def free_form_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Yu et al. (2019) Algorithm 1, free-form mask generation: 1-3 brush strokes, each a random walk of 4-11
    vertices with alternating turning angles around 2*pi/5 (+-2*pi/15), segment lengths ~N(r, r/2) clipped to
    [0, 2r] with r = diagonal/8, drawn as a polyline of width 12-40 px (at 256 px) with round joints; then random
    horizontal and vertical flips. Returns a float32 (H, W) array, 1 in the hole.

    (The official code computes the flips but discards the flipped image; we apply them, as intended.)
    """
    scale = min(height, width) / _REFERENCE_SIDE
    average_radius = math.sqrt(height * height + width * width) / 8
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, _MAX_STROKES))):
        num_vertex = int(rng.integers(_MIN_VERTICES, _MAX_VERTICES))
        angle_min = _MEAN_ANGLE - rng.uniform(0, _ANGLE_RANGE)
        angle_max = _MEAN_ANGLE + rng.uniform(0, _ANGLE_RANGE)
        angles = [
            2 * math.pi - rng.uniform(angle_min, angle_max)
            if i % 2 == 0
            else rng.uniform(angle_min, angle_max)
            for i in range(num_vertex)
        ]
        vertices = [(int(rng.integers(0, width)), int(rng.integers(0, height)))]
        for angle in angles:
            radius = float(np.clip(rng.normal(average_radius, average_radius // 2), 0, 2 * average_radius))
            x = float(np.clip(vertices[-1][0] + radius * math.cos(angle), 0, width))
            y = float(np.clip(vertices[-1][1] + radius * math.sin(angle), 0, height))
            vertices.append((int(x), int(y)))
        stroke = max(1, int(rng.uniform(_MIN_WIDTH, _MAX_WIDTH) * scale))
        draw.line(vertices, fill=1, width=stroke)
        for vx, vy in vertices:
            draw.ellipse((vx - stroke // 2, vy - stroke // 2, vx + stroke // 2, vy + stroke // 2), fill=1)
    mask = np.asarray(canvas, dtype=np.float32)
    if rng.normal() > 0:
        mask = mask[:, ::-1]
    if rng.normal() > 0:
        mask = mask[::-1, :]
    return np.ascontiguousarray(mask)


def rectangle_mask(
    height: int, width: int, rng: np.random.Generator, fraction: float = 0.5, max_delta: float = 0.125
) -> np.ndarray:
    """DeepFill v2's `random_bbox` + `bbox2mask`: a box of `fraction` x the image side at a uniformly random
    position (no margin), shrunk on each side by a random 0..max_delta/2 of the side. 1 in the hole."""
    box_h, box_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    top = int(rng.integers(0, max(1, height - box_h)))
    left = int(rng.integers(0, max(1, width - box_w)))
    shrink_h = int(rng.integers(0, int(height * max_delta) // 2 + 1))
    shrink_w = int(rng.integers(0, int(width * max_delta) // 2 + 1))
    mask = np.zeros((height, width), np.float32)
    mask[top + shrink_h : top + box_h - shrink_h, left + shrink_w : left + box_w - shrink_w] = 1.0
    return mask


def hole_ratio(mask: torch.Tensor | np.ndarray) -> torch.Tensor | float:
    """Fraction of hole pixels: a float for one (H, W)/(1, H, W) mask, a (B,) tensor for a (B, 1, H, W) batch."""
    if isinstance(mask, np.ndarray):
        return float(mask.mean())
    if mask.dim() == 4:
        return mask.flatten(1).float().mean(dim=1)
    return float(mask.float().mean())


def _source_mask(height: int, width: int, config: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """One object of the COCO file or one file of the mask folder, drawn by `rng`, at (height, width)."""
    from projects.inpaint_probe import object_masks

    if config.kind == "coco_objects":
        instances = object_masks.read_coco_instances(str(config.source))
        mask = instances.object_mask(int(rng.integers(0, len(instances.annotations))))
    else:
        files = sorted(object_masks.mask_folder_index(str(config.source)).values())
        try:
            mask, _ = load_mask(files[int(rng.integers(0, len(files)))])
        except MaskError:
            return np.zeros((height, width), np.float32)  # unusable file: redrawn by the ratio check
    return object_masks.dilate_mask(object_masks.resize_mask(mask, height, width), config.dilate)


def image_mask(image_path: str | Path, height: int, width: int, config: MaskConfig) -> np.ndarray | None:
    """The hole of one image matched by file stem: its COCO objects (`object_choice`) or the mask file of the same
    stem in the folder, resized to (height, width) and dilated; None when the source has none for this image
    (the caller counts it as a skip). Raises MaskError for an unusable mask file, as load_mask."""
    from projects.inpaint_probe import object_masks

    if config.kind not in SOURCE_KINDS:
        raise ConfigError(
            f"masks matched to images need kind coco_objects or mask_folder, not {config.kind!r}"
        )
    stem = Path(image_path).stem
    if config.kind == "coco_objects":
        mask = object_masks.read_coco_instances(str(config.source)).image_mask(stem, config.object_choice)
    else:
        path = object_masks.mask_folder_index(str(config.source)).get(stem)
        mask = load_mask(path)[0] if path is not None else None
    if mask is None:
        return None
    mask = object_masks.dilate_mask(object_masks.resize_mask(mask, height, width), config.dilate)
    check_mask_coverage(mask, f"mask of {stem}")
    return mask


def sample_mask(height: int, width: int, config: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """One mask of `config.kind` whose hole ratio lies in [min_ratio, max_ratio] (redrawn up to 100 times)."""
    for _ in range(100):
        if config.kind in SOURCE_KINDS:
            mask = _source_mask(height, width, config, rng)
        elif config.kind == "free_form":
            mask = free_form_mask(height, width, rng)
        elif config.kind == "rectangle":
            mask = rectangle_mask(height, width, rng, config.rect_fraction, config.rect_max_delta)
        else:
            mask = np.maximum(
                free_form_mask(height, width, rng),
                rectangle_mask(height, width, rng, config.rect_fraction, config.rect_max_delta),
            )
        if config.min_ratio <= mask.mean() <= config.max_ratio:
            return mask
    raise MaskError(
        f"could not draw a {config.kind} mask of {height}x{width} with hole ratio in "
        f"[{config.min_ratio}, {config.max_ratio}] in 100 tries: widen the range",
        reason="ratio_out_of_range",
    )


def mask_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator for mask number `keys` of run `seed`: image i of every probe set gets the same mask."""
    material = [seed] + [
        k if isinstance(k, int) else int.from_bytes(k.encode()[:8].ljust(8, b"\0")) for k in keys
    ]
    return np.random.default_rng(np.random.SeedSequence(material))


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a mask file (white = hole) as float32 (H, W) in {0, 1}; returns (mask, notes).

    Any Pillow mode is accepted: RGBA/LA masks use their alpha when the colour is flat, everything else its
    luminance, thresholded at 50 %. A mask of another size than `size` (W, H) is resized with nearest neighbour
    and noted ("resized"); a converted mode is noted ("converted_mode"). An all-zero (nothing to fill) or all-one
    (nothing to condition on) mask raises MaskError with reason "empty" or "full".
    """
    notes: list[str] = []
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                alpha = np.asarray(rgba)[..., 3]
                gray = np.asarray(rgba.convert("L"))
                plane = Image.fromarray(alpha if gray.min() == gray.max() else gray)
                notes.append("converted_mode")
            elif image.mode != "L":
                plane = image.convert("L")
                if image.mode != "1":
                    notes.append("converted_mode")
            else:
                plane = image.copy()
    except FileNotFoundError as err:
        raise MaskError(f"mask file {path} does not exist", reason="missing") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MaskError(f"mask file {path} is not a readable image ({err})", reason="not_an_image") from err
    if size is not None and plane.size != tuple(size):
        plane = plane.resize(tuple(size), Image.Resampling.NEAREST)
        notes.append("resized")
    mask = (np.asarray(plane, dtype=np.float32) >= 128).astype(np.float32)
    check_mask_coverage(mask, str(path))
    return mask, notes


def check_mask_coverage(mask: np.ndarray | torch.Tensor, name: str = "mask") -> None:
    """Reject masks with no hole (nothing to inpaint) or no known pixel (nothing to inpaint from)."""
    total = float(mask.sum())
    count = mask.size if isinstance(mask, np.ndarray) else mask.numel()
    if total == 0:
        raise MaskError(f"{name} has no hole pixel (all zero): nothing to inpaint", reason="empty")
    if total == count:
        raise MaskError(f"{name} is all hole (all one): nothing to condition on", reason="full")


def check_mask_batch(image: torch.Tensor, hole: torch.Tensor) -> None:
    """The shapes and values an inpainter accepts: image (B, 3, H, W), hole (B, 1, H, W) in {0, 1}."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(image.shape)}")
    if hole.dim() != 4 or hole.shape[1] != 1:
        raise ValueError(f"masks must be (B, 1, H, W) with 1 in the hole, got {tuple(hole.shape)}")
    if hole.shape[0] != image.shape[0] or hole.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask {tuple(hole.shape)} does not match image {tuple(image.shape)}")
    if not torch.all((hole == 0) | (hole == 1)):
        raise ValueError("masks must be binary (0 known, 1 hole); threshold soft masks first")


def bucket_label(ratio: float, edges: Sequence[float] = DEFAULT_BUCKET_EDGES) -> str:
    """The hole-ratio bucket of `ratio`, e.g. "10-20%" for 0.15; the last bucket includes its upper edge."""
    if not edges or len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"bucket edges must be increasing, at least two: {edges}")
    for low, high in itertools.pairwise(edges):
        if low <= ratio < high or (high == edges[-1] and ratio == high):
            return f"{round(100 * low)}-{round(100 * high)}%"
    raise ValueError(f"hole ratio {ratio} is outside the bucket edges {edges[0]}..{edges[-1]}")


def to_tensor(mask: np.ndarray) -> torch.Tensor:
    """(H, W) float array -> (1, H, W) float tensor."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).unsqueeze(0)
