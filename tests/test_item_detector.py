"""ITEM end to end: the datamodule's batches and bad-input handling, the model's forward against the equations,
the frozen models' tiny presets, and the commands through the real `forgelab` CLI (extract, fit on the cache,
predict with captions, the Fig. 4 robustness grid, the ablation figure)."""

from __future__ import annotations

import csv
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from common.data.samples import Sample
from common.perturbations import robustness_specs
from projects.item_detector.cache import FeatureCache, content_hash, entry_key
from projects.item_detector.captioning import CaptionerConfig, GenerativeCaptioner
from projects.item_detector.clip_encoders import ClipConfig, ClipEncoder
from projects.item_detector.data import ItemFeatures
from projects.item_detector.grounding import GrounderConfig, GroundingDinoGrounder, Owlv2Grounder
from projects.item_detector.misalignment import hierarchical_distance, local_distance, misalignment_vector
from projects.item_detector.model import ItemDetector
from projects.item_detector.phrases import noun_phrases
from projects.item_detector.report import ablation_table, paper_tables, robustness_table, tsne_figure
from tests.cli_helpers import CONFIGS, item_subset, run_cli, tiny_overrides

TINY = CONFIGS / "item_detector" / "tiny.yaml"
ROBUSTNESS = CONFIGS / "item_detector" / "robustness.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"
CPU_DEVICE = torch.device("cpu")


def oracle_datamodule(root: Path, cache_dir: Path | None, **kwargs) -> ItemFeatures:
    """Oracle captions and boxes, tiny CLIP: the cheapest real frozen stage."""
    return ItemFeatures(
        train_root=str(root / "train.jsonl"),
        val_root=str(root / "val.jsonl"),
        test_root=str(root / "test.jsonl"),
        captioner=CaptionerConfig(name="dataset"),
        grounder=GrounderConfig(name="dataset", max_objects=4, min_box_size=1),
        preset="tiny",
        device="cpu",
        dtype="float32",
        cache_dir=None if cache_dir is None else str(cache_dir),
        extract_workers=0,
        batch_size=4,
        **kwargs,
    )


# --- datamodule ------------------------------------------------------------------------------------------------


def test_batches_hold_per_image_features_of_the_cached_embeddings_and_labels(
    small_toy_world, tmp_path
) -> None:
    subset = item_subset(small_toy_world, per_label=2)
    datamodule = oracle_datamodule(subset, tmp_path / "cache")
    datamodule.setup("fit")
    assert set(datamodule.extraction) == {"train/none", "val/none"} and datamodule.feature_dim == 32
    dataset = datamodule.datasets[("train", "none")]
    batch = next(iter(datamodule.train_dataloader()))
    n = len(batch["label"])
    assert batch["global_image"].shape == batch["d_global"].shape == batch["d_local"].shape == (n, 32)
    cache = FeatureCache(tmp_path / "cache", datamodule.stage.descriptor("none"))
    keys = [entry_key(content_hash(s.path), datamodule.stage.annotations(s)) for s in dataset.samples]
    table, _ = cache.load(keys)
    for i, index in enumerate(batch["index"].tolist()):
        sample = dataset.samples[index]
        assert batch["path"][i] == sample.path and batch["caption"][i] == sample.caption
        assert int(batch["label"][i]) == sample.label
        assert datamodule.generators[int(batch["generator_id"][i])] == sample.generator
        row = table.key_index[keys[index]]
        assert int(batch["n_objects"][i]) == int(table.offsets[row + 1] - table.offsets[row])
        assert torch.equal(batch["global_image"][i], table.global_image[row])
    assert batch["skipped"] == []

    again = oracle_datamodule(subset, tmp_path / "cache")
    again.setup("fit")
    assert again.extraction == {}  # everything came from the cache, and the view built before
    assert again.datasets[("train", "none")].view.dir == dataset.view.dir
    indices = list(range(len(dataset)))
    assert torch.equal(
        again.datasets[("train", "none")].__getitems__(indices)["d_local"],
        dataset.__getitems__(indices)["d_local"],
    )


