"""Fine-grained guidance, Sec. 4: `forgelab fit` of the generator, `forgelab augment`, the Table 1 classifiers and
`forgelab fg-table1` helpers."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from common.data.captioned import CaptionedParts, read_captioned_manifest
from common.errors import ConfigError
from projects.fg_guidance.augment import PROMPTS, Synthesizer, class_quotas, plan_jobs, variant_prompt
from projects.fg_guidance.augment import main as augment_main
from projects.fg_guidance.cycle import FineGrainedGenerator
from projects.fg_guidance.subtype import (
    FineLIPClassifier,
    class_descriptions,
    inference_ms_per_image,
    late_interaction_scores,
    stretch_position_embeddings,
)
from projects.fg_guidance.table1 import (
    COLUMNS,
    augmentation_cost,
    augmentation_fraction,
    markdown_table,
    mean_std,
    parse_arguments,
    step_matched,
    summarise,
    table1_rows,
)
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


def test_finelip_image_size_keeps_every_pixel_and_interpolates_the_position_embeddings():
    torch.manual_seed(0)
    native = FineLIPClassifier(preset="tiny", num_classes=2)  # the tiny CLIP's 32 px, 8 px patches: 4x4 grid
    wide = FineLIPClassifier(preset="tiny", num_classes=2, image_size=64)
    wide.load_state_dict(native.state_dict())
    images = torch.rand(2, 3, 64, 64)
    assert native.image_patches(images).shape[1] == 1 + 16  # resized to 32 px
    patches = wide.image_patches(images)
    assert patches.shape[1] == 1 + 64  # every 8 px patch of the 64 px image
    # at the native size interpolation is the identity: the same tokens as the plain forward
    small = torch.rand(2, 3, 32, 32)
    states = native.clip.vision_model(
        pixel_values=(small - native.mean) / native.std, interpolate_pos_encoding=True
    ).last_hidden_state
    expected = F.normalize(
        native.clip.visual_projection(native.clip.vision_model.post_layernorm(states)), dim=-1
    )
    torch.testing.assert_close(native.image_patches(small), expected)
    with pytest.raises(ConfigError, match="multiple of the CLIP patch size 8"):
        FineLIPClassifier(preset="tiny", num_classes=2, image_size=60)


# -- augmentation plan and command ---------------------------------------------------------------------------------


def test_class_quotas_grow_every_subclass_by_the_fraction_or_equally():
    counts = {"a": 5, "b": 42, "c": 13}  # the paper's subtypes hold 5-42 images
    proportional = class_quotas(counts, 0.5)
    # by hand: 2.5, 21, 6.5 -> floor 2, 21, 6 (29); total floor(0.5 * 60) = 30: one more to the largest
    # remainder, a tie of a and c broken by name -> a
    assert proportional == {"a": 3, "b": 21, "c": 6}
    assert class_quotas(counts, 0.5, "balanced") == {"a": 10, "b": 10, "c": 10}  # a grows +200 %
    assert class_quotas({"a": 10, "b": 10}, 0.1) == {"a": 1, "b": 1}
    with pytest.raises(ConfigError, match="balance"):
        class_quotas(counts, 0.5, "equal")


def test_proportional_plan_uses_distinct_sources_in_each_subclass():
    from common.data.captioned import CaptionedSample

    samples = [
        CaptionedSample(f"{name}{i}.png", f"a {name} valve", name)
        for name, n in (("a", 4), ("b", 12))
        for i in range(n)
    ]
    jobs = plan_jobs(samples, 0.5, tuple(PROMPTS), seed=1)
    per_class = Counter(j.source.subclass for j in jobs)
    assert per_class == {"a": 2, "b": 6}
    assert len({j.source.path for j in jobs}) == len(jobs)  # no source used twice
    balanced = Counter(j.source.subclass for j in plan_jobs(samples, 0.5, tuple(PROMPTS), 1, "balanced"))
    assert balanced == {"a": 4, "b": 4}


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


def _pair(seed, without, with_, ms=(1.0, 3.0)):
    base = {"train_images": 20, "train_by_class": {"a": 4, "b": 16}, "train_steps": 8}
    grown = {"train_images": 30, "train_by_class": {"a": 6, "b": 24}, "train_steps": 8}
    return {
        "method": "ResNet-101",
        "seed": seed,
        "without": {**base, "test/acc": without, "inference_ms_per_image": ms[0]},
        "with": {**grown, "test/acc": with_, "inference_ms_per_image": ms[1]},
    }


def test_table1_reports_mean_and_sample_std_over_seeds_with_the_augmentation_fraction():
    pairs = [_pair(0, 0.70, 0.80), _pair(1, 0.74, 0.83), _pair(2, 0.78, 0.89)]
    entry = summarise("ResNet-101", pairs, generation_ms=20.04)
    # by hand: without = 70, 74, 78 -> mean 74, sample std 4; with = 80, 83, 89 -> mean 84, std sqrt(21)
    assert entry["without"][0] == pytest.approx(74) and entry["without"][1] == pytest.approx(4)
    assert entry["with"][0] == pytest.approx(84) and entry["with"][1] == pytest.approx(math.sqrt(21))
    assert entry["gain"] == pytest.approx(10) and entry["classifier_ms"] == pytest.approx(2.0)
    assert entry["aug"] == {"overall": pytest.approx(50), "min": pytest.approx(50), "max": pytest.approx(50)}
    shown, numeric = table1_rows([entry])
    text = markdown_table(COLUMNS, shown)
    assert text.splitlines()[2] == (
        "| ResNet-101 | 74.00 ± 4.00 | 84.00 ± 4.58 | +10.00 | 50.0 | 50-50 | 8 | 0,1,2 | 20.0 | 2.0 |"
    )
    assert numeric[0][:3] == ["ResNet-101", 74.0, 4.0]
    assert mean_std([0.5]) == (0.5, None)  # one seed: no std, shown without "±"
    assert "±" not in table1_rows([summarise("ResNet-101", pairs[:1], 20.0)])[0][0][1]


def test_augmentation_fraction_shows_unequal_growth_per_subclass():
    without = {"train_images": 20, "train_by_class": {"a": 4, "b": 16}}
    with_ = {"train_images": 30, "train_by_class": {"a": 9, "b": 21}}  # balanced: +5 each
    assert augmentation_fraction(without, with_) == {"overall": 50.0, "min": 31.25, "max": 125.0}


def test_the_run_with_augmentation_gets_the_steps_and_validation_points_of_the_run_without():
    assert step_matched({"train_steps": 80, "train_batches_per_epoch": 8}) == [
        "--trainer.max_epochs=-1",
        "--trainer.max_steps=80",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.val_check_interval=8",
    ]
    with pytest.raises(ConfigError, match="train_steps"):
        step_matched({"train_steps": 0})


def test_fg_table1_passes_set_and_bare_overrides_to_every_fit(tmp_path):
    args = parse_arguments(
        ["--augmented=m.jsonl", "--trainer.max_epochs=3", "--set", "--model.init_args.lr=0.1"]
    )
    assert args.fit_overrides == ["--trainer.max_epochs=3", "--model.init_args.lr=0.1"]
    assert args.seeds == [0, 1, 2]
    with pytest.raises(ConfigError, match="--key=value"):
        parse_arguments(["--augmented=m.jsonl", "--set", "max_epochs=3"])
    with pytest.raises(ConfigError, match="distinct"):
        parse_arguments(["--augmented=m.jsonl", "--seeds", "1", "1"])
    with pytest.raises(ConfigError, match="METHOD=YAML"):
        parse_arguments(["--augmented=m.jsonl", "--method-config", "VGG=x.yaml"])
    overlay = tmp_path / "o.yaml"
    overlay.write_text("{}")
    args = parse_arguments(["--augmented=m.jsonl", "--method-config", f"FineLIP={overlay}"])
    assert args.method_configs == {"FineLIP": [str(overlay)]}


# -- cost columns: warm-up, synchronisation, no re-encoding ------------------------------------------------------


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return images


class _CudaLike:
    """Stands for a batch on a CUDA device (no GPU here): what inference_ms_per_image reads of it."""

    device = torch.device("cuda", 0)

    def __len__(self) -> int:
        return 4


def test_inference_timing_warms_up_and_synchronises_cuda(monkeypatch):
    model = _Counting().train()
    ms = inference_ms_per_image(model, torch.zeros(4, 3, 8, 8), warmup=2, repeats=5)
    assert model.calls == 7 and ms >= 0 and model.training  # mode restored
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    model.calls = 0
    inference_ms_per_image(model, _CudaLike(), warmup=1, repeats=3)
    assert model.calls == 4 and len(synced) == 2  # before and after the timed calls, not inside
    with pytest.raises(ValueError):
        inference_ms_per_image(model, torch.zeros(0, 3, 8, 8))


def test_synthesizer_times_after_one_untimed_warm_up_image():
    import time as _time

    class SlowFirst:
        calls = 0

        def edit(self, image, *args, **kwargs):
            SlowFirst.calls += 1
            _time.sleep(0.3 if SlowFirst.calls == 1 else 0.005)
            return torch.zeros(1, 3, 8, 8)

    synth = Synthesizer.__new__(Synthesizer)
    synth.generator, synth.device, synth.steps = SlowFirst(), "cpu", 2
    synth.strength, synth.guidance, synth.eta, synth.warmed_up = 0.6, 3.0, 0.0, False
    images = torch.zeros(2, 3, 8, 8)
    _, ms = synth(images, ["a", "b"], ["a, x", "b, y"], [0, 1])
    assert SlowFirst.calls == 3 and ms < 150  # the 300 ms warm-up is not in the per-image cost
    synth(images, ["a", "b"], ["a, x", "b, y"], [0, 1])
    assert SlowFirst.calls == 5  # once per Synthesizer


def test_finelip_encodes_the_class_descriptions_once_per_evaluation():
    model = FineLIPClassifier(preset="tiny", num_classes=3)
    model.descriptions = ["a ball valve", "a gate valve", "a check valve"]
    calls = []
    model.clip.text_model.register_forward_hook(lambda *_: calls.append(1))
    images = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first = model(images)
        for _ in range(3):
            torch.testing.assert_close(model(images), first)
    assert len(calls) == 1
    model.train()
    model(images).sum().backward()  # a trainable text tower: encoded with gradients every training step
    model(images)
    assert len(calls) == 3 and model.clip.text_projection.weight.grad is not None
    model.on_train_batch_end(None, None, 0)  # after an optimiser step the cached encoding is stale
    with torch.no_grad():
        model(images)
    assert len(calls) == 4
    model.on_validation_epoch_start()
    with torch.no_grad():
        model(images)
        model(images)
    assert len(calls) == 5


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


# -- `forgelab fg-table1` through the real CLI ---------------------------------------------------------------------


def _augmented_manifest(toy: Path, out: Path, per_class: int = 1) -> Path:
    """A stand-in for `forgelab augment`'s output: copies of training rows (absolute paths), with a cost."""
    rows, seen = [], Counter()
    for line in (toy / "parts" / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train" and seen[row["subclass"]] < per_class:
            seen[row["subclass"]] += 1
            rows.append({**row, "path": str(toy / "parts" / row["path"]), "generation_ms": 12.5})
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "manifest.jsonl"


def _table1_argv(augmented: Path, toy: Path, root: Path, seeds: tuple[str, ...]) -> list[str]:
    """`forgelab fg-table1` of the tiny ResNet-101 row on the small toy world, without W&B."""
    config = REPO / "configs/fg_guidance/subtype_resnet101.yaml"
    return [
        "fg-table1",
        f"--augmented={augmented}",
        f"--trainer={REPO / 'configs/trainer/cpu.yaml'}",
        "--methods",
        "ResNet-101",
        "--seeds",
        *seeds,
        f"--root={root}",
        "--no-wandb",
        *tiny_overrides(config, toy),
    ]


def test_fg_table1_matches_steps_and_validation_points_and_reuses_finished_pairs(small_toy_world, tmp_path):
    augmented = _augmented_manifest(small_toy_world, tmp_path / "aug")
    argv = [
        *_table1_argv(augmented, small_toy_world, tmp_path, seeds=("3",)),
        "--name=t1",
        "--set",
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.batch_size=16",
    ]
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    runs = tmp_path / "fg_guidance"
    without = json.loads((runs / "t1-resnet101-s3-without" / "test_metrics.json").read_text())
    with_ = json.loads((runs / "t1-resnet101-s3-with" / "test_metrics.json").read_text())
    # 48 training images in batches of 16: 3 batches, 2 epochs; the augmented run (48 + 24) gets the same 6 steps
    assert without["train_steps"] == with_["train_steps"] == 6
    assert (without["train_images"], with_["train_images"]) == (48, 72)

    def validated_at(run: str) -> list[int]:
        import csv

        with open(runs / run / "metrics.csv") as f:
            return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("val/acc")})

    assert validated_at("t1-resnet101-s3-with") == validated_at("t1-resnet101-s3-without")
    config_with = yaml.safe_load((runs / "t1-resnet101-s3-with" / "config.yaml").read_text())
    assert config_with["seed_everything"] == 3 and config_with["trainer"]["max_steps"] == 6
    table = (runs / "t1" / "table1.md").read_text().splitlines()
    assert table[0].startswith("| method | without (%) | with (%) | gain (pp) | aug (%)")
    row = table[2].split(" | ")
    assert row[4] == "50.0" and row[6] == "6" and row[7] == "3" and row[8] == "12.5"
    # run again under the same name: the finished pair is read back, no fit runs (its run names would clash)
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    assert (runs / "t1" / "table1.md").read_text().splitlines() == table


