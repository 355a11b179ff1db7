"""Captioned fine-grained data: manifest parsing, class ids, and boxes that follow the image's transforms."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.transforms import v2

from common.data.captioned import CaptionedDataset, CaptionedParts, class_index, read_captioned_manifest
from common.data.samples import DatasetLayoutError
from tests.conftest import write_rgb


def _manifest(tmp_path, rows):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_boxes_are_resized_and_flipped_with_the_image(tmp_path):
    write_rgb(tmp_path / "a.png", size=(200, 100))
    rows = [
        {
            "path": "a.png",
            "caption": "a valve",
            "subclass": "x",
            "boxes": [[10, 20, 50, 60]],
            "phrases": ["valve"],
        }
    ]
    samples = read_captioned_manifest(_manifest(tmp_path, rows))
    flip = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((50, 100)),
            v2.RandomHorizontalFlip(p=1.0),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    item = CaptionedDataset(samples, ["x"], transform=flip)[0]
    # resize (200x100 -> 100x50) halves coordinates: [5, 10, 25, 30]; flip maps x -> 100 - x
    assert item["image"].shape == (3, 50, 100)
    assert torch.allclose(item["boxes"], torch.tensor([[75.0, 10.0, 95.0, 30.0]]))
    assert item["phrases"] == ["valve"] and item["label"] == 0


def test_class_index_uses_manifest_ids_or_sorted_names(tmp_path):
    for name in ("a.png", "b.png"):
        write_rgb(tmp_path / name)
    with_ids = [
        {"path": "a.png", "caption": "c", "subclass": "zeta", "subclass_id": 0},
        {"path": "b.png", "caption": "c", "subclass": "alpha", "subclass_id": 1},
    ]
    assert class_index(read_captioned_manifest(_manifest(tmp_path, with_ids))) == ["zeta", "alpha"]
    without = [{k: v for k, v in r.items() if k != "subclass_id"} for r in with_ids]
    assert class_index(read_captioned_manifest(_manifest(tmp_path, without))) == ["alpha", "zeta"]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"path": "a.png", "subclass": "x"}, "missing 'caption'"),
        (
            {"path": "a.png", "caption": "c", "subclass": "x", "boxes": [[0, 0, 1, 1]], "phrases": []},
            "1 boxes but 0",
        ),
        (
            {"path": "a.png", "caption": "c", "subclass": "x", "boxes": [[0, 0, 1]], "phrases": ["p"]},
            r"\[x0, y0",
        ),
    ],
)
def test_bad_rows_are_clear_errors(tmp_path, row, match):
    write_rgb(tmp_path / "a.png")
    with pytest.raises(DatasetLayoutError, match=match):
        read_captioned_manifest(_manifest(tmp_path, [row]))


def test_toy_world_parts_datamodule(small_toy_world):
    dm = CaptionedParts(
        manifest=str(small_toy_world / "parts" / "manifest.jsonl"), image_size=32, num_workers=0, batch_size=8
    )
    dm.setup("fit")
    assert dm.num_classes >= 24 and set(dm.samples) == {"train", "val", "test"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["caption"]) == 8
    for boxes, phrases, caption in zip(batch["boxes"], batch["phrases"], batch["caption"], strict=True):
        assert boxes.shape == (len(phrases), 4)
        assert (boxes >= 0).all() and (boxes <= 32).all()
        assert all(p in caption for p in phrases)


def test_missing_files_are_skipped_and_counted(tmp_path):
    write_rgb(tmp_path / "a.png")
    rows = [
        {"path": "a.png", "caption": "c", "subclass": "x"},
        {"path": "gone.png", "caption": "c", "subclass": "x"},
    ]
    from common.data.images import SkipLog

    skips = SkipLog("t")
    assert len(read_captioned_manifest(_manifest(tmp_path, rows), skips)) == 1
    assert skips.summary() == {"missing": 1}
