"""Paper 003 inpainters as LightningModules: they train (the loss falls over a few steps on a fixed batch),
inpaint any image size without touching known pixels, load their checkpoints for the probe; and the masks and
the inpainting datamodule behave on good and bad input."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import ConfigError
from projects.inpaint_probe.data import InpaintingImages, collate_inpainting, fit_image
from projects.inpaint_probe.inpainters import DeepFillV2Inpainter, PartialConvInpainter, pad_to_multiple
from projects.inpaint_probe.masks import (
    MaskConfig,
    MaskError,
    bucket_label,
    check_mask_batch,
    free_form_mask,
    hole_ratio,
    load_mask,
    mask_rng,
    rectangle_mask,
    sample_mask,
    to_tensor,
)
from tests.conftest import write_rgb


def _fixed_batch(n: int = 4, size: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    base = torch.linspace(0, 1, size).view(1, 1, 1, size)
    image = (
        base * torch.rand(n, 3, 1, 1, generator=generator)
        + 0.1 * torch.rand(n, 3, size, size, generator=generator)
    ).clamp(0, 1)
    hole = torch.stack([to_tensor(sample_mask(size, size, MaskConfig(), mask_rng(0, i))) for i in range(n)])
    return {
        "image": image,
        "hole": hole,
        "hole_ratio": hole_ratio(hole),
        "index": torch.arange(n),
        "path": [""] * n,
    }


class _Losses(Callback):
    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


def _train(module: L.LightningModule, key: str, batches: int) -> list[float]:
    """Fit `batches` times on one fixed batch (same images, same masks); the logged loss after each."""
    loader = DataLoader([_fixed_batch()] * batches, batch_size=None)
    losses = _Losses(key)
    trainer = L.Trainer(
        max_steps=batches * (1 if module.automatic_optimization else 2),  # a GAN batch is two optimiser steps
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    torch.manual_seed(0)
    trainer.fit(module, train_dataloaders=loader)
    return losses.values


def test_partial_conv_inpainter_loss_decreases_over_a_few_steps():
    losses = _train(PartialConvInpainter(preset="tiny", lr=3e-3), "train/loss_step", 10)
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_deepfill_v2_reconstruction_loss_decreases_with_manual_gan_steps():
    module = DeepFillV2Inpainter(preset="tiny", lr=3e-3)
    losses = _train(module, "train/l1_step", 10)
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    assert module.automatic_optimization is False


@pytest.mark.parametrize("module_class", [PartialConvInpainter, DeepFillV2Inpainter])
def test_inpaint_keeps_known_pixels_and_handles_sizes_off_the_stride(module_class):
    module = module_class(preset="tiny").eval()
    image = torch.rand(2, 3, 30, 45)
    hole = torch.zeros(2, 1, 30, 45)
    hole[..., 5:20, 10:30] = 1
    result = module.inpaint(image, hole)
    assert result.shape == image.shape
    assert torch.equal(result * (1 - hole), image * (1 - hole))
    assert result.min() >= 0 and result.max() <= 1


def test_pad_to_multiple_marks_the_padding_as_hole():
    image, hole, size = pad_to_multiple(torch.ones(1, 3, 5, 7), torch.zeros(1, 1, 5, 7), 4)
    assert image.shape[-2:] == (8, 8) and size == (5, 7)
    assert hole[..., 5:, :].min() == 1 and hole[..., :, 7:].min() == 1 and hole[..., :5, :7].max() == 0


def test_inpainters_reject_bad_masks():
    module = PartialConvInpainter(preset="tiny").eval()
    with pytest.raises(ValueError, match="does not match"):
        module.inpaint(torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="binary"):
        module.inpaint(torch.rand(1, 3, 32, 32), torch.full((1, 1, 32, 32), 0.5))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        check_mask_batch(torch.rand(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_partial_conv_checkpoint_reloads_without_the_vgg_loss_network(tmp_path):
    module = PartialConvInpainter(preset="tiny")
    module.setup("fit")
    assert not any(k.startswith("vgg") or "loss_network" in k for k in module.state_dict())
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader([_fixed_batch()], batch_size=None))
    path = tmp_path / "pconv.ckpt"
    trainer.save_checkpoint(path)
    loaded = PartialConvInpainter.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert loaded._loss_network == []  # built for training only
    for key, value in module.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key])


def test_freeze_encoder_bn_keeps_the_encoder_statistics_fixed():
    module = PartialConvInpainter(preset="tiny", freeze_encoder_bn=True).train()
    bn = module.network.encoder_batchnorms()[0]
    before = bn.running_mean.clone()
    module.predict_raw(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    assert not bn.training and torch.equal(bn.running_mean, before) and not bn.weight.requires_grad


def test_deepfill_pretrained_preset_without_weights_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="pretrained needs weights"):
        DeepFillV2Inpainter(preset="pretrained")


# --- masks ---------------------------------------------------------------------------------------------------


def test_free_form_masks_are_binary_deterministic_and_cover_a_plausible_area():
    masks = [free_form_mask(256, 256, mask_rng(3, i)) for i in range(40)]
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    assert np.array_equal(masks[0], free_form_mask(256, 256, mask_rng(3, 0)))
    ratios = [m.mean() for m in masks]
    assert 0.03 < np.mean(ratios) < 0.4 and max(ratios) > 2 * min(ratios)  # 1-3 strokes of 12-40 px


def test_rectangle_mask_is_one_box_of_the_deepfill_size():
    mask = rectangle_mask(256, 256, mask_rng(0, 1))
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask.sum() == height * width  # one filled box
    assert 96 <= height <= 128 and 96 <= width <= 128  # 128 minus up to 2 x 16 px


def test_sample_mask_respects_the_hole_ratio_range_and_union_kind():
    config = MaskConfig(kind="free_form+rectangle", min_ratio=0.2, max_ratio=0.6)
    ratios = [sample_mask(64, 64, config, mask_rng(1, i)).mean() for i in range(10)]
    assert all(0.2 <= r <= 0.6 for r in ratios)
    with pytest.raises(ValueError, match="mask kind"):
        MaskConfig(kind="circles")


def test_bucket_labels_follow_the_edges_and_include_the_last_edge():
    assert bucket_label(0.15) == "10-20%" and bucket_label(0.0) == "0-10%" and bucket_label(1.0) == "60-100%"
    with pytest.raises(ValueError, match="increasing"):
        bucket_label(0.1, [0.5, 0.2])


def test_mask_files_of_any_mode_and_size_are_read_and_noted(tmp_path):
    hole = np.zeros((16, 16), np.uint8)
    hole[4:8, 4:12] = 255
    Image.fromarray(hole).convert("RGB").save(tmp_path / "rgb.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = hole
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    mask, notes = load_mask(tmp_path / "rgb.png", (32, 32))
    assert (
        mask.shape == (32, 32)
        and mask.mean() == pytest.approx(32 / 256)
        and notes == ["converted_mode", "resized"]
    )
    mask, notes = load_mask(tmp_path / "alpha.png")
    assert mask.sum() == 32 and "converted_mode" in notes


@pytest.mark.parametrize(("content", "reason"), [(0, "empty"), (255, "full")])
def test_all_zero_and_all_one_masks_are_rejected_with_a_reason(tmp_path, content, reason):
    Image.fromarray(np.full((8, 8), content, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(MaskError) as err:
        load_mask(tmp_path / "m.png")
    assert err.value.reason == reason


def test_a_mask_that_is_not_an_image_is_rejected(tmp_path):
    (tmp_path / "m.png").write_text("<html>")
    with pytest.raises(MaskError) as err:
        load_mask(tmp_path / "m.png")
    assert err.value.reason == "not_an_image"


# --- datamodule ----------------------------------------------------------------------------------------------


def test_inpainting_datamodule_batches_and_fixed_eval_masks(tmp_path):
    for i in range(6):
        write_rgb(tmp_path / "imgs" / f"{i}.png", size=(40, 36), seed=i)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dm = InpaintingImages(
        train_root=str(tmp_path / "imgs"),
        test_root=str(tmp_path / "imgs"),
        image_size=32,
        batch_size=8,
        num_workers=0,
        val_fraction=0.3,
    )
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (6, 3, 32, 32) and batch["hole"].shape == (6, 1, 32, 32)
    assert [reason for _, reason in batch["skipped"]] == ["truncated"] or [
        r for _, r in batch["skipped"]
    ] == ["corrupt"]
    again = next(iter(dm.test_dataloader()))
    assert torch.equal(batch["hole"], again["hole"])  # evaluation masks are a function of the index
    assert torch.allclose(batch["hole_ratio"], hole_ratio(batch["hole"]))


def test_fit_image_pads_small_images_and_crops_large_ones():
    small = Image.fromarray(np.full((10, 12, 3), 200, np.uint8))
    assert fit_image(small, 32, "crop", train=False).shape == (3, 32, 32)
    assert fit_image(small, 32, "resize", train=True).shape == (3, 32, 32)


def test_collate_of_only_broken_files_is_an_empty_batch():
    batch = collate_inpainting([{"skip": "corrupt", "path": "x"}])
    assert batch["image"].shape[0] == 0 and batch["skipped"] == [("x", "corrupt")]
