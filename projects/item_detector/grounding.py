"""ITEM Eq. 5, {(x_i, p_i)} = ObjectDetector(x, p, Theta_obj): ground the caption's noun phrases to boxes.

The paper uses GLIP (glip-Swin-L), which is not in transformers. Grounding DINO is the open-vocabulary grounder
that is (same task: a caption's phrases in, boxes with the phrase they ground out); OWLv2 is the alternative.
`dataset` takes the boxes and phrases of the data manifest (oracle); `none` grounds nothing (global-only runs
skip the detector's cost, as the paper suggests for Fig. 5's global variant).

Boxes are (x0, y0, x1, y1) in pixels of the image as stored. Every grounder's raw boxes go through
`select_objects`: clipped to the image, boxes smaller than `min_box_size` dropped, per-phrase NMS, and the
`max_objects` best kept; what was clipped or dropped is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torchvision.ops import batched_nms

# Factories are looked up on use: importing transformers' model classes costs seconds, and a run on
# cached features never needs them.
from common import backbones
from common.backbones.registry import default_id
from common.data.samples import DatasetLayoutError, Sample
from projects.item_detector.phrases import noun_phrases

GrounderName = Literal["grounding_dino", "owlv2", "dataset", "none"]
DEFAULT_GROUNDERS: dict[str, str] = {
    name: default_id(f"grounder.{name}") for name in ("grounding_dino", "owlv2")
}


@dataclass(frozen=True)
class GrounderConfig:
    """Which detector grounds the caption's objects (Eq. 5) and how its boxes are filtered.

    Args:
        name: grounding_dino (default; GLIP is not in transformers), owlv2, dataset (manifest boxes: oracle)
            or none (no local objects).
        model_id: hub id; default IDEA-Research/grounding-dino-base or google/owlv2-base-patch16-ensemble.
        box_threshold: minimum phrase score of a kept box (Grounding DINO's box threshold; OWLv2's threshold).
        max_phrases: noun phrases taken from a caption (in order of appearance).
        max_objects: objects kept per image, best scores first (n of Eq. 7 is at most this).
        nms_iou: boxes of the same phrase overlapping more than this are one object.
        min_box_size: boxes narrower or shorter than this many pixels (after clipping) are dropped.
        revision: hub revision (branch, tag or commit) of model_id; default the registry's pin or main.
    """

    name: GrounderName = "grounding_dino"
    model_id: str | None = None
    box_threshold: float = 0.35
    max_phrases: int = 8
    max_objects: int = 8
    nms_iou: float = 0.5
    min_box_size: int = 4
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.name not in (*DEFAULT_GROUNDERS, "dataset", "none"):
            raise ValueError(
                f"grounder.name must be one of grounding_dino, owlv2, dataset, none; got {self.name!r}"
            )
        if not 0.0 <= self.box_threshold < 1.0:
            raise ValueError(f"grounder.box_threshold must be in [0, 1), got {self.box_threshold}")
        if self.max_phrases <= 0 or self.max_objects <= 0:
            raise ValueError("grounder.max_phrases and grounder.max_objects must be positive")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"grounder.nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.min_box_size < 1:
            raise ValueError(f"grounder.min_box_size must be >= 1, got {self.min_box_size}")

    @property
    def resolved_model_id(self) -> str | None:
        return self.model_id or DEFAULT_GROUNDERS.get(self.name)

    def descriptor(self) -> dict[str, Any]:
        """What determines the objects (part of the cache key)."""
        out: dict[str, Any] = {"name": self.name}
        if self.name == "none":
            return out
        if self.name != "dataset":
            out |= {"model_id": self.resolved_model_id, "box_threshold": self.box_threshold}
            out["max_phrases"] = self.max_phrases
            if self.revision:
                out["revision"] = self.revision
        out |= {"max_objects": self.max_objects, "nms_iou": self.nms_iou, "min_box_size": self.min_box_size}
        return out


@dataclass
class Grounding:
    """One image's grounded objects: phrase i names box i."""

    phrases: list[str] = field(default_factory=list)
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    boxes_outside: int = 0  # boxes reaching outside the image (clipped, or dropped when nothing was left)
    boxes_dropped: int = 0  # boxes dropped as smaller than min_box_size after clipping


