"""UniFD (Ojha et al., CVPR 2023): the linear probe against a hand computation, its training setting, and its
configs reading ITEM's feature cache. That a UniFD fit after an ITEM fit extracts nothing is checked through
the CLI in tests/test_benchmark.py (the benchmark runs both)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from projects.item_detector.unifd import UniFD, linear_probe
from tests.cli_helpers import CONFIGS

ITEM = CONFIGS / "item_detector"


@pytest.mark.parametrize(
    ("unifd", "item"), [("unifd.yaml", "item_vitl14.yaml"), ("unifd_tiny.yaml", "tiny.yaml")]
)
def test_unifd_configs_have_items_data_section_so_the_feature_cache_is_shared(unifd, item) -> None:
    ours, theirs = (yaml.safe_load((ITEM / name).read_text()) for name in (unifd, item))
    assert ours["data"] == theirs["data"]
    assert ours["model"]["class_path"] == "projects.item_detector.unifd.UniFD"
    assert ours["model"]["init_args"]["lr"] == 1e-4


def test_the_logit_is_w_dot_x_plus_b_of_the_raw_embedding_and_the_loss_is_bce() -> None:
    torch.manual_seed(0)
    model = UniFD(feature_dim=4)
    x = torch.randn(3, 4) * 5  # not unit norm: the probe reads the raw embedding
    batch = {"global_image": x, "global_text": torch.randn(3, 4)}
    logits = model(batch)
    w, b = model.fc.weight.detach()[0].tolist(), float(model.fc.bias.detach()[0])
    by_hand = [sum(wi * xi for wi, xi in zip(w, row)) + b for row in x.tolist()]
    assert logits.shape == (3,) and logits.tolist() == pytest.approx(by_hand, abs=1e-5)
    labels = torch.tensor([0, 1, 1])
    p = [1 / (1 + math.exp(-z)) for z in by_hand]
    bce = -sum(y * math.log(q) + (1 - y) * math.log(1 - q) for y, q in zip(labels.tolist(), p)) / 3
    assert float(model.loss(logits, labels).detach()) == pytest.approx(bce, abs=1e-5)
    assert model.scores(logits).tolist() == pytest.approx(p, abs=1e-6)


def test_adam_at_1e4_trains_the_layer_alone_from_a_normal_002_init() -> None:
    torch.manual_seed(0)
    model = UniFD(feature_dim=768)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 1e-4
    assert optimizer.defaults["weight_decay"] == 0
    (group,) = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert abs(float(model.fc.weight.std()) - 0.02) < 0.002  # 768 draws of N(0, 0.02)
    assert UniFD.monitor == "val/acc" and UniFD.monitor_mode == "max"
    assert linear_probe(8, init_std=0.5).weight.shape == (1, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"lr": 0.0}, "lr must be positive"), ({"init_std": -1}, "init_std")]
)
def test_bad_unifd_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        UniFD(**kwargs)


def test_forward_before_the_layer_exists_says_how_it_is_built() -> None:
    with pytest.raises(RuntimeError, match="configure_model"):
        UniFD()({"global_image": torch.zeros(1, 4)})
