"""Fine-grained guidance, Sec. 4: `forgelab fit` of the generator, `forgelab augment`, the Table 1 classifiers and
`forgelab fg-table1` helpers."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from common.data.captioned import CaptionedParts, read_captioned_manifest
from common.errors import ConfigError
from projects.fg_guidance.augment import PROMPTS, plan_jobs, variant_prompt
from projects.fg_guidance.augment import main as augment_main
from projects.fg_guidance.cycle import FineGrainedGenerator
from projects.fg_guidance.subtype import (
    FineLIPClassifier,
    class_descriptions,
    late_interaction_scores,
    stretch_position_embeddings,
)
from projects.fg_guidance.table1 import augmentation_cost, markdown_table, table1_rows
from tests.cli_helpers import run_cli, tiny_overrides
from tests.conftest import REPO


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread (OpenMP synchronisation dominates small ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- FineLIP-style pieces, by hand --------------------------------------------------------------------------------


def test_long_clip_stretch_keeps_the_first_20_and_interpolates_4x():
    weight = (
        torch.arange(77 * 2, dtype=torch.float32).view(77, 2) ** 1.5
    )  # non-linear, so interpolation shows
    out = stretch_position_embeddings(weight)
    assert out.shape == (248, 2)
    torch.testing.assert_close(out[:20], weight[:20])
    for j in (0, 7, 55):
        for k in range(4):
            expected = (1 - k / 4) * weight[20 + j] + (k / 4) * weight[21 + j]
            torch.testing.assert_close(out[20 + 4 * j + k], expected)
    # past the last position the last difference is extrapolated
    torch.testing.assert_close(out[247], weight[76] + 0.75 * (weight[76] - weight[75]))
    with pytest.raises(ValueError):
        stretch_position_embeddings(weight, keep=77)


def test_late_interaction_is_the_mean_over_tokens_of_the_best_patch():
    g = torch.Generator().manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(3, 5, 4, generator=g), dim=-1)
    tokens = torch.nn.functional.normalize(torch.randn(2, 6, 4, generator=g), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    scores = late_interaction_scores(patches, tokens, mask)
    for b in range(3):
        for c in range(2):
            best = [
                max(float(patches[b, p] @ tokens[c, t]) for p in range(5)) for t in range(6) if mask[c, t]
            ]
            assert scores[b, c].item() == pytest.approx(sum(best) / len(best), abs=1e-6)


def test_class_descriptions_are_the_most_frequent_caption():
    from common.data.captioned import CaptionedSample

    rows = [CaptionedSample("p", c, s) for s, c in [("a", "x"), ("a", "y"), ("a", "y"), ("b", "z")]]
    assert class_descriptions(rows, ["a", "b"]) == ["y", "z"]
    with pytest.raises(ConfigError, match="no training caption"):
        class_descriptions(rows, ["a", "b", "c"])


def test_finelip_reads_descriptions_past_77_tokens():
    model = FineLIPClassifier(preset="tiny", num_classes=2)
    assert model.clip.text_model.embeddings.position_embedding.weight.shape[0] == 248
    long = "a ball valve with " + ", ".join(f"bolt number {i}" for i in range(20))  # 156 tokens
    model.descriptions = [long, "a gate valve"]
    _, mask = model.encode_descriptions()
    assert mask[0].sum() > 77 and model.truncated_descriptions == 0
    logits = model(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    logits.sum().backward()  # the image and the text tower both train
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad is not None
    with pytest.raises(ConfigError, match="max_text_tokens"):
        FineLIPClassifier(preset="tiny", num_classes=2, max_text_tokens=100)


# -- augmentation plan and command ---------------------------------------------------------------------------------


def test_augmentation_plan_is_half_the_set_balanced_over_subclasses_and_kinds(small_toy_world):
    samples = [
        s for s in read_captioned_manifest(small_toy_world / "parts" / "manifest.jsonl") if s.split == "train"
    ]
    jobs = plan_jobs(samples, 0.5, tuple(PROMPTS), seed=0)
    assert len(jobs) == math.floor(0.5 * len(samples))
    per_class = Counter(j.source.subclass for j in jobs)
    assert max(per_class.values()) - min(per_class.values()) <= 1
    assert Counter(j.kind for j in jobs) == {"view": 8, "deterioration": 8, "environment": 8}
    assert all(j.prompt.startswith(j.source.caption.rstrip(". ")) for j in jobs)
    assert [j.prompt for j in jobs] == [j.prompt for j in plan_jobs(samples, 0.5, tuple(PROMPTS), seed=0)]
    assert variant_prompt("a valve.", "environment", 1) == "a valve, in low light"
    with pytest.raises(ConfigError, match="fraction"):
        plan_jobs(samples, 0.8, tuple(PROMPTS), seed=0)


def test_augment_writes_a_captioned_dataset_with_provenance_and_resumes(small_toy_world, tmp_path):
    generator_dir = FineGrainedGenerator(preset="tiny", image_size=32).save(
        tmp_path / "generator", extra={"num_inference_steps": 2}
    )
    manifest = small_toy_world / "parts" / "manifest.jsonl"
    out, realfake = tmp_path / "aug", tmp_path / "realfake"
    argv = [
        f"--generator={generator_dir}",
        f"--manifest={manifest}",
        f"--out={out}",
        "--limit=3",
        "--batch-size=2",
        f"--realfake-root={realfake}",
        "--realfake-per-split=1",
    ]
    augment_main(argv)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert (out / row["path"]).is_file()
        prov = row["provenance"]
        assert prov["prompt"] == row["caption"] and Path(prov["source"]).is_file() and prov["steps"] == 2
        assert len(prov["lora_sha256"]) == 64 and row["generation_ms"] > 0
    assert rows[0]["boxes"] == [] and rows[1]["boxes"]  # view variants drop the boxes, conditions keep them
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["images"] == 3 and summary["generation_ms_per_image"] > 0
    assert augmentation_cost(out / "manifest.jsonl") == pytest.approx(summary["generation_ms_per_image"])

    # resuming makes nothing twice
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    augment_main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps

    # CaptionedParts reads it as extra training rows
    data = CaptionedParts(
        manifest=str(manifest), extra_train_manifests=[str(out / "manifest.jsonl")], image_size=32
    )
    data.setup("fit")
    assert len(data.samples["train"]) == 48 + 3
    item = data.dataset("train")[48]
    assert item["image"].shape == (3, 32, 32) and item["caption"] == rows[0]["caption"]

    # the detectors' generated half, in the CNNDetection layout the overlay config points at
    for split in ("train", "val", "test"):
        for label in ("0_real", "1_fake"):
            assert len(list((realfake / split / "fg_guidance" / label).glob("*.png"))) == 1
    overlay = yaml.safe_load((REPO / "configs/inpaint_probe/data/toy_world_fg.yaml").read_text())
    assert overlay["data"]["init_args"]["train_root"].endswith("realfake/train")


def test_augment_needs_a_saved_generator(tmp_path):
    with pytest.raises(ConfigError, match=r"generator\.json"):
        augment_main([f"--generator={tmp_path}", f"--out={tmp_path / 'x'}"])


# -- Table 1 -----------------------------------------------------------------------------------------------------


def test_table1_rows_have_the_papers_shape():
    rows = table1_rows({"ResNet-101": {"without": 0.7612, "with": 0.853}}, 20.04)
    assert rows == [["ResNet-101", 76.12, 85.3, 20.0]]
    text = markdown_table(("method", "without (%)", "with (%)", "cost (ms)"), rows)
    assert text.splitlines()[2] == "| ResNet-101 | 76.12 | 85.3 | 20.0 |"


# -- the generator through the real CLI ----------------------------------------------------------------------------


def test_forgelab_fit_of_the_tiny_config_logs_lambdas_grids_and_exports_the_generator(
    small_toy_world, tmp_path
):
    config = REPO / "configs/fg_guidance/tiny.yaml"
    args = [
        "fit",
        "--config",
        str(REPO / "configs/trainer/cpu.yaml"),
        "--config",
        str(config),
        *tiny_overrides(config, small_toy_world),
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        f"--run.root={tmp_path}",
        "--run.name=fg",
        "--run.wandb=false",
    ]
    code, _, err = run_cli(args)
    assert code == 0, err[-3000:]
    run = tmp_path / "fg_guidance" / "fg"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"train/lambda_{n}" for n in ("contrast", "detail", "temporal", "env")} <= set(header)
    assert {"train/contrast", "val/loss", "val/loss_paper", "val/caption_token_f1"} <= set(header)
    assert (run / "lambdas.csv").read_text().count("\n") == 3
    assert (run / "plots" / "val_samples.png").is_file() and (run / "plots" / "train_lambdas.png").is_file()
    captions = json.loads((run / "captions" / "epoch000.json").read_text())
    assert captions and {"c", "c_hat", "token_f1"} <= set(captions[0])
    assert FineGrainedGenerator.load(run / "generator").image_size == 32