def test_recomputing_every_batch_serves_what_the_cache_serves(small_toy_world, tmp_path) -> None:
    subset = item_subset(small_toy_world, per_label=2)
    cached = oracle_datamodule(subset, tmp_path / "cache")
    cached.setup("test")
    live = oracle_datamodule(subset, None)
    live.setup("test")
    indices = list(range(len(cached.samples["test"])))
    a = cached.datasets[("test", "none")].__getitems__(indices)
    b = live.datasets[("test", "none")].__getitems__(indices)
    for key in ("global_image", "d_global", "d_local", "n_objects", "label"):
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert a["caption"] == b["caption"]


def test_per_object_batches_give_the_views_d_and_a_shard_corrupt_at_view_build_is_re_extracted(
    small_toy_world, tmp_path
) -> None:
    subset = item_subset(small_toy_world, per_label=2)
    streamed = oracle_datamodule(subset, tmp_path / "cache", shard_size=2, extract_batch_size=2)
    streamed.setup("test")
    per_object = oracle_datamodule(subset, tmp_path / "cache", per_object_batches=True)
    per_object.setup("test")
    assert per_object.extraction == {}  # the same cache, read in memory from the shards
    indices = list(range(len(streamed.samples["test"])))
    view_batch = streamed.datasets[("test", "none")].__getitems__(indices)
    object_batch = per_object.datasets[("test", "none")].__getitems__(indices)
    assert "local_mask" in object_batch and "d_local" not in object_batch
    for empty_local in ("global", "zero"):
        model = ItemDetector(feature_dim=32, empty_local=empty_local)
        torch.testing.assert_close(
            model.distance(view_batch), model.distance(object_batch), atol=1e-6, rtol=1e-5
        )

    cache = FeatureCache(tmp_path / "cache", streamed.stage.descriptor("none"))
    shard = sorted(cache.shard_dir.iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")  # corrupt, and the view must be rebuilt from the shards
    shutil.rmtree(cache.dir / "views")
    again = oracle_datamodule(subset, tmp_path / "cache", shard_size=2, extract_batch_size=2)
    again.setup("test")
    # only the corrupt shard's two entries, found while building the view, are extracted again
    assert again.extraction["test/none"]["extracted"] == 2
    rebuilt = again.datasets[("test", "none")].__getitems__(indices)
    torch.testing.assert_close(rebuilt["d_local"], view_batch["d_local"], atol=1e-6, rtol=1e-5)


def write_bad_manifest(toy: Path, folder: Path) -> Path:
    """Test rows: an empty caption, a caption of 200 words, no boxes, a box outside the image, a corrupt file."""
    rows = [json.loads(line) for line in (toy / "realfake" / "test.jsonl").read_text().splitlines()][:6]
    for row in rows:
        row["path"] = str(toy / "realfake" / row["path"])
    rows[0]["caption"] = ""
    rows[1]["caption"] = " ".join(["a brass valve with four bolts"] * 40)
    rows[2]["boxes"], rows[2]["phrases"] = [], []
    rows[3]["boxes"], rows[3]["phrases"] = [[-30.0, -30.0, 40.0, 500.0]], ["valve reaching out of the frame"]
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR truncated")
    rows[4]["path"] = str(corrupt)
    manifest = folder / "bad.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def test_bad_inputs_are_handled_and_counted(small_toy_world, tmp_path) -> None:
    manifest = write_bad_manifest(small_toy_world, tmp_path)
    datamodule = ItemFeatures(
        test_root=str(manifest),
        captioner=CaptionerConfig(name="dataset"),
        grounder=GrounderConfig(name="dataset", min_box_size=1),
        preset="tiny",
        device="cpu",
        dtype="float32",
        cache_dir=str(tmp_path / "cache"),
        extract_workers=0,
        batch_size=8,
    )
    datamodule.setup("test")
    health = datamodule.feature_health["test/none"]
    assert health["caption_empty"] == 1 and health["caption_truncated"] == 1 and health["undecodable"] == 1
    assert health["no_objects"] >= 1 and health["boxes_outside"] >= 1
    batch = next(iter(datamodule.test_dataloader()))
    assert [reason for _, reason in batch["skipped"]] == ["truncated"] and len(batch["label"]) == 5
    model = ItemDetector(feature_dim=datamodule.feature_dim, hidden_features=8)
    assert torch.isfinite(model(batch)).all()  # zero-object rows use the empty-local fallback


def test_dataset_oracle_on_images_without_captions_is_a_clear_error(small_toy_world, tmp_path) -> None:
    datamodule = ItemFeatures(
        test_root=str(small_toy_world / "realfake" / "test"),
        captioner=CaptionerConfig(name="dataset"),
        preset="tiny",
    )
    with pytest.raises(ValueError, match="captioner 'dataset' reads captions from the data manifest"):
        datamodule.setup("test")


# --- model ---------------------------------------------------------------------------------------------------------


def random_batch(n: int = 3, k: int = 2, d: int = 6) -> dict:
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, True], [True, False], [False, False]])[:n, :k]
    return {
        "global_image": torch.randn(n, d, generator=generator),
        "global_text": torch.randn(n, d, generator=generator),
        "local_image": torch.randn(n, k, d, generator=generator),
        "local_text": torch.randn(n, k, d, generator=generator),
        "local_mask": mask,
    }


