"""Frozen vision-language encoders from transformers (and open_clip), each with a tiny preset of the same class.

Every factory returns ``(model, processor)`` with the model in eval mode and in ``dtype``, with the class's
``_keep_in_fp32_modules`` left in fp32 as ``from_pretrained`` leaves them (so callers move the model with
``.to(device)`` only). ``pretrained`` loads the hub id; ``random`` builds the full architecture from the id's
config with seeded random weights (only the small config and processor files are fetched, or read from the cache);
``tiny`` builds the same model class from a small config with seeded random weights and a processor whose
tokenizer is built locally, so it runs with no network at all.
Tiny models produce meaningless captions, boxes and embeddings: they exist to run the real code paths in tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    PreTrainedModel,
    ProcessorMixin,
    SwinConfig,
)

from common.backbones.presets import (
    Preset,
    check_preset,
    check_tokenizer_loaded,
    hub_kwargs,
    pretrained_unavailable,
    seeded,
)
from common.backbones.registry import default_id
from common.backbones.tokenizers import local_bert_tokenizer, local_clip_tokenizer, local_opt_tokenizer
from common.errors import ConfigError

# Shared by the tiny presets: a 2-layer, 32-wide ViT over 32x32 images (16 patches of 8x8).
_TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def build_model(
    model_cls: type[PreTrainedModel], config: Any, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """``model_cls(config)`` with seeded random weights in ``dtype``, as ``from_pretrained(dtype=...)`` would load it.

    Built directly in ``dtype`` (a full-size random model never exists in fp32), then the class's
    ``_keep_in_fp32_modules`` (float16) and ``_keep_in_fp32_modules_strict`` (float16, bfloat16) are upcast, the
    rule transformers applies at load: BLIP-2's Q-Former and query tokens stay fp32.
    """
    with seeded():  # the same weights in every run, so two runs of a random preset can share a cache entry
        model = model_cls._from_config(config, dtype=dtype)
    keep = set(model._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(model._keep_in_fp32_modules_strict or ())
    if keep:
        # transformers matches these names anywhere in a parameter's name (core_model_loading's glob search)
        pattern = re.compile("|".join(name.replace("*", ".*") for name in sorted(keep)))
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if pattern.search(name) and tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return model


def _load_from_hub(
    model_cls: type[PreTrainedModel],
    processor_cls: type[ProcessorMixin],
    model_id: str,
    preset: Preset,
    dtype: torch.dtype | None,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """``pretrained``: weights from the hub id; ``random``: the id's config with random weights.

    Any failure to find the files (offline, not cached, wrong id) becomes one PretrainedUnavailableError.
    """
    hub = hub_kwargs(model_id, revision)
    try:
        processor = processor_cls.from_pretrained(model_id, **hub)
        if preset == "pretrained":
            model = model_cls.from_pretrained(model_id, dtype=dtype, use_safetensors=True, **hub)
        else:
            config = model_cls.config_class.from_pretrained(model_id, **hub)
            model = build_model(model_cls, config, dtype)
    except (OSError, ValueError) as error:
        raise pretrained_unavailable(model_id, error) from None
    check_tokenizer_loaded(processor.tokenizer, model.config.text_config.vocab_size, model_id)
    return model.eval(), processor


def _tiny_clip_text_config(tokenizer: Any, max_positions: int) -> dict[str, Any]:
    """A tiny CLIP text tower for the local CLIP tokenizer. CLIP pools text at the EOS token and OWLv2 at
    argmax(input_ids) (the local vocabulary puts EOS at the highest id, like OpenAI's), so the special-token ids
    must be the tokenizer's."""
    return {
        **_TINY_TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def create_clip(
    model_id: str = default_id("clip"),
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[CLIPModel, CLIPProcessor]:
    """CLIP image/text encoders (ITEM's joint embedding space; ViT-L/14 gives 768-d features).

    The tiny preset projects both towers to 32-d, and its tokenizer truncates at 77 tokens like CLIP's.
    """
    check_preset(preset)
    if preset != "tiny":
        return _load_from_hub(CLIPModel, CLIPProcessor, model_id, preset, dtype, revision)

    tokenizer = local_clip_tokenizer(model_max_length=77)
    config = CLIPConfig(
        text_config=_tiny_clip_text_config(tokenizer, max_positions=77),
        vision_config=_TINY_VIT,
        projection_dim=32,
    )
    model = build_model(CLIPModel, config, dtype)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def check_open_clip_activation(model_name: str, pretrained: str | None) -> None:
    """Refuse weights trained with QuickGELU on a model name that builds GELU (open_clip only warns).

    OpenAI's CLIP weights (``openai``, and every tag whose pretrained config says ``quick_gelu``) were trained with
    QuickGELU; open_clip's plain names (``RN50``) build GELU, so the text tower silently computes other features.
    This is an error rather than a silent remap, so the config names the model that actually runs.
    """
    import open_clip

    if not pretrained:
        return
    weights_quick = pretrained == "openai" or bool(
        open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False)
    )
    model_config = open_clip.get_model_config(model_name) or {}
    if weights_quick and not model_config.get("quick_gelu", False):
        raise ConfigError(
            f"open_clip weights {pretrained!r} were trained with QuickGELU, but {model_name!r} builds GELU: use "
            f"model {model_name.removesuffix('-quickgelu')}-quickgelu"
        )


def create_open_clip(
    model_name: str = "RN50-quickgelu",
    pretrained: str | None = "openai",
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """An open_clip model with its eval preprocessing and tokenizer: ``(model, preprocess, tokenizer)``.

    Needed for ITEM's CLIP ResNet-50 ablation, which transformers does not have. ``pretrained`` is open_clip's
    weight tag (``openai`` for RN50, whose weights need the ``RN50-quickgelu`` model: a GELU name with QuickGELU
    weights raises ConfigError, see `check_open_clip_activation`); ``random`` builds ``model_name`` from open_clip's
    bundled config with seeded weights. The tiny preset is open_clip's ``CLIP`` class with a ModifiedResNet vision
    tower (layers [1, 1, 1, 1], width 8) and a 2-layer QuickGELU text tower; it keeps open_clip's own tokenizer,
    whose BPE vocabulary ships inside the package. ``dtype`` casts the whole model (open_clip keeps nothing in fp32).
    """
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "open_clip is not installed; install it with `pip install forgelab[open_clip]`"
        ) from error

    check_preset(preset)
    if preset == "tiny":
        vision_cfg = open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=32)
        text_cfg = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
        with seeded():
            model = open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
        preprocess = open_clip.image_transform(
            32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
        )
        return model.to(dtype=dtype).eval(), preprocess, open_clip.get_tokenizer("RN50-quickgelu")

    check_open_clip_activation(model_name, pretrained)
    weights = pretrained if preset == "pretrained" else None
    try:
        with seeded():  # the random preset: the same weights in every run
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, cache_dir=hub_kwargs()["cache_dir"]
            )
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as error:
        hub_repo = open_clip.get_pretrained_cfg(model_name, pretrained or "").get("hf_hub", "").strip("/")
        raise pretrained_unavailable(
            f"{model_name} ({pretrained})", error, repo_id=hub_repo or None
        ) from None
    return model.to(dtype=dtype).eval(), preprocess, tokenizer


