"""The third inpainter of the probe: Stable Diffusion inpainting (9-channel UNet) through diffusers'
`StableDiffusionInpaintPipeline`, built from common.backbones' components.

`DiffusionInpainter` samples with pretrained SD 2 inpainting weights, as the paper's comparison needs (the
paper trains no diffusion model; its inpainters are Liu et al.'s and Yu et al.'s). `DiffusionInpaintingFinetune`
makes it trainable with `forgelab fit` like the other two inpainters (LoRA or the whole UNet, the latent
diffusion loss), e.g. to adapt it to a domain's real images before probing. The tiny preset (random weights, a
few steps) exercises the same code paths in tests; its fills are noise and must not be read as quality.

The prediction type (what the UNet outputs: noise, or v) is read from the model's own scheduler config, logged,
and recorded in the probe's report. SD 2 inpainting declares `epsilon` (it was fine-tuned from the 512-px base
model; only SD 2's 768-px text-to-image models are v-prediction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from peft import LoraConfig

from common.backbones import build_pipeline, create_diffusion_components
from common.errors import ConfigError
from projects.inpaint_probe.inpainters import InpaintingTask
from projects.inpaint_probe.losses import composite
from projects.inpaint_probe.masks import check_mask_batch

log = logging.getLogger("forgelab.inpaint_probe")


def _pad(
    image: torch.Tensor, hole: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        hole = torch.nn.functional.pad(hole, (0, pad_w, 0, pad_h), value=1.0)
    return image, hole, (h, w)


class DiffusionInpainter:
    """`inpaint(image, hole)` with Stable Diffusion inpainting; known pixels are pasted back (as for the other
    inpainters, the probe scores the composite: SD's VAE round trip would otherwise alter every pixel).

    Args:
        model_id: diffusers repo or local folder (default: the registry's SD 2 inpainting, a community mirror).
        preset: "pretrained" | "random" | "tiny" (see common.backbones).
        prompt: the text condition; "" asks for a plausible fill without a subject (object removal).
        steps, guidance_scale: DDIM steps and classifier-free guidance (1.0 turns guidance off; with an empty
            prompt guidance is refused: the conditional and unconditional passes are then the same).
        seed: the noise seed; every batch starts from the same generator state, so results are reproducible.
        revision: hub revision (branch, tag or commit) of model_id.
    """

    display_name = "diffusion (Stable Diffusion inpainting)"

    def __init__(
        self,
        model_id: str | None = None,
        preset: str = "pretrained",
        prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 1.0,
        seed: int = 0,
        revision: str | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_guidance(prompt, guidance_scale)
        self.components = create_diffusion_components(
            model_id, preset=preset, inpainting=True, revision=revision
        )
        self.prediction_type: str = self.components.scheduler.config.prediction_type
        log.info(
            "%s: prediction type %s (its scheduler config)", self.components.model_id, self.prediction_type
        )
        self.pipeline = build_pipeline(self.components, "inpaint")
        self.pipeline.set_progress_bar_config(disable=True)
        self.prompt, self.steps, self.guidance_scale, self.seed = prompt, steps, guidance_scale, seed
        vae_factor = 2 ** (len(self.components.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.components.unet.config.block_out_channels) - 1)
        self.network_stride = max(8, vae_factor * unet_factor)  # the pipeline also wants multiples of 8

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """Fill the holes of [0, 1] images (B, 3, H, W); returns the composite, same size."""
        check_mask_batch(image, hole)
        padded, padded_hole, (h, w) = _pad(image, hole, self.network_stride)
        device = self.components.unet.device
        result = self.pipeline(
            prompt=[self.prompt] * image.shape[0],
            image=padded.to(device),
            mask_image=padded_hole.to(device),
            height=padded.shape[-2],
            width=padded.shape[-1],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(self.seed),
            output_type="pt",
        ).images
        return composite(result[..., :h, :w].float().clamp(0, 1).to(image.device), image, hole)


def check_guidance(prompt: str, guidance_scale: float) -> None:
    """Classifier-free guidance extrapolates from the unconditional ("") towards the prompt's prediction: with an
    empty prompt both are the same, so guidance > 1 only doubles the UNet calls. Refused, so no config pays it."""
    if guidance_scale > 1.0 and not prompt.strip():
        raise ConfigError(
            f"guidance_scale {guidance_scale} with an empty prompt changes nothing and doubles the cost: "
            "use guidance_scale 1.0, or give a prompt"
        )


# -- fine-tuning ------------------------------------------------------------------------------------------------

# The UNet's attention projections, where LoRA adapters go (the usual Stable Diffusion LoRA targets).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def inpainting_conditioning(
    latents_of: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, hole: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD inpainting's extra 5 UNet input channels hold, computed as `StableDiffusionInpaintPipeline` does:
    the hole mask resized (nearest) to the latent grid, and the latents of the masked image (hole pixels set to
    0 in [-1, 1], i.e. mid-grey). `latents_of` maps [-1, 1] images to scaled latents; image is [0, 1].

    Returns (mask_latent (B, 1, h, w), masked_image_latents (B, 4, h, w))."""
    masked_image = (image * 2.0 - 1.0) * (hole < 0.5)
    masked_latents = latents_of(masked_image)
    mask_latent = F.interpolate(hole, size=masked_latents.shape[-2:])
    return mask_latent, masked_latents


def denoising_target(
    scheduler: DDIMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target of the latent diffusion objective (Ho et al. 2020 Eq. 14; Salimans & Ho 2022 for v):
    epsilon-prediction regresses the noise itself; v-prediction (SD 2) regresses
    v_t = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        alpha_bar = scheduler.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * latents
    raise ConfigError(f"prediction_type {kind!r} is not supported for fine-tuning (epsilon, v_prediction)")


class DiffusionInpaintingFinetune(InpaintingTask):
    """Stable Diffusion inpainting fine-tuned on a dataset with `forgelab fit` (the probe's third inpainter, made
    trainable like the other two): LoRA adapters on the UNet attention projections (or the whole UNet with
    `lora_rank: 0`), VAE and text encoder frozen, the latent diffusion loss
    || target - UNet([z_t, mask, E(masked image)], t, c) ||^2 on random timesteps (the objective SD 2 inpainting
    was trained with; `denoising_target` gives epsilon or v). Validation and the probe inpaint through the stock
    pipeline (`DiffusionInpainter`) with the adapted UNet; known pixels are composited back.

    Checkpoints hold only the trained weights (the LoRA adapters, or the UNet): the frozen parts come from
    `model_id` again when a checkpoint is loaded, so a fine-tune of SD 2 is megabytes, not gigabytes.

    Args:
        model_id, preset: as `DiffusionInpainter` (default SD 2 inpainting; "tiny" builds the same classes small).
        lora_rank, lora_alpha: adapter rank (0 trains the whole UNet) and scale numerator (default = rank).
        lr: AdamW learning rate. prompt: the text condition of every image ("" as SD 2 inpainting's object removal).
        steps, guidance_scale, seed: sampling settings for validation and the probe.
        revision: hub revision of model_id. The loss target follows the model's own prediction type
            (`scheduler.config.prediction_type`), logged and sent to the run's loggers as `prediction_type`.
    """

    display_name = "diffusion (Stable Diffusion inpainting, fine-tuned)"

    def __init__(
        self,
        model_id: str | None = None,
        preset: str = "pretrained",
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lr: float = 1e-4,
        prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 1.0,
        seed: int = 0,
        grid_images: int = 8,
        revision: str | None = None,
    ) -> None:
        super().__init__(grid_images)
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains the whole UNet), got {lora_rank}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.sampler = DiffusionInpainter(model_id, preset, prompt, steps, guidance_scale, seed, revision)
        components = self.sampler.components
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        if lora_rank > 0:
            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=list(LORA_TARGETS))
            )
        self.strict_loading = False  # checkpoints leave the frozen weights out (see on_save_checkpoint)

    @property
    def network_stride(self) -> int:
        return self.sampler.network_stride

    @property
    def prediction_type(self) -> str:
        return self.sampler.prediction_type

    def on_fit_start(self) -> None:
        for logger in self.loggers:  # so a dashboard shows which objective the run trained
            logger.log_hyperparams({"prediction_type": self.prediction_type})

    def train(self, mode: bool = True) -> DiffusionInpaintingFinetune:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode (no dropout in the text encoder)
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        return self.sampler.inpaint(image, hole)

    def _latents_of(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.sample() * self.vae.config.scaling_factor

    def _text_embeddings(self, batch_size: int) -> torch.Tensor:
        tokenizer = self.sampler.components.tokenizer
        ids = tokenizer(
            [self.hparams.prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].expand(batch_size, -1, -1)

    def denoising_loss(
        self, image: torch.Tensor, hole: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The training objective on stride-aligned [0, 1] images with given noise and timesteps (so tests can
        hold both fixed)."""
        with torch.no_grad():
            latents = self._latents_of(image * 2.0 - 1.0)
            mask_latent, masked_latents = inpainting_conditioning(self._latents_of, image, hole)
            text = self._text_embeddings(image.shape[0])
        scheduler = self.sampler.components.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(torch.cat([noisy, mask_latent, masked_latents], dim=1), timesteps, text).sample
        return F.mse_loss(prediction.float(), denoising_target(scheduler, latents, noise, timesteps).float())

    def latent_shape(self, image: torch.Tensor) -> tuple[int, ...]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        channels = self.vae.config.latent_channels
        return (image.shape[0], channels, image.shape[-2] // factor, image.shape[-1] // factor)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["image"].shape[0] == 0:
            return None
        image, hole, _ = _pad(batch["image"], batch["hole"], self.network_stride)
        noise = torch.randn(self.latent_shape(image), device=self.device)
        steps = self.sampler.components.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (image.shape[0],), device=self.device)
        loss = self.denoising_loss(image, hole, noise, timesteps)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trained = self.trained_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def trained_keys(self) -> set[str]:
        """The parameter names a checkpoint of this module holds."""
        return {name for name, p in self.named_parameters() if p.requires_grad}
