"""ITEM's feature cache: hit, miss, resume after an interruption, stale keys, corrupt shards, undecodable images.

The frozen stage is the real one (tiny CLIP, oracle captions and boxes from the toy world's manifest), with
`run` wrapped to count the images it computes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.samples import Sample, read_manifest
from common.perturbations import Perturbation
from projects.item_detector.cache import FeatureCache, FeatureTable, content_hash, entry_key
from projects.item_detector.captioning import CaptionerConfig
from projects.item_detector.clip_encoders import ClipConfig
from projects.item_detector.data import ensure_features
from projects.item_detector.frozen import FLAG_NAMES, FrozenStage, ImageFeatures
from projects.item_detector.grounding import GrounderConfig
from tests.cli_helpers import item_subset

_MODELS: list = []  # the tiny models, built once per test session (tiny CLIP weights do not depend on the id)


class CountingStage(FrozenStage):
    """The real frozen stage, counting computed images and optionally failing on the n-th batch."""

    def __init__(self, fail_on_batch: int | None = None, **overrides) -> None:
        super().__init__(
            overrides.get("captioner", CaptionerConfig(name="dataset")),
            overrides.get("grounder", GrounderConfig(name="dataset", max_objects=4)),
            overrides.get("clip", ClipConfig()),
            preset="tiny",
            device="cpu",
            dtype="float32",
        )
        if not _MODELS:
            _MODELS.append(self.models())
        self._models = _MODELS[0]
        self.images_run = 0
        self.batches = 0
        self.fail_on_batch = fail_on_batch

    def run(self, images, samples):
        self.batches += 1
        if self.fail_on_batch is not None and self.batches == self.fail_on_batch:
            raise KeyboardInterrupt("simulated interruption")
        self.images_run += len(images)
        return super().run(images, samples)


@pytest.fixture
def samples(small_toy_world: Path, tmp_path: Path) -> list[Sample]:
    """Eight toy images (real and generated, with captions and boxes) copied where tests may edit them."""
    rows = read_manifest(item_subset(small_toy_world, per_label=2) / "train.jsonl")
    copies = []
    for i, sample in enumerate(rows):
        target = tmp_path / "images" / f"{i:02d}.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(sample.path, target)
        copies.append(
            Sample(
                str(target),
                sample.label,
                sample.generator,
                sample.caption,
                None,
                sample.boxes,
                sample.phrases,
            )
        )
    return copies


def items_for(stage: FrozenStage, samples: list[Sample]) -> list[tuple[Sample, str, str]]:
    out = []
    for sample in samples:
        content = content_hash(sample.path)
        out.append((sample, entry_key(content, stage.annotations(sample)), content))
    return out


def extract(stage, cache, samples, **kwargs):
    kwargs = {"batch_size": 2, "shard_size": 2} | kwargs
    return ensure_features(stage, cache, items_for(stage, samples), Perturbation.parse("none"), **kwargs)


def cache_for(stage: FrozenStage, root: Path, perturbation: str = "none") -> FeatureCache:
    return FeatureCache(root, stage.descriptor(perturbation))


def keys_of(stage, samples) -> list[str]:
    return [key for _, key, _ in items_for(stage, samples)]


# --- the table -------------------------------------------------------------------------------------------------


def fake_features(n_objects: int, value: float, dim: int = 3) -> ImageFeatures:
    return ImageFeatures(
        caption=f"caption {value}",
        phrases=[f"part {i}" for i in range(n_objects)],
        boxes=torch.full((n_objects, 4), value),
        box_scores=torch.full((n_objects,), 0.5),
        global_image=torch.full((dim,), value),
        global_text=torch.full((dim,), -value),
        local_image=torch.arange(n_objects * dim, dtype=torch.float32).reshape(n_objects, dim) + value,
        local_text=torch.ones(n_objects, dim) * value,
        flags={"no_objects": int(n_objects == 0), "boxes_outside": 1},
    )


def test_feature_table_round_trips_and_pads_objects_per_batch() -> None:
    table = FeatureTable.from_features(
        ["a", "b", "c"], [fake_features(2, 1.0), fake_features(0, 2.0), fake_features(3, 3.0)]
    )
    data = table.to_bytes("stage")
    from projects.item_detector.cache import safetensors_metadata

    loaded = FeatureTable.from_bytes(data, safetensors_metadata(data))
    assert (
        loaded.keys == ["a", "b", "c"]
        and loaded.phrases == table.phrases
        and loaded.captions == table.captions
    )
    for name in ("global_image", "local_image", "local_text", "boxes", "offsets", "flags"):
        assert torch.equal(getattr(loaded, name), getattr(table, name)), name
    assert loaded.flag_totals()["no_objects"] == 1 and loaded.flag_totals()["boxes_outside"] == 3
    assert set(loaded.flag_totals()) == set(FLAG_NAMES)

    batch = loaded.batch([2, 1, 0])
    assert batch["local_image"].shape == (3, 3, 3)
    assert batch["local_mask"].tolist() == [[True, True, True], [False, False, False], [True, True, False]]
    assert torch.equal(batch["local_image"][0], fake_features(3, 3.0).local_image)
    assert torch.equal(batch["local_image"][2, :2], fake_features(2, 1.0).local_image)
    assert not batch["local_image"][1].any() and not batch["local_image"][2, 2].any()
    assert batch["caption"] == ["caption 3.0", "caption 2.0", "caption 1.0"]

    reordered = FeatureTable.concat([loaded.select([2]), loaded.select([0, 1])])
    assert reordered.keys == ["c", "a", "b"] and reordered.offsets.tolist() == [0, 3, 5, 5]
    assert torch.equal(reordered.batch([1])["local_image"][0], fake_features(2, 1.0).local_image)


# --- hit and miss ---------------------------------------------------------------------------------------------


def test_miss_extracts_and_hit_reads_back_without_computing(samples, tmp_path) -> None:
    stage = CountingStage()
    cache = cache_for(stage, tmp_path / "cache")
    stats = extract(stage, cache, samples)
    assert stats["extracted"] == len(samples) and stage.images_run == len(samples)
    manifest = json.loads(cache.manifest_path.read_text())
    assert len(manifest["shards"]) == len(samples) // 2  # one shard per 2 images
    assert manifest["descriptor"] == stage.descriptor("none")

    again = extract(stage, cache, samples)
    assert again["extracted"] == 0 and again["cached"] == len(samples) and stage.images_run == len(samples)
    table, skipped = cache.load(keys_of(stage, samples))
    assert table.keys == keys_of(stage, samples) and not skipped
    # the cached entry is what the stage computes
    fresh = CountingStage().run([_image(samples[3])], [samples[3]])[0]
    row = table.key_index[keys_of(stage, samples)[3]]
    assert torch.allclose(table.global_image[row], fresh.global_image, atol=1e-6)
    assert table.phrases[row] == fresh.phrases and table.captions[row] == samples[3].caption


def _image(sample: Sample) -> torch.Tensor:
    from projects.item_detector.data import load_image_tensor

    return load_image_tensor(sample.path)


def test_another_model_or_perturbation_is_a_miss(samples, tmp_path) -> None:
    stage = CountingStage()
    extract(stage, cache_for(stage, tmp_path), samples[:2])
    other_clip = CountingStage(clip=ClipConfig(model_id="openai/clip-vit-base-patch16"))
    assert cache_for(other_clip, tmp_path).dir != cache_for(stage, tmp_path).dir
    assert extract(other_clip, cache_for(other_clip, tmp_path), samples[:2])["extracted"] == 2
    jpeg = cache_for(stage, tmp_path, "jpeg:75")
    assert jpeg.dir != cache_for(stage, tmp_path).dir
    assert (
        ensure_features(stage, jpeg, items_for(stage, samples[:2]), Perturbation.parse("jpeg:75"))[
            "extracted"
        ]
        == 2
    )


# --- resume ---------------------------------------------------------------------------------------------------


def test_interrupted_extraction_resumes_after_the_last_committed_shard(samples, tmp_path) -> None:
    stage = CountingStage(fail_on_batch=3)  # shards of 2 images: two shards are committed, then it dies
    cache = cache_for(stage, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        extract(stage, cache, samples)
    committed = {p.name: p.stat().st_mtime_ns for p in cache.shard_dir.iterdir()}
    assert len(committed) == 2 and len(json.loads(cache.manifest_path.read_text())["shards"]) == 2
    (cache.shard_dir / ".half-written.safetensors.tmp").write_bytes(b"partial")  # a writer killed mid-write
    (cache.shard_dir / "uncommitted.safetensors").write_bytes(b"never listed")  # killed before its commit

    resumed = CountingStage()
    stats = extract(resumed, cache, samples)
    assert stats["cached"] == 4 and stats["extracted"] == len(samples) - 4 == resumed.images_run
    after = {p.name: p.stat().st_mtime_ns for p in cache.shard_dir.iterdir()}
    assert all(after[name] == mtime for name, mtime in committed.items())  # finished shards untouched
    assert ".half-written.safetensors.tmp" not in after and "uncommitted.safetensors" not in after
    table, _ = cache.load(keys_of(resumed, samples))
    assert len(table) == len(samples)


# --- stale keys ---------------------------------------------------------------------------------------------------


def test_an_edited_image_is_never_served_its_old_features(samples, tmp_path) -> None:
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    extract(stage, cache, samples)
    old_key = keys_of(stage, samples)[0]
    old = cache.load([old_key])[0]

    pixels = np.asarray(Image.open(samples[0].path).convert("RGB")).copy()
    Image.fromarray(255 - pixels).save(samples[0].path)  # same path, new content
    new_key = keys_of(stage, samples)[0]
    assert new_key != old_key
    table, _ = cache.load([new_key])
    assert len(table) == 0  # a miss, not the old entry
    assert extract(stage, cache, samples)["extracted"] == 1
    table, _ = cache.load([new_key])
    assert not torch.allclose(table.global_image[0], old.global_image[0])


def test_an_edited_oracle_caption_is_a_new_entry(samples, tmp_path) -> None:
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    extract(stage, cache, samples[:2])
    samples[0].caption = "a completely different caption"
    assert extract(stage, cache, samples[:2])["extracted"] == 1
    table, _ = cache.load(keys_of(stage, samples[:1]))
    assert table.captions == ["a completely different caption"]


# --- the cached embeddings are CLIP's ----------------------------------------------------------------------------


def test_cached_object_embeddings_are_clip_run_directly_on_each_padded_box_and_phrase(
    samples, tmp_path
) -> None:
    """The cache's local rows against the tiny CLIP called by hand: the box cut with its edges rounded outwards,
    padded to a square of the CLIP mean colour around it, resized (bicubic) and normalised; each phrase
    tokenized alone."""
    import math

    import torch.nn.functional as F

    samples = samples[:3]  # real and generated, 12 objects
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    extract(stage, cache, samples, batch_size=3, shard_size=3)
    table, _ = cache.load(keys_of(stage, samples))
    clip = stage.models()[2]
    mean = torch.tensor(clip.processor.image_processor.image_mean).reshape(3, 1, 1)
    std = torch.tensor(clip.processor.image_processor.image_std).reshape(3, 1, 1)
    size = clip.input_size[0]
    pixels, phrases = [], []
    for row, sample in enumerate(samples):
        image = _image(sample)
        start, end = int(table.offsets[row]), int(table.offsets[row + 1])
        assert table.phrases[row] and end - start == len(table.phrases[row])
        for x0, y0, x1, y1 in table.boxes[start:end].tolist():
            cut = image[:, math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)]
            h, w = cut.shape[-2:]
            side = max(h, w)
            square = mean.expand(3, side, side).clone()
            square[:, (side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = cut
            resized = F.interpolate(square[None], size=(size, size), mode="bicubic", antialias=True)[0]
            pixels.append((resized - mean) / std)
        phrases += table.phrases[row]
    with torch.no_grad():
        direct_images = clip.model.get_image_features(pixel_values=torch.stack(pixels)).pooler_output
        direct_texts = torch.cat(  # each phrase alone: no batch padding
            [
                clip.model.get_text_features(**clip.tokenizer([p], return_tensors="pt")).pooler_output
                for p in phrases
            ]
        )
    assert len(phrases) == len(table.local_image) >= 2 * len(samples)
    torch.testing.assert_close(table.local_image, direct_images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(table.local_text, direct_texts, atol=1e-5, rtol=1e-4)


# --- every frozen-stage setting is in the key ------------------------------------------------------------------

# (base overrides, changed overrides) of FrozenStage's arguments; config sections are dicts of their fields.
KEY_CASES: dict[str, tuple[dict, dict]] = {
    "captioner.name": ({}, {"captioner": {"name": "blip"}}),
    "captioner.model_id": ({}, {"captioner": {"model_id": "acme/other-blip2"}}),
    "captioner.max_new_tokens": ({}, {"captioner": {"max_new_tokens": 20}}),
    "captioner.instruction": (
        {"captioner": {"name": "llava"}},
        {"captioner": {"name": "llava", "instruction": "Describe the image."}},
    ),
    "captioner.revision": ({}, {"captioner": {"revision": "v2"}}),
    "grounder.name": ({}, {"grounder": {"name": "owlv2"}}),
    "grounder.model_id": ({}, {"grounder": {"model_id": "IDEA-Research/grounding-dino-tiny"}}),
    "grounder.box_threshold": ({}, {"grounder": {"box_threshold": 0.3}}),
    "grounder.max_phrases": ({}, {"grounder": {"max_phrases": 4}}),
    "grounder.max_objects": ({}, {"grounder": {"max_objects": 4}}),
    "grounder.nms_iou": ({}, {"grounder": {"nms_iou": 0.7}}),
    "grounder.min_box_size": ({}, {"grounder": {"min_box_size": 8}}),
    "grounder.revision": ({}, {"grounder": {"revision": "v2"}}),
    "clip.library": ({}, {"clip": {"library": "open_clip", "model_id": "RN50-quickgelu"}}),
    "clip.model_id": ({}, {"clip": {"model_id": "openai/clip-vit-base-patch16"}}),
    "clip.pretrained": (
        {"clip": {"library": "open_clip", "model_id": "RN50", "pretrained": "yfcc15m"}},
        {"clip": {"library": "open_clip", "model_id": "RN50", "pretrained": "cc12m"}},
    ),
    "clip.revision": ({}, {"clip": {"revision": "v2"}}),
    "clip.image_preprocess": ({}, {"clip": {"image_preprocess": "resize_center_crop"}}),
    "dtype": ({}, {"dtype": "bfloat16"}),
}


def stage_with(overrides: dict) -> FrozenStage:
    """A tiny-preset stage with generative models (never loaded: the key is computed without them)."""
    configs = {"captioner": CaptionerConfig, "grounder": GrounderConfig, "clip": ClipConfig}
    args = {name: cls(**overrides.get(name, {})) for name, cls in configs.items()}
    return FrozenStage(**args, preset="tiny", device="cpu", dtype=overrides.get("dtype", "float32"))


def test_every_field_of_the_frozen_configs_has_a_key_case() -> None:
    from dataclasses import fields

    names = {
        f"{s}.{f.name}"
        for s, c in (("captioner", CaptionerConfig), ("grounder", GrounderConfig), ("clip", ClipConfig))
        for f in fields(c)
    }
    assert names | {"dtype"} == set(KEY_CASES)


@pytest.mark.parametrize("setting", list(KEY_CASES))
def test_the_cache_key_changes_with_every_frozen_stage_setting(setting: str, tmp_path) -> None:
    base, changed = (stage_with(overrides) for overrides in KEY_CASES[setting])
    assert stage_key_of(base) == stage_key_of(stage_with(KEY_CASES[setting][0]))  # deterministic
    assert stage_key_of(changed) != stage_key_of(base)
    assert cache_for(changed, tmp_path).dir != cache_for(base, tmp_path).dir  # a separate cache directory


# --- what the key names besides the config ----------------------------------------------------------------------


def pretrained_stage(captioner_id: str) -> FrozenStage:
    """A pretrained-preset stage (never loaded here: the key is computed without the models)."""
    return FrozenStage(
        CaptionerConfig(name="blip2", model_id=captioner_id),
        GrounderConfig(name="none"),
        ClipConfig(),
        preset="pretrained",
        device="cpu",
        dtype="float32",
    )


def stage_key_of(stage: FrozenStage) -> str:
    return FeatureCache("unused", stage.descriptor("none")).key


def test_the_key_names_the_hub_snapshot_a_model_id_resolves_to(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--acme--captioner"
    for commit in ("1" * 40, "2" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    stage = pretrained_stage("acme/captioner")
    before = stage_key_of(stage)
    assert stage.weights_revisions()["captioner"] == "1" * 40
    (repo / "refs" / "main").write_text("2" * 40)  # the hub's main moved, and the new snapshot was fetched
    assert stage_key_of(stage) != before


def test_the_key_names_the_bytes_of_a_local_checkpoint(tmp_path) -> None:
    import os

    weights = tmp_path / "blip2" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights, version one")
    stage = pretrained_stage(str(weights.parent))
    before = stage_key_of(stage)
    assert stage_key_of(stage) == before  # deterministic
    stat = weights.stat()
    weights.write_bytes(b"weights, version two")  # same size, other bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert weights.stat().st_size == stat.st_size and stage_key_of(stage) != before


def test_the_key_names_the_library_versions_and_the_extraction_code(monkeypatch) -> None:
    from projects.item_detector import frozen, provenance

    stage = CountingStage()
    before = stage_key_of(stage)
    real_version = provenance.package_version
    monkeypatch.setattr(
        provenance, "package_version", lambda name: "99.0" if name == "transformers" else real_version(name)
    )
    upgraded = stage_key_of(stage)
    assert upgraded != before
    monkeypatch.setattr(frozen, "source_fingerprint", lambda: "edited extraction code")
    assert stage_key_of(stage) not in (before, upgraded)


def test_the_code_fingerprint_follows_code_not_comments_or_docstrings(tmp_path) -> None:
    from projects.item_detector.provenance import EXTRACTION_SOURCES, source_fingerprint

    module = tmp_path / "crop.py"
    module.write_text('"""Crop."""\n\ndef crop(x):\n    """The box."""\n    return x[1:]  # x1 exclusive\n')
    original = source_fingerprint([module])
    module.write_text('"""Crop a box."""\n\n\ndef crop(x):\n    return x[1:]\n')
    assert source_fingerprint([module]) == original
    module.write_text('"""Crop."""\n\ndef crop(x):\n    return x[2:]\n')
    assert source_fingerprint([module]) != original
    assert "projects/item_detector/frozen.py" in EXTRACTION_SOURCES
    assert "common/backbones/transformers_models.py" in EXTRACTION_SOURCES
    assert len(source_fingerprint()) == 64


# --- corruption -------------------------------------------------------------------------------------------------------


def test_a_corrupt_shard_is_dropped_and_recomputed(samples, tmp_path, caplog) -> None:
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    extract(stage, cache, samples)
    keys = keys_of(stage, samples)
    reference, _ = cache.load(keys)
    shard = sorted(cache.shard_dir.iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    shard.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="forgelab.item"):
        table, _ = cache.load(keys)
    assert len(table) == len(samples) - 2  # the two entries of the corrupt shard are not served
    assert "checksum mismatch" in caplog.text and not shard.exists()
    assert shard.name not in json.loads(cache.manifest_path.read_text())["shards"]

    recomputing = CountingStage()
    assert extract(recomputing, cache, samples)["extracted"] == 2 == recomputing.images_run
    table, _ = cache.load(keys)
    assert torch.allclose(table.global_image, reference.global_image, atol=1e-6)
    assert torch.allclose(table.local_image, reference.local_image, atol=1e-6)


def test_truncated_shards_foreign_shards_and_broken_manifests_are_not_served(
    samples, tmp_path, caplog
) -> None:
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    extract(stage, cache, samples[:4])
    keys = keys_of(stage, samples[:4])
    first, second = sorted(cache.shard_dir.iterdir())
    first.write_bytes(first.read_bytes()[:100])  # truncated copy
    # a shard of another configuration with a forged manifest entry
    other = CountingStage(clip=ClipConfig(model_id="openai/clip-vit-base-patch16"))
    other_cache = cache_for(other, tmp_path)
    extract(other, other_cache, samples[:2])
    (foreign,) = other_cache.shard_dir.iterdir()
    manifest = json.loads(cache.manifest_path.read_text())
    manifest["shards"][second.name] |= {"sha256": content_hash(foreign), "bytes": foreign.stat().st_size}
    second.write_bytes(foreign.read_bytes())
    cache.manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="forgelab.item"):
        table, _ = cache.load(keys)
    assert len(table) == 0
    assert "checksum mismatch" in caplog.text and "another configuration" in caplog.text

    cache.manifest_path.write_text("{not json")
    assert cache.status(keys) == (set(), {})
    assert extract(stage, cache, samples[:4])["extracted"] == 4  # rebuilt, and served again
    assert len(cache.load(keys)[0]) == 4


def test_an_unreadable_manifest_is_rebuilt_from_the_shards_not_emptied(samples, tmp_path, caplog) -> None:
    Path(samples[1].path).write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    assert extract(stage, cache, samples[:6])["extracted"] == 5
    shards = {path.name: path.read_bytes() for path in cache.shard_dir.iterdir()}
    committed = json.loads(cache.manifest_path.read_text())
    cache.manifest_path.write_bytes(b"\x00\xff garbage \x13")

    again = CountingStage()
    with caplog.at_level(logging.WARNING, logger="forgelab.item"):
        reopened = cache_for(again, tmp_path)
        stats = extract(again, reopened, samples[:6])
        table, skipped = reopened.load(keys_of(again, samples[:6]))
    assert stats["extracted"] == 0 and again.images_run == 0  # nothing recomputed, the skip not retried
    assert {path.name: path.read_bytes() for path in cache.shard_dir.iterdir()} == shards  # nothing deleted
    assert len(table) == 5 and list(skipped.values()) == ["not_an_image"]
    rebuilt = json.loads(cache.manifest_path.read_text())
    assert rebuilt["shards"] == committed["shards"] and rebuilt["skipped"] == committed["skipped"]
    assert rebuilt["descriptor"] == stage.descriptor("none")
    assert sum("rebuilt" in record.getMessage() for record in caplog.records) == 1


def test_an_undecodable_image_is_recorded_not_retried(samples, tmp_path) -> None:
    Path(samples[1].path).write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    stage = CountingStage()
    cache = cache_for(stage, tmp_path)
    stats = extract(stage, cache, samples[:4])
    assert stats["skipped"] == 1 and stats["extracted"] == 3
    table, skipped = cache.load(keys_of(stage, samples[:4]))
    assert len(table) == 3 and list(skipped.values()) == ["not_an_image"]
    assert extract(stage, cache, samples[:4])["extracted"] == 0 and stage.images_run == 3
