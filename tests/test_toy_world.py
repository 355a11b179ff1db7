"""The embedded toy world: catalogue, rendering, annotations, files on disk, caching and fake fingerprints."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import toy_world as tw
from common.data.toy_world import (
    CATALOGUE,
    TOY_GENERATORS,
    Scene,
    ToyWorldSpec,
    ensure_toy_world,
    generate_toy_world,
    render_part,
    render_scene,
    sample_scene,
)
from common.data.toy_world import writer as tw_writer  # the module whose internals the tests patch

TINY = {
    "image_size": 64,
    "parts_train": 1,
    "parts_val": 1,
    "parts_test": 1,
    "realfake_train": 3,
    "realfake_val": 2,
    "realfake_test": 2,
}
# Smaller still, for tests that generate several worlds.
MINI = {**TINY, "parts_val": 0, "parts_test": 0, "realfake_train": 1, "realfake_val": 0, "realfake_test": 1}
REPO_ROOT = Path(tw.__file__).resolve().parents[3]  # common/data/toy_world/__init__.py


def tree_bytes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def siblings(root: Path) -> list[str]:
    return sorted(
        p.name for p in root.parent.iterdir() if p.name != root.name and not p.name.endswith(".lock")
    )


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_toy_world(
        tmp_path_factory.mktemp("tw") / "toy_world", ToyWorldSpec(**TINY), num_workers=1
    )


# --- catalogue ------------------------------------------------------------------------------------------


def test_catalogue_has_the_papers_six_valve_types_with_three_or_four_subtypes_each() -> None:
    per_type: dict[str, list[tw.Subtype]] = {}
    for st in CATALOGUE:
        per_type.setdefault(st.part_type, []).append(st)
    assert set(per_type) == {"ball", "gate", "check", "butterfly", "plug", "control"}
    assert all(3 <= len(v) <= 4 for v in per_type.values())
    assert len(CATALOGUE) >= 20
    assert len({st.subclass for st in CATALOGUE}) == len(CATALOGUE)


def test_subtypes_of_one_type_differ_in_one_or_two_attributes() -> None:
    for a, b in itertools.combinations(CATALOGUE, 2):
        if a.part_type != b.part_type:
            continue
        diff = [k for k in tw.ATTRIBUTE_NAMES if getattr(a, k) != getattr(b, k)]
        assert 1 <= len(diff) <= 2, (a.subclass, b.subclass, diff)


def test_catalogue_values_are_all_drawable_and_consistent() -> None:
    for st in CATALOGUE:
        assert st.material in tw.MATERIALS and st.handle in tw.HANDLE_NOUNS and st.flange in tw.END_NOUNS
        assert (st.bolts == 0) == (st.flange == "threaded")
        assert (st.handle_colour == "none") == (st.handle == "none")


def test_subclass_ids_equal_imagefolder_indices_of_the_subclass_folders() -> None:
    dirs = sorted(st.subclass_dir for st in CATALOGUE)
    for st in CATALOGUE:
        assert dirs.index(st.subclass_dir) == tw.SUBCLASS_IDS[st.subclass]
        assert "." not in st.subclass_dir


# --- rendering and annotations ----------------------------------------------------------------------------


def test_render_is_deterministic_and_varies_between_photographs_of_one_subclass() -> None:
    st = CATALOGUE[0]
    a = np.asarray(render_part(st, np.random.default_rng(1), 64)[0])
    b = np.asarray(render_part(st, np.random.default_rng(1), 64)[0])
    c = np.asarray(render_part(st, np.random.default_rng(2), 64)[0])
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_caption_lists_the_distinguishing_attributes_and_contains_every_phrase() -> None:
    for i, st in enumerate(CATALOGUE):
        img, boxes, phrases, caption = render_part(st, np.random.default_rng(i), 64)
        assert img.mode == "RGB" and img.size == (64, 64)
        assert tw.MATERIALS[st.material].phrase in caption and f"{st.part_type} valve" in caption
        if st.flange != "threaded":
            assert f"{st.flange} flanges with {tw.NUMBER_WORDS[st.bolts]} bolts" in caption
            assert phrases.count("bolt") == 2 * st.bolts
        if st.handle != "none":
            assert f"{st.handle_colour} {tw.HANDLE_NOUNS[st.handle]}" in caption
        assert len(boxes) == len(phrases)
        for phrase in phrases:
            assert phrase in caption, (phrase, caption)


def _object_on_black(scene: Scene) -> Scene:
    """The same part and pose with no background, light effects or noise, so drawn pixels are the non-zero ones."""
    return dataclasses.replace(
        scene,
        background="plain",
        bg_colours=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        lighting="normal",
        light_gain=1.0,
        glare=(0.0, 0.0, 0.0),
        noise_sigma=0.0,
    )


@pytest.mark.parametrize("size", [96])
def test_boxes_are_inside_the_image_and_tight_to_drawn_pixels(size: int) -> None:
    for i, st in enumerate(CATALOGUE):
        scene = _object_on_black(sample_scene(st, np.random.default_rng(100 + i)))
        img, boxes, phrases, _ = render_scene(scene, size)
        drawn = np.asarray(img).max(axis=-1) > 4
        ys, xs = np.nonzero(drawn)
        # The first box is the whole part: equal to the extent of the drawn pixels up to anti-aliasing.
        assert phrases[0] == f"{st.part_type} valve"
        extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert np.abs(np.array(boxes[0]) - extent).max() <= 1, (st.subclass, boxes[0], extent)
        for box, phrase in zip(boxes, phrases):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, (phrase, box)
            inside = drawn[y0:y1, x0:x1]
            assert inside.mean() > 0.15, (st.subclass, phrase, box)
            # Tight: drawn pixels within 2 px of every edge (a rotated corner may cover too little of the last one).
            assert inside[:2].any() and inside[-2:].any() and inside[:, :2].any() and inside[:, -2:].any(), (
                phrase,
                box,
            )


def test_box_regions_differ_from_the_clean_plate_background() -> None:
    for i, st in enumerate(CATALOGUE[::3]):
        scene = sample_scene(st, np.random.default_rng(200 + i))
        img, boxes, phrases, _ = render_scene(scene, 96)
        plate, *_ = render_scene(scene, 96, draw_object=False)
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(plate, np.int16)).max(-1)
        for (x0, y0, x1, y1), phrase in zip(boxes, phrases):
            assert (diff[y0:y1, x0:x1] > 6).mean() > 0.15, (st.subclass, phrase)


def test_scene_round_trips_through_json_and_wear_changes_only_the_part() -> None:
    scene = sample_scene(tw.get_subtype("gate/round_8bolt"), np.random.default_rng(3))
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    clean = dataclasses.replace(scene, wear="clean", lighting="normal", glare=(0.0, 0.0, 0.0))
    rusty = dataclasses.replace(clean, wear="corroded")
    a, boxes, _, cap_a = render_scene(clean, 96)
    b, _, _, cap_b = render_scene(rusty, 96)
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max(-1)
    x0, y0, x1, y1 = boxes[0]
    outside = np.ones_like(diff, bool)
    outside[max(y0 - 8, 0) : y1 + 8, max(x0 - 8, 0) : x1 + 8] = False
    assert diff[outside].max() == 0  # background, shadow and sensor noise untouched: a temporal pair
    assert (diff[y0:y1, x0:x1] > 12).mean() > 0.03  # rust halos on the flanges
    assert "rust" in cap_b and "rust" not in cap_a


# --- files on disk --------------------------------------------------------------------------------------


def test_same_spec_gives_byte_identical_worlds_with_any_number_of_workers(
    tiny_world: Path, tmp_path: Path
) -> None:
    again = generate_toy_world(tmp_path / "again", ToyWorldSpec(**TINY), num_workers=2)
    assert tree_bytes(again) == tree_bytes(tiny_world)
    other_seed = generate_toy_world(tmp_path / "seed1", ToyWorldSpec(**{**MINI, "seed": 1}), num_workers=1)
    first = "parts/train/ball__brass_blue_lever/00000.png"
    assert (other_seed / first).read_bytes() != (tiny_world / first).read_bytes()


def test_layout_counts_and_manifests_match_the_files(tiny_world: Path) -> None:
    spec = ToyWorldSpec(**TINY)
    meta = json.loads((tiny_world / "toy_world.json").read_text())
    assert meta["spec_hash"] == spec.spec_hash() and meta["spec"] == spec.to_dict()
    records = read_jsonl(tiny_world / "parts" / "manifest.jsonl")
    assert len(records) == len(CATALOGUE) * 3
    for split in ("train", "val", "test"):
        assert sum(r["split"] == split for r in records) == len(CATALOGUE) * spec.parts_count(split)
        assert meta["counts"]["parts"][split] == len(CATALOGUE) * spec.parts_count(split)
    pngs = {p.relative_to(tiny_world / "parts").as_posix() for p in (tiny_world / "parts").rglob("*.png")}
    assert pngs == {r["path"] for r in records}
    for r in records:
        st = tw.get_subtype(r["subclass"])
        assert r["path"].startswith(f"{r['split']}/{st.subclass_dir}/")
        assert r["subclass_id"] == tw.SUBCLASS_IDS[r["subclass"]] and r["part_type"] == st.part_type
        assert r["attributes"] == st.attributes()
        with Image.open(tiny_world / "parts" / r["path"]) as img:
            assert (
                (img.format, img.mode, img.size)
                == ("PNG", "RGB", (64, 64))
                == ("PNG", "RGB", (r["width"], r["height"]))
            )
    assert meta["content_hash"] == tw_writer._content_hash(tiny_world)


def test_realfake_folders_labels_and_manifests_agree(tiny_world: Path) -> None:
    rf = tiny_world / "realfake"
    spec = ToyWorldSpec(**TINY)
    for split in ("train", "val", "test"):
        with open(rf / f"{split}.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["path", "label", "generator", "caption", "subclass"]
        records = read_jsonl(rf / f"{split}.jsonl")
        assert [r[:5] for r in rows[1:]] == [
            [r["path"], str(r["label"]), r["generator"], r["caption"], r["subclass"]] for r in records
        ]
        for gen in spec.generators:
            for label, folder in ((0, "0_real"), (1, "1_fake")):
                files = sorted(p.name for p in (rf / split / gen / folder).glob("*.png"))
                assert len(files) == spec.realfake_count(split)
                mine = [r for r in records if r["generator"] == gen and r["label"] == label]
                assert sorted(Path(r["path"]).name for r in mine) == files
                assert all(r["path"] == f"{split}/{gen}/{folder}/{Path(r['path']).name}" for r in mine)
        for r in records:
            with Image.open(rf / r["path"]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))
            assert all(p in r["caption"] for p in r["phrases"]) and len(r["boxes"]) == len(r["phrases"])
            assert all(0 <= b[0] < b[2] <= 64 and 0 <= b[1] < b[3] <= 64 for b in r["boxes"])
    # Each generator folder has its own real scenes: no real image is shared between generators.
    reals = [p.read_bytes() for p in rf.rglob("0_real/*.png")]
    assert len(set(reals)) == len(reals)


def test_fakes_carry_the_caption_and_boxes_of_the_scene_they_generated(tiny_world: Path) -> None:
    for r in read_jsonl(tiny_world / "realfake" / "train.jsonl"):
        scene = Scene.from_dict(r["scene"])
        boxes, phrases, caption = tw.scene_annotations(scene, 64)
        assert (boxes, phrases, caption) == (r["boxes"], r["phrases"], r["caption"])
        assert r["subclass"] == scene.subclass


# --- ensure_toy_world -----------------------------------------------------------------------------------


def test_ensure_reuses_a_current_world_without_touching_it(
    tiny_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_world.rglob("*")}
    with caplog.at_level(logging.INFO, logger="forgelab.toy_world"):
        assert ensure_toy_world(tiny_world, ToyWorldSpec(**TINY)) == tiny_world
    assert {p: p.stat().st_mtime_ns for p in tiny_world.rglob("*")} == before
    assert "up to date" in caplog.text


def test_ensure_regenerates_when_the_spec_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "toy_world"
    first, second = ToyWorldSpec(**MINI), ToyWorldSpec(**{**MINI, "seed": 5})
    ensure_toy_world(root, first, num_workers=1)
    with caplog.at_level(logging.INFO, logger="forgelab.toy_world"):
        ensure_toy_world(root, second, num_workers=1)
    meta = json.loads((root / "toy_world.json").read_text())
    assert meta["spec_hash"] == second.spec_hash() != first.spec_hash()
    assert "written from another spec" in caplog.text and "generated toy world" in caplog.text
    assert siblings(root) == []  # no temporary or old copies left behind


_CHILD = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
sys.path.insert(0, sys.argv[1])
from common.data.toy_world import writer as tw  # numpy and PIL only: no torch or lightning
write_world = tw._write_world
tw._write_world = lambda *a, **k: (time.sleep(1.0), write_world(*a, **k))[1]  # widen the race window
go = Path(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
tw.ensure_toy_world(sys.argv[2], tw.ToyWorldSpec(**json.loads(sys.argv[3])), num_workers=1)
"""


