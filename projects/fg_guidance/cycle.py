"""G_theta and the deterministic DDIM cycle of Sec. 3: x -> eps_T (inversion, frozen) -> x_hat (reverse, trained).

The generator is a latent diffusion model (Stable Diffusion through diffusers; a tiny preset for tests) whose
UNet attention projections carry LoRA adapters (peft); those adapters are theta, everything else is frozen.

* Inversion (`ddim_invert`): the loop of DDIM run forwards with `DDIMInverseScheduler`, built from the sampler's
  own config (its defaults, clip_sample=True and set_alpha_to_one=True, are wrong for latent models), no
  classifier-free guidance (guidance drifts the cycle) and no gradients: the paper keeps the forward path frozen.
* Reconstruction (`ddim_reconstruct`): the reverse DDIM loop from eps_T conditioned on the caption. Gradients
  are kept only for the last K steps (AlignProp, DRaFT-K), each UNet call wrapped in activation checkpointing,
  so the memory of a training step does not grow with the number of steps T.
* The VAE decoder is frozen but differentiable, so the loss on x_hat reaches the last K UNet calls.

Both loops are written on the schedulers (`set_timesteps` + `step`): the diffusers pipelines that did this
(DiffEdit, Pix2Pix-Zero) are deprecated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.backbones import create_diffusion_components
from common.errors import ConfigError
from common.io import write_bytes, write_json

log = logging.getLogger("forgelab.fg_guidance")

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
GENERATOR_FILE, LORA_FILE = "generator.json", "lora.safetensors"
# A base-weights folder (projects.fg_guidance.toy_diffusion): UNet, VAE and the latent scale they were fitted with.
BASE_FILES: tuple[str, ...] = ("unet.safetensors", "vae.safetensors", "toy_diffusion.json")


def load_base_weights(directory: str | Path, unet: nn.Module, vae: nn.Module) -> float:
    """Load UNet and VAE weights from a base-weights folder (before LoRA is added); returns the latent scale."""
    directory = Path(directory)
    missing = [name for name in BASE_FILES if not (directory / name).is_file()]
    if missing:
        raise ConfigError(
            f"base_weights folder {directory} lacks {', '.join(missing)}: build it with "
            f"`python -m projects.fg_guidance.toy_diffusion --root {directory}` or set base_weights: null"
        )
    for module, name in ((unet, "unet.safetensors"), (vae, "vae.safetensors")):
        try:
            module.load_state_dict(safetensors.torch.load_file(str(directory / name)))
        except RuntimeError as error:
            raise ConfigError(
                f"{directory / name} does not fit the {type(module).__name__}: {error}"
            ) from None
    return float(json.loads((directory / "toy_diffusion.json").read_text())["latent_scale"])


def check_steps(num_steps: int, grad_steps: int) -> None:
    """T >= 1 and 0 <= K <= T: gradients can only be kept for steps that are run."""
    if num_steps < 1:
        raise ConfigError(f"the number of DDIM steps T must be >= 1, got {num_steps}")
    if grad_steps < 0:
        raise ConfigError(f"the number of gradient steps K must be >= 0, got {grad_steps}")
    if grad_steps > num_steps:
        raise ConfigError(
            f"T < K: cannot keep gradients for the last K={grad_steps} steps of a {num_steps}-step DDIM "
            f"reconstruction; use K <= T (K = 1-3 is typical)"
        )


def ddim_invert(
    unet: nn.Module,
    inverse: DDIMInverseScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    num_steps: int,
    stop_after: int | None = None,
) -> torch.Tensor:
    """DDIM inversion z_0 -> z_T (eps_T of the paper) in ``num_steps`` steps, unguided, without gradients.

    ``stop_after`` n < T stops at the n-th timestep (a partial inversion, for edits that keep more of the image);
    `ddim_reconstruct` with the same ``start_from`` walks back from there.
    """
    inverse.set_timesteps(num_steps, device=latents.device)
    timesteps = inverse.timesteps[: stop_after or num_steps]
    with torch.no_grad():
        for t in timesteps:
            eps = unet(latents, t, encoder_hidden_states=cond).sample
            latents = inverse.step(eps, t, latents).prev_sample
    return latents


def _predict_noise(
    unet: nn.Module,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    if uncond is None or guidance_scale == 1.0:
        return unet(latents, t, encoder_hidden_states=cond).sample
    both = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def ddim_reconstruct(
    unet: nn.Module,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    num_steps: int,
    grad_steps: int = 0,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    start_from: int | None = None,
    use_checkpoint: bool = True,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reverse DDIM z_T -> z_0 conditioned on ``cond``, gradients kept only for the last ``grad_steps`` steps.

    Earlier steps run under ``torch.no_grad``; each of the last K UNet calls is recomputed in the backward pass
    (activation checkpointing) instead of keeping its activations. ``start_from`` n runs only the last n of the
    T timesteps (after a partial inversion). ``uncond`` + ``guidance_scale`` > 1 is classifier-free guidance
    (for edits; the training cycle runs unguided). ``eta`` > 0 adds DDIM's stochastic term.
    """
    check_steps(num_steps, grad_steps)
    scheduler.set_timesteps(num_steps, device=latents.device)
    timesteps = scheduler.timesteps
    if start_from is not None:
        timesteps = timesteps[len(timesteps) - start_from :]
    first_grad = len(timesteps) - grad_steps
    grad_wanted = torch.is_grad_enabled()
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(grad_wanted and i >= first_grad):
            if grad_wanted and i >= first_grad and use_checkpoint:
                eps = checkpoint(
                    _predict_noise, unet, latents, t, cond, uncond, guidance_scale, use_reentrant=False
                )
            else:
                eps = _predict_noise(unet, latents, t, cond, uncond, guidance_scale)
            latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents


