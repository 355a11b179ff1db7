"""`forgelab probe` (paper 003 Table 2, Figs. 1-4) through the real CLI, and its FID against torchmetrics."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from common.errors import ConfigError
from projects.inpaint_probe.fid import (
    NOT_COMPARABLE,
    FIDWeightsMissing,
    RandomConvFeatures,
    build_feature_extractor,
    extract_features,
    frechet_distance,
)
from tests.cli_helpers import CONFIGS, run_cli
from tests.conftest import write_rgb

PROBE_TINY = CONFIGS / "inpaint_probe" / "probe_tiny.yaml"


# --- FID ----------------------------------------------------------------------------------------------------------


class _PassThrough(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(("n_real", "n_fake", "d"), [(10, 12, 64), (120, 90, 16)])
def test_frechet_distance_equals_torchmetrics_fid_on_the_same_features(n_real, n_fake, d):
    generator = torch.Generator().manual_seed(n_real)
    real = torch.randn(n_real, d, generator=generator, dtype=torch.float64)
    fake = torch.randn(n_fake, d, generator=generator, dtype=torch.float64) * 1.3 + 0.2
    metric = FrechetInceptionDistance(feature=_PassThrough(d))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_frechet_distance_matches_the_textbook_formula_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.tensor(real), torch.tensor(fake)) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_needs_two_samples():
    features = torch.randn(6, 32, dtype=torch.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(frechet_distance(features[:1], features))


def test_frechet_distance_is_nan_below_the_minimum_count():
    features = torch.randn(5, 8, dtype=torch.float64)
    assert math.isfinite(frechet_distance(features, features * 2))
    assert math.isnan(frechet_distance(features, features * 2, min_samples=6))
    assert math.isfinite(frechet_distance(features, features * 2, min_samples=5))


def test_bucket_cells_name_the_distance_and_are_nan_below_the_floor():
    from projects.inpaint_probe.probe import Scores, bucket_table_rows

    rows = [
        {"inpainter": "p", "set": "s", "real": True, "bucket": "0-10%", "niqe": 1.0, "niqe_original": 1.0}
        | {"hole_l1": 0.1, "psnr": 20.0}
        for _ in range(4)
    ]
    features = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    original, result = Scores(features, [1.0] * 4), Scores(features + 1, [1.0] * 4)
    edges = [0.0, 0.1, 1.0]
    (cell, _all) = bucket_table_rows(rows, original, result, edges, "fd_randconv", min_images=5)
    assert "fid" not in cell and math.isnan(cell["fd_randconv"])
    (cell, _all) = bucket_table_rows(rows, original, result, edges, "fd_randconv", min_images=4)
    assert cell["fd_randconv"] == pytest.approx(frechet_distance(features, features + 1))


def test_fid_without_inception_weights_falls_back_to_a_named_substitute(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    extractor, info = build_feature_extractor("auto")
    assert isinstance(extractor, RandomConvFeatures)
    assert info.name == "random_conv_features_seed0" and not info.comparable
    assert (info.metric, info.label, info.dim) == ("fd_randconv", "FD_randconv", 992)
    assert info.min_images(None) == 993 and info.min_images(10) == 10
    with pytest.raises(
        FIDWeightsMissing, match=r"weights-inception-2015-12-05.*--probe.fid.features=substitute"
    ):
        build_feature_extractor("inception")
    with pytest.raises(ConfigError, match="does not exist"):
        build_feature_extractor("inception", str(tmp_path / "missing.pth"))


def test_inception_weight_files_that_need_code_to_load_are_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv": functools.partial(print, "pickled code")}, path)
    with pytest.raises(ConfigError, match="not a plain state dict"):
        build_feature_extractor("inception", str(path))


def test_substitute_features_are_deterministic_and_see_blur():
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first = extract_features(RandomConvFeatures(), images)
    assert first.shape == (4, 992) and torch.equal(first, extract_features(RandomConvFeatures(), images))
    blurred = torch.nn.functional.avg_pool2d(images, 5, 1, 2)
    assert (extract_features(RandomConvFeatures(), blurred) - first).abs().mean() > 0.05 * first.abs().mean()


# --- the probe through the CLI --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 192 px real renders and three toy_gan images (NIQE's minimum size), plus bad files in the real set."""
    from common.data.toy_world import CATALOGUE, render_scene, render_toy_gan, sample_scene

    root = tmp_path_factory.mktemp("probe_sets")
    (root / "real").mkdir()
    (root / "gan").mkdir()
    for i in range(3):
        image, *_ = render_scene(sample_scene(CATALOGUE[i], np.random.default_rng(i)), 192, supersample=1)
        image.save(root / "real" / f"r{i}.png")
        fake = render_toy_gan(
            sample_scene(CATALOGUE[i + 5], np.random.default_rng(10 + i)), 192, supersample=1
        )
        fake.save(root / "gan" / f"g{i}.png")
    (root / "real" / "a_truncated.png").write_bytes((root / "real" / "r0.png").read_bytes()[:200])
    write_rgb(root / "real" / "b_small.png", size=(100, 100))
    return root