@pytest.mark.slow
def test_fg_table1_runs_pairs_in_parallel_forked_children(small_toy_world, tmp_path):
    """`--parallel 2` as a user starts it (a fresh process): two seeds at once, each pair in a forked child with
    its own log, the same table shape; a failing pair is a one-line error naming its log."""
    import subprocess
    import sys

    augmented = _augmented_manifest(small_toy_world, tmp_path / "aug")
    base = [
        sys.executable,
        "-m",
        "common.experiment.cli",
        *_table1_argv(augmented, small_toy_world, tmp_path, seeds=("0", "1")),
        "--parallel",
        "2",
        "--trainer.max_epochs=1",
    ]
    done = subprocess.run([*base, "--name=par"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    pairs = tmp_path / "fg_guidance" / "par" / "pairs"
    assert sorted(p.name for p in pairs.glob("*.json")) == ["resnet101-s0.json", "resnet101-s1.json"]
    assert all((pairs / f"resnet101-s{s}.log").stat().st_size > 0 for s in (0, 1))
    assert "| ResNet-101 |" in (tmp_path / "fg_guidance" / "par" / "table1.md").read_text()
    bad = subprocess.run(
        [*base, "--name=bad", "--model.init_args.lr=-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0
    assert "2 pair(s) failed" in bad.stderr and "resnet101-s0.log" in bad.stderr
