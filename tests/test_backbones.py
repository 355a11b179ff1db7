"""Backbone factories: tiny presets build the real classes offline, pretrained failures explain themselves.

Every test runs with the network blocked (sockets refuse to connect) and the Hugging Face hub in offline mode
with an empty cache, so a factory that tried to download anything would fail here.
"""

from __future__ import annotations

import socket
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from common.backbones import (
    TIMM_CLASSIFIERS,
    PretrainedUnavailableError,
    build_pipeline,
    create_blip,
    create_blip2,
    create_clip,
    create_diffusion_components,
    create_grounding_dino,
    create_llava,
    create_owlv2,
    create_timm_classifier,
    local_bert_tokenizer,
    local_clip_tokenizer,
    local_opt_tokenizer,
    registry,
    timm_data_config,
)
from common.backbones import tokenizers as local_tokenizers
from tests.cli_helpers import CONFIGS

CAPTION = "a brass ball valve with a lever handle and four bolts on a round flange"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    hf_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub read HF_HUB_OFFLINE at import; make sure its own checks see offline mode too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- timm classifiers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIMM_CLASSIFIERS)
def test_tiny_timm_classifier_is_the_full_architecture_class_and_classifies(name: str) -> None:
    model = create_timm_classifier(name, preset="tiny", num_classes=3).eval()
    with torch.device("meta"):  # the full model's class without allocating convnext_xlarge's weights
        full = timm.create_model(name, pretrained=False)
    assert type(model) is type(full)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert same_weights(model, create_timm_classifier(name, preset="tiny", num_classes=3))


def test_tiny_presets_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_timm_classifier("resnet50.tv_in1k", preset="tiny")
    create_clip(preset="tiny")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_timm_covers_family_members_beyond_the_table() -> None:
    for name in ("convnext_tiny", "vgg11_bn", "resnet18", "efficientnet_b3"):
        with torch.no_grad():
            assert create_timm_classifier(name, preset="tiny").eval()(torch.randn(1, 3, 64, 64)).shape == (
                1,
                2,
            )


def test_tiny_timm_rejects_families_without_a_tiny_config() -> None:
    with pytest.raises(ValueError, match="No tiny preset"):
        create_timm_classifier("vit_base_patch16_224", preset="tiny")


def test_unknown_preset_is_rejected_before_building() -> None:
    with pytest.raises(ValueError, match="Unknown preset 'tinny'"):
        create_timm_classifier("resnet50.tv_in1k", preset="tinny")  # type: ignore[arg-type]


def test_random_timm_preset_is_the_full_architecture_built_offline() -> None:
    model = create_timm_classifier("resnet10t.c3_in1k", preset="random", num_classes=2)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [1, 1, 1, 1]
    assert model.fc.in_features == 512 and model.fc.out_features == 2


def test_pretrained_timm_preset_with_a_checkpoint_downloads_nothing(tmp_path) -> None:
    trained = create_timm_classifier("resnet10t.c3_in1k", preset="random")
    safetensors.torch.save_file(trained.state_dict(), str(tmp_path / "trained.safetensors"))
    loaded = create_timm_classifier(
        "resnet10t.c3_in1k", preset="pretrained", checkpoint_path=tmp_path / "trained.safetensors"
    )
    assert same_weights(loaded, trained)


def test_timm_data_config_reports_the_pretrained_input_pipeline() -> None:
    config = timm_data_config(create_timm_classifier("convnext_xlarge.fb_in22k_ft_in1k_384", preset="tiny"))
    assert config["input_size"] == (3, 384, 384)
    assert len(config["mean"]) == len(config["std"]) == 3
    assert config["interpolation"] in {"bicubic", "bilinear"}


def trained_copy(name: str) -> torch.nn.Module:
    """A tiny model whose weights differ from a fresh tiny build, standing in for a trained one."""
    model = create_timm_classifier(name, preset="tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_path_round_trips_weights(tmp_path, suffix: str) -> None:
    trained = trained_copy("resnet50.tv_in1k")
    path = tmp_path / f"classifier{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(trained.state_dict(), str(path))
    else:
        torch.save(trained.state_dict(), path)
    loaded = create_timm_classifier("resnet50.tv_in1k", preset="tiny", checkpoint_path=path)
    assert same_weights(loaded, trained)


def test_checkpoint_path_accepts_a_lightning_checkpoint_with_prefixed_keys(tmp_path) -> None:
    trained = trained_copy("efficientnet_b0.ra_in1k")
    state_dict = {f"model.{key}": value for key, value in trained.state_dict().items()}
    state_dict["criterion.pos_weight"] = torch.tensor(2.0)  # another module of the LightningModule
    torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 120}, tmp_path / "last.ckpt")
    loaded = create_timm_classifier(
        "efficientnet_b0.ra_in1k", preset="tiny", checkpoint_path=tmp_path / "last.ckpt"
    )
    assert same_weights(loaded, trained)


