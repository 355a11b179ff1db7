"""ITEM Eq. 2, (I, T) = CLIP(x, p, Theta_clip): CLIP image and text embeddings in the joint space.

CLIP ViT-L/14 (768-d, the paper's) and ViT-B/16 come from transformers; the ResNet-50 CLIP of the architecture
ablation (Fig. 8) exists only in open_clip. Images are float tensors in [0, 1] of any size; captions longer than
CLIP's 77 tokens are truncated, and counted.

How CLIP sees an image (`ClipConfig.image_preprocess`; the model's own processor does the crop, resize and
normalisation, we only choose which steps run and pad first):
  * whole images, `center_crop` (default; the paper's Sec. IV-A and UniFD's): the centre 224x224 pixels, no
    resizing, so generator artifacts keep their pixel scale on large test images. A side shorter than the crop is
    padded (centred), not upscaled, for the same reason;
  * whole images, `resize_center_crop`: the short side resized to 224 (bicubic), then the centre crop (CLIP's
    own pipeline, the behaviour before the paper's setting was the default);
  * object boxes (always): the box's pixels padded to a square around the box, then resized to 224x224
    (bicubic), so an elongated object is seen whole instead of its middle ~10 %.
Padding uses the CLIP mean colour, which is exactly zero after CLIP's normalisation (a neutral input, unlike
black, which torchvision's CenterCrop pads with).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torchvision import transforms as T

# Factories are looked up on use: importing transformers' model classes costs seconds, and a run on
# cached features never needs them.
from common import backbones
from common.backbones.registry import default_id

ClipLibrary = Literal["transformers", "open_clip"]
ImagePreprocess = Literal["center_crop", "resize_center_crop"]
IMAGE_PREPROCESSES: tuple[str, ...] = ("center_crop", "resize_center_crop")
# What object boxes go through (recorded in the cache key; change the name when the rule changes).
BOX_PREPROCESS = "pad_square_mean_resize"


@dataclass(frozen=True)
class ClipConfig:
    """Which CLIP embeds images and texts (Eq. 2).

    Args:
        library: transformers (ViT-L/14, ViT-B/16) or open_clip (RN50: Fig. 8).
        model_id: hub id (transformers) or open_clip model name (RN50-quickgelu for the OpenAI weights).
        pretrained: open_clip weight tag (openai); ignored by transformers. OpenAI's weights were trained with
            QuickGELU, so `openai` on a model name without `-quickgelu` is rejected, not remapped.
        revision: hub revision (branch, tag or commit) of model_id (transformers); default the registry's pin.
        image_preprocess: how whole images become CLIP's input: center_crop (the paper's: the centre crop, no
            resizing; smaller images padded with the mean colour) or resize_center_crop (short side resized to
            the input size first). Object boxes are always padded to a square and resized (module docstring).
    """

    library: ClipLibrary = "transformers"
    model_id: str = default_id("clip")
    pretrained: str = "openai"
    revision: str | None = None
    image_preprocess: ImagePreprocess = "center_crop"

    def __post_init__(self) -> None:
        if self.library not in ("transformers", "open_clip"):
            raise ValueError(f"clip.library must be transformers or open_clip, got {self.library!r}")
        if self.image_preprocess not in IMAGE_PREPROCESSES:
            raise ValueError(
                f"clip.image_preprocess must be center_crop or resize_center_crop, got {self.image_preprocess!r}"
            )
        if self.library == "open_clip" and self.pretrained == "openai" and "quickgelu" not in self.model_id:
            raise ValueError(
                f"clip.pretrained openai was trained with QuickGELU, but clip.model_id {self.model_id!r} builds "
                f"GELU: use {self.model_id}-quickgelu"
            )

    def descriptor(self) -> dict[str, Any]:
        """What determines the embeddings besides the weights (part of the cache key)."""
        out: dict[str, Any] = {"library": self.library, "model_id": self.model_id}
        out |= {"image_preprocess": self.image_preprocess, "box_preprocess": BOX_PREPROCESS}
        if self.library == "open_clip":
            out["pretrained"] = self.pretrained
        if self.revision:
            out["revision"] = self.revision
        return out


def pad_centred(image: torch.Tensor, height: int, width: int, fill: Sequence[float]) -> torch.Tensor:
    """`image` (C, h, w) in the centre of a canvas of at least (height, width) filled with the colour `fill`
    (one value per channel); sides already long enough are left as they are. An odd margin's extra pixel goes
    to the bottom/right, as in the processors' own centre crop."""
    channels, h, w = image.shape
    out_h, out_w = max(h, height), max(w, width)
    if (out_h, out_w) == (h, w):
        return image
    canvas = torch.tensor(list(fill), dtype=image.dtype).reshape(channels, 1, 1).repeat(1, out_h, out_w)
    top, left = (out_h - h) // 2, (out_w - w) // 2
    canvas[:, top : top + h, left : left + w] = image
    return canvas


