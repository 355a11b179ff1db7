"""Object masks (paper 003 Sec. 5.2, Fig. 6): COCO instance annotations (polygon, uncompressed and compressed
RLE) and mask folders matched by stem, bucketed by hole ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.errors import ConfigError
from projects.inpaint_probe.masks import (
    MaskConfig,
    bucket_label,
    hole_ratio,
    image_mask,
    mask_rng,
    sample_mask,
)
from projects.inpaint_probe.object_masks import (
    decode_rle,
    decode_rle_counts,
    polygon_mask,
    read_coco_instances,
)


def _encode_counts(runs: list[int]) -> str:
    """pycocotools' rleToString, written out independently of the decoder under test."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros (COCO's RLE), by a naive loop."""
    flat = mask.T.ravel()
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel == value:
            count += 1
        else:
            runs.append(count)
            value, count = pixel, 1
    runs.append(count)
    return runs


# image 2's object: a few scattered pixels whose runs shrink, so the compressed deltas go negative
IMAGE2 = np.zeros((8, 8), np.float32)
IMAGE2[0:3, 0] = 1
IMAGE2[5, 1] = 1
IMAGE2[7, 3] = 1


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    data = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "height": 10, "width": 20},
            {"id": 2, "file_name": "000000000002.jpg", "height": 8, "width": 8},
        ],
        "annotations": [
            # a box with corners (2, 2) and (6, 6): area 16 of 200 pixels = 0.08
            {"id": 10, "image_id": 1, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]], "area": 16.0, "iscrowd": 0},
            # the last 5 of 20 columns, uncompressed RLE (crowd style): 50 of 200 pixels = 0.25
            {
                "id": 11,
                "image_id": 1,
                "segmentation": {"size": [10, 20], "counts": [150, 50]},
                "area": 50.0,
                "iscrowd": 1,
            },
            {
                "id": 12,
                "image_id": 2,
                "segmentation": {"size": [8, 8], "counts": _encode_counts(_runs(IMAGE2))},
                "area": 5.0,
                "iscrowd": 0,
            },
            {"id": 13, "image_id": 2, "segmentation": [], "area": 0.0},  # no segmentation: skipped, counted
        ],
    }
    path = root / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_compressed_rle_decodes_a_hand_worked_string_and_negative_deltas():
    # "045": runs 0, 4, 5 -> on a 3x3 mask the first four pixels in column order are the object
    assert decode_rle_counts("045") == [0, 4, 5]
    expected = np.zeros((3, 3), np.float32)
    expected[:, 0] = 1
    expected[0, 1] = 1
    assert np.array_equal(decode_rle({"size": [3, 3], "counts": "045"}), expected)
    runs = _runs(IMAGE2)
    assert any(runs[i] < runs[i - 2] for i in range(3, len(runs)))  # the case the sign bit exists for
    assert decode_rle_counts(_encode_counts(runs)) == runs
    assert np.array_equal(decode_rle({"size": [8, 8], "counts": _encode_counts(runs)}), IMAGE2)


def test_polygon_fill_gives_the_polygon_area_not_the_outline_inclusive_one():
    mask = polygon_mask([[2, 2, 6, 2, 6, 6, 2, 6]], 10, 20)
    expected = np.zeros((10, 20), np.float32)
    expected[2:6, 2:6] = 1  # pixel centres 2.5 .. 5.5 lie inside; PIL's fill would also take row/column 6
    assert np.array_equal(mask, expected)
    # triangle (0, 0), (8, 0), (0, 4): inside when x + 2y < 8 (no pixel centre lies on the slanted edge)
    triangle = polygon_mask([[0, 0, 8, 0, 0, 4]], 8, 8)
    naive = [[float((x + 0.5) + 2 * (y + 0.5) < 8) for x in range(8)] for y in range(8)]
    assert np.array_equal(triangle, np.array(naive, np.float32)) and triangle.sum() == 16


def test_coco_objects_by_stem_with_known_hole_ratios_and_buckets(coco):
    config = MaskConfig(kind="coco_objects", source=str(coco))
    largest = image_mask("/any/where/000000000001.jpg", 10, 20, config)
    assert hole_ratio(largest) == pytest.approx(0.25) and bucket_label(hole_ratio(largest)) == "20-30%"
    assert np.array_equal(largest[:, 15:], np.ones((10, 5))) and largest[:, :15].sum() == 0
    union = image_mask(
        "000000000001.png", 10, 20, MaskConfig(kind="coco_objects", source=str(coco), object_choice="all")
    )
    assert hole_ratio(union) == pytest.approx(66 / 200) and bucket_label(hole_ratio(union)) == "30-40%"
    small = image_mask("000000000002.jpg", 8, 8, config)
    assert np.array_equal(small, IMAGE2) and bucket_label(hole_ratio(small)) == "0-10%"
    assert image_mask("000000000099.jpg", 8, 8, config) is None  # not annotated: the caller counts a skip
    dilated = image_mask(
        "000000000002.jpg", 8, 8, MaskConfig(kind="coco_objects", source=str(coco), dilate=1)
    )
    assert dilated.sum() > small.sum() and np.all(dilated >= small)
    assert len(read_coco_instances(str(coco)).annotations) == 3  # the empty segmentation was skipped


def test_sample_mask_draws_coco_objects_through_the_probe_api(coco):
    """The probe's `sample_mask(size, size, config.mask, mask_rng(seed, "probe", i))` gives object masks when the
    config says kind coco_objects: only the 0.25 object lies in [0.2, 0.3] at 10x20."""
    config = MaskConfig(kind="coco_objects", source=str(coco), min_ratio=0.2, max_ratio=0.3)
    masks = [sample_mask(10, 20, config, mask_rng(0, "probe", i)) for i in range(3)]
    for mask in masks:
        assert hole_ratio(mask) == pytest.approx(0.25) and mask[:, 15:].all()
    again = sample_mask(10, 20, config, mask_rng(0, "probe", 0))
    assert np.array_equal(again, masks[0])


def test_mask_folder_matched_by_stem_and_drawn(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    hole = np.zeros((16, 32), np.uint8)
    hole[4:12, 8:24] = 255  # 128 of 512 pixels = 0.25
    Image.fromarray(hole).save(folder / "000000000001.png")
    (folder / "notes.txt").write_text("not a mask")
    config = MaskConfig(kind="mask_folder", source=str(folder))
    mask = image_mask(tmp_path / "images" / "000000000001.jpg", 16, 32, config)
    assert hole_ratio(mask) == pytest.approx(0.25) and bucket_label(hole_ratio(mask)) == "20-30%"
    resized = image_mask("000000000001.webp", 8, 16, config)
    assert hole_ratio(resized) == pytest.approx(0.25)
    assert image_mask("other.jpg", 16, 32, config) is None
    drawn = sample_mask(16, 32, config, mask_rng(3, "probe", 0))
    assert np.array_equal(drawn, mask)


def test_mask_sources_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="source is needed"):
        MaskConfig(kind="coco_objects")
    with pytest.raises(ConfigError, match="do not exist"):
        image_mask("a.jpg", 8, 8, MaskConfig(kind="coco_objects", source=str(tmp_path / "missing.json")))
    with pytest.raises(ConfigError, match="holds no image"):
        image_mask("a.jpg", 8, 8, MaskConfig(kind="mask_folder", source=str(tmp_path)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="not a COCO instances file"):
        sample_mask(8, 8, MaskConfig(kind="coco_objects", source=str(bad)), mask_rng(0))
    with pytest.raises(ValueError, match="RLE runs"):
        decode_rle({"size": [2, 2], "counts": [1, 1]})