# -- box selection (pure) --------------------------------------------------------------------------------------


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (N, 4) xyxy boxes to the image; also returns which boxes reached outside it."""
    limits = boxes.new_tensor([width, height, width, height])
    outside = ((boxes < 0) | (boxes > limits)).any(dim=1)
    clipped = torch.minimum(boxes.clamp_min(0), limits)
    return clipped, outside


def select_objects(
    phrases: Sequence[str],
    boxes: torch.Tensor,
    scores: torch.Tensor,
    width: int,
    height: int,
    max_objects: int,
    nms_iou: float = 0.5,
    min_box_size: int = 4,
) -> Grounding:
    """Clip to the image, drop boxes under `min_box_size`, NMS within each phrase, keep the `max_objects` best.

    Ties in score keep the grounder's order (the manifest's order for the oracle), so selection is
    deterministic.
    """
    if boxes.numel() == 0:
        return Grounding()
    boxes = boxes.float().reshape(-1, 4)
    scores = scores.float().reshape(-1)
    clipped, outside = clip_boxes(boxes, width, height)
    sizes = clipped[:, 2:] - clipped[:, :2]
    big_enough = (sizes >= min_box_size).all(dim=1)
    keep = torch.nonzero(big_enough).flatten()
    vocabulary = {phrase: i for i, phrase in enumerate(dict.fromkeys(phrases))}
    labels = torch.tensor([vocabulary[p] for p in phrases], dtype=torch.long)
    if keep.numel():
        survivors = batched_nms(clipped[keep], scores[keep], labels[keep], nms_iou)
        keep = keep[survivors]
        order = sorted(range(keep.numel()), key=lambda i: (-float(scores[keep[i]]), int(keep[i])))
        keep = keep[order][:max_objects]
    return Grounding(
        phrases=[phrases[i] for i in keep.tolist()],
        boxes=clipped[keep],
        scores=scores[keep],
        boxes_outside=int(outside.sum()),
        boxes_dropped=int((~big_enough).sum()),
    )


def cxcywh_to_xyxy(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1), as DETR-family detectors predict boxes."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return xyxy * boxes.new_tensor([width, height, width, height])


def phrase_token_spans(
    offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]
) -> list[list[int]]:
    """Token positions of each phrase: tokens whose (non-empty) character offsets lie inside the phrase's span.

    A phrase cut off by the text length limit keeps only its surviving tokens (possibly none).
    """
    spans = []
    for start, end in char_spans:
        spans.append([t for t, (s, e) in enumerate(offsets) if e > s and s >= start and e <= end])
    return spans


def assign_phrases(
    token_probs: torch.Tensor, spans: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounding DINO / GLIP phrase grounding: a box's score for a phrase is the highest probability among the
    phrase's tokens; each box takes its best phrase. `token_probs` (Q, L) -> (phrase index (Q,), score (Q,)).
    Phrases without surviving tokens score 0."""
    columns = [
        token_probs[:, list(span)].max(dim=1).values if span else token_probs.new_zeros(token_probs.shape[0])
        for span in spans
    ]
    per_phrase = torch.stack(columns, dim=1)
    score, index = per_phrase.max(dim=1)
    return index, score


# -- grounders ---------------------------------------------------------------------------------------------------


class DatasetGrounder:
    """The manifest's boxes and phrases (oracle), score 1. A row without boxes grounds nothing (counted as
    `no_objects`); data with no boxes at all is a configuration error."""

    def __call__(
        self, images: Sequence[torch.Tensor], captions: Sequence[str], samples: Sequence[Sample]
    ) -> list[Grounding]:
        out = []
        for sample in samples:
            boxes = torch.tensor(sample.boxes or [], dtype=torch.float32).reshape(-1, 4)
            phrases = list(sample.phrases or [])
            if len(phrases) != len(boxes):  # read_manifest rejects this; a hand-made Sample might not
                raise DatasetLayoutError(f"{sample.path}: {len(boxes)} boxes but {len(phrases)} phrases")
            out.append(Grounding(phrases, boxes, torch.ones(len(boxes))))
        return out

    @staticmethod
    def check(samples: Sequence[Sample]) -> None:
        if samples and all(s.boxes is None for s in samples):
            raise DatasetLayoutError(
                f"grounder 'dataset' reads boxes and phrases from the data manifest, but none of the "
                f"{len(samples)} images under e.g. {samples[0].path} has them: use a .jsonl manifest with boxes "
                f"and phrases as the data root (e.g. data/toy_world/realfake/train.jsonl), or a detector"
            )


class NoGrounder:
    """No local objects (global-only extraction)."""

    def __call__(
        self, images: Sequence[torch.Tensor], captions: Sequence[str], samples: Sequence[Sample]
    ) -> list[Grounding]:
        return [Grounding() for _ in images]


