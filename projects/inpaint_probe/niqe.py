"""NIQE, the Naturalness Image Quality Evaluator (Mittal, Soundararajan & Bovik 2013, "Making a 'Completely
Blind' Image Quality Analyzer", IEEE SPL 20(3)), as the authors' MATLAB release computes it; lower is more natural.

1. Grey image (MATLAB rgb2gray, rounded to integers as for uint8 input), cropped to whole 96 x 96 blocks.
2. At two scales (full, then MATLAB `imresize(im, 0.5)`: bicubic with antialiasing), the MSCN coefficients
   (Eq. 1): (I - μ) / (σ + 1) with μ, σ from a 7 x 7 Gaussian window (σ_w = 7/6, replicated borders).
3. Per block (96 px, then 48 px): 18 features (Sec. III-B, Eq. 2-8): the asymmetric generalised Gaussian
   (AGGD) fit of the MSCN coefficients (shape α, mean scale (β_l + β_r)/2), and of their products with the
   horizontal, vertical and both diagonal neighbours (α, mean η, β_l, β_r each): 36 per block.
4. A multivariate Gaussian fitted to the test image's block features (mean; covariance over complete rows) is
   compared with the pristine model (ν1, Σ1) fitted on natural images (Eq. 10):
       D = sqrt((ν1 - ν2)^T ((Σ1 + Σ2) / 2)^+ (ν1 - ν2)).

The pristine parameters (`niqe_pristine_params.npz`) are those of the official release; see NIQE_PARAMS.md for
their origin and licence. The test suite checks this implementation against BasicSR's independent one.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.ndimage import correlate
from scipy.special import gamma

BLOCK = 96
MIN_SIDE = 2 * BLOCK  # 2 x 2 blocks: fewer give no usable covariance of the block features
PARAMS_FILE = Path(__file__).with_name("niqe_pristine_params.npz")
ColorMode = Literal["gray", "y"]

# MATLAB rgb2gray: the luma row of the inverse of the NTSC YIQ matrix
_GRAY_WEIGHTS = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
_AGGD_SHAPES = np.arange(0.2, 10.001, 0.001)  # MATLAB gam = 0.2:0.001:10


class ImageTooSmallForNIQE(ValueError):
    """NIQE is defined on 96-pixel blocks and needs at least 2 x 2 of them."""


@cache
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """(ν1, Σ1): mean (36,) and covariance (36, 36) of the pristine natural-image model."""
    with np.load(PARAMS_FILE) as params:
        return params["mu"].astype(np.float64), params["cov"].astype(np.float64)


def to_luminance(image: np.ndarray, color: ColorMode = "gray") -> np.ndarray:
    """uint8-range RGB (H, W, 3) or grey (H, W) -> float64 grey levels, rounded like MATLAB's uint8 output.

    "gray": MATLAB rgb2gray (the official NIQE). "y": the Y of MATLAB rgb2ycbcr, 16 + (65.481 R + 128.553 G +
    24.966 B) for R, G, B in [0, 1] (the super-resolution literature's convention, e.g. BasicSR's default).
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        return np.round(array)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"NIQE takes an (H, W) grey or (H, W, 3) RGB image, got shape {array.shape}")
    if color == "gray":
        return np.round(array @ _GRAY_WEIGHTS)
    if color == "y":
        return np.round(16.0 + array @ np.array([65.481, 128.553, 24.966]) / 255.0)
    raise ValueError(f"color must be 'gray' or 'y', got {color!r}")


def gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    """MATLAB fspecial('gaussian', size, sigma), normalised to sum 1."""
    x = np.arange(size) - (size - 1) / 2
    window = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return window / window.sum()


def mscn(image: np.ndarray, window: np.ndarray | None = None) -> np.ndarray:
    """Mittal et al. (2013) Eq. 1: mean-subtracted contrast-normalised coefficients (I - μ) / (σ + 1), with
    Gaussian-weighted local mean and deviation and replicated borders (MATLAB imfilter 'replicate')."""
    window = gaussian_window() if window is None else window
    mu = correlate(image, window, mode="nearest")
    sigma = np.sqrt(np.abs(correlate(image * image, window, mode="nearest") - mu * mu))
    return (image - mu) / (sigma + 1.0)


def aggd_fit(values: np.ndarray) -> tuple[float, float, float]:
    """Moment-matching fit of an asymmetric generalised Gaussian (Lasmar et al. 2009; Mittal et al. Eq. 6-7):
    returns (α, β_l, β_r). The shape α is the grid point 0.2:0.001:10 whose ratio Γ(2/α)² / (Γ(1/α) Γ(3/α))
    best matches the normalised sample ratio, as in the MATLAB release."""
    values = values.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        left = math.sqrt(np.mean(values[values < 0] ** 2)) if np.any(values < 0) else math.nan
        right = math.sqrt(np.mean(values[values > 0] ** 2)) if np.any(values > 0) else math.nan
        gamma_hat = left / right
        r_hat = np.mean(np.abs(values)) ** 2 / np.mean(values**2)
        r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    if not math.isfinite(r_hat_norm):
        return math.nan, math.nan, math.nan
    alpha = float(_AGGD_SHAPES[np.argmin((_aggd_ratios() - r_hat_norm) ** 2)])
    scale = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * scale, right * scale


