"""The frozen captioner C (x_hat -> c_hat) and how faithful c_hat is to the caption c the image was made from.

The paper re-captions every generated image "immediately" but gives no formula that uses c_hat; captioning is
discrete, so it cannot pass a gradient to theta. We therefore log it as a measurement (README "Decisions"):
two caption-fidelity scores, both in [0, 1] for identical captions = 1:
* ``token_f1``: bag-of-words F1 between c and c_hat (SQuAD's answer F1), the fine-grained words themselves;
* CLIP text-text cosine between g(c) and g(c_hat) (`FrozenCLIP.text_embedding`), which forgives paraphrase.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.backbones import create_blip, create_blip2
from common.backbones.registry import default_id

CAPTIONERS = {"blip": create_blip, "blip2": create_blip2}
DEFAULT_CAPTIONER_IDS = {kind: default_id(f"captioner.{kind}") for kind in CAPTIONERS}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(reference: str, hypothesis: str) -> float:
    """Bag-of-words F1 between two captions (lower-cased alphanumeric words; 1.0 when both are empty)."""
    ref, hyp = Counter(_words(reference)), Counter(_words(hypothesis))
    if not ref and not hyp:
        return 1.0
    overlap = sum((ref & hyp).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(hyp.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    return [Image.fromarray(a.astype(np.uint8)) for a in array]


class Captioner(nn.Module):
    """A frozen BLIP or BLIP-2 captioner with greedy decoding (C in the paper's Fig. 2)."""

    def __init__(
        self,
        kind: str = "blip",
        model_id: str | None = None,
        preset: str = "pretrained",
        max_new_tokens: int = 30,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in CAPTIONERS:
            raise ValueError(f"captioner must be one of {sorted(CAPTIONERS)}, got {kind!r}")
        model, processor = CAPTIONERS[kind](
            model_id or DEFAULT_CAPTIONER_IDS[kind], preset=preset, dtype=dtype
        )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[str]:
        device = next(self.model.parameters()).device
        inputs = self.processor(images=to_pil(images), return_tensors="pt").to(device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]


def caption_fidelity(
    references: Sequence[str], hypotheses: Sequence[str], text_embedding: torch.Tensor | None = None
) -> dict[str, float]:
    """Mean token F1 (and mean CLIP text cosine, when ``text_embedding`` = g of [*references, *hypotheses])."""
    scores = {"token_f1": float(np.mean([token_f1(r, h) for r, h in zip(references, hypotheses)]))}
    if text_embedding is not None:
        n = len(references)
        scores["clip_cosine"] = float((text_embedding[:n] * text_embedding[n:]).sum(-1).mean())
    return scores
