"""ITEM's frozen stage (Algorithm 1, lines 2-5): caption (Eq. 1), ground the caption's objects (Eq. 5), embed the
image, the caption, every object crop and its phrase with CLIP (Eq. 2).

Nothing here trains, so its outputs are a function of (image content, models and their weights, library
versions, extraction code, preprocessing, perturbation) only: `FrozenStage.descriptor` names exactly that, and
the feature cache (cache.py) keys entries by it. The misalignment maths (Eq. 3-8) happens later, on the cached
embeddings, so one extraction serves every w1/w2 setting and the empty-object policy.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.data.samples import Sample
from projects.item_detector.captioning import CaptionerConfig, DatasetCaptioner, build_captioner
from projects.item_detector.clip_encoders import ClipConfig, ClipEncoder
from projects.item_detector.grounding import DatasetGrounder, GrounderConfig, build_grounder, select_objects
from projects.item_detector.provenance import (
    library_versions,
    open_clip_weights_revision,
    source_fingerprint,
    weights_revision,
)

log = logging.getLogger("forgelab.item")

# Bump when the extraction code changes what it computes for the same models (crop rule, caption cleaning,
# phrase chunker, box filtering): every cached entry of older versions then misses instead of being served.
# 2: object boxes padded to a square and resized (were resized on the short side and centre-cropped).
FEATURE_VERSION = 2

FLAG_NAMES: tuple[str, ...] = (
    "caption_empty",  # the captioner returned nothing (CLIP embeds the empty string)
    "caption_truncated",  # caption longer than CLIP's 77 tokens, embedded truncated
    "phrase_truncated",  # object phrases longer than 77 tokens
    "no_objects",  # nothing grounded: D_l falls back (see ItemDetector.empty_local)
    "boxes_outside",  # boxes reaching outside the image, clipped to it
    "boxes_dropped",  # boxes smaller than min_box_size after clipping, dropped
)


@dataclass
class ImageFeatures:
    """The frozen outputs for one image: caption p, objects (p_i, box_i), and the CLIP embeddings I_0, T_0 of the
    whole image and caption and I_i, T_i of each object crop and its phrase."""

    caption: str
    phrases: list[str]
    boxes: torch.Tensor  # (n, 4) xyxy pixels
    box_scores: torch.Tensor  # (n,)
    global_image: torch.Tensor  # (d,)
    global_text: torch.Tensor  # (d,)
    local_image: torch.Tensor  # (n, d)
    local_text: torch.Tensor  # (n, d)
    flags: dict[str, int] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK under DDP) when there is one, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU (BLIP-2 OPT-2.7b is 7.7 GB in fp16), float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16; got {dtype!r}") from None


def crop(image: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """The pixels of `box` (x0, y0, x1, y1; x1/y1 exclusive edges), rounded outwards to whole pixels (CLIP pads
    them to a square before resizing: `ClipEncoder.box_pixels`)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = image.shape[-2:]
    left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
    right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    return image[:, top:bottom, left:right]


