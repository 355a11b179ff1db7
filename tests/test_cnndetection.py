"""CNNDetection (Wang et al., CVPR 2020): the Blur+JPEG training augmentation, the single-logit head, the configs."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy.ndimage import gaussian_filter
from torchvision.transforms import v2

from common.transforms import AugmentConfig, BlurJpegAugment, apply_blur_jpeg, build_train_transform
from projects.inpaint_probe.classifier import RealFakeClassifier
from projects.inpaint_probe.cnndetection import CNNDetection
from tests.cli_helpers import CONFIGS


def _image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.uniform(0, 255, (size[1], size[0], 3)), sigma=(2, 2, 0))  # JPEG-like content
    return Image.fromarray(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8))


def _pil_round_trip(image: Image.Image, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


# --- the augmentation's probabilities and ranges -----------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.1])  # the paper's Blur+JPEG (0.5) and (0.1)
def test_blur_and_jpeg_are_independent_coin_flips_with_the_papers_ranges(p):
    augment = BlurJpegAugment(p, generator=torch.Generator().manual_seed(0))
    n = 4000
    draws = [augment.sample() for _ in range(n)]
    blurred = np.array([s is not None for s, _ in draws])
    jpegged = np.array([q is not None for _, q in draws])
    tolerance = 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard errors
    assert abs(blurred.mean() - p) < tolerance and abs(jpegged.mean() - p) < tolerance
    both = (blurred & jpegged).mean()
    assert abs(both - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / n)  # independent, not one shared flip
    sigmas = np.array([s for s, _ in draws if s is not None])
    assert sigmas.min() >= 0.0 and sigmas.max() <= 3.0
    assert abs(sigmas.mean() - 1.5) < 4 * (3 / math.sqrt(12)) / math.sqrt(len(sigmas))  # U[0, 3]
    qualities = np.array([q for _, q in draws if q is not None])
    assert qualities.dtype.kind == "i" and qualities.min() >= 30 and qualities.max() <= 100
    assert abs(qualities.mean() - 65) < 4 * math.sqrt((71**2 - 1) / 12) / math.sqrt(
        len(qualities)
    )  # U{30..100}
    if p == 0.5:  # 2,000 draws of 71 values: both ends are hit
        assert {30, 100} <= set(qualities.tolist())


def test_the_augmentation_is_seedable():
    def stream(seed: int) -> list:
        augment = BlurJpegAugment(0.5, generator=torch.Generator().manual_seed(seed))
        return [augment.sample() for _ in range(50)]

    assert stream(3) == stream(3) and stream(3) != stream(4)
    torch.manual_seed(11)  # without a generator: torch's global RNG (seeded per worker by Lightning)
    first = [BlurJpegAugment(0.5).sample() for _ in range(20)]
    torch.manual_seed(11)
    assert [BlurJpegAugment(0.5).sample() for _ in range(20)] == first


def test_p_zero_is_the_identity():
    image = _image()
    assert BlurJpegAugment(0.0)(image) is image
    assert all(BlurJpegAugment(0.0).sample() == (None, None) for _ in range(100))
    assert np.array_equal(np.asarray(apply_blur_jpeg(image, None, None)), np.asarray(image))
    no_op = build_train_transform(48, "random_crop", AugmentConfig(p=0.0, horizontal_flip=False))
    assert not any(isinstance(t, BlurJpegAugment) for t in no_op.transforms)


def test_the_jpeg_branch_is_a_pil_round_trip_of_the_full_image():
    image = _image()
    augment = BlurJpegAugment(1.0, blur_sigma=(0.0, 0.0), jpeg_quality=(40, 40))
    out = np.asarray(augment(image))
    assert np.array_equal(out, _pil_round_trip(image, 40))
    assert not np.array_equal(out, np.asarray(image))


def test_the_blur_branch_is_scipys_gaussian_filter_per_channel_in_8_bits():
    image = _image()
    out = np.asarray(apply_blur_jpeg(image, 1.7, None)).astype(int)
    by_scipy = gaussian_filter(np.asarray(image, dtype=np.float64), sigma=(1.7, 1.7, 0), mode="reflect")
    assert np.abs(out - np.round(by_scipy)).max() <= 1  # float32 vs float64 at the rounding boundary
    assert np.abs(out - np.asarray(image, dtype=int)).mean() > 1


def test_blur_jpeg_runs_on_the_full_image_before_the_crop_then_the_flip():
    augment = AugmentConfig(p=0.0, blur_jpeg_p=0.5)
    transform = build_train_transform(32, "random_crop", augment)
    kinds = [type(t) for t in transform.transforms]
    assert kinds[0] is BlurJpegAugment and transform.transforms[0].p == 0.5
    assert kinds.index(v2.RandomCrop) < kinds.index(v2.RandomHorizontalFlip)
    assert not any(isinstance(t, v2.RandomApply) for t in transform.transforms)  # paper 003's list is off
    # a crop the size of the image is the image: the output is the JPEG of the whole image
    image = _image()
    full = build_train_transform(
        40,
        "random_crop",
        AugmentConfig(
            p=0.0, blur_jpeg_p=1.0, blur_sigma=(0, 0), jpeg_quality=(55, 55), horizontal_flip=False
        ),
    )
    cropped = full(image.crop((0, 0, 40, 40)))
    expected = (
        torch.from_numpy(_pil_round_trip(image.crop((0, 0, 40, 40)), 55).copy()).permute(2, 0, 1) / 255.0
    )
    torch.testing.assert_close(cropped, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blur_jpeg_p": 1.5}, "blur_jpeg_p"),
        ({"blur_jpeg_p": 0.5, "blur_sigma": (3.0, 1.0)}, "blur_sigma"),
        ({"blur_jpeg_p": 0.5, "jpeg_quality": (0, 100)}, "jpeg_quality"),
    ],
)
def test_bad_blur_jpeg_settings_fail_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**kwargs)


# --- the single-logit head ----------------------------------------------------------------------------------------


def test_single_logit_loss_is_bce_on_one_logit_and_the_score_its_sigmoid():
    model = CNNDetection(preset="tiny")
    assert model.network.get_classifier().out_features == 1 and model.method_name == "CNNDetection"
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (4, 1)
    z, y = logits[:, 0].double(), labels.double()
    by_hand = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    torch.testing.assert_close(model.loss(logits, labels).double(), by_hand)
    torch.testing.assert_close(
        model.loss(logits, labels), F.binary_cross_entropy_with_logits(z.float(), y.float())
    )
    torch.testing.assert_close(model.scores(logits), 1 / (1 + torch.exp(-logits[:, 0])))


def test_the_classifier_keeps_two_nodes_by_default_and_rejects_an_unknown_head():
    assert (
        RealFakeClassifier(backbone="resnet50.tv_in1k", preset="tiny").network.get_classifier().out_features
        == 2
    )
    with pytest.raises(ValueError, match="head must be one of two_node, single_logit"):
        RealFakeClassifier(backbone="resnet50.tv_in1k", preset="tiny", head="three_node")


def test_cnndetection_optimiser_is_adam_with_the_papers_settings():
    model = CNNDetection(preset="tiny")
    setup = model.configure_optimizers()
    optimiser = setup["optimizer"]
    assert isinstance(optimiser, torch.optim.Adam)
    assert optimiser.defaults["lr"] == 1e-4 and optimiser.defaults["betas"] == (0.9, 0.999)
    scheduler = setup["lr_scheduler"]
    assert scheduler["monitor"] == "val/acc" and scheduler["scheduler"].factor == pytest.approx(0.1)


# --- configs ------------------------------------------------------------------------------------------------------


def test_the_paper_config_is_blur_jpeg_05_on_224_random_crops_of_progan():
    config = yaml.safe_load((CONFIGS / "inpaint_probe" / "cnndetection.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert config["model"]["class_path"] == "projects.inpaint_probe.cnndetection.CNNDetection"
    assert model["backbone"] == "resnet50.tv_in1k" and model["preset"] == "pretrained" and model["lr"] == 1e-4
    assert data["image_size"] == 224 and data["resize"] == "random_crop" and data["batch_size"] == 64
    augment = AugmentConfig(**data["augment"])
    assert (
        augment.blur_jpeg_p == 0.5 and augment.blur_sigma == (0.0, 3.0) and augment.jpeg_quality == (30, 100)
    )
    assert augment.horizontal_flip and augment.p == 0.0
    assert (
        data["train_root"] == "progan=data/cnndetection/train"
        and data["test_root"] == "data/cnndetection/test"
    )