def test_concurrent_ensure_calls_from_two_processes_generate_one_world(tmp_path: Path) -> None:
    root, go = tmp_path / "data" / "toy_world", tmp_path / "go"
    args = [sys.executable, "-c", _CHILD, str(REPO_ROOT), str(root), json.dumps(MINI), str(go)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        logs.append(err)
    assert sum("generated toy world at" in log for log in logs) == 1, logs
    assert sum("by another process" in log and "waiting for another process" in log for log in logs) == 1, (
        logs
    )
    meta = json.loads((root / "toy_world.json").read_text())
    assert meta["spec_hash"] == ToyWorldSpec(**MINI).spec_hash()
    assert meta["content_hash"] == tw_writer._content_hash(root)
    assert siblings(root) == []


def test_interrupted_generation_leaves_no_partial_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run, calls = tw_writer._run_task, []

    def crash_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tw_writer, "_run_task", crash_midway)
    root = tmp_path / "toy_world"
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_toy_world(root, ToyWorldSpec(**MINI), num_workers=1)
    assert not root.exists() and siblings(root) == []

    # A crash while replacing an older world keeps the older world, complete.
    monkeypatch.setattr(tw_writer, "_run_task", real_run)
    generate_toy_world(root, ToyWorldSpec(**MINI), num_workers=1)
    before = tree_bytes(root)
    calls.clear()
    monkeypatch.setattr(tw_writer, "_run_task", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_toy_world(root, ToyWorldSpec(**{**MINI, "seed": 9}), num_workers=1)
    assert tree_bytes(root) == before and siblings(root) == []


def test_refuses_to_replace_a_directory_that_is_not_a_toy_world(tmp_path: Path) -> None:
    root = tmp_path / "precious"
    root.mkdir()
    (root / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a toy world"):
        ensure_toy_world(root, ToyWorldSpec(**MINI), num_workers=1)
    assert (root / "thesis.tex").read_text() == "do not delete"


def test_spec_rejects_sizes_the_generators_cannot_make() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        ToyWorldSpec(image_size=60)
    with pytest.raises(ValueError, match="generators"):
        ToyWorldSpec(generators=("toy_gan", "dalle"))
    assert ToyWorldSpec(generators=["toy_ldm"]).generators == ("toy_ldm",)  # configs pass lists


def test_cli_generates_and_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cli_world"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in MINI.items()]
    assert tw.main(["--root", str(root), "--workers", "1", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["images"] == len(CATALOGUE) + 2 * 2 * 2
    assert out["spec_hash"] == ToyWorldSpec(**MINI).spec_hash() and out["seconds"] >= 0


# --- the fake generators' fingerprints -------------------------------------------------------------------


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float64).mean(-1)


def high_frequency_ratio(img: Image.Image) -> float:
    """Share of the spectral energy above 1/4 cycle/pixel (DC and the lowest frequencies excluded)."""
    g = _grey(img)
    power = np.abs(np.fft.fft2(g - g.mean())) ** 2
    f = np.fft.fftfreq(g.shape[0])
    radius = np.hypot(f[:, None], f[None, :])
    return float(power[radius > 0.25].sum() / power[radius > 0.02].sum())


def periodic_peak_ratio(images: list[Image.Image], period: int) -> float:
    """Mean spectral power at the harmonics of `period` over the median power, in the images' mean spectrum.

    A fixed pattern repeating every `period` pixels (an upsampler's checkerboard, a decoder's grid) puts
    energy exactly at multiples of 1/period cycle/pixel; natural content spreads it (ratio ~1).
    """
    n = images[0].size[0]
    power = np.mean([np.abs(np.fft.fft2(_grey(im) - _grey(im).mean())) ** 2 for im in images], axis=0)
    harmonics = np.zeros((n, n), bool)
    harmonics[:: n // period, :: n // period] = True
    harmonics[0, 0] = False
    f = np.fft.fftfreq(n)
    high = np.hypot(f[:, None], f[None, :]) > 0.1
    return float(power[harmonics & high].mean() / np.median(power[high & ~harmonics]))


def test_fake_generators_leave_measurable_spectral_fingerprints() -> None:
    size, images = 128, {"real": [], "toy_gan": [], "toy_ldm": []}
    for i in range(6):
        scene = sample_scene(CATALOGUE[i * 4], np.random.default_rng(300 + i))
        images["real"].append(render_scene(scene, size)[0])
        images["toy_gan"].append(tw.render_toy_gan(scene, size))
        images["toy_ldm"].append(tw.render_toy_ldm(scene, size))
    for name, imgs in images.items():
        assert all((im.mode, im.size) == ("RGB", (size, size)) for im in imgs), name
    # toy_ldm loses the top octave: far less energy above 1/4 cycle/pixel, image by image (same scenes).
    for real, ldm in zip(images["real"], images["toy_ldm"]):
        assert high_frequency_ratio(ldm) < 0.5 * high_frequency_ratio(real)
    # toy_gan's upsampler leaves period-4 peaks, toy_ldm's decoder period-8 ones; the real photos neither.
    real4, real8 = periodic_peak_ratio(images["real"], 4), periodic_peak_ratio(images["real"], 8)
    assert real4 < 20 and real8 < 20, (real4, real8)
    assert periodic_peak_ratio(images["toy_gan"], 4) > 10 * real4
    assert periodic_peak_ratio(images["toy_ldm"], 8) > 10 * real8


def test_toy_generators_make_new_annotated_scenes() -> None:
    st = CATALOGUE[5]
    for name, generate in TOY_GENERATORS.items():
        img, boxes, phrases, caption = generate(np.random.default_rng(0), st, 64)
        assert (img.mode, img.size) == ("RGB", (64, 64)), name
        assert phrases[0] == f"{st.part_type} valve" and all(p in caption for p in phrases)
        assert len(boxes) == len(phrases)


def test_default_world_renders_fast_enough_per_image() -> None:
    """Guards the < 40 s budget of the default world (736 images on 2 cores) against slow drawing code."""
    scenes = [sample_scene(st, np.random.default_rng(i)) for i, st in enumerate(CATALOGUE[:6])]
    t0 = time.process_time()
    for scene in scenes:
        render_scene(scene, 256)
    per_image = (time.process_time() - t0) / len(scenes)
    assert per_image < 0.2, per_image
