"""RealFakeFolder: layouts, manifests, splits, and bad files skipped with a count instead of a crash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from common.data import DatasetLayoutError, RealFakeFolder, index_source
from common.data.realfake import stratified_split
from common.data.samples import index_image_folder, read_manifest
from tests.conftest import write_rgb


def test_folder_layout_with_and_without_class_level(realfake_root):
    samples = index_source(realfake_root)
    assert len(samples) == 24
    by_gen = {g: [s for s in samples if s.generator == g] for g in ("gan", "ldm")}
    assert all(len(v) == 12 for v in by_gen.values())
    assert {s.subclass for s in by_gen["ldm"]} == {"cat"}
    assert all((s.label == 0) == ("0_real" in s.path) for s in samples)
    assert all(Path(s.path).name.startswith("img.") for s in samples)  # dotted names survive


def test_single_generator_folder_uses_its_name(realfake_root):
    samples = index_source(realfake_root / "gan")
    assert {s.generator for s in samples} == {"gan"} and len(samples) == 12


def test_misnamed_folders_get_a_rename_hint(tmp_path):
    write_rgb(tmp_path / "sd" / "real" / "a.png")
    write_rgb(tmp_path / "sd" / "fake" / "b.png")
    with pytest.raises(DatasetLayoutError, match="rename them to '0_real' and '1_fake'"):
        index_source(tmp_path)


def test_empty_folder_is_a_clear_error_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "empty")):
        index_source(tmp_path / "empty")


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        index_source(tmp_path / "nowhere")


def test_folder_with_only_bad_files_is_an_error_with_counts(tmp_path):
    (tmp_path / "g" / "0_real").mkdir(parents=True)
    (tmp_path / "g" / "0_real" / "a.png").touch()
    (tmp_path / "g" / "0_real" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="empty"):
        index_source(tmp_path)


def test_csv_manifest_relative_paths_and_grip_labels(tmp_path):
    write_rgb(tmp_path / "imgs" / "r.png")
    write_rgb(tmp_path / "imgs" / "f.png", seed=1)
    write_rgb(tmp_path / "imgs" / "g.png", seed=2)
    (tmp_path / "m.csv").write_text(
        "path,label,generator,caption\nimgs/r.png,real,coco,a cat\nimgs/f.png,1,sd,a dog\nimgs/g.png,dalle2,,\n"
    )
    samples = read_manifest(tmp_path / "m.csv")
    assert [(s.label, s.generator) for s in samples] == [(0, "coco"), (1, "sd"), (1, "dalle2")]
    assert samples[0].caption == "a cat" and Path(samples[0].path).is_file()


def test_jsonl_manifest_with_boxes(tmp_path):
    write_rgb(tmp_path / "a.png")
    row = {
        "path": "a.png",
        "label": 0,
        "generator": "toy",
        "caption": "a valve",
        "boxes": [[0, 0, 4, 4]],
        "phrases": ["valve"],
    }
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n\n")
    (sample,) = read_manifest(tmp_path / "m.jsonl")
    assert sample.boxes == [[0, 0, 4, 4]] and sample.phrases == ["valve"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("file,label\na.png,0\n", "must contain 'path'"),
        ("path,generator\na.png,x\n", "must contain 'label'"),
        ("path,label\na.png,7\n", "not 0 or 1"),
    ],
)
def test_bad_csv_manifests_are_clear_errors(tmp_path, content, match):
    write_rgb(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetLayoutError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_manifest_rows_for_missing_files_are_counted(tmp_path):
    write_rgb(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,0\ngone.png,1\n")
    from common.data.images import SkipLog

    skips = SkipLog("t")
    assert len(read_manifest(tmp_path / "m.csv", skips)) == 1
    assert skips.summary() == {"missing": 1}


def test_stratified_split_is_deterministic_and_keeps_every_stratum(realfake_root):
    samples = index_source(realfake_root)
    train_a, val_a = stratified_split(samples, 0.25, seed=0)
    _train_b, val_b = stratified_split(list(reversed(samples)), 0.25, seed=0)
    assert sorted(s.path for s in val_a) == sorted(s.path for s in val_b)
    assert {(s.generator, s.label) for s in val_a} == {(g, lab) for g in ("gan", "ldm") for lab in (0, 1)}
    assert len(train_a) + len(val_a) == len(samples)


def test_max_train_per_label_keeps_the_lowest_hashes_of_each_label_after_the_split(realfake_root):
    full = RealFakeFolder(train_root=str(realfake_root), val_fraction=0.25, split_seed=3, num_workers=0)
    cut = RealFakeFolder(
        train_root=str(realfake_root), val_fraction=0.25, split_seed=3, num_workers=0, max_train_per_label=2
    )
    full.setup("fit")
    cut.setup("fit")
    assert [s.path for s in cut.samples["val"]] == [
        s.path for s in full.samples["val"]
    ]  # the split is unchanged
    for label in (0, 1):  # naive: rank the label's training files by sha1("3:<path>"), keep the first two
        members = [s.path for s in full.samples["train"] if s.label == label]
        expected = sorted(members, key=lambda p: hashlib.sha1(f"3:{p}".encode()).hexdigest())[:2]
        assert sorted(s.path for s in cut.samples["train"] if s.label == label) == sorted(expected)
    with pytest.raises(ValueError, match="max_train_per_label must be positive"):
        RealFakeFolder(train_root=str(realfake_root), max_train_per_label=0)


def _bad_files(label_dir: Path) -> None:
    """One of each bad input next to good images."""
    label_dir.mkdir(parents=True, exist_ok=True)
    (label_dir / "zero.png").touch()
    (label_dir / "html.jpg").write_text("<html>")
    good = write_rgb(label_dir / "trunc_src.png", size=(64, 64))
    (label_dir / "trunc.png").write_bytes(good.read_bytes()[:200])
    good.unlink()
    (label_dir / "readme.txt").write_text("not an image")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_over_bad_files_completes_and_counts_skips(realfake_root, num_workers):
    _bad_files(realfake_root / "gan" / "1_fake")
    dm = RealFakeFolder(
        train_root=str(realfake_root),
        test_root=str(realfake_root),
        image_size=16,
        batch_size=4,
        num_workers=num_workers,
        val_fraction=0.2,
    )
    dm.setup("fit")
    assert dm.skip_summary() == {"empty": 1, "not_an_image_extension": 1}
    seen, skipped = 0, []
    for batch in dm.test_dataloader():
        assert batch["image"].shape[1:] == (3, 16, 16) or batch["image"].numel() == 0
        assert batch["image"].dtype == torch.float32 and batch["label"].shape == batch["generator_id"].shape
        seen += batch["label"].numel()
        skipped += batch["skipped"]
    assert seen == 24
    assert sorted(reason for _, reason in skipped) in (
        ["not_an_image", "truncated"],
        ["corrupt", "not_an_image"],
    )
    assert dm.generators == ["gan", "ldm"]


def test_all_bad_batch_collates_to_an_empty_batch(tmp_path):
    from common.data.realfake import collate_skipping

    batch = collate_skipping([{"skip": "empty", "path": "a"}, {"skip": "corrupt", "path": "b"}])
    assert batch["label"].numel() == 0 and batch["skipped"] == [("a", "empty"), ("b", "corrupt")]


def test_training_root_needs_both_labels(tmp_path):
    for i in range(3):
        write_rgb(tmp_path / "g" / "1_fake" / f"{i}.png", seed=i)
    dm = RealFakeFolder(train_root=str(tmp_path), num_workers=0, val_fraction=0.3)
    with pytest.raises(DatasetLayoutError, match="both 0_real and 1_fake"):
        dm.setup("fit")


def test_missing_split_names_the_config_key(realfake_root):
    dm = RealFakeFolder(train_root=str(realfake_root), num_workers=0)
    dm.setup("fit")
    with pytest.raises(DatasetLayoutError, match=r"data\.init_args\.test_root"):
        dm.test_dataloader()


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"num_workers": -1}, {"test_perturbation": "sharpen:1"}, {"val_fraction": 1.5}],
)
def test_bad_config_values_fail_early(realfake_root, kwargs):
    with pytest.raises(ValueError):
        dm = RealFakeFolder(train_root=str(realfake_root), **kwargs)
        dm.setup("fit")


def test_predict_folder_reads_labels_when_present(realfake_root):
    samples = index_image_folder(realfake_root / "gan")
    assert {s.label for s in samples} == {0, 1}
    write_rgb(realfake_root / "loose" / "x.png")
    assert index_image_folder(realfake_root / "loose")[0].label == -1


def test_test_perturbation_changes_pixels_deterministically(realfake_root):
    clean = RealFakeFolder(test_root=str(realfake_root), image_size=16, num_workers=0)
    noisy = RealFakeFolder(
        test_root=str(realfake_root), image_size=16, num_workers=0, test_perturbation="jpeg:25"
    )
    for dm in (clean, noisy):
        dm.setup("test")
    a, b = next(iter(clean.test_dataloader())), next(iter(noisy.test_dataloader()))
    assert not torch.equal(a["image"], b["image"])
    assert torch.equal(b["image"], next(iter(noisy.test_dataloader()))["image"])


def test_several_roots_are_concatenated(realfake_root):
    dm = RealFakeFolder(
        train_root=[str(realfake_root / "gan"), f"ldm={realfake_root / 'ldm'}"],
        test_root=[f"ldm={realfake_root / 'ldm'}"],
        num_workers=0,
    )
    dm.setup("fit")
    assert len(dm.samples["train"]) + len(dm.samples["val"]) == 24
    assert dm.generator_names("test") == ["ldm"] and dm.generators == ["gan", "ldm"]


def test_named_root_holds_one_generator_with_class_folders(realfake_root):
    samples = index_source(f"progan={realfake_root / 'ldm'}")
    assert {s.generator for s in samples} == {"progan"} and {s.subclass for s in samples} == {"cat"}
