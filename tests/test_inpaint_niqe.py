"""NIQE (Mittal et al. 2013) against reference values of an independent implementation (BasicSR 1.4.2, which
reproduces the MATLAB release), plus its parts against distribution theory and hand computations.

tests/data/niqe/make_reference.py says exactly how reference.json was computed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projects.inpaint_probe.niqe import (
    ImageTooSmallForNIQE,
    aggd_fit,
    gaussian_window,
    imresize,
    niqe,
    pristine_model,
    to_luminance,
)

DATA = Path(__file__).parent / "data" / "niqe"
REFERENCE = json.loads((DATA / "reference.json").read_text())


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_niqe_matches_basicsr_reference_values(name):
    rgb = np.asarray(Image.open(DATA / name).convert("RGB"))
    # 'gray': BasicSR's niqe() fed the same float64 luminance; only its float32 imresize differs -> 1e-3.
    assert niqe(rgb, "gray") == pytest.approx(REFERENCE[name]["gray"], abs=1e-3)
    # 'y': BasicSR filters in float32; the AGGD shape grid (steps of 0.001) amplifies that to ~0.2 % at most.
    assert niqe(rgb, "y") == pytest.approx(REFERENCE[name]["y"], rel=3e-3)


def test_niqe_ranks_blur_and_noise_as_less_natural_than_the_clean_render():
    values = {name: niqe(np.asarray(Image.open(DATA / name).convert("RGB"))) for name in REFERENCE}
    assert values["render_blur.png"] > values["render.png"] < values["render_noise.png"]


def test_pristine_model_is_the_36_dimensional_mvg_of_the_release():
    mu, cov = pristine_model()
    assert mu.shape == (36,) and cov.shape == (36, 36)
    assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > -1e-9)
    assert mu[0] == pytest.approx(2.60131368, abs=1e-6)  # the MSCN shape α of pristine images


def test_aggd_fit_recovers_gaussian_and_laplacian_shapes():
    rng = np.random.default_rng(0)
    alpha, left, right = aggd_fit(rng.normal(0, 1.5, 400_000))
    assert alpha == pytest.approx(2.0, abs=0.03)
    assert left == pytest.approx(1.5 * math.sqrt(2), rel=0.02) and right == pytest.approx(
        1.5 * math.sqrt(2), rel=0.02
    )
    alpha, left, right = aggd_fit(rng.laplace(0, 0.7, 400_000))
    assert alpha == pytest.approx(1.0, abs=0.03) and left == pytest.approx(0.7, rel=0.03)


def test_aggd_fit_sees_asymmetry():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 200_000)
    _, left, right = aggd_fit(np.where(x < 0, 0.5 * x, 2.0 * x))
    assert right / left == pytest.approx(4.0, rel=0.03)


def test_gaussian_window_is_matlab_fspecial_7_by_7_sigma_7_over_6():
    window = gaussian_window()
    assert window.shape == (7, 7) and window.sum() == pytest.approx(1.0)
    assert window[3, 3] / window[3, 4] == pytest.approx(math.exp(1 / (2 * (7 / 6) ** 2)))


def test_imresize_half_preserves_constants_and_averages_a_linear_ramp():
    assert np.allclose(imresize(np.full((12, 10), 7.0), 0.5), 7.0)
    ramp = np.tile(np.arange(20.0), (8, 1))
    out = imresize(ramp, 0.5)
    assert out.shape == (4, 10)
    assert np.allclose(out[:, 2:-2], (ramp[:4, 4:-4:2] + ramp[:4, 5:-3:2]) / 2)  # interior: symmetric kernel


def test_luminance_conversions():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    assert to_luminance(rgb, "gray").tolist() == [[76, 150, 29, 128]]  # MATLAB rgb2gray
    assert to_luminance(rgb, "y").tolist() == [[81, 145, 41, 126]]  # MATLAB rgb2ycbcr, Y


def test_images_below_192_pixels_are_a_clear_error():
    with pytest.raises(ImageTooSmallForNIQE, match="at least 192x192"):
        niqe(np.zeros((191, 300, 3), np.uint8))


def test_flat_image_has_undefined_niqe():
    assert math.isnan(niqe(np.full((192, 192, 3), 100, np.uint8)))