def test_checkpoint_path_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Checkpoint not found: .*nope\.pt"):
        create_timm_classifier("resnet50.tv_in1k", preset="tiny", checkpoint_path=tmp_path / "nope.pt")


def test_checkpoint_path_with_other_architecture_lists_mismatched_keys(tmp_path) -> None:
    torch.save(create_timm_classifier("vgg16.tv_in1k", preset="tiny").state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(ValueError, match=r"missing \(\d+\): .*unexpected \(\d+\): .*features\.0\.weight"):
        create_timm_classifier("resnet50.tv_in1k", preset="tiny", checkpoint_path=tmp_path / "vgg.pt")


def test_checkpoint_path_with_extra_layers_is_not_loaded_partially(tmp_path) -> None:
    deeper = create_timm_classifier("resnet50.tv_in1k", preset="tiny", layers=(1, 2, 1, 1))
    torch.save({"state_dict": {f"model.{k}": v for k, v in deeper.state_dict().items()}}, tmp_path / "d.ckpt")
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): layer2\.1\."):
        create_timm_classifier("resnet50.tv_in1k", preset="tiny", checkpoint_path=tmp_path / "d.ckpt")


def test_checkpoint_path_with_other_num_classes_names_the_head(tmp_path) -> None:
    torch.save(create_timm_classifier("resnet50.tv_in1k", preset="tiny").state_dict(), tmp_path / "r.pt")
    with pytest.raises(ValueError, match=r"wrong shape \(2\): fc\.bias: \(2,\) vs \(5,\)"):
        create_timm_classifier(
            "resnet50.tv_in1k", preset="tiny", num_classes=5, checkpoint_path=tmp_path / "r.pt"
        )


# --- pretrained ids that are not available offline -----------------------------------------------------------


def test_timm_pretrained_offline_raises_one_actionable_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PretrainedUnavailableError) as caught:
        create_timm_classifier("resnet50.tv_in1k", preset="pretrained")
    message = str(caught.value)
    assert "resnet50.tv_in1k" in message
    assert "hf download timm/resnet50.tv_in1k" in message
    assert str(tmp_path) in message and "HF_HOME" in message and "preset: tiny" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("factory", "model_id"),
    [
        (create_clip, "openai/clip-vit-large-patch14"),
        (create_blip2, "Salesforce/blip2-opt-2.7b"),
        (create_grounding_dino, "IDEA-Research/grounding-dino-tiny"),
        (create_llava, "llava-hf/llava-1.5-7b-hf"),
        (create_diffusion_components, registry.default_id("sd.text2img")),
    ],
)
@pytest.mark.parametrize("preset", ["pretrained", "random"])
# diffusers still passes this argument to huggingface_hub 2, which warns and ignores it.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_hub_factories_offline_raise_pretrained_unavailable(
    tmp_path, monkeypatch, factory, model_id, preset
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PretrainedUnavailableError) as caught:
        factory(model_id, preset=preset)
    message = str(caught.value)
    assert model_id in message
    assert "Offline mode is on" in message
    assert "preset: tiny" in message and str(tmp_path / "hub") in message


def test_pretrained_preset_loads_a_saved_model_directory(tmp_path) -> None:
    """The pretrained code path itself (from_pretrained with safetensors), fed a local directory."""
    model, processor = create_clip(preset="tiny")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = create_clip(str(tmp_path), preset="pretrained")
    assert same_weights(loaded, model) and not loaded.training
    assert loaded_processor.tokenizer(CAPTION).input_ids == processor.tokenizer(CAPTION).input_ids


def blip2_dtypes(model: torch.nn.Module) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """(dtypes of the Q-Former and query tokens, dtypes of every other parameter)."""
    kept = {p.dtype for n, p in model.named_parameters() if n.startswith(("qformer.", "query_tokens"))}
    rest = {p.dtype for n, p in model.named_parameters() if not n.startswith(("qformer.", "query_tokens"))}
    return kept, rest


@pytest.mark.parametrize("preset", ["pretrained", "random", "tiny"])
def test_half_precision_blip2_keeps_its_qformer_and_query_tokens_in_fp32(tmp_path, preset) -> None:
    """BLIP-2 declares the Q-Former and query tokens `_keep_in_fp32_modules`: every preset honours that."""
    model, processor = create_blip2(preset="tiny")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    half, _ = create_blip2(str(tmp_path), preset=preset, dtype=torch.float16)
    assert blip2_dtypes(half) == ({torch.float32}, {torch.float16})


