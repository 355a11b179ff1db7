"""Paper 003 Sec. 4-5.1: the classifier's loss, its head, the augmentation list, and the offline augmentation of
the generated class only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import log_loss
from torchvision.transforms import v2

from common.errors import ConfigError
from common.transforms import AugmentConfig, build_train_transform, paper_augmentations
from projects.inpaint_probe.classifier import RealFakeClassifier, two_node_bce
from projects.inpaint_probe.offline_augment import (
    OfflineAugment,
    OfflineAugmentedRealFake,
    augment_copy,
    copy_sources,
)
from tests.cli_helpers import CONFIGS

PAPER_CONFIGS = ["convnext_xl", "vgg16", "resnet50", "efficientnet_b0", "cross_generator"]
PAPER_ORDER = ["rotation", "gaussian_noise", "brightness_contrast", "color_jitter"]


# --- loss and head (Sec. 4) ---------------------------------------------------------------------------------------


def test_two_node_bce_by_hand_and_against_sklearn_log_loss():
    # by hand: logits (0, 0) -> sigmoid 0.5 on both nodes -> -ln 0.5 per node
    assert float(two_node_bce(torch.zeros(1, 2), torch.tensor([1]))) == pytest.approx(math.log(2))
    # logits (2, -1), label 0 (one-hot (1, 0)): (-ln s(2) - ln(1 - s(-1))) / 2
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-math.log(s(2)) - math.log(1 - s(-1))) / 2
    assert float(two_node_bce(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))) == pytest.approx(expected)
    # against sklearn: the mean over the two nodes of each node's binary log loss
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 2, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 2, (64,), generator=generator)
    onehot = np.eye(2)[labels.numpy()]
    probs = torch.sigmoid(logits).numpy()
    reference = np.mean([log_loss(onehot[:, j], probs[:, j], labels=[0, 1]) for j in range(2)])
    assert float(two_node_bce(logits, labels)) == pytest.approx(reference, rel=1e-9)
    # two independent sigmoid nodes, not a softmax: softmax cross-entropy differs
    softmax_ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(two_node_bce(logits, labels)) != pytest.approx(softmax_ce, rel=1e-3)


def test_convnext_head_is_gap_then_one_dense_layer_with_two_sigmoid_nodes():
    """Sec. 4: GAP kept, "only one dense layer was added at the end, and the number of nodes was set to two",
    sigmoid activation. The tiny preset is the same timm ConvNeXt class as ConvNeXt-XL, with small widths."""
    model = RealFakeClassifier(backbone="convnext_xlarge.fb_in22k_ft_in1k_384", preset="tiny").eval()
    network = model.network
    dense = network.get_classifier()
    assert isinstance(dense, torch.nn.Linear) and dense.out_features == 2
    assert dense.in_features == network.num_features
    head_linears = [m for m in network.head.modules() if isinstance(m, torch.nn.Linear)]
    assert head_linears == [dense]  # no hidden layer between the pooled features and the two nodes
    assert network.head.global_pool.pool_type == "avg"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(images)
        features = network.forward_features((images - model.mean) / model.std)
        pooled = features.mean(dim=(2, 3))  # GAP by hand
        # ConvNeXt's own LayerNorm after GAP belongs to the (pretrained) backbone, then the one dense layer
        by_hand = dense(network.head.norm(pooled[:, :, None, None]).flatten(1))
    torch.testing.assert_close(logits, by_hand)
    assert torch.allclose(model.scores(logits), torch.sigmoid(logits[:, 1]))


# --- the augmentation list (Sec. 4) ------------------------------------------------------------------------------


def test_the_augmentation_list_is_the_papers_in_order_with_the_configs_parameters():
    augment = AugmentConfig(
        p=0.5, rotation_degrees=15, noise_sigma=0.02, brightness=0.2, contrast=0.3, saturation=0.4, hue=0.05
    )
    ops = paper_augmentations(augment)
    assert [name for name, _ in ops] == PAPER_ORDER
    rotation, noise, brightness_contrast, jitter = (op for _, op in ops)
    assert isinstance(rotation, v2.RandomRotation) and list(rotation.degrees) == [-15.0, 15.0]
    assert isinstance(noise, v2.GaussianNoise) and noise.sigma == 0.02 and noise.mean == 0.0
    assert brightness_contrast.brightness == pytest.approx((0.8, 1.2))
    assert brightness_contrast.contrast == pytest.approx((0.7, 1.3))
    assert brightness_contrast.saturation is None and brightness_contrast.hue is None
    assert jitter.brightness is None and jitter.contrast is None
    assert jitter.saturation == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.05, 0.05))
    # online: the same list, each with probability p, and no flip when it is off
    transform = build_train_transform(32, "resize", AugmentConfig(horizontal_flip=False))
    applied = [t for t in transform.transforms if isinstance(t, v2.RandomApply)]
    assert [type(t.transforms[0]) for t in applied] == [type(op) for _, op in ops]
    assert all(t.p == 0.5 for t in applied)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in transform.transforms)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_use_the_offline_protocol_without_a_flip(name):
    data = yaml.safe_load((CONFIGS / "inpaint_probe" / f"{name}.yaml").read_text())["data"]
    assert data["class_path"] == "projects.inpaint_probe.offline_augment.OfflineAugmentedRealFake"
    args = data["init_args"]
    assert "augment" not in args  # no online augmentation: real images stay as they are
    offline = args["offline_augment"]
    assert offline["augment"]["horizontal_flip"] is False
    assert round(offline["fraction"] * 7000) == 3000
    assert [n for n, _ in paper_augmentations(AugmentConfig(**offline["augment"]))] == PAPER_ORDER


# --- offline augmentation of the generated class (Sec. 5.1) -------------------------------------------------------


def test_augment_copy_is_deterministic_applies_at_least_one_technique_in_order():
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    augment = AugmentConfig(p=0.5, horizontal_flip=False)
    first, applied = augment_copy(image, augment, seed=7)
    again, applied_again = augment_copy(image, augment, seed=7)
    assert torch.equal(first, again) and applied == applied_again
    for seed in range(20):
        _, names = augment_copy(image, augment, seed)
        assert names and names == [n for n in PAPER_ORDER if n in names]
    _, every = augment_copy(image, AugmentConfig(p=1.0), seed=0)
    assert every == PAPER_ORDER
    other, _ = augment_copy(image, augment, seed=8)
    assert not torch.equal(first, other)


def test_copy_sources_draw_without_replacement_before_repeating():
    sources = copy_sources(7, 10, seed=0)
    assert sorted(sources[:7]) == list(range(7)) and len(sources) == 10
    assert copy_sources(7, 3, seed=0) == sources[:3] and copy_sources(7, 3, seed=1) != sources[:3]


def _write_folder(root: Path, n_real: int, n_fake: int) -> None:
    rng = np.random.default_rng(0)
    for label, n in (("0_real", n_real), ("1_fake", n_fake)):
        folder = root / "gen" / label
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offline_augment")
    _write_folder(root / "train", n_real=7, n_fake=7)
    _write_folder(root / "val", n_real=1, n_fake=1)
    return root


def _datamodule(folders: Path, cache: Path, **settings) -> OfflineAugmentedRealFake:
    return OfflineAugmentedRealFake(
        train_root=str(folders / "train"),
        val_root=str(folders / "val"),
        image_size=16,
        num_workers=0,
        offline_augment=OfflineAugment(cache_dir=str(cache), **settings),
    )


def test_offline_augmentation_adds_generated_copies_once_and_leaves_reals_alone(folders, tmp_path):
    dm = _datamodule(folders, tmp_path / "cache")
    dm.setup("fit")
    train = dm.samples["train"]
    copies = [s for s in train if str(tmp_path / "cache") in s.path]
    assert len(copies) == 3  # the paper's 3 per 7 generated images
    assert all(s.label == 1 and s.generator == "gen" for s in copies)
    assert sum(s.label == 0 for s in train) == 7 and sum(s.label == 1 for s in train) == 10
    assert dm.offline_summary["copies"] == 3 and dm.offline_summary["sources"] == 7
    # no online augmentation: a real training image comes out as the deterministic eval transform makes it
    dataset = dm._dataset("train")
    real = next(i for i, s in enumerate(dataset.samples) if s.label == 0)
    assert torch.equal(dataset[real]["image"], dataset[real]["image"])
    # written once: a second datamodule reuses the files; the same seed elsewhere gives the same bytes
    mtimes = {s.path: Path(s.path).stat().st_mtime_ns for s in copies}
    dm2 = _datamodule(folders, tmp_path / "cache")
    dm2.setup("fit")
    assert {
        s.path: Path(s.path).stat().st_mtime_ns for s in dm2.samples["train"] if s.path in mtimes
    } == mtimes
    dm3 = _datamodule(folders, tmp_path / "elsewhere")
    dm3.setup("fit")
    elsewhere = [s for s in dm3.samples["train"] if "elsewhere" in s.path]
    assert [Path(s.path).read_bytes() for s in elsewhere] == [Path(s.path).read_bytes() for s in copies]
    dm4 = _datamodule(folders, tmp_path / "cache", seed=1, count=5)
    dm4.setup("fit")
    other = [s for s in dm4.samples["train"] if str(tmp_path / "cache") in s.path]
    assert len(other) == 5 and not {s.path for s in other} & set(mtimes)


def test_online_and_offline_augmentation_together_is_a_config_error(folders, tmp_path):
    with pytest.raises(ConfigError, match="either augment"):
        OfflineAugmentedRealFake(
            train_root=str(folders / "train"),
            augment=AugmentConfig(),
            offline_augment=OfflineAugment(cache_dir=str(tmp_path)),
        )
    with pytest.raises(ConfigError, match="fraction must be >= 0"):
        OfflineAugment(fraction=-1)