def create_blip2(
    model_id: str = default_id("captioner.blip2"),
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """BLIP-2 captioner (ITEM captions each image once, greedily). The real OPT-2.7b model is ~7.7 GB in fp16.

    The tiny preset wires a 2-layer ViT, Q-Former and OPT with a local OPT tokenizer; ``model.generate(
    **processor(images=..., return_tensors="pt"), max_new_tokens=...)`` runs and decodes (to gibberish).
    """
    check_preset(preset)
    if preset != "tiny":
        return _load_from_hub(
            Blip2ForConditionalGeneration, Blip2Processor, model_id, preset, dtype, revision
        )

    tokenizer = local_opt_tokenizer()
    num_query_tokens = 4
    # The processor adds the "<image>" placeholder token; the model must know its id and embed it.
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
    )
    config = Blip2Config(
        vision_config=_TINY_VIT,
        qformer_config={
            **_TINY_TEXT,
            "vocab_size": 64,
            "max_position_embeddings": 64,
            "encoder_hidden_size": 32,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(processor.tokenizer),
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = build_model(Blip2ForConditionalGeneration, config, dtype)
    return model.eval(), processor


def create_blip(
    model_id: str = default_id("captioner.blip"),
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """BLIP captioner, a lighter alternative to BLIP-2. The tiny preset decodes with a local WordPiece tokenizer."""
    check_preset(preset)
    if preset != "tiny":
        return _load_from_hub(BlipForConditionalGeneration, BlipProcessor, model_id, preset, dtype, revision)

    tokenizer = local_bert_tokenizer(model_max_length=64)
    # As in Salesforce's BLIP tokenizer: "[DEC]" starts the caption (the model's bos_token_id), "[SEP]" ends it.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    config = BlipConfig(
        text_config={
            **_TINY_TEXT,
            "vocab_size": len(tokenizer),
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_TINY_VIT,
        projection_dim=32,
    )
    model = build_model(BlipForConditionalGeneration, config, dtype)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    return model.eval(), BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def create_grounding_dino(
    model_id: str = default_id("grounder.grounding_dino"),
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """Grounding DINO open-vocabulary detector (ITEM's GLIP stand-in; prompt: lowercase phrases joined by ". ").

    The tiny preset uses a one-block-per-stage Swin backbone, a 2-layer BERT text tower, 2 encoder/decoder
    layers (64 wide, so one-image batches of any aspect work) and 10 queries; ``processor.post_process_grounded_object_detection`` runs on its outputs.
    """
    check_preset(preset)
    if preset != "tiny":
        return _load_from_hub(
            GroundingDinoForObjectDetection, GroundingDinoProcessor, model_id, preset, dtype, revision
        )

    max_text_len = 32
    tokenizer = local_bert_tokenizer(model_max_length=max_text_len)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=7,
            out_indices=[2, 3, 4],
        ),
        text_config={
            "model_type": "bert",
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": max_text_len,
            "pad_token_id": tokenizer.pad_token_id,
        },
        # 64 channels in the neck's GroupNorm(32 groups): two values per group even on a 1x1 map, which a
        # one-image batch of a small or elongated image reaches at the coarsest level.
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=max_text_len,
    )
    model = build_model(GroundingDinoForObjectDetection, config, dtype)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    return model.eval(), GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def create_owlv2(
    model_id: str = default_id("grounder.owlv2"),
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    """OWLv2 open-vocabulary detector (queries are noun phrases, at most 16 tokens each).

    The tiny preset keeps OWLv2's conventions: CLIP tokenizer padding with "!" to 16 tokens, square padded images.
    """
    check_preset(preset)
    if preset != "tiny":
        return _load_from_hub(Owlv2ForObjectDetection, Owlv2Processor, model_id, preset, dtype, revision)

    tokenizer = local_clip_tokenizer(model_max_length=16, pad_token="!")
    config = Owlv2Config(
        text_config=_tiny_clip_text_config(tokenizer, max_positions=16),
        vision_config=_TINY_VIT,
        projection_dim=32,
    )
    model = build_model(Owlv2ForObjectDetection, config, dtype)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    return model.eval(), Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)


# llava-hf/llava-1.5-*'s chat template ("USER: <image>\n<text> ASSISTANT:"), for the tiny preset's processor.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def create_llava(
    model_id: str = default_id("captioner.llava"),
    *,
    preset: Preset = "pretrained",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA captioner (ITEM's caption-model ablation, Fig. 7). llava-1.5-7b is ~14 GB in fp16.

    Prompt it through ``processor.apply_chat_template`` (a user turn with an image and the instruction,
    ``add_generation_prompt=True``) and decode only the generated tokens. The tiny preset is the same class with a
    2-layer CLIP vision tower (32 px, 16 patches), a 2-layer Llama, a local byte-level BPE tokenizer with an
    ``<image>`` token, left padding for batched generation, and llava-1.5's chat template.
    """
    check_preset(preset)
    if preset != "tiny":
        return _load_from_hub(
            LlavaForConditionalGeneration, LlavaProcessor, model_id, preset, dtype, revision
        )

    tokenizer = local_opt_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last prompt token
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=_TINY_VIT["patch_size"],
        vision_feature_select_strategy="default",  # drop the CLS token: 16 image tokens per image
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_TINY_VIT, projection_dim=32),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = build_model(LlavaForConditionalGeneration, config, dtype)
    return model.eval(), processor