@pytest.mark.parametrize(
    ("w_global", "w_local", "empty_local"), [(1.0, 1.0, "global"), (0.0, 1.0, "zero"), (1.0, 0.0, "global")]
)
def test_model_distance_composes_eq_4_to_8(w_global, w_local, empty_local) -> None:
    batch = random_batch()
    model = ItemDetector(feature_dim=6, w_global=w_global, w_local=w_local, empty_local=empty_local)
    d_global = misalignment_vector(batch["global_image"], batch["global_text"])
    d_objects = misalignment_vector(batch["local_image"], batch["local_text"])
    fallback = d_global if empty_local == "global" else torch.zeros_like(d_global)
    expected = hierarchical_distance(
        d_global, local_distance(d_objects, batch["local_mask"], fallback), w_global, w_local
    )
    assert torch.allclose(model.distance(batch), expected)
    # image 1 has one object: D_l is that object's D_l^1; image 2 has none: D_l is the fallback
    assert torch.allclose(local_distance(d_objects, batch["local_mask"], fallback)[1], d_objects[1, 0])
    assert model(batch).shape == (3, 2)


def test_only_the_head_is_optimised_with_adamw_as_the_paper() -> None:
    model = ItemDetector(feature_dim=6)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-3
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.parameters()
    }
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w_global": 0.0, "w_local": 0.0}, "not both 0"),
        ({"empty_local": "mean"}, "empty_local"),
        ({"lr": 0}, "lr"),
    ],
)
def test_bad_model_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ItemDetector(**kwargs)


# --- tiny frozen models ----------------------------------------------------------------------------------------------


def toy_images(toy: Path, n: int = 3) -> tuple[list[torch.Tensor], list[Sample]]:
    from projects.item_detector.data import load_image_tensor

    paths = sorted((toy / "realfake" / "test" / "toy_gan" / "0_real").glob("*.png"))[:n]
    return [load_image_tensor(str(p)) for p in paths], [Sample(str(p), 0, "toy_gan") for p in paths]


@pytest.mark.parametrize("name", ["blip2", "blip", "llava"])
def test_generative_captioners_caption_a_batch(name, small_toy_world) -> None:
    images, samples = toy_images(small_toy_world)
    captioner = GenerativeCaptioner(
        CaptionerConfig(name=name, max_new_tokens=6), "tiny", CPU_DEVICE, torch.float32
    )
    captions = captioner(images, samples)
    assert len(captions) == 3 and all(isinstance(c, str) and c == " ".join(c.split()) for c in captions)
    if name == "llava":
        assert "ASSISTANT" not in " ".join(captions)  # the prompt is not part of the caption


def test_a_half_precision_blip2_captioner_keeps_the_qformer_in_fp32(small_toy_world, tmp_path) -> None:
    """The path a user hits: a saved BLIP-2 loaded by the captioner in float16, then moved to the device."""
    from common.backbones import create_blip2

    model, processor = create_blip2(preset="tiny")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = CaptionerConfig(name="blip2", model_id=str(tmp_path), max_new_tokens=3)
    captioner = GenerativeCaptioner(config, "pretrained", CPU_DEVICE, torch.float16)
    params = dict(captioner.model.named_parameters())
    kept = {n: p.dtype for n, p in params.items() if n.startswith(("qformer.", "query_tokens"))}
    assert kept and set(kept.values()) == {torch.float32}
    assert {p.dtype for n, p in params.items() if n not in kept} == {torch.float16}


