"""The third inpainter of the probe: Stable Diffusion inpainting (9-channel UNet) through diffusers'
`StableDiffusionInpaintPipeline`, built from common.backbones' components.

Inference only: the paper trains no diffusion model (its inpainters are Liu et al.'s and Yu et al.'s), and the
pretrained SD 2 inpainting weights are what anyone would use. The tiny preset (random weights, a few steps)
exercises the same code path in tests; its results are noise and must not be read as inpainting quality.
"""

from __future__ import annotations

import torch

from common.backbones import build_pipeline, create_diffusion_components
from projects.inpaint_probe.losses import composite
from projects.inpaint_probe.masks import check_mask_batch


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
        model_id: diffusers repo or local folder (default stabilityai/stable-diffusion-2-inpainting).
        preset: "pretrained" | "random" | "tiny" (see common.backbones).
        prompt: the text condition; "" asks for a plausible fill without a subject (object removal).
        steps, guidance_scale: DDIM steps and classifier-free guidance (1.0 turns guidance off).
        seed: the noise seed; every batch starts from the same generator state, so results are reproducible.
    """

    display_name = "diffusion (Stable Diffusion inpainting)"

    def __init__(
        self,
        model_id: str | None = None,
        preset: str = "pretrained",
        prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.components = create_diffusion_components(model_id, preset=preset, inpainting=True)
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