class GroundingDinoGrounder:
    """Grounding DINO on the prompt "phrase 1. phrase 2. ..." (lowercase phrases joined by ". ")."""

    def __init__(
        self, config: GrounderConfig, preset: str, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        self.config = config
        model, self.processor = backbones.create_grounding_dino(
            config.resolved_model_id, preset=preset, dtype=dtype, revision=config.revision
        )
        self.model = model.to(device=device)  # loaded in `dtype` by the factory
        self.device, self.dtype = device, dtype
        self.max_text_len = int(self.model.config.max_text_len)

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[torch.Tensor], captions: Sequence[str], samples: Sequence[Sample]
    ) -> list[Grounding]:
        out = [Grounding() for _ in images]
        phrases = [noun_phrases(c, self.config.max_phrases) for c in captions]
        todo = [i for i, p in enumerate(phrases) if p]
        if not todo:
            return out
        prompts, char_spans = [], []
        for i in todo:
            prompt, spans = "", []
            for phrase in phrases[i]:
                spans.append((len(prompt), len(prompt) + len(phrase)))
                prompt += phrase + ". "
            prompts.append(prompt.strip())
            char_spans.append(spans)
        text_kwargs = {"padding": "longest", "truncation": True, "max_length": self.max_text_len}
        inputs = self.processor(
            images=[images[i] for i in todo],
            text=prompts,
            do_rescale=False,
            input_data_format="channels_first",
            return_tensors="pt",
            **text_kwargs,
        ).to(self.device)
        if self.dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tokens = self.processor.tokenizer(prompts, return_offsets_mapping=True, **text_kwargs)
        if tokens["input_ids"] != inputs["input_ids"].tolist():  # the spans must index the model's tokens
            raise RuntimeError(
                "Grounding DINO's processor tokenized the prompts differently from its tokenizer"
            )
        offsets = tokens["offset_mapping"]
        outputs = self.model(**inputs)
        probs = outputs.logits.float().sigmoid().cpu()
        pred_boxes = outputs.pred_boxes.float().cpu()
        for row, i in enumerate(todo):
            spans = phrase_token_spans(offsets[row], char_spans[row])
            index, score = assign_phrases(probs[row], spans)
            keep = score > self.config.box_threshold
            height, width = images[i].shape[-2:]
            out[i] = Grounding(
                [phrases[i][j] for j in index[keep].tolist()],
                cxcywh_to_xyxy(pred_boxes[row][keep], width, height),
                score[keep],
            )
        return out


class Owlv2Grounder:
    """OWLv2 with the caption's noun phrases as text queries; an image's boxes do not depend on its batch."""

    def __init__(
        self, config: GrounderConfig, preset: str, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        self.config = config
        model, self.processor = backbones.create_owlv2(
            config.resolved_model_id, preset=preset, dtype=dtype, revision=config.revision
        )
        self.model = model.to(device=device)  # loaded in `dtype` by the factory
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[torch.Tensor], captions: Sequence[str], samples: Sequence[Sample]
    ) -> list[Grounding]:
        out = [Grounding() for _ in images]
        phrases = [noun_phrases(c, self.config.max_phrases) for c in captions]
        todo = [i for i, p in enumerate(phrases) if p]
        if not todo:
            return out
        inputs = self.processor(
            text=[phrases[i] for i in todo],
            images=[images[i] for i in todo],
            do_rescale=False,
            input_data_format="channels_first",
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        if self.dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        # The processor pads shorter query lists, and OWLv2's own query mask (first token > 0) keeps the padded
        # queries (they start with BOS): mask them here, so an image's boxes do not depend on its batch.
        counts = torch.tensor([len(phrases[i]) for i in todo], device=outputs.logits.device)
        padded = torch.arange(outputs.logits.shape[-1], device=counts.device) >= counts[:, None]
        outputs.logits = outputs.logits.masked_fill(padded[:, None, :], torch.finfo(outputs.logits.dtype).min)
        # OWLv2 pads every image to a square at the bottom/right: boxes scale by the longer side.
        sides = [max(images[i].shape[-2:]) for i in todo]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.config.box_threshold, target_sizes=[(s, s) for s in sides]
        )
        for result, i in zip(results, todo, strict=True):
            out[i] = Grounding(
                [phrases[i][j] for j in result["labels"].tolist()],
                result["boxes"].float().cpu(),
                result["scores"].float().cpu(),
            )
        return out


def build_grounder(
    config: GrounderConfig, preset: str, device: torch.device, dtype: torch.dtype | None
) -> DatasetGrounder | NoGrounder | GroundingDinoGrounder | Owlv2Grounder:
    if config.name == "dataset":
        return DatasetGrounder()
    if config.name == "none":
        return NoGrounder()
    if config.name == "owlv2":
        return Owlv2Grounder(config, preset, device, dtype)
    return GroundingDinoGrounder(config, preset, device, dtype)
