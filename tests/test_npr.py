"""NPR (Tan et al., CVPR 2024): the residual x - up(down(x)), the network that sees only it, the detector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.models.resnet import Bottleneck

from common.transforms import AugmentConfig, build_train_transform
from projects.inpaint_probe.npr import NPRDetector, NPRNet, create_npr_network, npr_residual
from tests.cli_helpers import CONFIGS

# --- the residual -------------------------------------------------------------------------------------------------


def test_residual_of_a_4x4_image_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # x =  0  1  2  3      top-left of each 2x2 block: 0 (rows 0-1, cols 0-1), 2, 8, 10
    #      4  5  6  7      residual = x - that pixel
    #      8  9 10 11
    #     12 13 14 15
    expected = torch.tensor([[0.0, 1, 0, 1], [4, 5, 4, 5], [0, 1, 0, 1], [4, 5, 4, 5]]).view(1, 1, 4, 4)
    assert torch.equal(npr_residual(x), expected)


def test_odd_sizes_are_cropped_to_even_before_the_residual():
    x = torch.arange(35.0).view(1, 1, 5, 7)  # x[i, j] = 7 i + j
    residual = npr_residual(x)
    assert residual.shape == (1, 1, 4, 6)
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    assert torch.equal(residual[0, 0], 7 * (i % 2) + (j % 2))  # x[i, j] - x[2(i//2), 2(j//2)]


def test_residual_equals_the_official_double_interpolation_on_even_sizes():
    x = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    official = F.interpolate(
        F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True),
        scale_factor=2.0,
        mode="nearest",
        recompute_scale_factor=True,
    )
    torch.testing.assert_close(npr_residual(x), x - official)
    # a naive loop: every pixel minus the top-left pixel of its factor x factor block (factor 3 here)
    y = torch.rand(1, 2, 6, 9, generator=torch.Generator().manual_seed(1))
    loop = torch.empty_like(y)
    for r in range(6):
        for c in range(9):
            loop[..., r, c] = y[..., r, c] - y[..., 3 * (r // 3), 3 * (c // 3)]
    torch.testing.assert_close(npr_residual(y, factor=3), loop)


@pytest.mark.parametrize(
    ("shape", "factor", "message"),
    [((3, 4, 4), 2, "batch"), ((1, 3, 4, 4), 1, "integer >= 2"), ((1, 3, 1, 4), 2, "at least 2 x 2")],
)
def test_bad_residual_inputs_are_one_clear_error(shape, factor, message):
    with pytest.raises(ValueError, match=message):
        npr_residual(torch.zeros(shape), factor)


# --- the network --------------------------------------------------------------------------------------------------


def _bottleneck_params(inplanes: int, planes: int, downsample: bool) -> int:
    out = 4 * planes
    params = inplanes * planes + 2 * planes  # 1x1 conv + BN
    params += 9 * planes * planes + 2 * planes  # 3x3 conv + BN
    params += planes * out + 2 * out  # 1x1 conv + BN
    return params + ((inplanes * out + 2 * out) if downsample else 0)


def test_full_network_is_stem_layer1_layer2_and_one_logit_by_hand_count():
    net = create_npr_network("full")
    stem = 3 * 64 * 9 + 2 * 64  # conv1 3x3, 64 channels, no bias; BN
    layer1 = _bottleneck_params(64, 64, True) + 2 * _bottleneck_params(256, 64, False)  # 3 blocks
    layer2 = _bottleneck_params(256, 128, True) + 3 * _bottleneck_params(512, 128, False)  # 4 blocks
    fc = 512 + 1
    assert stem + layer1 + layer2 + fc == 1_437_761  # the count written out once
    assert sum(p.numel() for p in net.parameters()) == 1_437_761
    assert [len(net.layer1), len(net.layer2)] == [3, 4]
    assert all(isinstance(block, Bottleneck) for block in [*net.layer1, *net.layer2])
    assert net.conv1.kernel_size == (3, 3) and net.conv1.out_channels == 64 and net.conv1.stride == (2, 2)
    assert (net.fc.in_features, net.fc.out_features) == (512, 1)
    assert not hasattr(net, "layer3")
    shapes = {}
    for name in ("conv1", "maxpool", "layer1", "layer2", "fc"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    net.eval()
    with torch.no_grad():
        net(torch.rand(2, 3, 64, 64))
    assert shapes == {
        "conv1": (2, 64, 32, 32),  # stride 2 (official code)
        "maxpool": (2, 64, 16, 16),
        "layer1": (2, 256, 16, 16),
        "layer2": (2, 512, 8, 8),
        "fc": (2, 1),
    }


def test_tiny_preset_is_the_same_class_narrower():
    tiny, full = create_npr_network("tiny"), create_npr_network("full")
    assert type(tiny) is type(full) is NPRNet
    assert sum(p.numel() for p in tiny.parameters()) < sum(p.numel() for p in full.parameters()) / 50
    with pytest.raises(ValueError, match="full, tiny"):
        create_npr_network("huge")


def test_the_network_sees_only_the_residual():
    detector = NPRDetector(preset="tiny").eval()
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(3, 3, 8, 8, generator=g).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    other_blocks = torch.rand(3, 3, 8, 8, generator=g).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    noise = torch.rand(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        zeros = detector(torch.zeros(3, 3, 16, 16))
        torch.testing.assert_close(detector(blocks), zeros)  # constant 2x2 blocks: zero residual
        torch.testing.assert_close(detector(other_blocks), zeros)
        assert not torch.allclose(detector(noise), zeros)
        # the scaled residual of the normalised image is what reaches conv1
        normalised = (noise - detector.mean) / detector.std
        by_hand = detector.network.fc(detector.network.features(npr_residual(normalised) * 2.0 / 3.0))
        torch.testing.assert_close(detector(noise), by_hand)


def test_detector_loss_is_bce_on_one_logit_and_the_score_its_sigmoid():
    detector = NPRDetector(preset="tiny")
    assert detector.method_name == "NPR"
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    labels = torch.tensor([1, 0, 0])
    z, y = logits[:, 0], labels.float()
    by_hand = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    torch.testing.assert_close(detector.loss(logits, labels), by_hand)
    torch.testing.assert_close(detector.scores(logits), 1 / (1 + torch.exp(-z)))
    setup = detector.configure_optimizers()
    assert setup["optimizer"].defaults["lr"] == 2e-4
    assert (
        setup["lr_scheduler"]["scheduler"].step_size == 10 and setup["lr_scheduler"]["scheduler"].gamma == 0.8
    )


def test_the_paper_config_trains_from_scratch_on_progan():
    config = yaml.safe_load((CONFIGS / "inpaint_probe" / "npr.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert config["model"]["class_path"] == "projects.inpaint_probe.npr.NPRDetector"
    assert model["preset"] == "full" and model["lr"] == 2e-4
    assert data["resize"] == "random_crop" and data["image_size"] == 224
    # the 4 ProGAN classes of the official command, each one generator folder named progan
    assert data["train_root"] == [
        f"progan=data/cnndetection/train/{c}" for c in ("car", "cat", "chair", "horse")
    ]
    assert data["test_root"] == "data/cnndetection/test"


@pytest.mark.parametrize("name", ["npr", "npr_tiny"])
def test_the_configs_train_with_a_flip_and_no_other_augmentation(name):
    augment = yaml.safe_load((CONFIGS / "inpaint_probe" / f"{name}.yaml").read_text())["data"]["init_args"][
        "augment"
    ]
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = image.float() / 255.0
    transform = build_train_transform(
        32, "random_crop", AugmentConfig(**augment)
    )  # a crop of the whole image
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(24)]
    flipped = [torch.allclose(out, pixels.flip(-1)) for out in outputs]
    assert all(f or torch.allclose(out, pixels) for f, out in zip(flipped, outputs, strict=True))
    assert 0 < sum(flipped) < len(outputs)  # the official flip (no_flip False), not every time
    # no augmentation config at all: no flip either
    assert all(
        torch.allclose(build_train_transform(32, "random_crop", None)(image), pixels) for _ in range(8)
    )