def pad_to_square(image: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """The box crop padded to a square around it (centred), so a resize keeps its aspect and all of it."""
    side = max(image.shape[-2:])
    return pad_centred(image, side, side, fill)


class ClipEncoder:
    """`encode_images(whole images) -> (n, d)`, `encode_boxes(box crops) -> (n, d)` (lists of (3, H, W) [0, 1]
    tensors), `encode_texts(list of str) -> (n, d), truncated`.

    Embeddings are the projected ones (the joint space), returned as float32 on the CPU. `image_pixels` and
    `box_pixels` are the normalised model inputs (module docstring).
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
            image_processor = processor.image_processor
            self.input_size = (
                int(image_processor.crop_size["height"]),
                int(image_processor.crop_size["width"]),
            )
            self.mean = tuple(float(m) for m in image_processor.image_mean)
        else:
            model, preprocess, tokenizer = backbones.create_open_clip(
                config.model_id, config.pretrained, preset=preset, dtype=dtype
            )
            # open_clip's pipeline works on PIL images; keep its tensor-capable steps (resize, crop, normalise).
            steps = [t for t in preprocess.transforms if isinstance(t, (T.Resize, T.CenterCrop, T.Normalize))]
            self.resize_steps = T.Compose(steps)
            self.crop_steps = T.Compose([t for t in steps if not isinstance(t, T.Resize)])
            (crop,) = [t for t in steps if isinstance(t, T.CenterCrop)]
            (normalize,) = [t for t in steps if isinstance(t, T.Normalize)]
            self.input_size = (int(crop.size[0]), int(crop.size[1]))
            self.mean = tuple(float(m) for m in normalize.mean)
            self.tokenizer = tokenizer
            self.max_tokens = int(getattr(tokenizer, "context_length", 77))
            self.dim = int(model.text_projection.shape[1])
        self.model = model.to(device=device).eval()  # loaded in `dtype` by the factory

    def _model_pixels(self, images: Sequence[torch.Tensor], resize: bool) -> torch.Tensor:
        """The model's own pipeline: with `resize`, short side to the input size, centre crop, normalise; without,
        the centre crop and normalisation only (callers pad images smaller than the crop first)."""
        if self.config.library == "transformers":
            steps: dict[str, Any] = {} if resize else {"do_resize": False, "do_center_crop": True}
            pixels = self.processor.image_processor(
                images=list(images),
                do_rescale=False,
                input_data_format="channels_first",
                return_tensors="pt",
                **steps,
            )["pixel_values"]
        else:
            transform = self.resize_steps if resize else self.crop_steps
            pixels = torch.stack([transform(image) for image in images])
        return pixels.to(device=self.device, dtype=self.dtype or torch.float32)

    def image_pixels(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Whole images as CLIP sees them, by `config.image_preprocess`."""
        if self.config.image_preprocess == "resize_center_crop":
            return self._model_pixels(images, resize=True)
        height, width = self.input_size
        return self._model_pixels([pad_centred(i, height, width, self.mean) for i in images], resize=False)

    def box_pixels(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Object crops padded to a square around the box, then resized to the input size (the crop of the
        model's pipeline then keeps everything)."""
        return self._model_pixels([pad_to_square(c, self.mean) for c in crops], resize=True)

    @torch.inference_mode()
    def _encode(self, images: Sequence[torch.Tensor], pixels_of: Callable[..., torch.Tensor]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = pixels_of(images[start : start + self.batch_size])
            if self.config.library == "transformers":
                features = self.model.get_image_features(pixel_values=pixels).pooler_output
            else:
                features = self.model.encode_image(pixels)
            chunks.append(features.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """I_0 of Eq. 2: whole images (`image_pixels`)."""
        return self._encode(images, self.image_pixels)

    def encode_boxes(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """I_i of Eq. 2: object crops (`box_pixels`)."""
        return self._encode(crops, self.box_pixels)

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
