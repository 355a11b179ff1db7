"""Object masks for paper 003's object removal (Sec. 5.2, Fig. 6): holes shaped like the objects of MS-COCO's
instance annotations (`instances_*.json`: polygons, uncompressed and compressed RLE), or any folder of mask files
matched to images by file stem. 1 in the hole, as everywhere in this project (see masks.py).

pycocotools is not a dependency here, so both decoders are written out: COCO's RLE (column-major run lengths,
starting with a run of zeros; the compressed form is pycocotools' `rleToString` character code) and polygon
filling. Polygons are filled by sampling pixel centres (matplotlib's Path.contains_points): PIL's
ImageDraw.polygon also fills the outline pixels, so a w x h box would cover (w + 1) x (h + 1) pixels and small
objects' hole ratios would come out too large; centre sampling gives the polygon's area (COCO's `area`) to within
the boundary pixels, as pycocotools' rasterisation does.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.path import Path as PolygonPath
from PIL import Image

from common.data.images import is_image_file
from common.errors import ConfigError

log = logging.getLogger("forgelab.inpaint_probe")


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """pycocotools' compressed RLE string -> run lengths. Each count is little-endian base-32 in characters
    48 + 5-bit groups, bit 0x20 meaning "more groups follow", bit 0x10 of the last group its sign; from the fourth
    count on, the stored value is the difference to the count two before."""
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("compressed RLE ends inside a count")
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            position += 1
            shift += 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE ({"size": [h, w], "counts": list or compressed str}) -> float32 (h, w), 1 on the object."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs sum to {sum(runs)} for a {height}x{width} mask (or are negative)")
    flat = np.zeros(height * width, np.float32)
    position = 0
    for index, run in enumerate(runs):
        if index % 2:  # odd runs are ones
            flat[position : position + run] = 1.0
        position += run
    return flat.reshape(width, height).T.copy()  # COCO stores columns first (Fortran order)


def polygon_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ([[x1, y1, x2, y2, ...], ...], pixel coordinates) -> float32 (h, w): a pixel is on the object
    when its centre (x + 0.5, y + 0.5) lies inside one of the polygons."""
    mask = np.zeros((height, width), bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            continue
        x0, y0 = np.floor(points.min(0)).astype(int).clip(0, [width, height])
        x1, y1 = np.ceil(points.max(0)).astype(int).clip(0, [width, height])
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
        inside = PolygonPath(points).contains_points(centres).reshape(ys.shape)
        mask[y0:y1, x0:x1] |= inside
    return mask.astype(np.float32)


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Any COCO `segmentation` (polygon list, uncompressed RLE, compressed RLE) -> float32 (h, w)."""
    if isinstance(segmentation, list):
        return polygon_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        mask = decode_rle(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"RLE of size {mask.shape} for a {height}x{width} image")
        return mask
    raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")


@dataclass
class CocoInstances:
    """The images and object annotations of one instances_*.json (what object masks need of it)."""

    path: str
    images: dict[int, tuple[str, int, int]]  # id -> (file_name, height, width)
    annotations: list[dict[str, Any]]  # those with a segmentation, in file order
    by_image: dict[int, list[int]] = field(default_factory=dict)  # image id -> indices into annotations
    by_stem: dict[str, int] = field(default_factory=dict)  # file stem -> image id

    def object_mask(self, index: int) -> np.ndarray:
        """The mask of annotation `index` at its image's size."""
        annotation = self.annotations[index]
        _, height, width = self.images[annotation["image_id"]]
        return segmentation_mask(annotation["segmentation"], height, width)

    def image_mask(self, stem: str, choice: str = "largest") -> np.ndarray | None:
        """The hole for image `stem`: its largest object ("largest", by COCO's area) or all its objects ("all");
        None when the image is not annotated or has no object."""
        image_id = self.by_stem.get(stem)
        indices = self.by_image.get(image_id, []) if image_id is not None else []
        if not indices:
            return None
        if choice == "largest":
            return self.object_mask(max(indices, key=lambda i: float(self.annotations[i].get("area", 0.0))))
        return np.maximum.reduce([self.object_mask(i) for i in indices])


@functools.lru_cache(maxsize=4)
def read_coco_instances(path: str) -> CocoInstances:
    """Index an instances_*.json once per process (train2017's is 450 MB); annotations without a segmentation are
    skipped with a logged count."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"COCO annotations {file} do not exist (instances_<split>.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"COCO annotations {file} are not valid JSON ({err})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ConfigError(f"{file} has no 'images' and 'annotations': not a COCO instances file")
    images = {
        int(im["id"]): (str(im["file_name"]), int(im["height"]), int(im["width"])) for im in data["images"]
    }
    annotations, skipped = [], 0
    for annotation in data["annotations"]:
        if annotation.get("segmentation") and int(annotation.get("image_id", -1)) in images:
            annotations.append(annotation)
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d annotations without a segmentation or image", file, skipped)
    if not annotations:
        raise ConfigError(f"{file} holds no object segmentation")
    instances = CocoInstances(str(file), images, annotations)
    for index, annotation in enumerate(annotations):
        instances.by_image.setdefault(int(annotation["image_id"]), []).append(index)
    instances.by_stem = {Path(name).stem: image_id for image_id, (name, _, _) in images.items()}
    return instances


@functools.lru_cache(maxsize=4)
def mask_folder_index(folder: str) -> dict[str, str]:
    """{file stem: path} of the mask images in `folder` (recursive; the first of duplicate stems wins, logged)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"mask folder {root} does not exist")
    index: dict[str, str] = {}
    duplicates = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)):
        if file.stem in index:
            duplicates += 1
            continue
        index[file.stem] = str(file)
    if duplicates:
        log.warning(
            "mask folder %s: %d files share a stem with an earlier one and are ignored", root, duplicates
        )
    if not index:
        raise ConfigError(f"mask folder {root} holds no image file")
    return index


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a {0, 1} mask (as load_mask does for files of another size)."""
    if mask.shape == (height, width):
        return mask
    image = Image.fromarray((mask * 255).astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)
    return (np.asarray(image) >= 128).astype(np.float32)


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the hole by `pixels` (a square structuring element): object removal takes the object's rim too."""
    if pixels <= 0:
        return mask
    from scipy.ndimage import binary_dilation

    structure = np.ones((2 * pixels + 1, 2 * pixels + 1), bool)
    return binary_dilation(mask > 0.5, structure=structure).astype(np.float32)
