"""The frozen encoders of the fine-grained loss: f (image -> z, and patches -> z_k) and g (text -> t_k).

Choice (README "Decisions"): one CLIP model serves as both. The paper's f is "a ViT backbone or Swin-T" for the
patch embeddings and g a text encoder; Eq. 3 compares <z_k, t_j>, which only means something when patches and
text live in one space. CLIP aligns only its pooled, projected embeddings: the last layer's patch tokens and the
text tower's per-token states are not trained to be comparable. So, as in MaskCLIP (Zhou et al., ECCV 2022):

* dense image side: the value-embedding path of the last attention block. For each patch token x (the input of
  the last encoder layer), v = W_v(LN_1(x)), then the block's out_proj; nothing from q/k (no attention mixing),
  no residual and no MLP; then CLIP's final post-layernorm and visual projection, the same two maps the pooled
  [CLS] embedding takes into the joint space (``maskclip_patch_features``);
* text side: the projected pooled (EOS) embedding of each phrase on its own (``FrozenCLIP.text_embedding``).

All embeddings are L2-normalised, so D in Eq. 2 lies in [0, 2] and S_kj in Eq. 3 is a cosine. The pooled image
embedding z = f(x) (Eq. 2, 4, 5) is CLIP's ordinary one.

Which patches go with which text (Eq. 3 needs row k of both to name the same part): the captioned datasets give
part boxes with noun phrases that occur in the caption ("brass body", "red lever handle", "bolt"). For each
distinct phrase, z_k is the mean of the dense patch embeddings weighted by how much of each patch its boxes
cover, and t_k the phrase's embedding. A phrase is used only when it lies within the caption's first 77 CLIP
tokens (the generator's conditioning is cut there, so a later phrase does not describe what x_hat was asked
for); phrases dropped, and why, are returned so the module can count them. Images without boxes give no pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    patches: (
        torch.Tensor
    )  # (B, P, d) unit vectors (MaskCLIP dense features), row-major over a (grid, grid) layout
    grid: int


def maskclip_patch_features(
    vision_model: nn.Module, visual_projection: nn.Module, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, dense) joint-space features of a transformers CLIP vision tower (``CLIPModel.vision_model`` or
    ``CLIPVisionModelWithProjection.vision_model``, with its ``visual_projection``), not normalised.

    pooled (B, d): CLIP's own image embedding, visual_projection(post_layernorm([CLS] of the last layer)).
    dense (B, P, d): MaskCLIP's per-patch features from the last block's value path,
    visual_projection(post_layernorm(out_proj(v_proj(layer_norm1(x))))) for the patch tokens x entering the last
    encoder layer (the [CLS] token dropped).
    """
    out = vision_model(pixel_values=pixel_values, output_hidden_states=True)
    pooled = visual_projection(out.pooler_output)
    last = vision_model.encoder.layers[-1]
    tokens = out.hidden_states[-2][:, 1:]  # the last layer's input, patch tokens only
    value = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(tokens)))
    dense = visual_projection(vision_model.post_layernorm(value))
    return pooled, dense


@dataclass
class PhrasePairs:
    """Eq. 3's K (patch, text) pairs of one image and the phrases that could not be used."""

    z: torch.Tensor  # (K, d) unit-norm box-weighted dense patch embeddings
    t: torch.Tensor  # (K, d) unit-norm phrase embeddings
    used: list[str]
    dropped: dict[str, list[str]]  # reason -> phrases: not_in_caption, past_token_limit, no_patch_coverage


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
        pooled, patches = maskclip_patch_features(
            self.model.vision_model, self.model.visual_projection, self.preprocess(images)
        )
        grid = round(patches.shape[1] ** 0.5)
        return ImageFeatures(F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1), grid)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """z = f(x): the pooled, projected, unit-norm image embedding."""
        return self.image_features(images).pooled

    @property
    def token_limit(self) -> int:
        return int(self.tokenizer.model_max_length)

    def visible_chars(self, captions: Sequence[str]) -> list[int]:
        """Per caption, the character position where CLIP's token limit (77 with [BOS] and [EOS]) cuts it:
        len(caption) when it fits, else the end of its last token that is kept."""
        encoded = self.tokenizer(
            list(captions), truncation=True, max_length=self.token_limit, return_offsets_mapping=True
        )
        full = self.tokenizer(list(captions), truncation=False)["input_ids"]
        ends = []
        for caption, ids, offsets in zip(captions, full, encoded["offset_mapping"]):
            if len(ids) <= self.token_limit:
                ends.append(len(caption))
            else:
                ends.append(max((int(b) for a, b in offsets if b > a), default=0))
        return ends

    @torch.no_grad()
    def text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """t = g(c): pooled (EOS), projected, unit-norm text embeddings, CLIP's joint space: the phrases of Eq. 3
        and the caption-fidelity score. Texts longer than the token limit are cut there."""
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
    phrase_embeddings: Mapping[str, torch.Tensor],
    caption: str,
    boxes: Sequence[Sequence[float]],
    phrases: Sequence[str],
    image_size: tuple[int, int],
    visible_chars: int | None = None,
) -> PhrasePairs:
    """Eq. 3's K (patch, text) embedding pairs of one image: one row per distinct phrase that has boxes, occurs
    in the caption and ends within its first ``visible_chars`` characters (the part CLIP's token limit keeps;
    None: all of it), and covers at least part of a patch.

    ``patches`` (P, d) are the image's dense patch embeddings on a (grid, grid) layout, ``phrase_embeddings``
    maps each phrase to its (d,) text embedding. z_k is the coverage-weighted mean of the patches under the
    phrase's boxes, t_k its embedding; both unit-norm.
    """
    by_phrase: dict[str, list[Sequence[float]]] = {}
    for box, phrase in zip(boxes, phrases):
        by_phrase.setdefault(phrase, []).append(box)
    lowered = caption.lower()
    limit = len(caption) if visible_chars is None else visible_chars
    z_rows, t_rows, used = [], [], []
    dropped: dict[str, list[str]] = {}
    for phrase, phrase_boxes in by_phrase.items():
        start = lowered.find(phrase.lower())
        if start < 0:
            dropped.setdefault("not_in_caption", []).append(phrase)
            continue
        if start + len(phrase) > limit:
            dropped.setdefault("past_token_limit", []).append(phrase)
            continue
        weights = patch_coverage(phrase_boxes, image_size, grid).to(patches)
        if float(weights.sum()) <= 0:
            dropped.setdefault("no_patch_coverage", []).append(phrase)
            continue
        z_rows.append((weights[:, None] * patches).sum(0) / weights.sum())
        t_rows.append(phrase_embeddings[phrase].to(patches))
        used.append(phrase)
    d = patches.shape[-1]
    if not used:
        return PhrasePairs(patches.new_zeros(0, d), patches.new_zeros(0, d), [], dropped)
    z = F.normalize(torch.stack(z_rows), dim=-1)
    return PhrasePairs(z, F.normalize(torch.stack(t_rows), dim=-1), used, dropped)
