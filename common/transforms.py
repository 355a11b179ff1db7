"""Image transforms shared by the datamodules: decoded PIL RGB image -> float tensor (3, H, W) in [0, 1].

Normalisation (ImageNet or CLIP mean/std) belongs to the model, not the data, so the same batches feed any
backbone and the perturbations of `common.perturbations` act on un-normalised pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import v2

ResizeMode = Literal["resize", "center_crop", "random_crop"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of the real-vs-generated classifier (paper 003, Sec. 4): random rotation, Gaussian
    noise, brightness/contrast and colour jitter (`paper_augmentations`). Each is applied with probability `p`;
    0 disables one. `horizontal_flip` is not in the paper's list (off in the paper's configs)."""

    p: float = 0.5
    rotation_degrees: float = 15.0
    noise_sigma: float = 0.02
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augment.p must be in [0, 1], got {self.p}")
        for name in ("rotation_degrees", "noise_sigma", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue must be in [0, 0.5], got {self.hue}")


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
    """Geometry, then the paper's augmentations on the [0, 1] tensor, each with probability `augment.p`
    (online; `horizontal_flip` adds a flip the paper does not list)."""
    augment = augment or AugmentConfig(p=0.0)
    ops: list[Callable] = [v2.ToImage(), *_geometry(image_size, mode, train=True)]
    if augment.horizontal_flip and augment.p > 0:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if augment.p > 0:
        ops += [v2.RandomApply([op], p=augment.p) for _name, op in paper_augmentations(augment)]
    return v2.Compose(ops)