FROZEN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_frozen_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a `frozen_dtype` config value (None for float32: the libraries' default)."""
    if name not in FROZEN_DTYPES:
        raise ConfigError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}; got {name!r}")
    return None if name == "float32" else FROZEN_DTYPES[name]


class FineGrainedGenerator(nn.Module):
    """G_theta: Stable Diffusion parts with LoRA on the UNet attention projections, and the DDIM cycle on them.

    Args:
        model_id: diffusers repository of the base model (default SD 2.1-base).
        preset: "pretrained" | "random" | "tiny" (common.backbones.create_diffusion_components).
        lora_rank, lora_alpha: LoRA rank r and scale alpha (the update is alpha / r * B A; B starts at 0, so the
            untrained generator is exactly the base model).
        image_size: side of the square images the cycle runs on (a multiple of the VAE's downsampling factor).
        base_weights: a folder with UNet and VAE weights for the tiny architecture, written by
            `projects.fg_guidance.toy_diffusion` (the toy world's own small latent diffusion model); None keeps
            the preset's weights.
        frozen_dtype: float32 | float16 | bfloat16, the dtype the frozen UNet, VAE and text encoder are loaded in
            (`from_pretrained(dtype=...)`); the LoRA weights stay fp32. Half precision needs a mixed-precision
            trainer (`precision: bf16-mixed` or `16-mixed`), whose autocast runs the mixed-dtype layers.
        revision: hub revision (branch, tag or commit) of model_id.
    """

    def __init__(
        self,
        model_id: str | None = None,
        preset: str = "pretrained",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        image_size: int = 512,
        base_weights: str | None = None,
        frozen_dtype: str = "float32",
        revision: str | None = None,
    ) -> None:
        super().__init__()
        if lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {lora_rank}")
        dtype = resolve_frozen_dtype(frozen_dtype)
        parts = create_diffusion_components(model_id, preset=preset, dtype=dtype, revision=revision)
        self.config: dict[str, Any] = {
            "model_id": parts.model_id,
            "preset": preset,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "image_size": image_size,
            "base_weights": base_weights,
            "frozen_dtype": frozen_dtype,
            "revision": revision,
        }
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.latent_scale = float(self.vae.config.scaling_factor)
        if base_weights is not None:
            self.latent_scale = load_base_weights(base_weights, self.unet, self.vae)
        self.tokenizer = parts.tokenizer
        self.scheduler = parts.scheduler
        self.inverse_scheduler = DDIMInverseScheduler.from_config(parts.scheduler.config)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if image_size % self.vae_factor:
            raise ConfigError(
                f"image_size {image_size} must be a multiple of the VAE's downsampling factor {self.vae_factor}"
            )
        self.image_size = image_size
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.unet.add_adapter(
            LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(LORA_TARGETS))
        )
        for weight in self.lora_parameters():  # theta trains in fp32 whatever the frozen parts are in
            weight.data = weight.data.float()
        self.truncated_captions = 0

    # -- theta ---------------------------------------------------------------------------------------------------
    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable weights theta: the LoRA A and B matrices, nothing else."""
        return [p for name, p in self.unet.named_parameters() if "lora_" in name]

    def train(self, mode: bool = True) -> FineGrainedGenerator:
        # The frozen parts stay in eval mode whatever Lightning asks: no dropout, fixed normalisation.
        super().train(mode)
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval()
        return self

    # -- images <-> latents, captions -> conditioning --------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"the generator takes RGB batches (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)} "
                "(grayscale, RGBA and palette images are converted to RGB when loaded by common.data)"
            )
        if images.shape[-1] % self.vae_factor or images.shape[-2] % self.vae_factor:
            raise ValueError(
                f"image side {tuple(images.shape[-2:])} is not a multiple of the VAE factor {self.vae_factor}; "
                f"resize to image_size={self.image_size} first (the datamodule does)"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z_0 = E(x) * scaling factor, the posterior mean (the cycle is deterministic end to end)."""
        self.check_images(images)
        with torch.no_grad():
            posterior = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
        return posterior.mean * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z / scaling factor) in [0, 1]; differentiable, the decoder's weights frozen."""
        images = self.vae.decode(latents / self.latent_scale).sample
        return ((images.float() + 1) / 2).clamp(0.0, 1.0)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Text encoder hidden states of the captions, truncated at the tokenizer's limit (77 for CLIP).

        Truncation is counted (``truncated_captions``) and logged, because the details at the end of a long
        caption are then not part of the conditioning.
        """
        limit = self.tokenizer.model_max_length
        full = self.tokenizer(list(captions), truncation=False)["input_ids"]
        over = [len(ids) for ids in full if len(ids) > limit]
        if over:
            self.truncated_captions += len(over)
            log.warning(
                "%d caption(s) longer than the text encoder's %d tokens (up to %d) were truncated; "
                "details after token %d do not condition the generator",
                len(over),
                limit,
                max(over),
                limit,
            )
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
        )
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            return self.text_encoder(tokens.input_ids.to(device))[0]

    # -- the cycle -----------------------------------------------------------------------------------------------
    def invert(
        self, latents: torch.Tensor, cond: torch.Tensor, num_steps: int, stop_after: int | None = None
    ) -> torch.Tensor:
        return ddim_invert(self.unet, self.inverse_scheduler, latents, cond, num_steps, stop_after)

    def reconstruct(
        self, latents_t: torch.Tensor, cond: torch.Tensor, num_steps: int, grad_steps: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        return ddim_reconstruct(self.unet, self.scheduler, latents_t, cond, num_steps, grad_steps, **kwargs)

    def cycle(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        num_steps: int,
        grad_steps: int,
        activation_checkpointing: bool = True,
    ) -> dict[str, torch.Tensor]:
        """x -> z_0 -> eps_T (frozen) -> z_0_hat (last K steps differentiable) -> x_hat.

        ``activation_checkpointing`` recomputes each of the K differentiable UNet calls in the backward pass
        (torch.utils.checkpoint) instead of keeping its activations; the values and gradients are the same."""
        check_steps(num_steps, grad_steps)
        latents = self.encode(images)
        cond = self.encode_text(captions)
        noise = self.invert(latents, cond, num_steps)
        latents_hat = self.reconstruct(
            noise, cond, num_steps, grad_steps, use_checkpoint=activation_checkpointing
        )
        return {
            "latents": latents,
            "noise": noise,
            "latents_hat": latents_hat,
            "x_hat": self.decode(latents_hat),
        }

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        source_captions: Sequence[str],
        target_captions: Sequence[str],
        num_steps: int,
        strength: float = 1.0,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A variant of each image: invert with its own caption (unguided), regenerate with the target prompt.

        ``strength`` in (0, 1] is the fraction of the T steps inverted (1 = all the way to eps_T); guidance > 1
        applies classifier-free guidance towards the target prompt on the way back.
        """
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        n = max(1, round(strength * num_steps))
        latents = self.encode(images)
        noise = self.invert(latents, self.encode_text(source_captions), num_steps, stop_after=n)
        cond = self.encode_text(target_captions)
        uncond = self.encode_text([""] * len(target_captions)) if guidance_scale != 1.0 else None
        latents = self.reconstruct(
            noise,
            cond,
            num_steps,
            uncond=uncond,
            guidance_scale=guidance_scale,
            start_from=n,
            eta=eta,
            generator=generator,
        )
        return self.decode(latents)

    # -- saving and loading --------------------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write generator.json (how to rebuild it) and lora.safetensors (theta), atomically. Local base weights
        (the toy model) are copied into ``base/`` so the folder is self-contained."""
        directory = Path(directory)
        lora = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        write_bytes(directory / LORA_FILE, safetensors.torch.save(lora))
        config = {**self.config, **(extra or {})}
        if self.config["base_weights"] is not None:
            source = Path(self.config["base_weights"])
            for name in BASE_FILES:
                write_bytes(directory / "base" / name, (source / name).read_bytes())
            config["base_weights"] = "base"
        write_json(directory / GENERATOR_FILE, config)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FineGrainedGenerator:
        """Rebuild a saved generator (base weights from the model id, theta from lora.safetensors)."""
        directory = Path(directory)
        config_path = directory / GENERATOR_FILE
        if not config_path.is_file():
            raise ConfigError(
                f"{directory} is not a saved generator: {GENERATOR_FILE} is missing (a fit of "
                "projects.fg_guidance.module.FineGrainedGuidance writes <run>/generator/)"
            )
        config = json.loads(config_path.read_text())
        base = config.get("base_weights")
        generator = cls(
            config["model_id"],
            config["preset"],
            config["lora_rank"],
            config["lora_alpha"],
            config["image_size"],
            base_weights=str(directory / base) if base else None,
            revision=config.get(
                "revision"
            ),  # the same base snapshot; sampling runs in fp32 (no autocast there)
        )
        lora_path = directory / LORA_FILE
        if not lora_path.is_file():
            raise ConfigError(f"missing LoRA weights {lora_path}")
        result = set_peft_model_state_dict(generator.unet, safetensors.torch.load_file(str(lora_path)))
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(
                f"{lora_path} does not fit this UNet: unexpected keys {result.unexpected_keys[:5]}"
            )
        generator.config.update({k: v for k, v in config.items() if k not in generator.config})
        return generator.eval()
