"""Toy generators: fingerprints of GAN and latent-diffusion pipelines.

"generated" images come from two toy generators that draw NEW scenes (their own seeds, same distribution of
subtypes and captions) and leave the fingerprints of the generator families they stand for, until the
project's own diffusion generator replaces them. All are 8-bit RGB PNGs of the same size as the real
photographs, so a detector cannot separate them by size, mode or format.

* ``toy_gan``: renders the scene at 1/4 resolution and upsamples it 4x through two fixed GAN-style stages:
  a kernel-4 stride-2 transposed convolution whose taps are bilinear weights perturbed by a fixed random
  3.5 % (per channel), then a fixed 3x3 sharpening convolution. The unequal gains of the four output
  phases leave the periodic checkerboard of GAN upsamplers (spectral peaks at multiples of 1/4 cycle/pixel);
  the upsampling also leaves the image without the fine texture and sensor noise a camera records.
* ``toy_ldm``: renders the scene at full resolution, encodes it into an 8x-downsampled 4-channel "latent"
  (fixed linear map, quantised to 1/64), and decodes it with bicubic upsampling through a fixed, slightly
  wrong colour matrix (a faint colour cast). A skip path adds back detail from a 2x-downsampled copy (the
  decoder's learned detail prior), so nothing above half the Nyquist frequency survives: sensor noise and
  the sharpest edges are lost. A faint fixed 8x8 pattern (std 1.2/255) is added, like the grid that VAE
  decoders imprint (spectral peaks at multiples of 1/8 cycle/pixel).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from common.data.toy_world.catalogue import Subtype
from common.data.toy_world.geometry import Box
from common.data.toy_world.rendering import _render_array, _resize, _to_image, scene_annotations
from common.data.toy_world.scenes import Scene, sample_scene


@functools.cache
def _gan_weights() -> tuple[np.ndarray, np.ndarray]:
    """Fixed "weights" of toy_gan, one set per upsampling stage.

    up: (stage, channel, phase_y, phase_x, tap_y, tap_x) taps of the transposed convolution;
    sharpen: (stage, channel, 3, 3) the conv layer after it, which restores edge contrast as a generator's
    learned convolutions do (and so amplifies the checkerboard too).
    """
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(b"toy_gan")))
    bilinear = np.outer([0.75, 0.25], [0.75, 0.25])  # own pixel, neighbour: exact bilinear 2x upsampling
    up = bilinear * (1 + 0.035 * rng.standard_normal((2, 3, 2, 2, 2, 2)))
    # Keep the mean phase gain at 1 (no global colour change) but let the four phases differ.
    up = up / up.sum(axis=(-1, -2), keepdims=True).mean(axis=(2, 3), keepdims=True)
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    sharpen = delta * 1.6 - 0.6 * np.full((3, 3), 1 / 9) + 0.01 * rng.standard_normal((2, 3, 3, 3))
    sharpen = sharpen / sharpen.sum(axis=(-1, -2), keepdims=True)
    return up.astype(np.float32), sharpen.astype(np.float32)  # float64 weights would upcast every pixel


def _transposed_conv2x(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Kernel-4 stride-2 transposed convolution, written per output phase.

    x is channel-first (c, h, w); k is (c, phase_y, phase_x, tap_y, tap_x): output pixel (2i + py, 2j + px)
    mixes input pixel (i, j) with its neighbours towards that phase, exactly bilinear when k is bilinear.
    """
    c, h, w = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.empty((c, 2 * h, 2 * w), np.float32)
    for py, sy in ((0, -1), (1, 1)):
        for px, sx in ((0, -1), (1, 1)):
            for ch in range(c):
                kk = k[ch, py, px]
                out[ch, py::2, px::2] = (
                    kk[0, 0] * p[ch, 1 : h + 1, 1 : w + 1]
                    + kk[0, 1] * p[ch, 1 : h + 1, 1 + sx : w + 1 + sx]
                    + kk[1, 0] * p[ch, 1 + sy : h + 1 + sy, 1 : w + 1]
                    + kk[1, 1] * p[ch, 1 + sy : h + 1 + sy, 1 + sx : w + 1 + sx]
                )
    return out


