"""Degradation library: ranges, identity at severity 0, monotone in severity, masks, seeds, gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from common.data.toy_world import CATALOGUE, render_scene, sample_scene
from projects.fg_guidance.degradations import (
    ENVIRONMENTS,
    TEMPORAL,
    apply_degradation,
    box_mask,
    glare,
    low_light,
    overexposure,
    random_degradation,
    rust,
    streaks,
)

ALL = sorted({**TEMPORAL, **ENVIRONMENTS})


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two toy-world photographs (64 px) as a float batch."""
    rng = np.random.default_rng(3)
    images = []
    for subtype in (CATALOGUE[0], CATALOGUE[9]):
        image, *_ = render_scene(sample_scene(subtype, rng), 64, supersample=1)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ALL)
def test_output_stays_in_range_with_a_mask_per_pixel(name, photos):
    out, mask = apply_degradation(name, photos, 0.7, _seeded())
    assert out.shape == photos.shape and mask.shape == (2, 1, 64, 64)
    assert out.min() >= 0 and out.max() <= 1
    assert mask.min() >= 0 and mask.max() <= 1


@pytest.mark.parametrize("name", ALL)
def test_severity_zero_is_the_identity(name, photos):
    out, mask = apply_degradation(name, photos, 0.0, _seeded())
    torch.testing.assert_close(out, photos, atol=1e-5, rtol=0)
    assert mask.abs().max() < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_change_grows_monotonically_with_severity(name, photos):
    changes = [
        (apply_degradation(name, photos, s, _seeded(1)).image - photos).abs().mean().item()
        for s in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert all(b > a for a, b in itertools.pairwise(changes)), changes


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_degradation(name, photos):
    a = apply_degradation(name, photos, 0.6, _seeded(5)).image
    b = apply_degradation(name, photos, 0.6, _seeded(5)).image
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["rust", "fading", "tarnish", "streaks", "glare", "low_light"])
def test_different_seeds_give_different_patterns(name, photos):
    a = apply_degradation(name, photos, 0.6, _seeded(5)).image
    b = apply_degradation(name, photos, 0.6, _seeded(6)).image
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_gradients_flow_to_the_image(name, photos):
    images = photos.clone().requires_grad_(True)
    out, _ = apply_degradation(name, images, 0.5, _seeded())
    (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_rust_grows_only_inside_the_region_and_reddens_it(photos):
    region = box_mask([[[8, 8, 40, 40]], [[0, 0, 64, 64]]], (64, 64))
    out, mask = rust(photos, 1.0, _seeded(2), region=region)
    assert mask[0, :, 40:, :].max() == 0 and mask[0, :, :, 40:].max() == 0
    assert mask[0].sum() > 0
    rusted = mask[1, 0] > 0.9
    red_minus_blue = out[1, 0] - out[1, 2]
    assert (red_minus_blue[rusted]).mean() > 0.15
    coverage = [rust(photos, s, _seeded(2)).mask.mean().item() for s in (0.2, 0.5, 0.8)]
    assert coverage == sorted(coverage) and coverage[0] < coverage[-1]


def test_streak_sets_are_nested_in_severity(photos):
    low = streaks(photos, 0.3, _seeded(4)).mask
    high = streaks(photos, 0.9, _seeded(4)).mask
    assert bool((high >= low - 1e-6).all())


def test_environment_directions(photos):
    assert overexposure(photos, 0.8).image.mean() > photos.mean() + 0.1
    dark = low_light(photos, 0.8, _seeded()).image
    assert dark.mean() < photos.mean() * 0.5
    bright, bloom = glare(photos, 1.0, _seeded(7))
    peak = bloom[0, 0].flatten().argmax()
    assert bright[0].flatten(1)[:, peak].mean() > photos[0].flatten(1)[:, peak].mean()


def test_per_image_severity_and_bad_arguments(photos):
    out, mask = rust(photos, torch.tensor([0.0, 1.0]), _seeded())
    torch.testing.assert_close(out[0], photos[0])
    assert mask[1].mean() > 0.3
    with pytest.raises(ValueError, match=r"severity must be in \[0, 1\]"):
        rust(photos, 1.5)
    with pytest.raises(ValueError, match="one value per image"):
        rust(photos, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rust(photos[:, :1], 0.5)
    with pytest.raises(ValueError, match="unknown degradation"):
        apply_degradation("sandstorm", photos, 0.5)


def test_random_degradation_applies_one_named_op_per_image(photos):
    batch = photos.repeat(3, 1, 1, 1)
    (out, _), names = random_degradation(batch, ["rust", "low_light"], (0.5, 0.5), _seeded(9))
    assert len(names) == 6 and set(names) <= {"rust", "low_light"}
    (again, _), names_again = random_degradation(batch, ["rust", "low_light"], (0.5, 0.5), _seeded(9))
    assert names == names_again and torch.equal(out, again)
    for i, name in enumerate(names):
        if name == "low_light":
            assert out[i].mean() < batch[i].mean()
    with pytest.raises(ValueError, match="severity_range"):
        random_degradation(batch, ["rust"], (0.8, 0.2))
