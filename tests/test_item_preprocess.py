"""How ITEM's CLIP sees whole images and object boxes (clip_encoders.py), checked against pixels built by hand:
the paper's centre crop without resizing, the resize-then-crop alternative, padding of small images, and boxes
padded to a square around them before the resize. Both CLIP libraries, tiny presets (32 px input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from projects.item_detector.clip_encoders import ClipConfig, ClipEncoder, pad_centred, pad_to_square

SIZE = 32  # the tiny presets' input side
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)  # OpenAI CLIP's
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)
LIBRARIES = ["transformers", "open_clip"]


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


def bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True)[0]


def mean_canvas(height: int, width: int) -> torch.Tensor:
    return MEAN.expand(3, height, width).clone()


@pytest.fixture(scope="module", params=LIBRARIES)
def encoders(request) -> dict[str, ClipEncoder]:
    """One tiny encoder per image_preprocess setting (same weights: the tiny presets are seeded)."""
    library = request.param
    model_id = "RN50-quickgelu" if library == "open_clip" else "x"
    return {
        mode: ClipEncoder(
            ClipConfig(library=library, model_id=model_id, image_preprocess=mode),
            "tiny",
            torch.device("cpu"),
            None,
        )
        for mode in ("center_crop", "resize_center_crop")
    }


def test_the_default_is_the_papers_centre_crop_and_bad_settings_are_rejected() -> None:
    assert ClipConfig().image_preprocess == "center_crop"
    with pytest.raises(ValueError, match=r"clip.image_preprocess must be center_crop or resize_center_crop"):
        ClipConfig(image_preprocess="resize")


def test_whole_images_are_centre_cropped_without_resizing(encoders) -> None:
    image = torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(0))
    pixels = encoders["center_crop"].image_pixels([image])[0]
    # (80 - 32) / 2 = 24 rows and (120 - 32) / 2 = 44 columns off each side: the pixels themselves, unscaled
    torch.testing.assert_close(pixels, normalised(image[:, 24:56, 44:76]), atol=1e-6, rtol=0)


def test_resize_center_crop_resizes_the_short_side_first(encoders) -> None:
    image = torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(1))
    pixels = encoders["resize_center_crop"].image_pixels([image])[0]
    resized = bicubic(image, 32, 48)  # short side 80 -> 32, long side 120 -> 48
    torch.testing.assert_close(pixels, normalised(resized[:, :, 8:40]), atol=1e-5, rtol=0)


def test_images_smaller_than_the_crop_are_padded_with_the_mean_not_upscaled(encoders) -> None:
    generator = torch.Generator().manual_seed(2)
    short = torch.rand(3, 20, 40, generator=generator)  # too short, wide enough
    tiny = torch.rand(3, 5, 7, generator=generator)  # smaller than the crop both ways
    pixels = encoders["center_crop"].image_pixels([short, tiny])
    expected_short = mean_canvas(SIZE, SIZE)
    expected_short[:, 6:26] = short[:, :, 4:36]  # 12 rows of padding split 6/6; 8 columns cropped 4/4
    expected_tiny = mean_canvas(SIZE, SIZE)
    expected_tiny[:, 13:18, 12:19] = tiny  # margins 27 -> 13 above, 14 below; 25 -> 12 left, 13 right
    torch.testing.assert_close(pixels[0], normalised(expected_short), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[1], normalised(expected_tiny), atol=1e-6, rtol=0)
    assert pixels[0, :, :6].abs().max() < 1e-6  # the mean colour is zero after CLIP's normalisation


@pytest.mark.parametrize("shape", [(3, 10, 90), (3, 60, 7), (3, 50, 50), (3, 3, 4)])
def test_boxes_are_padded_to_a_square_around_them_then_resized(encoders, shape) -> None:
    box = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    _, h, w = shape
    side = max(h, w)
    square = mean_canvas(side, side)
    top, left = (side - h) // 2, (side - w) // 2
    for y in range(h):  # the box in the middle of the square, every pixel of it
        for x in range(w):
            square[:, top + y, left + x] = box[:, y, x]
    expected = normalised(bicubic(square, SIZE, SIZE))
    for mode in ("center_crop", "resize_center_crop"):  # the whole-image setting does not touch boxes
        torch.testing.assert_close(encoders[mode].box_pixels([box])[0], expected, atol=1e-5, rtol=0)


def test_padding_helpers_centre_the_image_and_leave_long_sides_alone() -> None:
    image = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    padded = pad_centred(image, 5, 2, [-1.0])
    assert padded.shape == (1, 5, 3) and torch.equal(padded[0, 1:3], image[0])
    assert (padded[0, [0, 3, 4]] == -1).all()  # odd margin: the extra row goes below
    assert pad_centred(image, 2, 3, [0.0]) is image
    square = pad_to_square(image, [9.0])
    assert square.shape == (1, 3, 3) and torch.equal(square[0, :2], image[0]) and (square[0, 2] == 9).all()