def test_random_preset_weights_are_seeded(tmp_path) -> None:
    model, processor = create_blip(preset="tiny")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    torch.manual_seed(1)
    first, _ = create_blip(str(tmp_path), preset="random")
    torch.manual_seed(2)  # whatever the run's own seed, the random preset's weights are the same
    second, _ = create_blip(str(tmp_path), preset="random")
    assert same_weights(first, second)


# --- transformers tiny presets -------------------------------------------------------------------------------


def test_tiny_clip_embeds_images_and_truncated_long_captions_in_one_space() -> None:
    model, processor = create_clip(preset="tiny")
    long_caption = " ".join(["a brass valve with bolts"] * 40)  # 200 words
    inputs = processor(
        text=[CAPTION, long_caption], images=images(), return_tensors="pt", padding=True, truncation=True
    )
    assert inputs["input_ids"].shape == (2, 77)
    assert inputs["input_ids"][1, -1] == processor.tokenizer.eos_token_id
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_features = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    assert image_features.shape == text_features.shape == (2, model.config.projection_dim)
    assert not model.training


@pytest.mark.parametrize(
    "factory", [create_clip, create_blip2, create_blip, create_grounding_dino, create_owlv2, create_llava]
)
def test_tiny_transformers_presets_are_deterministic(factory) -> None:
    assert same_weights(factory(preset="tiny")[0], factory(preset="tiny")[0])


@pytest.mark.parametrize("factory", [create_blip2, create_blip])
def test_tiny_captioners_generate_decodable_text_for_a_batch(factory) -> None:
    model, processor = factory(preset="tiny")
    with torch.no_grad():
        generated = model.generate(**processor(images=images(), return_tensors="pt"), max_new_tokens=5)
    captions = processor.batch_decode(generated, skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) and c.strip() for c in captions)


def test_tiny_llava_captions_a_batch_from_llava_15_chat_prompts() -> None:
    model, processor = create_llava(preset="tiny")
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe it. ASSISTANT:"  # llava-1.5's format
    inputs = processor(images=images(), text=[prompt, prompt], return_tensors="pt", padding=True)
    image_token = model.config.image_token_index
    assert (inputs["input_ids"] == image_token).sum(dim=1).tolist() == [16, 16]  # one token per 8 px patch
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape == (2, 4)
    assert all(isinstance(c, str) for c in processor.batch_decode(new_tokens, skip_special_tokens=True))


def test_blip2_processor_does_not_leak_its_image_token_into_other_tokenizers() -> None:
    _, processor = create_blip2(preset="tiny")
    assert "<image>" in processor.tokenizer.get_vocab()
    assert "<image>" not in local_opt_tokenizer().get_vocab()


def test_tiny_grounding_dino_post_processing_returns_boxes_scores_labels_per_image() -> None:
    model, processor = create_grounding_dino(preset="tiny")
    inputs = processor(
        images=images(), text=["a valve. a bolt.", "a flange."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(48, 64), (48, 64)]
    )
    assert len(results) == 2
    for result in results:
        assert result["boxes"].shape == (model.config.num_queries, 4)
        assert result["scores"].shape == (model.config.num_queries,)
        assert len(result["text_labels"]) == model.config.num_queries
        assert all(isinstance(label, str) for label in result["text_labels"])


def test_tiny_owlv2_post_processing_returns_boxes_scores_labels_per_image() -> None:
    model, processor = create_owlv2(preset="tiny")
    queries = [["a valve", "a bolt"], ["a flange", "a nut"]]
    inputs = processor(text=queries, images=images(), return_tensors="pt")
    assert inputs["input_ids"].shape == (4, 16)  # OWLv2 pads every query to 16 tokens
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(48, 64), (48, 64)], text_labels=queries
    )
    assert len(results) == 2
    for result, image_queries in zip(results, queries):
        assert result["boxes"].shape[1] == 4 and len(result["boxes"]) == len(result["scores"]) > 0
        assert set(result["text_labels"]) <= set(image_queries)


def test_tiny_open_clip_uses_a_modified_resnet_tower() -> None:
    open_clip = pytest.importorskip("open_clip")
    from common.backbones import create_open_clip

    model, preprocess, tokenizer = create_open_clip(preset="tiny")
    assert type(model) is open_clip.CLIP
    assert type(model.visual).__name__ == "ModifiedResNet"
    pixels = torch.stack([preprocess(image) for image in images()])
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokenizer([CAPTION, "a nut"]))
    assert image_features.shape == text_features.shape == (2, 32)


