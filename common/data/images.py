"""Robust image decoding: every file a dataset can meet is normalised to 8-bit RGB or rejected with a reason.

Real forensics datasets are scraped: zero-byte files, truncated JPEGs, CMYK scans, 16-bit PNGs, palettes with
transparency, phone photos stored sideways with an EXIF tag, the occasional HTML error page saved as `.jpg`.
Detectors must see each of these the same way at train and test time, and one bad file must never kill an epoch,
so decoding goes through `load_rgb`, which either returns a clean RGB image or raises `ImageDecodeError` that
datasets turn into a counted, logged skip.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger("forgelab.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Pillow's default bomb limit (~89 Mpx) warns, and only raises at twice that. Make the limit an error at the
# limit itself: a 20k x 20k "image" in a training folder is an attack or a mistake, never a sample.
MAX_IMAGE_PIXELS: int = 89_478_485


class ImageDecodeError(Exception):
    """A file that cannot become an RGB image. `reason` is a short stable tag used for skip counts."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}{': ' + detail if detail else ''}")


def is_image_file(path: str | Path) -> bool:
    """True for the extensions the CNNDetection-style layouts use (case-insensitive, dotted names are fine)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB the way a viewer would show it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: rescale the full range to 8 bits instead of Pillow's clipping `convert("L")`.
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # "F": assume [0, 1] floats when in range, else min-max
            lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
            arr = arr * 255.0 if lo >= 0.0 and hi <= 1.0 else (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite transparency onto white (the browser/viewer convention) so alpha never leaks into colour.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX ...: Pillow's conversions are the standard ones.
    return img.convert("RGB")


def load_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB image with EXIF orientation applied.

    Raises `ImageDecodeError` with reason one of: missing, empty, too_large, not_an_image, truncated, corrupt.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise ImageDecodeError(path, "missing") from err
    if size == 0:
        raise ImageDecodeError(path, "empty", "zero-byte file")
    previous_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a skip, not a half-grey training sample
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(path, "too_large", f"{width}x{height} exceeds {max_pixels} pixels")
                if width == 0 or height == 0:
                    raise ImageDecodeError(path, "corrupt", "zero-sized image")
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(path, "too_large", str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(path, "not_an_image", "Pillow cannot identify the format") from err
    except OSError as err:
        reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise ImageDecodeError(path, reason, str(err)) from err
    except (ValueError, SyntaxError, struct.error) as err:
        raise ImageDecodeError(path, "corrupt", str(err)) from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated


class SkipLog:
    """Counts skipped files by reason and logs the first few of each, so a bad folder is visible but not noisy."""

    def __init__(self, name: str, max_logged_per_reason: int = 5) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self.max_logged = max_logged_per_reason
        self._seen: set[str] = set()

    def record(self, path: str | Path, reason: str, detail: str = "") -> None:
        """Count `path` once under `reason`, however many splits or epochs meet it."""
        if str(path) in self._seen:
            return
        self._seen.add(str(path))
        self.counts[reason] += 1
        if self.counts[reason] <= self.max_logged:
            log.warning("%s: skipping %s (%s%s)", self.name, path, reason, f": {detail}" if detail else "")
        elif self.counts[reason] == self.max_logged + 1:
            log.warning("%s: further '%s' skips are counted but not logged", self.name, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
