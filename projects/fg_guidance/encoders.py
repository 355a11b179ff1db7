"""The frozen encoders of the fine-grained loss: f (image -> z, and patches -> z_k) and g (caption -> tokens t_k).

Choice (README "Decisions"): one CLIP model serves as both. The paper's f is "a ViT backbone or Swin-T" for the
patch embeddings and g a text encoder; Eq. 3 compares <z_k, t_j>, which only means something when patches and
tokens live in one space. CLIP's vision tower patch tokens, passed through its final layer norm and visual
projection, and its text tower's per-token states, passed through the text projection, are in CLIP's joint space
(the construction FILIP and MaskCLIP use). All embeddings are L2-normalised, so D in Eq. 2 lies in [0, 2] and
S_kj in Eq. 3 is a cosine.

Which patches go with which tokens (Eq. 3 needs row k of both to name the same part): the captioned datasets
give part boxes with noun phrases that occur in the caption ("brass body", "red lever handle", "bolt"). For each
distinct phrase, z_k is the mean of the patch embeddings weighted by how much of each patch its boxes cover,
and t_k the mean of the caption's token embeddings over the phrase's characters. Images without boxes give no
pairs (and no detail term).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import create_clip
from common.backbones.registry import default_id
from projects.fg_guidance.degradations import box_mask


@dataclass
class ImageFeatures:
    pooled: torch.Tensor  # (B, d) unit vectors: z = f(x)
    patches: torch.Tensor  # (B, P, d) unit vectors, row-major over a (grid, grid) layout
    grid: int


@dataclass
class TextTokens:
    tokens: torch.Tensor  # (B, L, d) unit vectors, one per token position (padding included)
    offsets: list[list[tuple[int, int]]]  # character span of each token in its caption ((0, 0) for specials)
    truncated: int  # captions longer than the encoder's limit


class FrozenCLIP(nn.Module):
    """CLIP image and text towers, frozen, returning joint-space pooled, patch and token embeddings.

    Gradients flow through it (to the generated image) but never into its weights.
    """

    def __init__(
        self,
        model_id: str = default_id("clip.fine_grained"),
        preset: str = "pretrained",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        model, processor = create_clip(model_id, preset=preset, dtype=dtype)  # loaded in dtype, never cast
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = processor.tokenizer
        crop = processor.image_processor.crop_size
        self.input_size = int(crop["height"])
        mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrozenCLIP:
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> CLIP input: a differentiable antialiased resize of the whole image, then normalise."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        return (images - self.mean) / self.std

    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        vision = self.model.vision_model(pixel_values=self.preprocess(images))
        pooled = self.model.visual_projection(vision.pooler_output)
        patch_states = self.model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:])
        patches = self.model.visual_projection(patch_states)
        grid = round(patches.shape[1] ** 0.5)
        return ImageFeatures(F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1), grid)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """z = f(x): the pooled, projected, unit-norm image embedding."""
        return self.image_features(images).pooled

    def text_tokens(self, captions: Sequence[str]) -> TextTokens:
        limit = self.tokenizer.model_max_length
        encoded = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=limit,
            return_offsets_mapping=True,
            return_overflowing_tokens=False,
            return_tensors="pt",
        )
        full = self.tokenizer(list(captions), truncation=False)["input_ids"]
        device = self.mean.device
        with torch.no_grad():
            states = self.model.text_model(input_ids=encoded.input_ids.to(device)).last_hidden_state
            tokens = F.normalize(self.model.text_projection(states), dim=-1)
        offsets = [[(int(a), int(b)) for a, b in row] for row in encoded.offset_mapping.tolist()]
        return TextTokens(tokens, offsets, sum(len(ids) > limit for ids in full))

    @torch.no_grad()
    def text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """t = g(c): pooled, projected, unit-norm caption embeddings (used for the caption-fidelity score)."""
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        features = self.model.get_text_features(
            input_ids=encoded.input_ids.to(self.mean.device),
            attention_mask=encoded.attention_mask.to(self.mean.device),
        )
        if not isinstance(features, torch.Tensor):  # transformers 5 returns an output object
            features = features.pooler_output
        return F.normalize(features, dim=-1)


def patch_coverage(boxes: Sequence[Sequence[float]], image_size: tuple[int, int], grid: int) -> torch.Tensor:
    """(grid * grid,) fraction of each patch (row-major) covered by the union of ``boxes`` in image pixels."""
    mask = box_mask([boxes], image_size)
    return F.adaptive_avg_pool2d(mask, grid).flatten()


def phrase_pairs(
    patches: torch.Tensor,
    grid: int,
    tokens: torch.Tensor,
    offsets: Sequence[tuple[int, int]],
    caption: str,
    boxes: Sequence[Sequence[float]],
    phrases: Sequence[str],
    image_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Eq. 3's K (patch, token) embedding pairs of one image: one row per distinct phrase that has boxes, occurs
    in the caption within the encoder's token limit, and covers at least part of a patch.

    Returns z (K, d) and t (K, d), both unit-norm, and the phrases used.
    """
    by_phrase: dict[str, list[Sequence[float]]] = {}
    for box, phrase in zip(boxes, phrases):
        by_phrase.setdefault(phrase, []).append(box)
    lowered = caption.lower()
    z_rows, t_rows, used = [], [], []
    for phrase, phrase_boxes in by_phrase.items():
        start = lowered.find(phrase.lower())
        if start < 0:
            continue
        end = start + len(phrase)
        in_span = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        weights = patch_coverage(phrase_boxes, image_size, grid).to(patches)
        if not in_span or float(weights.sum()) <= 0:
            continue
        z_rows.append((weights[:, None] * patches).sum(0) / weights.sum())
        t_rows.append(tokens[in_span].mean(0))
        used.append(phrase)
    d = patches.shape[-1]
    if not used:
        return patches.new_zeros(0, d), tokens.new_zeros(0, d), []
    return F.normalize(torch.stack(z_rows), dim=-1), F.normalize(torch.stack(t_rows), dim=-1), used