def _conv3x3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per-channel 3x3 convolution with edge padding; x is (c, h, w), k is (c, 3, 3)."""
    c, h, w = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.zeros_like(x)
    for ch in range(c):
        for dy in range(3):
            for dx in range(3):
                out[ch] += k[ch, dy, dx] * p[ch, dy : dy + h, dx : dx + w]
    return out


def render_toy_gan(scene: Scene, size: int = 256, supersample: int = 2) -> Image.Image:
    """toy_gan: render at size/4, then two fixed 2x transposed-conv + 3x3-conv stages (checkerboard)."""
    small, *_ = _render_array(scene, size // 4, supersample)
    x = np.ascontiguousarray(small.transpose(2, 0, 1), dtype=np.float32)
    for up, sharpen in zip(*_gan_weights()):
        x = _conv3x3(_transposed_conv2x(x, up), sharpen)
    return _to_image(x.transpose(1, 2, 0))


@functools.cache
def _ldm_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed "weights" of toy_ldm: encoder (4x3), decoder (3x4) with a colour cast, bias, 8x8 pattern."""
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(b"toy_ldm")))
    enc = np.linalg.qr(rng.standard_normal((4, 3)))[0]  # orthonormal columns: a lossless 4-channel latent
    cast = np.eye(3) + 0.025 * rng.standard_normal((3, 3))
    dec = cast @ enc.T
    bias = 0.012 * rng.standard_normal(3)
    pattern = rng.standard_normal((8, 8, 3))
    pattern = (pattern - pattern.mean()) / pattern.std() * (1.2 / 255)
    return enc, dec, bias, pattern.astype(np.float32)


def render_toy_ldm(scene: Scene, size: int = 256, supersample: int = 2) -> Image.Image:
    """toy_ldm: 8x latent bottleneck + bicubic decoder, colour cast, top-octave loss, 8x8 grid pattern."""
    x, *_ = _render_array(scene, size, supersample)
    enc, dec, bias, pattern = _ldm_weights()
    box, bicubic = Image.Resampling.BOX, Image.Resampling.BICUBIC
    low = _resize(x, size // 8, box)
    latent = np.round((low @ enc.T) * 64) / 64  # quantised latent
    base = _resize((latent @ dec.T + bias).astype(np.float32), size, bicubic)
    detail = _resize(_resize(x, size // 2, box), size, bicubic) - _resize(low, size, bicubic)
    out = base + 0.85 * detail + np.tile(pattern, (size // 8, size // 8, 1))
    return _to_image(out)


GeneratorFn = Callable[[np.random.Generator, Subtype, int], tuple[Image.Image, list[Box], list[str], str]]


def _generator_entry(render: Callable[[Scene, int, int], Image.Image]) -> GeneratorFn:
    def generate(
        rng: np.random.Generator, subtype: Subtype, size: int = 256
    ) -> tuple[Image.Image, list[Box], list[str], str]:
        scene = sample_scene(subtype, rng)
        boxes, phrases, caption = scene_annotations(scene, size)
        return render(scene, size, 2), boxes, phrases, caption

    generate.__doc__ = render.__doc__
    return generate


_FAKE_RENDERERS: dict[str, Callable[[Scene, int, int], Image.Image]] = {
    "toy_gan": render_toy_gan,
    "toy_ldm": render_toy_ldm,
}
#: name -> (rng, subtype, size) -> (image, boxes, phrases, caption) of a NEW generated scene.
TOY_GENERATORS: dict[str, GeneratorFn] = {name: _generator_entry(fn) for name, fn in _FAKE_RENDERERS.items()}
GENERATOR_DESCRIPTIONS = {
    "toy_gan": "render at 1/4 resolution, upsample 4x with two fixed, slightly unbalanced kernel-4 stride-2 "
    "transposed convolutions each followed by a fixed 3x3 sharpening conv: GAN-style checkerboard (spectral "
    "peaks at multiples of 1/4 cycle/pixel), no fine texture or sensor noise",
    "toy_ldm": "8x-downsampled quantised 4-channel latent decoded by bicubic upsampling with a colour cast, "
    "detail only from a 2x-downsampled skip path (top octave lost), faint fixed 8x8 decoder grid",
}