@pytest.mark.parametrize("grounder_class", [GroundingDinoGrounder, Owlv2Grounder])
def test_detectors_ground_the_captions_noun_phrases(grounder_class, small_toy_world) -> None:
    images, samples = toy_images(small_toy_world)
    name = "grounding_dino" if grounder_class is GroundingDinoGrounder else "owlv2"
    grounder = grounder_class(GrounderConfig(name=name, box_threshold=0.0), "tiny", CPU_DEVICE, torch.float32)
    captions = ["a brass gate valve with a red handwheel and four bolts", "", "a round flange"]
    found = grounder(images, captions, samples)
    assert found[1].phrases == [] and len(found[1].boxes) == 0  # nothing to ground in an empty caption
    for grounding, caption in zip([found[0], found[2]], [captions[0], captions[2]]):
        assert grounding.phrases and set(grounding.phrases) <= set(noun_phrases(caption))
        assert grounding.boxes.shape == (len(grounding.phrases), 4) and len(grounding.scores) == len(
            grounding.phrases
        )


@pytest.mark.parametrize(
    "shapes", [[(3, 40, 60)], [(3, 64, 64)], [(3, 20, 200)], [(3, 200, 20), (3, 9, 90)]], ids=str
)
def test_tiny_grounding_dino_grounds_one_image_batches_and_odd_aspects(shapes) -> None:
    """The last batch of an extraction can hold a single image, of any shape."""
    grounder = GroundingDinoGrounder(
        GrounderConfig(name="grounding_dino", box_threshold=0.0), "tiny", CPU_DEVICE, torch.float32
    )
    images = [torch.rand(*shape, generator=torch.Generator().manual_seed(0)) for shape in shapes]
    found = grounder(images, ["a red valve and a brass nut"] * len(images), [None] * len(images))
    assert len(found) == len(images)
    for grounding in found:
        assert grounding.phrases and set(grounding.phrases) <= {"red valve", "brass nut"}
        assert grounding.boxes.shape == (len(grounding.phrases), 4)


