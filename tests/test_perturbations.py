"""Robustness perturbations against independent implementations (scipy, Pillow) and their spec strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from common.perturbations import (
    Perturbation,
    gaussian_blur,
    gaussian_noise,
    jpeg_compress,
    robustness_specs,
)


def _image(seed: int = 0, h: int = 24, w: int = 31) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, h, w))).float()


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0, 0.7])
def test_gaussian_blur_matches_scipy_reflect(sigma):
    image = _image()
    expected = gaussian_filter(image.double().numpy(), sigma=(0, sigma, sigma), mode="reflect")
    np.testing.assert_allclose(gaussian_blur(image.double(), sigma).numpy(), expected, atol=1e-10)


def test_gaussian_blur_kernel_longer_than_image_still_matches_scipy():
    image = _image(h=5, w=4).double()
    expected = gaussian_filter(image.numpy(), sigma=(0, 3, 3), mode="reflect")
    np.testing.assert_allclose(gaussian_blur(image, 3.0).numpy(), expected, atol=1e-10)


def test_blur_works_on_batches():
    batch = torch.stack([_image(0), _image(1)])
    assert torch.allclose(gaussian_blur(batch, 2.0)[1], gaussian_blur(batch[1], 2.0))


def test_noise_has_requested_std_and_is_clipped():
    image = torch.full((3, 200, 200), 0.5)
    noisy = gaussian_noise(image, 0.01, torch.Generator().manual_seed(0))
    assert (noisy - image).std().item() == pytest.approx(0.01, rel=0.05)
    assert gaussian_noise(torch.ones(3, 8, 8), 0.5).max() <= 1.0


def test_jpeg_matches_pillow_round_trip_and_degrades_with_quality():
    from io import BytesIO

    from PIL import Image

    image = _image(2, 64, 64)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=50)
    expected = np.asarray(Image.open(BytesIO(buffer.getvalue())), dtype=np.float32) / 255
    np.testing.assert_allclose(jpeg_compress(image, 50).permute(1, 2, 0).numpy(), expected, atol=1e-6)
    errors = [(jpeg_compress(image, q) - image).abs().mean().item() for q in (75, 50, 25)]
    assert errors[0] < errors[1] < errors[2]


def test_spec_parsing_and_round_trip():
    assert Perturbation.parse(None).kind == "none"
    assert Perturbation.parse("JPEG:75") == Perturbation("jpeg", 75.0)
    assert Perturbation.parse("blur:2").spec == "blur:2"
    assert Perturbation.parse("noise:0.005").spec == "noise:0.005"
    assert robustness_specs() == [
        "none",
        "noise:0.001",
        "noise:0.005",
        "noise:0.01",
        "blur:1",
        "blur:2",
        "blur:3",
        "jpeg:75",
        "jpeg:50",
        "jpeg:25",
    ]


@pytest.mark.parametrize(
    "bad", ["sharpen:2", "jpeg", "jpeg:0", "jpeg:101", "blur:-1", "noise:abc", "blur:nan"]
)
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(ValueError, match="perturbation"):
        Perturbation.parse(bad)


def test_noise_is_deterministic_per_seed_key():
    p = Perturbation.parse("noise:0.01")
    image = _image()
    assert torch.equal(p(image, "a"), p(image, "a"))
    assert not torch.equal(p(image, "a"), p(image, "b"))
