"""Image transforms shared by the datamodules: decoded PIL RGB image -> float tensor (3, H, W) in [0, 1].

Normalisation (ImageNet or CLIP mean/std) belongs to the model, not the data, so the same batches feed any
backbone and the perturbations of `common.perturbations` act on un-normalised pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from common.perturbations import gaussian_blur

ResizeMode = Literal["resize", "center_crop", "random_crop"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. Paper 003 (Sec. 4): random rotation, Gaussian noise, brightness/contrast and colour
    jitter (`paper_augmentations`), each applied with probability `p`; a parameter of 0 disables one.
    CNNDetection (Wang et al., CVPR 2020): `blur_jpeg_p` > 0 turns on their Blur+JPEG augmentation
    (`BlurJpegAugment`, the paper's "Blur+JPEG (0.5)" and "(0.1)" settings) on the full image before the crop,
    with `blur_sigma` and `jpeg_quality` as its ranges. `horizontal_flip` is a switch of its own (not in paper
    003's list, off in its configs; on in CNNDetection's and NPR's, whose only augmentation it is for NPR); no
    AugmentConfig at all (`augment: null`) means no augmentation, flip included."""

    p: float = 0.5
    rotation_degrees: float = 15.0
    noise_sigma: float = 0.02
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    horizontal_flip: bool = True
    blur_jpeg_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_quality: tuple[int, int] = (30, 100)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augment.p must be in [0, 1], got {self.p}")
        for name in ("rotation_degrees", "noise_sigma", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue must be in [0, 0.5], got {self.hue}")
        # validates blur_jpeg_p, blur_sigma and jpeg_quality with the same messages as the transform
        checked = BlurJpegAugment(self.blur_jpeg_p, self.blur_sigma, self.jpeg_quality)
        object.__setattr__(
            self, "blur_sigma", checked.blur_sigma
        )  # YAML gives lists: keep (low, high) tuples
        object.__setattr__(self, "jpeg_quality", checked.jpeg_quality)


class BlurJpegAugment:
    """CNNDetection's training augmentation (Wang et al., CVPR 2020, Sec. 4.1; `data_augment` of their code):
    with probability `p` a Gaussian blur with sigma ~ U[`blur_sigma`], then, independently with probability `p`,
    a JPEG re-encode with quality ~ U{`jpeg_quality[0]`..`jpeg_quality[1]`} (both ends included). Applied to the
    whole decoded image, before any crop, as their pipeline does.

    The blur is `common.perturbations.gaussian_blur` (scipy's `gaussian_filter`, mode reflect, the filter their
    code calls) written back to 8 bits, as their in-place uint8 filtering does; the JPEG is Pillow's encoder
    (their code picks cv2 or PIL at random; both are libjpeg, cv2 is not a dependency here).

    Randomness: `generator` when given (tests, reproducible streams), else torch's global RNG, which Lightning's
    `seed_everything(workers=True)` seeds per DataLoader worker, so runs are seedable and workers differ.
    """

    def __init__(
        self,
        p: float,
        blur_sigma: tuple[float, float] = (0.0, 3.0),
        jpeg_quality: tuple[int, int] = (30, 100),
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.blur_jpeg_p must be in [0, 1], got {p}")
        low, high = (float(v) for v in blur_sigma)
        if not 0.0 <= low <= high:
            raise ValueError(f"augment.blur_sigma must be a range 0 <= low <= high, got {tuple(blur_sigma)}")
        q_low, q_high = (int(v) for v in jpeg_quality)
        if not 1 <= q_low <= q_high <= 100:
            raise ValueError(
                f"augment.jpeg_quality must be a range 1 <= low <= high <= 100, got {jpeg_quality}"
            )
        self.p, self.blur_sigma, self.jpeg_quality = float(p), (low, high), (q_low, q_high)
        self.generator = generator

    def sample(self) -> tuple[float | None, int | None]:
        """(blur sigma or None, JPEG quality or None) for one image: two independent coin flips."""
        g = self.generator
        draws = torch.rand(3, generator=g).tolist()
        sigma = None
        if draws[0] < self.p:
            low, high = self.blur_sigma
            sigma = low + draws[1] * (high - low)
        quality = None
        if draws[2] < self.p:
            q_low, q_high = self.jpeg_quality
            quality = int(torch.randint(q_low, q_high + 1, (1,), generator=g))
        return sigma, quality

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p == 0:
            return image
        sigma, quality = self.sample()
        return apply_blur_jpeg(image, sigma, quality)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, blur_sigma={self.blur_sigma}, jpeg_quality={self.jpeg_quality})"


def apply_blur_jpeg(image: Image.Image, sigma: float | None, quality: int | None) -> Image.Image:
    """Blur (8-bit result) then JPEG re-encode of an RGB image; None skips a step (both None: the same image)."""
    image = image.convert("RGB")
    if sigma is not None and sigma > 0:
        array = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        blurred = gaussian_blur(array, sigma).round().clamp(0, 255).to(torch.uint8)
        image = Image.fromarray(blurred.permute(1, 2, 0).numpy())
    if quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    return image


def _geometry(image_size: int, mode: ResizeMode, train: bool) -> list[Callable]:
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if mode == "resize":
        return [v2.Resize((image_size, image_size), antialias=True)]
    if mode == "center_crop" or (mode == "random_crop" and not train):
        # Pad small images instead of failing: a 100 px image in a 224 px crop pipeline is data, not an error.
        return [v2.CenterCrop(image_size)]
    if mode == "random_crop":
        return [v2.RandomCrop(image_size, pad_if_needed=True, padding_mode="reflect")]
    raise ValueError(f"resize mode must be one of resize, center_crop, random_crop; got {mode!r}")


def build_eval_transform(
    image_size: int, mode: ResizeMode = "resize"
) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic: geometry only."""
    return v2.Compose(
        [v2.ToImage(), *_geometry(image_size, mode, train=False), v2.ToDtype(torch.float32, scale=True)]
    )


def paper_augmentations(augment: AugmentConfig) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Paper 003 Sec. 4's list, in its order: random rotation, Gaussian noise, brightness and contrast
    adjustments, colour jitter (saturation and hue), as (name, transform of a [0, 1] tensor). A technique whose
    parameters are all 0 is left out. The paper gives no parameter values: they are the config's."""
    ops: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
    if augment.rotation_degrees > 0:
        ops.append(("rotation", v2.RandomRotation(augment.rotation_degrees)))
    if augment.noise_sigma > 0:
        ops.append(("gaussian_noise", v2.GaussianNoise(sigma=augment.noise_sigma, clip=True)))
    if augment.brightness or augment.contrast:
        ops.append(
            ("brightness_contrast", v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast))
        )
    if augment.saturation or augment.hue:
        ops.append(("color_jitter", v2.ColorJitter(saturation=augment.saturation, hue=augment.hue)))
    return ops


def build_train_transform(
    image_size: int, mode: ResizeMode = "resize", augment: AugmentConfig | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """CNNDetection's Blur+JPEG on the full image (when `augment.blur_jpeg_p` > 0), geometry, the flip, then
    paper 003's augmentations on the [0, 1] tensor, each with probability `augment.p` (online;
    `horizontal_flip` adds a flip paper 003 does not list)."""
    augment = augment or AugmentConfig(p=0.0, horizontal_flip=False)
    ops: list[Callable] = []
    if augment.blur_jpeg_p > 0:
        ops.append(BlurJpegAugment(augment.blur_jpeg_p, augment.blur_sigma, augment.jpeg_quality))
    ops += [v2.ToImage(), *_geometry(image_size, mode, train=True)]
    if augment.horizontal_flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if augment.p > 0:
        ops += [v2.RandomApply([op], p=augment.p) for _name, op in paper_augmentations(augment)]
    return v2.Compose(ops)