def test_owlv2_grounds_an_image_the_same_alone_and_batched_with_longer_captions(small_toy_world) -> None:
    images, samples = toy_images(small_toy_world, n=2)
    grounder = Owlv2Grounder(
        GrounderConfig(name="owlv2", box_threshold=0.0), "tiny", CPU_DEVICE, torch.float32
    )
    short = "a round flange"
    long = "a brass gate valve with a red handwheel, four bolts, a lever and a nut"
    assert len(noun_phrases(long)) > len(noun_phrases(short))
    (alone,) = grounder(images[:1], [short], samples[:1])
    batched, _ = grounder(images, [short, long], samples)
    assert alone.phrases and alone.phrases == batched.phrases
    # Same boxes, up to the float rounding of a batched forward (a padded query winning one would move it).
    torch.testing.assert_close(alone.boxes, batched.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(alone.scores, batched.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("library", ["transformers", "open_clip"])
def test_clip_embeds_crops_and_flags_captions_over_77_tokens(library) -> None:
    pytest.importorskip("open_clip") if library == "open_clip" else None
    encoder = ClipEncoder(
        ClipConfig(library=library, model_id="RN50-quickgelu" if library == "open_clip" else "x"),
        "tiny",
        CPU_DEVICE,
        None,
    )
    images = [torch.rand(3, 40, 60), torch.rand(3, 5, 7)]  # a whole image and a small crop
    assert encoder.encode_images(images).shape == (2, encoder.dim)
    embeddings, truncated = encoder.encode_texts(["a valve", " ".join(["a brass valve with bolts"] * 30)])
    assert embeddings.shape == (2, encoder.dim) and truncated == [False, True]


def test_open_clip_config_rejects_openai_weights_on_a_gelu_model() -> None:
    with pytest.raises(ValueError, match=r"RN50-quickgelu"):
        ClipConfig(library="open_clip", model_id="RN50", pretrained="openai")
    assert ClipConfig(library="open_clip", model_id="RN50", pretrained="yfcc15m").model_id == "RN50"


# --- reports ---------------------------------------------------------------------------------------------------------


def report_of(ap: dict[str, float], acc: float = 0.5) -> dict:
    out = {g: {"acc": acc, "ap": v, "real_acc": 1.0, "fake_acc": 0.0, "n": 10.0} for g, v in ap.items()}
    out["mean"] = {"acc": acc, "ap": sum(ap.values()) / len(ap), "n": 10.0 * len(ap)}
    out["pooled"] = {"acc": acc, "ap": 0.0, "n": 10.0 * len(ap)}
    return out


def test_paper_tables_have_one_column_per_generator_and_the_mean() -> None:
    columns, rows, markdown = paper_tables(report_of({"progan": 0.9, "ldm": 0.7}, acc=0.8), "ITEM")
    assert columns == ["table", "method", "progan", "ldm", "mean"]
    assert rows == [["I: ACC", "ITEM", 80.0, 80.0, 80.0], ["II: AP", "ITEM", 90.0, 70.0, 80.0]]
    assert "| ITEM | 80.00/90.00 | 80.00/70.00 | 80.00/80.00 |" in markdown and "mAP" in markdown


def test_generators_holding_one_class_are_named_not_silently_left_out_of_the_map(caplog) -> None:
    """sd has only generated images: its AP is undefined and mAP is the AP of the others (sklearn, by hand)."""
    import logging

    from sklearn.metrics import average_precision_score

    from common.metrics import RealFakeMetrics

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 6 + [1] * 5 + [0, 1] * 4)
    groups = torch.tensor([0] * 12 + [1] * 5 + [2] * 8)  # gan, sd (only generated), ldm
    scores = (labels + torch.rand(len(labels), generator=generator) * 1.5) / 2.5
    metric = RealFakeMetrics(["gan", "sd", "ldm"])
    metric.update(scores, labels, groups)
    report = metric.compute()
    expected = [average_precision_score(labels[groups == g], scores[groups == g]) for g in (0, 2)]
    with caplog.at_level(logging.WARNING, logger="forgelab.item"):
        columns, rows, markdown = paper_tables(report, "ITEM")
    assert columns == ["table", "method", "gan", "ldm", "sd", "mean"]
    assert rows[1][4] is None and rows[1][5] == pytest.approx(100 * sum(expected) / 2, abs=0.01)
    assert "| ITEM | " + f"{100 * expected[0]:.2f} | {100 * expected[1]:.2f} | n/a (one class) |" in markdown
    assert "mAP is the mean over 2 of 3 test generators; it leaves out sd (only generated)" in markdown
    assert "sd (only generated)" in caplog.text and caplog.records[0].levelname == "WARNING"
    _, _, fig4 = robustness_table({"none": report, "jpeg:75": report})
    assert fig4.count("n/a (one class)") == 2 and "leaves out sd (only generated)" in fig4
    _, _, ablation = ablation_table({"full": report})
    assert "n/a (one class)" in ablation and "leaves out sd" in ablation


def test_tables_without_one_class_generators_have_no_note(caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="forgelab.item"):
        _, _, markdown = paper_tables(report_of({"progan": 0.9, "ldm": 0.7}), "ITEM")
    assert "n/a" not in markdown and "Note" not in markdown and not caplog.records


def test_robustness_table_lists_every_condition_in_order() -> None:
    specs = ["none", "noise:0.001", "blur:2", "jpeg:50"]
    columns, rows, markdown = robustness_table(
        {s: report_of({"a": 0.9 - i / 10}) for i, s in enumerate(specs)}
    )
    assert columns == ["perturbation", "level", "ap_a", "mean_ap", "mean_acc"]
    assert [r[:3] for r in rows] == [
        ["none", "-", 90.0],
        ["noise", "0.001", 80.0],
        ["blur", "2", 70.0],
        ["jpeg", "50", 60.0],
    ]
    assert "Fig. 4" in markdown


def test_tsne_figure_has_a_panel_per_representation_and_generator() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 10)
    groups = torch.tensor([0] * 12 + [1] * 8)
    features = torch.randn(20, 5, generator=generator) + labels[:, None]
    figure = tsne_figure({"D": features, "I": features * 2}, labels, groups, ["gan", "ldm"], max_points=10)
    assert len(figure.axes) == 4
    assert "10 of 12" in figure.axes[0].get_title() and "n=8" in figure.axes[1].get_title()


