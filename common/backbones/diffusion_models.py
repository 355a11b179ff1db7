"""Stable Diffusion components (UNet, VAE, CLIP text encoder, tokenizer, DDIM scheduler), with a tiny preset.

The fine-grained guidance and inpainting projects write their own sampling loops on these parts, so the factory
returns the parts, and `build_pipeline` assembles a diffusers pipeline from them when a stock one is wanted.
The tiny preset follows the configs diffusers' own tests use, but builds the tokenizer locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common.backbones.presets import (
    Preset,
    check_preset,
    check_tokenizer_loaded,
    hub_kwargs,
    pretrained_unavailable,
    seeded,
)
from common.backbones.registry import default_id
from common.backbones.tokenizers import local_clip_tokenizer

# Community mirrors of Stability AI's deleted SD 2 repos (see common/backbones/registry.py).
DEFAULT_TEXT2IMG_ID = default_id("sd.text2img")
DEFAULT_INPAINTING_ID = default_id("sd.inpainting")
# The inpainting UNet sees the noisy latents (4), the mask (1) and the masked image's latents (4).
INPAINTING_IN_CHANNELS = 9


@dataclass
class DiffusionComponents:
    """The parts of a latent diffusion model, loaded once and shared by sampling loops and pipelines."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    model_id: str
    preset: Preset
    inpainting: bool = False


def create_diffusion_components(
    model_id: str | None = None,
    *,
    preset: Preset = "pretrained",
    inpainting: bool = False,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> DiffusionComponents:
    """Load Stable Diffusion's parts with a DDIM scheduler.

    ``model_id`` defaults to SD 2.1-base, or SD 2 inpainting (9-channel UNet) when ``inpainting`` is set (the
    registry's community mirrors); ``revision`` pins a commit of the repo.
    ``pretrained`` loads the weights; ``random`` builds each part from the id's configs with random weights;
    ``tiny`` builds small parts offline with seeded weights (32x32 images, 16x16 latents). Models are returned in
    eval mode; ``dtype`` (e.g. ``torch.float16`` on a GPU) applies to every preset.
    """
    check_preset(preset)
    if model_id is None:
        model_id = DEFAULT_INPAINTING_ID if inpainting else DEFAULT_TEXT2IMG_ID
    if preset == "tiny":
        components = _tiny_components(model_id, inpainting)
        if dtype is not None:  # diffusers' SD parts keep no module in fp32, so a cast equals loading in dtype
            for part in (components.unet, components.vae, components.text_encoder):
                part.to(dtype)
    else:
        components = _hub_components(model_id, preset, inpainting, dtype, revision)
    if inpainting and components.unet.config.in_channels != INPAINTING_IN_CHANNELS:
        raise ValueError(
            f"{model_id!r} has a {components.unet.config.in_channels}-channel UNet; inpainting needs "
            f"{INPAINTING_IN_CHANNELS} (e.g. {DEFAULT_INPAINTING_ID!r})"
        )
    for module in (components.unet, components.vae, components.text_encoder):
        module.eval()
    return components


def _hub_components(
    model_id: str, preset: Preset, inpainting: bool, dtype: torch.dtype | None, revision: str | None
) -> DiffusionComponents:
    hub = hub_kwargs(model_id, revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **hub)
        # Whatever scheduler the repo ships (PNDM for SD 2), sample with DDIM on its betas and prediction type.
        scheduler = DDIMScheduler.from_config(
            DDIMScheduler.load_config(model_id, subfolder="scheduler", **hub)
        )
        if preset == "pretrained":
            weights = {"use_safetensors": True, "torch_dtype": dtype, **hub}
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", **weights)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", **weights)
            text_encoder = CLIPTextModel.from_pretrained(
                model_id, subfolder="text_encoder", use_safetensors=True, dtype=dtype, **hub
            )
        else:
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(model_id, subfolder="unet", **hub)
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_id, subfolder="vae", **hub))
            text_encoder = CLIPTextModel(
                CLIPTextConfig.from_pretrained(model_id, subfolder="text_encoder", **hub)
            )
            if dtype is not None:
                unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
    except (OSError, ValueError) as error:
        raise pretrained_unavailable(model_id, error) from None
    check_tokenizer_loaded(tokenizer, text_encoder.config.vocab_size, model_id)
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler, model_id, preset, inpainting)


def _tiny_components(model_id: str, inpainting: bool) -> DiffusionComponents:
    # SD 2's tokenizer pads with "!"; the text encoder pools at EOS, so its ids must be the local tokenizer's.
    tokenizer = local_clip_tokenizer(model_max_length=77, pad_token="!")
    with seeded():
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=INPAINTING_IN_CHANNELS if inpainting else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler, model_id, "tiny", inpainting)


def build_pipeline(
    components: DiffusionComponents, kind: Literal["text2img", "inpaint"]
) -> DiffusionPipeline:
    """A stock diffusers pipeline sharing ``components`` (no copies), without the safety checker.

    The safety checker is left out on purpose: it needs its own large download, and research code inspects raw
    outputs.
    """
    pipeline_cls = {"text2img": StableDiffusionPipeline, "inpaint": StableDiffusionInpaintPipeline}.get(kind)
    if pipeline_cls is None:
        raise ValueError(f"Unknown pipeline kind {kind!r}; expected 'text2img' or 'inpaint'")
    if kind == "inpaint" and components.unet.config.in_channels != INPAINTING_IN_CHANNELS:
        raise ValueError(
            "The inpaint pipeline needs a 9-channel inpainting UNet: "
            "build the components with create_diffusion_components(..., inpainting=True)"
        )
    return pipeline_cls(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
