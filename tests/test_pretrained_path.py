"""The pretrained path, executed: every shipped non-tiny config through the real CLI with `preset: pretrained`,
loading its models by their registry ids from the hub-shaped fixture cache (tests/hub_cache.py), offline.

Nothing here switches a code path: the overrides only point the data at the small toy world and shrink sizes
(image size, batch size, steps), as `tests/cli_helpers.tiny_overrides` does for the tiny runs, minus the preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import (
    COMMAND_OVERRIDES,
    CONFIGS,
    command_configs,
    command_of,
    experiment_configs,
    run_cli,
    tiny_overrides,
)
from tests.hub_cache import TOO_LARGE

CPU = CONFIGS / "trainer" / "cpu.yaml"

# Configs whose models are only in the `full` fixture tier (real timm / open_clip architectures): slow.
FULL_TIER = {
    "inpaint_probe/resnet50.yaml",
    "inpaint_probe/cnndetection.yaml",  # ImageNet ResNet-50
    "inpaint_probe/vgg16.yaml",
    "inpaint_probe/partial_conv.yaml",
    "item_detector/clip_rn50.yaml",
    "fg_guidance/subtype_resnet101.yaml",
}
# Run in `make test` (a few seconds each); the rest of the light tier is slow-marked to keep the suite's budget.
FAST = {
    "item_detector/item_vitl14.yaml",
    "inpaint_probe/diffusion_inpaint.yaml",
    "inpaint_probe/efficientnet_b0.yaml",
}


def _name(config: Path) -> str:
    return str(config.relative_to(CONFIGS))


def _is_tiny(config: Path) -> bool:
    return "tiny" in config.stem


def _uses_too_large_model(config: Path) -> bool:
    text = config.read_text()
    return any(name in text for name in TOO_LARGE)


def pretrained_configs() -> list:
    """Every shipped non-tiny experiment config, marked by the tier it needs."""
    params = []
    for config in experiment_configs():
        if _is_tiny(config) or _uses_too_large_model(config):
            continue
        slow = _name(config) in FULL_TIER or _name(config) not in FAST
        params.append(pytest.param(config, id=_name(config), marks=[pytest.mark.slow] if slow else []))
    return params


def pretrained_overrides(config: Path, toy: Path, run_root: Path) -> list[str]:
    """The tiny runs' data and size overrides with the preset left as the config says (pretrained)."""
    args = [a for a in tiny_overrides(config, toy) if not a.endswith(".preset=tiny")]
    data_class = yaml.safe_load(config.read_text())["data"]["class_path"]
    if data_class.endswith(
        "ItemFeatures"
    ):  # one cache for the pretrained-path runs, apart from the tiny runs'
        args = [a for a in args if "cache_dir=" not in a] + [
            f"--data.init_args.cache_dir={toy.parent / 'item_cache_pt'}"
        ]
    return [*args, f"--run.root={run_root}", "--run.wandb=false"]


def _fit(config: Path, toy: Path, run_root: Path, *extra: str) -> tuple[int, str, str]:
    args = [
        "fit",
        "--config",
        str(CPU),
        "--config",
        str(config),
        *pretrained_overrides(config, toy, run_root),
    ]
    return run_cli([*args, *extra])


def _check_models_came_from_the_fixture(config: Path, cache: Path) -> None:
    """`forgelab weights` on the same config finds every model it needs in the fixture cache."""
    trainer = [] if command_of(config) else ["--config", str(CPU)]  # project commands take no trainer preset
    code, out, err = run_cli(["weights", *trainer, "--config", str(config)])
    assert code == 0, out + err
    assert "MISSING" not in out
    if "load no pretrained weights" not in out:  # e.g. DeepFill v2, trained from scratch (preset random)
        assert str(cache) in out and "cached (" in out


@pytest.mark.parametrize("config", pretrained_configs())
def test_every_pretrained_config_fits_from_the_hub_shaped_cache(
    config, small_toy_world, offline_hub, tmp_path, request
):
    tier = "hub_cache_full" if _name(config) in FULL_TIER else "hub_cache"
    cache = offline_hub(request.getfixturevalue(tier))
    code, _out, err = _fit(config, small_toy_world, tmp_path, "--trainer.fast_dev_run=true")
    assert code == 0, err
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    record = json.loads((run / "run.json").read_text())
    assert record["outcome"] == "completed"
    _check_models_came_from_the_fixture(config, cache)


@pytest.mark.slow
def test_extract_command_reads_the_pretrained_models_from_the_cache(
    small_toy_world, hub_cache, offline_hub, tmp_path
):
    offline_hub(hub_cache)
    config = CONFIGS / "item_detector" / "item_vitl14.yaml"
    overrides = [
        a for a in pretrained_overrides(config, small_toy_world, tmp_path) if not a.startswith("--run.")
    ]
    overrides = [a for a in overrides if "cache_dir=" not in a] + [
        f"--data.init_args.cache_dir={tmp_path / 'cache'}"
    ]
    run = json.dumps({"project": "item_detector", "root": str(tmp_path / "runs")})
    code, _out, err = run_cli(
        ["extract", "--config", str(config), *overrides, f"--run={run}", "--splits=[train]"]
    )
    assert code == 0, err
    (manifest,) = (tmp_path / "cache").rglob("manifest.json")
    assert json.loads(manifest.read_text())  # entries were written for the extracted images
    assert list((tmp_path / "runs" / "item_detector").glob("*/extract_report.json"))