# --- commands through the real CLI ---------------------------------------------------------------------------------


def item_args(config: Path, toy: Path, *extra: str) -> list[str]:
    return ["--config", str(CPU), "--config", str(config), *tiny_overrides(config, toy), *extra]


# the config's own test conditions, which tiny_overrides cuts to clean images
FIG4_GRID = f"--data.init_args.test_perturbations={json.dumps(robustness_specs())}"


def test_extract_then_fit_on_the_cache_then_predict_with_captions(small_toy_world, tmp_path) -> None:
    cache = f"--data.init_args.cache_dir={tmp_path / 'cache'}"
    runs = f"--run.root={tmp_path / 'runs'}"
    # without the cache and without extraction, fit refuses and says what to run
    code, _, err = run_cli(
        ["fit", *item_args(TINY, small_toy_world, cache, runs, "--data.init_args.extract_missing=false")]
    )
    assert code == 2 and "forgelab extract" in err and "Traceback" not in err

    code, out, err = run_cli(["extract", *item_args(TINY, small_toy_world, cache, runs, FIG4_GRID)])
    assert code == 0, err
    (extract_run,) = (tmp_path / "runs" / "item_detector").glob("extract-*")
    assert json.loads((extract_run / "run.json").read_text())["outcome"] == "completed"
    # the refused fit started nothing: it left no run directory behind
    assert [p for p in (tmp_path / "runs" / "item_detector").iterdir() if p != extract_run] == []
    report = json.loads((extract_run / "extract_report.json").read_text())
    conditions = {f"test/{spec}" for spec in robustness_specs()}  # tiny.yaml tests the whole Fig. 4 grid
    assert {"train/none", "val/none"} | conditions <= set(report["extraction"])
    assert "train/none" in out

    fit = [
        "fit",
        *item_args(TINY, small_toy_world, cache, runs, FIG4_GRID, "--data.init_args.extract_missing=false"),
    ]
    code, out, err = run_cli([*fit, "--trainer.max_epochs=2", "--run.name=fit"])
    assert code == 0, err
    run = tmp_path / "runs" / "item_detector" / "fit"
    tables = (run / "test_paper_tables.md").read_text()
    assert "| method | toy_gan | toy_ldm | mAP |" in tables and "Table III shape" in tables
    assert (run / "test_per_generator.md").is_file() and (run / "plots" / "test_tsne.png").is_file()
    frozen = json.loads((run / "frozen_stage.json").read_text())
    assert set(frozen["health"]) >= {"train/none", "val/none"} and frozen["extraction"] == {}  # all cached
    # Fig. 4: tiny.yaml tests the head under every perturbation of the grid, in the paper's order
    assert list(json.loads((run / "test_robustness.json").read_text())) == robustness_specs()
    rows = list(csv.DictReader((run / "test_robustness.csv").open()))
    assert [(r["perturbation"], r["level"]) for r in rows][:5] == [
        ("none", "-"),
        ("noise", "0.001"),
        ("noise", "0.005"),
        ("noise", "0.01"),
        ("blur", "1"),
    ]
    assert all(0 <= float(r["mean_ap"]) <= 100 for r in rows)
    assert (run / "plots" / "test_robustness.png").is_file()
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert ItemDetector.load_from_checkpoint(checkpoint).head.layers[0].in_features == 32

    folder = small_toy_world / "realfake" / "test" / "toy_ldm"
    generative = ("--data.init_args.captioner.name=blip2", "--data.init_args.grounder.name=grounding_dino")
    predict = ["predict", *item_args(TINY, small_toy_world, cache, runs, *generative)]
    code, _, err = run_cli([*predict, f"--data.init_args.predict_root={folder}", f"--ckpt_path={checkpoint}"])
    assert code == 0, err
    (predict_run,) = (tmp_path / "runs" / "item_detector").glob("fit-predict-*")  # its own run, not the fit's
    rows = list(csv.DictReader((predict_run / "predictions.csv").open()))
    assert len(rows) == len(list(folder.rglob("*.png")))
    assert list(rows[0]) == ["path", "caption", "score", "predicted_label", "true_label"]
    assert all(r["caption"] for r in rows) and {r["true_label"] for r in rows} == {"0", "1"}