def _probe_args(
    sets: Path,
    checkpoints: dict[str, Path],
    run_root: Path,
    *extra: str,
    kinds=("partial_conv", "gated_conv"),
) -> list[str]:
    probe_sets = [
        {"name": "real", "roots": [str(sets / "real")], "real": True},
        {"name": "gan", "roots": [str(sets / "gan")]},
    ]
    inpainters = [{"name": kind, "kind": kind, "checkpoint": str(checkpoints[kind])} for kind in kinds]
    return [
        "probe",
        "--config",
        str(PROBE_TINY),
        f"--probe.sets={json.dumps(probe_sets)}",
        "--probe.toy_world=null",
        "--probe.n_images=3",
        "--probe.image_size=192",
        "--probe.batch_size=2",
        "--probe.fid.features=substitute",
        f"--probe.inpainters={json.dumps(inpainters)}",
        f"--run.root={run_root}",
        "--run.name=probe",
        *extra,
    ]


def test_probe_writes_table2_per_image_rows_quadruples_and_counts_bad_files(
    probe_sets, tiny_inpainter_checkpoints, tmp_path
):
    code, out, err = run_cli(_probe_args(probe_sets, tiny_inpainter_checkpoints, tmp_path))
    assert code == 0, err
    run = tmp_path / "inpaint_probe" / "probe"
    table = (run / "table2.md").read_text()
    # the substitute's distance is never called FID, anywhere
    assert "FID ↓" not in table and "| real: real FD_randconv ↓" in table and "NIQE ↓" in table
    assert "All images" in table and NOT_COMPARABLE in table and table.strip() in out
    rows = list(csv.DictReader((run / "table2.csv").open()))
    assert "fid" not in rows[0] and "fd_randconv" in rows[0]
    overall = [r for r in rows if r["bucket"] == "all"]
    assert {(r["inpainter"], r["set"]) for r in overall} == {
        (i, s) for i in ("partial_conv", "gated_conv") for s in ("real", "gan")
    }
    # 3 images in 992 dimensions: below the default floor (d + 1), so n/a, not a number
    assert all(
        r["n"] == "3" and math.isnan(float(r["fd_randconv"])) and float(r["niqe"]) > 0 for r in overall
    )
    assert "| All images | 3 | n/a |" in table and "fewer than 993 images" in table
    per_image = list(csv.DictReader((run / "per_image.csv").open()))
    assert len(per_image) == 2 * 2 * 3
    for index in ("1", "2", "3"):  # image i of every set got mask i
        assert len({r["hole_ratio"] for r in per_image if r["image"] == index}) == 1
    assert all(math.isfinite(float(r["niqe"])) for r in per_image)
    assert "Image1" in (run / "table2_per_image.md").read_text()
    for name in ("quadruples_partial_conv_real", "quadruples_gated_conv_gan", "niqe_vs_hole_ratio"):
        assert Image.open(run / "plots" / f"{name}.png").size[0] > 0
    assert len(list((run / "results" / "gated_conv" / "gan").glob("*.png"))) == 3
    health = json.loads((run / "data_health.json").read_text())["counts"]
    assert health["decoding"] == {"truncated": 1, "smaller_than_image_size": 1}
    report = json.loads((run / "report.json").read_text())
    assert report["frechet_distance"]["comparable"] is False and report["n_images_per_set"] == 3
    assert (
        report["frechet_distance"]["metric"] == "fd_randconv"
        and report["frechet_distance"]["min_images"] == 993
    )
    assert "fid" not in json.dumps(report["frechet_distance"]).replace("fidelity", "")
    assert set(report["inpainting_images_per_second"]) == {"partial_conv", "gated_conv"}


