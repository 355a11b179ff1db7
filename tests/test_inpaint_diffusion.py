"""The probe's third inpainter, Stable Diffusion inpainting, made trainable: the latent diffusion objective's
target and conditioning checked by hand, a LoRA fine-tune that lowers the loss and touches only the adapters,
and a checkpoint of adapters only that the probe loads."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch.utils.data import DataLoader

from common.errors import ConfigError
from projects.inpaint_probe.diffusion_inpainter import (
    DiffusionInpainter,
    DiffusionInpaintingFinetune,
    denoising_target,
    inpainting_conditioning,
)
from projects.inpaint_probe.masks import MaskConfig, hole_ratio, mask_rng, sample_mask, to_tensor
from projects.inpaint_probe.probe import InpainterSpec, build_inpainter


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )


def test_epsilon_target_is_the_noise_and_v_target_matches_the_hand_formula():
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(denoising_target(_scheduler("epsilon"), latents, noise, t), noise)
    # alpha_bar from the scaled-linear betas, computed here with numpy
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = torch.tensor(np.cumprod(1.0 - betas)[[0, 500, 999]], dtype=torch.float32).view(3, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    v = denoising_target(_scheduler("v_prediction"), latents, noise, t)
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        v, _scheduler("v_prediction").get_velocity(latents, noise, t)
    )  # diffusers' own
    with pytest.raises(ConfigError, match="sample"):
        denoising_target(_scheduler("sample"), latents, noise, t)


def test_conditioning_is_the_resized_mask_and_the_latents_of_the_grey_filled_image():
    image = torch.rand(1, 3, 4, 4)
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., :2, :2] = 1.0
    mask_latent, masked = inpainting_conditioning(lambda x: F.avg_pool2d(x, 2), image, hole)
    assert mask_latent.shape == (1, 1, 2, 2) and mask_latent[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    known = image * 2 - 1
    assert torch.allclose(masked[..., 0, 0], torch.zeros(1, 3))  # the hole is mid-grey (0 in [-1, 1])
    assert torch.allclose(masked[..., 1, 1], known[..., 2:, 2:].mean(dim=(-1, -2)))


def _batch(n: int = 4, size: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(n, 3, size, size)
    image = torch.rand(n, 3, 1, 1, generator=generator) * ramp
    hole = torch.stack([to_tensor(sample_mask(size, size, MaskConfig(), mask_rng(0, i))) for i in range(n)])
    return {
        "image": image,
        "hole": hole,
        "hole_ratio": hole_ratio(hole),
        "index": torch.arange(n),
        "path": [""] * n,
    }


def test_lora_fine_tune_lowers_the_loss_trains_only_adapters_and_probes_from_its_checkpoint(tmp_path):
    module = DiffusionInpaintingFinetune(preset="tiny", lora_rank=4, lr=5e-2, steps=2, guidance_scale=1.0)
    batch = _batch()
    frozen = {k: v.clone() for k, v in module.state_dict().items() if "lora" not in k}

    # the objective at fixed noise and timesteps falls as the adapters train on it
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(module.latent_shape(batch["image"]), generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the VAE samples its latents
        loss = module.denoising_loss(batch["image"], batch["hole"], noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-2:]) < 0.97 * np.mean(losses[:2]), losses

    # two steps through Lightning's training_step (random noise and timesteps), then the checkpoint
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 2, batch_size=None))
    assert np.isfinite(float(trainer.callback_metrics["train/loss_step"]))

    trained = module.trained_keys()
    assert trained and all("lora" in k for k in trained)
    for key, value in module.state_dict().items():  # UNet base, VAE and text encoder untouched
        if key in frozen:
            assert torch.equal(value, frozen[key]), key

    path = tmp_path / "sd_lora.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == trained  # adapters only: megabytes for SD 2, not gigabytes

    spec = InpainterSpec(name="sd", kind="diffusion", preset="tiny", steps=2, guidance_scale=1.0)
    loaded = build_inpainter(spec, str(path), torch.device("cpu"))
    for key in trained:
        assert torch.equal(loaded.state_dict()[key], module.state_dict()[key])
    image, hole = batch["image"][:2], batch["hole"][:2]
    result = loaded.inpaint(image, hole)
    assert result.shape == image.shape
    assert torch.equal(result * (1 - hole), image * (1 - hole))  # known pixels are the original's

    other = tmp_path / "other.ckpt"  # a checkpoint of another model is one clear error
    torch.save({"hyper_parameters": saved and {"preset": "tiny"}, "state_dict": {"x": torch.zeros(1)}}, other)
    with pytest.raises(ConfigError, match="not a DiffusionInpaintingFinetune checkpoint"):
        build_inpainter(spec, str(other), torch.device("cpu"))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="lora_rank"):
        DiffusionInpaintingFinetune(preset="tiny", lora_rank=-1)
    with pytest.raises(ValueError, match="lr"):
        DiffusionInpaintingFinetune(preset="tiny", lr=0.0)


def test_guidance_with_an_empty_prompt_is_refused():
    """Classifier-free guidance with "" as the prompt equals the unconditional prediction: 2x cost, no change."""
    with pytest.raises(ConfigError, match="empty prompt"):
        DiffusionInpainter(preset="tiny", prompt="", guidance_scale=7.5, steps=1)
    DiffusionInpainter(preset="tiny", prompt="a cat", guidance_scale=7.5, steps=1)  # with a prompt it guides
    assert InpainterSpec(name="sd", kind="diffusion").guidance_scale == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_inpainter_reads_its_prediction_type_from_the_models_scheduler(prediction_type, tmp_path):
    """A saved model's scheduler decides (loaded through the same from_pretrained path as a hub id)."""
    from common.backbones import build_pipeline, create_diffusion_components

    components = create_diffusion_components(preset="tiny", inpainting=True)
    components.scheduler = DDIMScheduler.from_config(
        components.scheduler.config, prediction_type=prediction_type
    )
    build_pipeline(components, "inpaint").save_pretrained(tmp_path / "sd")
    inpainter = DiffusionInpainter(str(tmp_path / "sd"), preset="pretrained", steps=1)
    assert inpainter.prediction_type == prediction_type
    module = DiffusionInpaintingFinetune(str(tmp_path / "sd"), preset="pretrained", lora_rank=2, steps=1)
    assert module.prediction_type == prediction_type
    noise, latents = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    target = denoising_target(module.sampler.components.scheduler, latents, noise, torch.tensor([10]))
    assert torch.equal(target, noise) == (prediction_type == "epsilon")