# The Fig. 4 grid through the CLI is in the extract/fit test (tiny.yaml, oracle captions); this is the paper's
# robustness config, with BLIP-2 and Grounding DINO (tiny) captioning and grounding every perturbed image.
@pytest.mark.slow
def test_robustness_config_writes_the_fig4_table_and_plot(small_toy_world, tmp_path) -> None:
    code, _, err = run_cli(
        [
            "fit",
            *item_args(
                ROBUSTNESS,
                small_toy_world,
                f"--run.root={tmp_path}",
                "--trainer.max_epochs=1",
                "--run.name=r",
                FIG4_GRID,
            ),
        ]
    )
    assert code == 0, err
    run = tmp_path / "item_detector" / "r"
    reports = json.loads((run / "test_robustness.json").read_text())
    assert list(reports) == [
        "none",
        "noise:0.001",
        "noise:0.005",
        "noise:0.01",
        "blur:1",
        "blur:2",
        "blur:3",
        "jpeg:75",
        "jpeg:50",
        "jpeg:25",
    ]
    rows = list(csv.DictReader((run / "test_robustness.csv").open()))
    assert [(r["perturbation"], r["level"]) for r in rows][:4] == [
        ("none", "-"),
        ("noise", "0.001"),
        ("noise", "0.005"),
        ("noise", "0.01"),
    ]
    assert all(0 <= float(r["mean_ap"]) <= 100 for r in rows)
    assert (run / "plots" / "test_robustness.png").is_file()


def test_item_compare_builds_the_ablation_figure_from_run_reports(tmp_path) -> None:
    runs = []
    for name, ap in (("global", 0.8), ("local", 0.7), ("both", 0.9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test_metrics.json").write_text(
            json.dumps(report_of({"progan": ap, "ldm": ap - 0.1}))
        )
        runs.append(f"--run={name}={tmp_path / name}")
    code, out, err = run_cli(["item-compare", *runs, "--title=Fig. 5", f"--out={tmp_path / 'fig5'}"])
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "fig5" / "ablation.csv").open()))
    assert [(r["variant"], r["progan"], r["mean"]) for r in rows] == [
        ("global", "80.0", "75.0"),
        ("local", "70.0", "65.0"),
        ("both", "90.0", "85.0"),
    ]
    assert (tmp_path / "fig5" / "plots" / "ablation.png").is_file() and "Fig. 5: AP (%)" in out
    code, _, err = run_cli(["item-compare", f"--run=x={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}"])
    assert code == 2 and "test_metrics.json does not exist" in err


def test_item_sweep_dry_run_sweeps_the_heads_init_args(tmp_path, monkeypatch) -> None:
    """configs/sweeps/item_detector.yaml (W&B schema and trial parsing: tests/test_sweep.py) sweeps real
    `ItemDetector` arguments -- MLP width, AdamW lr and weight decay, Eq. 8's w1 and w2 -- on tiny.yaml."""
    monkeypatch.chdir(CONFIGS.parent)
    sweep_file = CONFIGS / "sweeps" / "item_detector.yaml"
    code, out, err = run_cli(["sweep", str(sweep_file), "--count", "2", "--dry-run", f"--root={tmp_path}"])
    assert code == 0, err
    command = out.split()
    assert command[1:6] == [
        "fit",
        "--config",
        "configs/trainer/cpu.yaml",
        "--config",
        str(TINY.relative_to(CONFIGS.parent)),
    ]
    swept = {arg.split("=")[0].removeprefix("--model.init_args.") for arg in command if "init_args" in arg}
    assert swept == {"hidden_features", "lr", "weight_decay", "w_global", "w_local"}
    assert swept <= set(inspect.signature(ItemDetector.__init__).parameters)
    assert not (tmp_path / "sweeps").exists()  # a dry run runs nothing