def test_fig8_rn50_config_builds_the_quickgelu_text_tower_the_openai_weights_need() -> None:
    open_clip = pytest.importorskip("open_clip")
    import yaml

    from common.backbones import create_open_clip

    clip = yaml.safe_load((CONFIGS / "item_detector" / "clip_rn50.yaml").read_text())["data"]["init_args"][
        "clip"
    ]
    assert clip["pretrained"] == "openai"
    # The random preset builds the same architecture the pretrained one loads the OpenAI weights into.
    model, _, _ = create_open_clip(clip["model_id"], clip["pretrained"], preset="random")
    activations = {type(block.mlp.gelu) for block in model.transformer.resblocks}
    assert activations == {open_clip.transformer.QuickGELU}


@pytest.mark.parametrize("preset", ["pretrained", "random"])
def test_openai_weights_on_a_gelu_open_clip_model_are_a_config_error(preset) -> None:
    pytest.importorskip("open_clip")
    from common.backbones import create_open_clip
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"RN50-quickgelu") as caught:
        create_open_clip("RN50", "openai", preset=preset)
    assert "\n" not in str(caught.value)


def test_open_clip_missing_tells_how_to_install_it(monkeypatch) -> None:
    from common.backbones import create_open_clip

    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r"pip install forgelab\[open_clip\]"):
        create_open_clip(preset="tiny")


# --- diffusion -------------------------------------------------------------------------------------------------


def test_tiny_text2img_pipeline_generates_images_at_32_and_64_px() -> None:
    components = create_diffusion_components(preset="tiny")
    pipeline = build_pipeline(components, "text2img")
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline([CAPTION, "a nut"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [image.size for image in result.images] == [(32, 32), (32, 32)]
    result = pipeline(CAPTION, num_inference_steps=2, height=64, width=64, output_type="np")
    assert result.images.shape == (1, 64, 64, 3)


def test_tiny_inpaint_pipeline_runs_with_a_nine_channel_unet() -> None:
    components = create_diffusion_components(preset="tiny", inpainting=True)
    assert components.unet.config.in_channels == 9
    assert components.model_id == registry.default_id("sd.inpainting")
    pipeline = build_pipeline(components, "inpaint")
    pipeline.set_progress_bar_config(disable=True)
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    image = images(1)[0].resize((32, 32))
    result = pipeline(
        prompt=CAPTION, image=image, mask_image=mask, num_inference_steps=2, height=32, width=32
    )
    assert result.images[0].size == (32, 32)


def test_inpaint_pipeline_refuses_a_text2img_unet() -> None:
    with pytest.raises(ValueError, match="9-channel"):
        build_pipeline(create_diffusion_components(preset="tiny"), "inpaint")


def test_tiny_diffusion_components_are_deterministic_and_ddim() -> None:
    first, second = create_diffusion_components(preset="tiny"), create_diffusion_components(preset="tiny")
    assert same_weights(first.unet, second.unet) and same_weights(first.text_encoder, second.text_encoder)
    assert type(first.scheduler).__name__ == "DDIMScheduler"
    assert first.scheduler.config.clip_sample is False and first.scheduler.config.set_alpha_to_one is False


def test_pretrained_diffusion_preset_loads_a_saved_pipeline_directory(tmp_path) -> None:
    components = create_diffusion_components(preset="tiny")
    build_pipeline(components, "text2img").save_pretrained(tmp_path)
    loaded = create_diffusion_components(str(tmp_path), preset="pretrained")
    assert same_weights(loaded.unet, components.unet) and same_weights(loaded.vae, components.vae)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"


# --- local tokenizers -------------------------------------------------------------------------------------------


def test_local_vocabularies_are_identical_across_builds() -> None:
    for build in (local_tokenizers._clip_vocab, local_tokenizers._opt_vocab, local_tokenizers._bert_vocab):
        assert build.__wrapped__() == build.__wrapped__() == build()


def test_clip_tokenizer_round_trips_with_clip_special_tokens() -> None:
    tokenizer = local_clip_tokenizer()
    ids = tokenizer(CAPTION).input_ids
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
    assert tokenizer.model_max_length == 77
    # Byte-level BPE: any text, even unseen symbols, tokenizes without falling back to the unknown token.
    assert tokenizer.unk_token_id not in tokenizer("Ünïcödé ☃ valve №7 🚀").input_ids[1:-1]


def test_opt_tokenizer_round_trips_with_opt_special_tokens() -> None:
    tokenizer = local_opt_tokenizer()
    ids = tokenizer(CAPTION).input_ids
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("</s>") == 2
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION


def test_bert_tokenizer_round_trips_with_bert_special_tokens() -> None:
    tokenizer = local_bert_tokenizer()
    encoding = tokenizer(CAPTION.upper())
    tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokenizer.decode(encoding.input_ids, skip_special_tokens=True) == CAPTION  # uncased
    assert {tokenizer.pad_token, tokenizer.unk_token, tokenizer.mask_token} == {"[PAD]", "[UNK]", "[MASK]"}
    assert tokenizer.unk_token_id not in tokenizer("zebra-striped xylophone").input_ids
