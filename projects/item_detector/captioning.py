"""ITEM Eq. 1, p = Caption(x, Theta_cap): one caption per image, generated once (greedy) and cached.

BLIP-2 (blip2-opt-2.7b) is the paper's captioner; BLIP and LLaVA are its caption-model ablation (Fig. 7, with
the paper's LLaVA prompt); `dataset` reads the caption from the data manifest (the toy world's realfake
JSONL), an oracle that takes caption quality out of the comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

# Factories are looked up on use: importing transformers' model classes costs seconds, and a run on
# cached features never needs them.
from common import backbones
from common.backbones.registry import default_id
from common.data.samples import DatasetLayoutError, Sample

CaptionerName = Literal["blip2", "blip", "llava", "dataset"]

DEFAULT_CAPTIONERS: dict[str, str] = {
    name: default_id(f"captioner.{name}") for name in ("blip2", "blip", "llava")
}
_FACTORIES: dict[str, str] = {"blip2": "create_blip2", "blip": "create_blip", "llava": "create_llava"}
LLAVA_INSTRUCTION = "Please generate a one-sentence caption for the input image."  # ITEM Sec. IV-C


@dataclass(frozen=True)
class CaptionerConfig:
    """Which captioner writes p (Eq. 1).

    Args:
        name: blip2 (paper), blip, llava (Fig. 7 ablation) or dataset (the manifest's `caption`: oracle).
        model_id: hub id; default per name (Salesforce/blip2-opt-2.7b, Salesforce/blip-image-captioning-large,
            llava-hf/llava-1.5-7b-hf).
        max_new_tokens: generation length cap (greedy decoding, one caption per image).
        instruction: LLaVA's prompt (the paper's, by default); ignored by the other captioners.
        revision: hub revision (branch, tag or commit) of model_id; default the registry's pin or main.
    """

    name: CaptionerName = "blip2"
    model_id: str | None = None
    max_new_tokens: int = 30
    instruction: str = LLAVA_INSTRUCTION
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.name not in (*DEFAULT_CAPTIONERS, "dataset"):
            raise ValueError(f"captioner.name must be one of blip2, blip, llava, dataset; got {self.name!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"captioner.max_new_tokens must be positive, got {self.max_new_tokens}")

    @property
    def resolved_model_id(self) -> str | None:
        return None if self.name == "dataset" else self.model_id or DEFAULT_CAPTIONERS[self.name]

    def descriptor(self) -> dict[str, Any]:
        """What determines the captions (part of the cache key)."""
        if self.name == "dataset":
            return {"name": "dataset"}
        out: dict[str, Any] = {"name": self.name, "model_id": self.resolved_model_id}
        out["max_new_tokens"] = self.max_new_tokens
        if self.name == "llava":
            out["instruction"] = self.instruction
        if self.revision:
            out["revision"] = self.revision
        return out


def clean_caption(text: str) -> str:
    """One line, single spaces, no surrounding whitespace."""
    return " ".join(text.split())


class DatasetCaptioner:
    """The caption column of the data manifest (oracle). A row without one gets the empty caption (counted as
    `caption_empty`); data with no captions at all is a configuration error."""

    def __call__(self, images: Sequence[torch.Tensor], samples: Sequence[Sample]) -> list[str]:
        return [clean_caption(sample.caption or "") for sample in samples]

    @staticmethod
    def check(samples: Sequence[Sample]) -> None:
        if samples and all(s.caption is None for s in samples):
            raise DatasetLayoutError(
                f"captioner 'dataset' reads captions from the data manifest, but none of the {len(samples)} "
                f"images under e.g. {samples[0].path} has one: use a .jsonl/.csv manifest with a caption column "
                f"as the data root (e.g. data/toy_world/realfake/train.jsonl), or a generative captioner"
            )


class GenerativeCaptioner:
    """BLIP-2, BLIP or LLaVA through `model.generate`, greedy, batched."""

    def __init__(
        self, config: CaptionerConfig, preset: str, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        self.config = config
        factory: Callable[..., tuple[Any, Any]] = getattr(backbones, _FACTORIES[config.name])
        model, self.processor = factory(
            config.resolved_model_id, preset=preset, dtype=dtype, revision=config.revision
        )
        # Loaded in `dtype` by the factory; only moved here, as `.to(dtype)` would cast the fp32-kept modules too.
        self.model = model.to(device=device)
        self.device, self.dtype = device, dtype
        self.prompt: str | None = None
        if config.name == "llava":
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.instruction}]}
            ]
            self.prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
            self.processor.tokenizer.padding_side = "left"  # batched decoder-only generation

    @torch.inference_mode()
    def __call__(self, images: Sequence[torch.Tensor], samples: Sequence[Sample]) -> list[str]:
        # Float [0, 1] tensors, channels first: no rescaling, and no guessing the layout of tiny crops.
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        kwargs |= {"do_rescale": False, "input_data_format": "channels_first"}
        if self.prompt is not None:
            kwargs |= {"text": [self.prompt] * len(images), "padding": True}
        inputs = self.processor(**kwargs).to(self.device)
        if self.dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generated = self.model.generate(
            **inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False, num_beams=1
        )
        prompt = inputs.get("input_ids")
        echoed = prompt is not None and generated.shape[1] >= prompt.shape[1]
        if echoed and torch.equal(generated[:, : prompt.shape[1]], prompt):
            generated = generated[:, prompt.shape[1] :]  # the models return the prompt before the caption
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [clean_caption(text) for text in texts]


def build_captioner(
    config: CaptionerConfig, preset: str, device: torch.device, dtype: torch.dtype | None
) -> DatasetCaptioner | GenerativeCaptioner:
    if config.name == "dataset":
        return DatasetCaptioner()
    return GenerativeCaptioner(config, preset, device, dtype)