class FrozenStage:
    """Captioner + grounder + CLIP, loaded on first use, run on batches of [0, 1] image tensors.

    Args:
        captioner, grounder, clip: which models (see their configs).
        preset: pretrained | random | tiny for all three (tiny: offline test models).
        device: auto | cpu | cuda[:i]. dtype: auto | float32 | float16 | bfloat16 (part of the cache key).
        clip_batch_size: images/texts per CLIP forward.
    """

    def __init__(
        self,
        captioner: CaptionerConfig,
        grounder: GrounderConfig,
        clip: ClipConfig,
        preset: str = "pretrained",
        device: str = "auto",
        dtype: str = "auto",
        clip_batch_size: int = 64,
    ) -> None:
        self.captioner_config, self.grounder_config, self.clip_config = captioner, grounder, clip
        self.preset = preset
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.clip_batch_size = clip_batch_size
        self._models: tuple[Any, Any, ClipEncoder] | None = None

    def descriptor(self, perturbation: str) -> dict[str, Any]:
        """Everything the features depend on besides the image itself (the cache key): the models and the
        revision of their weights, the library versions, and a fingerprint of the extraction code (provenance.py);
        FEATURE_VERSION marks deliberate changes of what our code computes."""
        return {
            "feature_version": FEATURE_VERSION,
            "preset": self.preset,
            "dtype": str(self.dtype).removeprefix("torch."),
            "captioner": self.captioner_config.descriptor(),
            "grounder": self.grounder_config.descriptor(),
            "clip": self.clip_config.descriptor(),
            "weights": self.weights_revisions(),
            "libraries": library_versions(open_clip=self.clip_config.library == "open_clip"),
            "code": source_fingerprint(),
            "max_text_tokens": 77,
            "perturbation": perturbation,
        }

    def weights_revisions(self) -> dict[str, str | None]:
        """The snapshot commit (hub id) or content hash (local path) of each model's weights; `random` presets
        name the config's revision. Tiny presets have none: their weights are built by the fingerprinted code."""
        if self.preset == "tiny":
            return {}
        out: dict[str, str | None] = {}
        if (captioner_id := self.captioner_config.resolved_model_id) is not None:
            out["captioner"] = weights_revision(captioner_id)
        if self.grounder_config.name not in ("dataset", "none"):
            out["grounder"] = weights_revision(str(self.grounder_config.resolved_model_id))
        clip = self.clip_config
        if clip.library == "transformers":
            out["clip"] = weights_revision(clip.model_id)
        elif self.preset == "pretrained":  # open_clip's random preset is its bundled config (library version)
            out["clip"] = open_clip_weights_revision(clip.model_id, clip.pretrained)
        return out

    def annotations(self, sample: Sample) -> dict[str, Any] | None:
        """The manifest annotations an oracle reads for `sample` (part of its cache entry's key)."""
        used: dict[str, Any] = {}
        if self.captioner_config.name == "dataset":
            used["caption"] = sample.caption
        if self.grounder_config.name == "dataset":
            used["boxes"], used["phrases"] = sample.boxes, sample.phrases
        return used or None

    def check_samples(self, samples: Sequence[Sample]) -> None:
        """Oracles need their annotations on every sample: fail before any model is loaded."""
        if self.captioner_config.name == "dataset":
            DatasetCaptioner.check(samples)
        if self.grounder_config.name == "dataset":
            DatasetGrounder.check(samples)

    def models(self) -> tuple[Any, Any, ClipEncoder]:
        if self._models is None:
            log.info(
                "loading the frozen stage on %s (%s): %s",
                self.device,
                self.dtype,
                json.dumps(self.descriptor("-")),
            )
            self._models = (
                build_captioner(self.captioner_config, self.preset, self.device, self.dtype),
                build_grounder(self.grounder_config, self.preset, self.device, self.dtype),
                ClipEncoder(self.clip_config, self.preset, self.device, self.dtype, self.clip_batch_size),
            )
        return self._models

    @property
    def feature_dim(self) -> int:
        return self.models()[2].dim

    def close(self) -> None:
        """Free the models (training needs the memory, not them)."""
        self._models = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, images: Sequence[torch.Tensor], samples: Sequence[Sample]) -> list[ImageFeatures]:
        """Algorithm 1 lines 2-5 for a batch: captions, objects, CLIP embeddings (Eq. 1, 5, 2)."""
        if not images:
            return []
        captioner, grounder, clip = self.models()
        captions = captioner(images, samples)  # Eq. 1
        config = self.grounder_config
        objects = []
        for image, grounding in zip(images, grounder(images, captions, samples), strict=True):  # Eq. 5
            height, width = image.shape[-2:]
            objects.append(
                select_objects(
                    grounding.phrases,
                    grounding.boxes,
                    grounding.scores,
                    width,
                    height,
                    config.max_objects,
                    config.nms_iou,
                    config.min_box_size,
                )
            )
        crops = [crop(image, box) for image, found in zip(images, objects) for box in found.boxes.tolist()]
        phrases = [phrase for found in objects for phrase in found.phrases]
        global_images, local_images = clip.encode_images(images), clip.encode_boxes(crops)  # Eq. 2
        text_embeddings, truncated = clip.encode_texts([*captions, *phrases])

        n, features, offset = len(images), [], 0
        for i, (caption, found) in enumerate(zip(captions, objects, strict=True)):
            k = len(found.phrases)
            local = slice(n + offset, n + offset + k)
            boxes = slice(offset, offset + k)
            features.append(
                ImageFeatures(
                    caption=caption,
                    phrases=list(found.phrases),
                    boxes=found.boxes.float(),
                    box_scores=found.scores.float(),
                    global_image=global_images[i],
                    global_text=text_embeddings[i],
                    local_image=local_images[boxes],
                    local_text=text_embeddings[local],
                    flags={
                        "caption_empty": int(not caption),
                        "caption_truncated": int(truncated[i]),
                        "phrase_truncated": sum(truncated[local]),
                        "no_objects": int(k == 0),
                        "boxes_outside": found.boxes_outside,
                        "boxes_dropped": found.boxes_dropped,
                    },
                )
            )
            offset += k
        return features
