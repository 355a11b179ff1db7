"""ITEM Eq. 2, (I, T) = CLIP(x, p, Theta_clip): CLIP image and text embeddings in the joint space.

CLIP ViT-L/14 (768-d, the paper's) and ViT-B/16 come from transformers; the ResNet-50 CLIP of the architecture
ablation (Fig. 8) exists only in open_clip. Images are float tensors in [0, 1] of any size (the whole image or a
box crop), preprocessed by the model's own pipeline (resize the short side, 224 center crop, CLIP
normalisation); captions longer than CLIP's 77 tokens are truncated, and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torchvision import transforms as T

# Factories are looked up on use: importing transformers' model classes costs seconds, and a run on
# cached features never needs them.
from common import backbones
from common.backbones.registry import default_id

ClipLibrary = Literal["transformers", "open_clip"]


@dataclass(frozen=True)
class ClipConfig:
    """Which CLIP embeds images and texts (Eq. 2).

    Args:
        library: transformers (ViT-L/14, ViT-B/16) or open_clip (RN50: Fig. 8).
        model_id: hub id (transformers) or open_clip model name (RN50-quickgelu for the OpenAI weights).
        pretrained: open_clip weight tag (openai); ignored by transformers. OpenAI's weights were trained with
            QuickGELU, so `openai` on a model name without `-quickgelu` is rejected, not remapped.
        revision: hub revision (branch, tag or commit) of model_id (transformers); default the registry's pin.
    """

    library: ClipLibrary = "transformers"
    model_id: str = default_id("clip")
    pretrained: str = "openai"
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.library not in ("transformers", "open_clip"):
            raise ValueError(f"clip.library must be transformers or open_clip, got {self.library!r}")
        if self.library == "open_clip" and self.pretrained == "openai" and "quickgelu" not in self.model_id:
            raise ValueError(
                f"clip.pretrained openai was trained with QuickGELU, but clip.model_id {self.model_id!r} builds "
                f"GELU: use {self.model_id}-quickgelu"
            )

    def descriptor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"library": self.library, "model_id": self.model_id}
        if self.library == "open_clip":
            out["pretrained"] = self.pretrained
        if self.revision:
            out["revision"] = self.revision
        return out


class ClipEncoder:
    """`encode_images(list of (3, H, W) [0, 1] tensors) -> (n, d)`, `encode_texts(list of str) -> (n, d), truncated`.

    Embeddings are the projected ones (the joint space), returned as float32 on the CPU.
    """

    def __init__(
        self,
        config: ClipConfig,
        preset: str,
        device: torch.device,
        dtype: torch.dtype | None,
        batch_size: int = 64,
    ) -> None:
        self.config, self.device, self.dtype, self.batch_size = config, device, dtype, batch_size
        if config.library == "transformers":
            model, processor = backbones.create_clip(
                config.model_id, preset=preset, dtype=dtype, revision=config.revision
            )
            self.processor = processor
            self.tokenizer = processor.tokenizer
            self.max_tokens = min(
                self.tokenizer.model_max_length, model.config.text_config.max_position_embeddings
            )
            self.dim = int(model.config.projection_dim)
        else:
            model, preprocess, tokenizer = backbones.create_open_clip(
                config.model_id, config.pretrained, preset=preset, dtype=dtype
            )
            # open_clip's pipeline works on PIL images; keep its tensor-capable steps (resize, crop, normalise).
            self.tensor_steps = T.Compose(
                [t for t in preprocess.transforms if isinstance(t, (T.Resize, T.CenterCrop, T.Normalize))]
            )
            self.tokenizer = tokenizer
            self.max_tokens = int(getattr(tokenizer, "context_length", 77))
            self.dim = int(model.text_projection.shape[1])
        self.model = model.to(device=device).eval()  # loaded in `dtype` by the factory

    def _pixels(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.config.library == "transformers":
            pixels = self.processor.image_processor(
                images=list(images), do_rescale=False, input_data_format="channels_first", return_tensors="pt"
            )
            pixels = pixels["pixel_values"]
        else:
            pixels = torch.stack([self.tensor_steps(image) for image in images])
        return pixels.to(device=self.device, dtype=self.dtype or torch.float32)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self._pixels(images[start : start + self.batch_size])
            if self.config.library == "transformers":
                features = self.model.get_image_features(pixel_values=pixels).pooler_output
            else:
                features = self.model.encode_image(pixels)
            chunks.append(features.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with its start/end tokens, before truncation."""
        if self.config.library == "transformers":
            return [
                len(ids) + 2
                for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
            ]
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # an open_clip HF tokenizer: it truncates like CLIP's; count what it keeps
            return [self.max_tokens] * len(texts)
        return [len(encode(text)) + 2 for text in texts]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Embeddings of `texts` cut to CLIP's context (77 tokens), and which texts were cut."""
        truncated = [count > self.max_tokens for count in self.token_counts(texts)]
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            if self.config.library == "transformers":
                tokens = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                ).to(self.device)
                features = self.model.get_text_features(**tokens).pooler_output
            else:
                features = self.model.encode_text(self.tokenizer(batch).to(self.device))
            chunks.append(features.float().cpu())
        return (torch.cat(chunks) if chunks else torch.zeros(0, self.dim)), truncated
