"""Model factories: one per family, each loading pretrained weights or building a tiny offline preset.

Presets: ``pretrained`` (real weights from the Hugging Face cache or the network), ``random`` (full-size
architecture, random weights), ``tiny`` (same class, small config, seeded random weights, no network, with
locally built tokenizers). Tests and demos use ``tiny``.

Submodules are imported on first use, so ``from common.backbones import create_timm_classifier`` does not pay
for importing diffusers and every transformers model (seconds, on every CLI start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.backbones.diffusion_models import (
        DiffusionComponents,
        build_pipeline,
        create_diffusion_components,
    )
    from common.backbones.presets import Preset, PretrainedUnavailableError
    from common.backbones.timm_models import (
        TIMM_CLASSIFIERS,
        create_timm_classifier,
        load_local_weights,
        timm_data_config,
    )
    from common.backbones.tokenizers import local_bert_tokenizer, local_clip_tokenizer, local_opt_tokenizer
    from common.backbones.transformers_models import (
        create_blip,
        create_blip2,
        create_clip,
        create_grounding_dino,
        create_llava,
        create_open_clip,
        create_owlv2,
    )

_EXPORTS = {
    "Preset": "presets",
    "PretrainedUnavailableError": "presets",
    "TIMM_CLASSIFIERS": "timm_models",
    "create_timm_classifier": "timm_models",
    "load_local_weights": "timm_models",
    "timm_data_config": "timm_models",
    "create_clip": "transformers_models",
    "create_open_clip": "transformers_models",
    "create_blip2": "transformers_models",
    "create_blip": "transformers_models",
    "create_grounding_dino": "transformers_models",
    "create_llava": "transformers_models",
    "create_owlv2": "transformers_models",
    "DiffusionComponents": "diffusion_models",
    "create_diffusion_components": "diffusion_models",
    "build_pipeline": "diffusion_models",
    "local_clip_tokenizer": "tokenizers",
    "local_opt_tokenizer": "tokenizers",
    "local_bert_tokenizer": "tokenizers",
}
__all__ = [
    "TIMM_CLASSIFIERS",
    "DiffusionComponents",
    "Preset",
    "PretrainedUnavailableError",
    "build_pipeline",
    "create_blip",
    "create_blip2",
    "create_clip",
    "create_diffusion_components",
    "create_grounding_dino",
    "create_llava",
    "create_open_clip",
    "create_owlv2",
    "create_timm_classifier",
    "load_local_weights",
    "local_bert_tokenizer",
    "local_clip_tokenizer",
    "local_opt_tokenizer",
    "timm_data_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