def test_probe_masks_from_files_handle_wrong_size_and_count_unusable_ones(
    probe_sets, tiny_inpainter_checkpoints, tmp_path
):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((192, 192), np.uint8)).save(masks / "0_empty.png")
    Image.fromarray(np.full((192, 192), 255, np.uint8)).save(masks / "1_full.png")
    small = np.zeros((96, 96), np.uint8)
    small[20:50, 30:70] = 255
    Image.fromarray(small).save(masks / "2_small.png")
    args = [
        f"--probe.mask_dir={masks}",
        "--probe.save_results=false",
        "--probe.image_size=64",
        "--probe.fid.min_images=2",  # a deliberately lowered floor gives numbers again
    ]
    code, _, err = run_cli(
        _probe_args(probe_sets, tiny_inpainter_checkpoints, tmp_path / "runs", *args, kinds=("partial_conv",))
    )
    assert code == 0, err
    run = tmp_path / "runs" / "inpaint_probe" / "probe"
    counts = json.loads((run / "data_health.json").read_text())["counts"]
    assert counts["masks"] == {"empty": 1, "full": 1, "resized": 1}
    assert counts["niqe"] == {"smaller_than_192px": 12}  # 64 px crops: 2 sets x (3 originals + 3 results)
    ratios = {float(row["hole_ratio"]) for row in csv.DictReader((run / "per_image.csv").open())}
    (ratio,) = ratios  # the one usable mask, resized to 64 px and reused for every image
    assert ratio == pytest.approx(30 * 40 / 96**2, abs=0.01)
    overall = [r for r in csv.DictReader((run / "table2.csv").open()) if r["bucket"] == "all"]
    assert overall and all(float(r["fd_randconv"]) >= 0 for r in overall)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--probe.checkpoints.partial_conv=/nonexistent/last.ckpt"], "does not exist"),
        (["--probe.fid.features=inception"], "weights-inception-2015-12-05"),
        (["--probe.n_images=0"], "n_images must be >= 1"),
        (["--probe.fid.min_images=1"], "min_images must be >= 2"),
        (["--probe.checkpoints.nope=/x.ckpt"], "unknown inpainters"),
    ],
)
def test_probe_user_errors_are_one_clear_line(
    probe_sets, tiny_inpainter_checkpoints, tmp_path, monkeypatch, extra, message
):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    code, _, err = run_cli(_probe_args(probe_sets, tiny_inpainter_checkpoints, tmp_path, *extra))
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_probe_refuses_a_checkpoint_of_another_model(probe_sets, tiny_inpainter_checkpoints, tmp_path):
    wrong = f"--probe.checkpoints.partial_conv={tiny_inpainter_checkpoints['gated_conv']}"
    code, _, err = run_cli(_probe_args(probe_sets, tiny_inpainter_checkpoints, tmp_path, wrong))
    assert code == 2 and "is not a PartialConvInpainter checkpoint" in err


def test_probe_loads_a_deepfill_checkpoint_trained_with_preset_pretrained_and_checkpoint_path(tmp_path):
    """The workflow DeepFill v2's own error recommends (`preset: pretrained` + converted weights as
    `checkpoint_path`) gives checkpoints the probe must load, wherever the converted file is by then."""
    from projects.inpaint_probe.inpainters import DeepFillV2Inpainter
    from projects.inpaint_probe.probe import InpainterSpec, build_inpainter

    converted = tmp_path / "converted.pt"
    torch.save(DeepFillV2Inpainter(preset="tiny", width=4).generator.state_dict(), converted)
    module = DeepFillV2Inpainter(preset="pretrained", width=4, disc_width=8, checkpoint_path=str(converted))
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, checkpoint)
    converted.unlink()  # the probe reads every weight from the checkpoint, not from checkpoint_path

    loaded = build_inpainter(InpainterSpec(name="g", kind="gated_conv"), str(checkpoint), torch.device("cpu"))
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image, hole = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    hole[..., 8:20, 8:20] = 1.0
    assert torch.allclose(loaded.inpaint(image, hole), module.eval().inpaint(image, hole))


@pytest.mark.slow
def test_probe_on_two_ranks_writes_the_single_process_results(
    probe_sets, tiny_inpainter_checkpoints, tmp_path
):
    """`--config configs/trainer/ddp_sim.yaml`: two CPU processes each inpaint whole batches (3 images, batches of
    2: one each); rank 0 scores. Composites are bitwise, tables and per-image rows equal to one process's (both
    at one torch thread, as each ddp_sim rank runs)."""
    ddp_sim = CONFIGS / "trainer" / "ddp_sim.yaml"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tmp_path / "one"
        code, _, err = run_cli(_probe_args(probe_sets, tiny_inpainter_checkpoints, one))
        assert code == 0, err
        two = tmp_path / "two"
        code, _, err = run_cli(
            [*_probe_args(probe_sets, tiny_inpainter_checkpoints, two), "--config", str(ddp_sim)]
        )
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    a, b = one / "inpaint_probe" / "probe", two / "inpaint_probe" / "probe"
    assert json.loads((b / "run.json").read_text())["ranks"] == 2
    assert (a / "table2.csv").read_text() == (b / "table2.csv").read_text()
    assert (a / "per_image.csv").read_text() == (b / "per_image.csv").read_text()
    composites = sorted(p.relative_to(a) for p in (a / "results").rglob("*.png"))
    assert len(composites) == 2 * 2 * 3
    for path in composites:
        assert np.array_equal(np.asarray(Image.open(a / path)), np.asarray(Image.open(b / path))), path