@cache
def _aggd_ratios() -> np.ndarray:
    return gamma(2 / _AGGD_SHAPES) ** 2 / (gamma(1 / _AGGD_SHAPES) * gamma(3 / _AGGD_SHAPES))


def block_features(coefficients: np.ndarray) -> list[float]:
    """Mittal et al. Sec. III-B: 18 features of one block of MSCN coefficients: (α, (β_l + β_r) / 2) of the
    coefficients, then (α, η, β_l, β_r) with η = (β_r - β_l) Γ(2/α) / Γ(1/α) (Eq. 8) for the products with the
    neighbour to the right, below, and on the two diagonals (circular shifts, as MATLAB circshift)."""
    alpha, beta_l, beta_r = aggd_fit(coefficients)
    features = [alpha, (beta_l + beta_r) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
        alpha, beta_l, beta_r = aggd_fit(coefficients * np.roll(coefficients, shift, axis=(0, 1)))
        eta = (beta_r - beta_l) * gamma(2 / alpha) / gamma(1 / alpha) if math.isfinite(alpha) else math.nan
        features += [alpha, eta, beta_l, beta_r]
    return features


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5), MATLAB imresize's 'bicubic'."""
    ax = np.abs(x)
    return (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1) + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


def _resize_matrix(in_length: int, scale: float) -> np.ndarray:
    """The (out, in) matrix of MATLAB imresize along one axis: bicubic, antialiased when shrinking (the kernel is
    stretched by 1/scale), output pixel centres mapped as u = x/scale + (1 - 1/scale)/2, borders mirrored."""
    out_length = math.ceil(in_length * scale)
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # 1-based, as MATLAB
    distance = u[:, None] - indices
    weights = scale * _cubic(distance * scale) if antialias else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])  # symmetric extension
    columns = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), columns.ravel()), weights.ravel())
    return matrix


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize(image, scale) for a 2-D float image (bicubic, antialiasing on), without rounding."""
    rows = _resize_matrix(image.shape[0], scale)
    cols = _resize_matrix(image.shape[1], scale)
    return rows @ image @ cols.T


def niqe_features(luminance: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """(n_blocks, 36) features: 18 at full scale and 18 at half scale for each block position."""
    h, w = luminance.shape
    if h < 2 * block or w < 2 * block:
        raise ImageTooSmallForNIQE(
            f"NIQE needs at least {2 * block}x{2 * block} pixels (2 x 2 blocks of {block} px, Mittal et al. "
            f"2013); got {w}x{h}. Use larger images or a larger probe image_size."
        )
    rows, cols = h // block, w // block
    image = luminance[: rows * block, : cols * block]
    window = gaussian_window()
    per_scale = []
    for scale in (1, 2):
        coefficients = mscn(image, window)
        size = block // scale
        per_scale.append(
            [
                block_features(coefficients[r * size : (r + 1) * size, c * size : (c + 1) * size])
                for c in range(cols)
                for r in range(rows)
            ]
        )
        if scale == 1:
            image = imresize(image, 0.5)
    return np.concatenate([np.asarray(f) for f in per_scale], axis=1)


def niqe_distance(features: np.ndarray, mu: np.ndarray | None = None, cov: np.ndarray | None = None) -> float:
    """Mittal et al. Eq. 10 between the test image's MVG (nanmean; covariance of rows without NaN) and the
    pristine model. NaN when fewer than two complete feature rows remain (e.g. a flat image)."""
    if mu is None or cov is None:
        mu, cov = pristine_model()
    complete = features[~np.isnan(features).any(axis=1)]
    if len(complete) < 2:
        return math.nan
    mu_test = np.nanmean(features, axis=0)
    cov_test = np.cov(complete, rowvar=False)
    difference = mu - mu_test
    value = difference @ np.linalg.pinv((cov + cov_test) / 2) @ difference
    return float(math.sqrt(max(float(value), 0.0)))


def niqe(image: np.ndarray, color: ColorMode = "gray") -> float:
    """NIQE of one image: (H, W, 3) RGB or (H, W) grey, values 0-255 (uint8 or float). Lower is better.

    Raises ImageTooSmallForNIQE below 192 x 192 pixels; returns NaN when the image has no usable block
    statistics (e.g. constant).
    """
    return niqe_distance(niqe_features(to_luminance(image, color)))