def _probe_pretrained_overrides(config: Path, toy: Path, checkpoints: dict[str, Path]) -> list[str]:
    """The tiny probe's overrides, except that the diffusion inpainter keeps the config's id and preset and FID uses
    the config's features (torch-fidelity's Inception-v3 from the fixture's torch hub folder)."""
    probe = yaml.safe_load(config.read_text())["probe"]
    inpainters = []
    for spec in probe["inpainters"]:
        if spec["kind"] == "diffusion":
            spec = {**spec, "steps": 1}
        else:
            spec = {**spec, "checkpoint": str(checkpoints[spec["kind"]])}
        inpainters.append(spec)
    args = COMMAND_OVERRIDES["probe"](config, toy, checkpoints)
    args = [a for a in args if not a.startswith(("--probe.inpainters=", "--probe.fid.features="))]
    return [*args, f"--probe.inpainters={json.dumps(inpainters)}"]


@pytest.mark.parametrize(
    "config",
    [c for c in command_configs() if not _is_tiny(c)],
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_every_pretrained_command_config_runs_from_the_hub_shaped_cache(
    config, small_toy_world, tiny_inpainter_checkpoints, hub_cache, offline_hub, tmp_path
):
    offline_hub(hub_cache)
    command = command_of(config)
    overrides = _probe_pretrained_overrides(config, small_toy_world, tiny_inpainter_checkpoints)
    code, _out, err = run_cli([command, "--config", str(config), *overrides, f"--run.root={tmp_path}"])
    assert code == 0, err
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    report = json.loads((run / "report.json").read_text())
    assert report
    # SD 2 inpainting's own scheduler (the fixture mirrors its config) decides the prediction type
    assert report["prediction_types"] == {"sd2_inpainting": "epsilon"}
    if yaml.safe_load(config.read_text())["probe"]["fid"]["features"] == "inception":
        assert "Inception" in json.dumps(report)  # the real FID features, not the substitute
    _check_models_came_from_the_fixture(config, hub_cache)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [c for c in experiment_configs() if _uses_too_large_model(c)],
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_too_large_architectures_build_and_run_one_forward_at_the_paper_size(config):
    """ConvNeXt-XL (350M parameters) is not written to the fixture: the config's own module is built with the
    real architecture and random weights (preset random, the same class and head code) and run once at the
    config's input size."""
    import torch

    data = yaml.safe_load(config.read_text())
    model_spec = data["model"]
    model_spec["init_args"] = {**model_spec["init_args"], "preset": "random"}
    module_class = __import__(model_spec["class_path"].rsplit(".", 1)[0], fromlist=["x"])
    cls = getattr(module_class, model_spec["class_path"].rsplit(".", 1)[1])
    module = cls(**model_spec["init_args"]).eval()
    size = data["data"]["init_args"]["image_size"]
    with torch.inference_mode():
        logits = module(torch.rand(1, 3, size, size))
    assert logits.shape[0] == 1 and torch.isfinite(logits).all()
    assert sum(p.numel() for p in module.parameters()) > 300e6  # the real ConvNeXt-XL, not a small stand-in


def _fine_grained_generator_config() -> Path:
    """The shipped paper-scale generator config (the FineGrainedGuidance module, not the tiny one)."""
    (config,) = [
        c
        for c in experiment_configs()
        if not _is_tiny(c)
        and yaml.safe_load(c.read_text())["model"]["class_path"].endswith("FineGrainedGuidance")
    ]
    return config


@pytest.mark.slow
def test_fine_grained_pipeline_fit_augment_table1_on_pretrained_weights(
    small_toy_world, hub_cache_full, offline_hub, tmp_path
):
    """Sec. 3-4 and Table 1 on the pretrained path: the generator (SD, CLIP f/g, BLIP from the cache) trains a
    step and exports; `forgelab augment` reloads it by its saved hub ids; `forgelab fg-table1` trains both
    subtype classifiers (ResNet-101 from timm's hub layout, FineLIP on CLIP ViT-B/16) with and without it."""
    cache = offline_hub(hub_cache_full)
    config = _fine_grained_generator_config()
    code, _out, err = _fit(
        config,
        small_toy_world,
        tmp_path,
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--run.name=gen",
    )
    assert code == 0, err
    generator = tmp_path / "fg_guidance" / "gen" / "generator"
    spec = json.loads(next(generator.glob("*.json")).read_text())
    assert "pretrained" in json.dumps(spec)  # the exported generator names its base model, not a tiny preset
    manifest = small_toy_world / "parts" / "manifest.jsonl"
    augmented = tmp_path / "aug"
    code, _out, err = run_cli(
        [
            "augment",
            f"--generator={generator}",
            f"--manifest={manifest}",
            f"--out={augmented}",
            "--limit=2",
            "--steps=2",
        ]
    )
    assert code == 0, err
    code, out, err = run_cli(
        [
            "fg-table1",
            f"--augmented={augmented / 'manifest.jsonl'}",
            f"--trainer={CPU}",
            f"--root={tmp_path}",
            "--name=table1",
            "--seeds=0",
            "--no-wandb",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--data.init_args.toy_world=null",
            f"--data.init_args.manifest={manifest}",
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
        ]
    )
    assert code == 0, out + err
    table = (tmp_path / "fg_guidance" / "table1" / "table1.md").read_text()
    assert "ResNet-101" in table and "FineLIP" in table
    _check_models_came_from_the_fixture(config, cache)
