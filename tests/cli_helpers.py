"""Running shipped configs through the real `forgelab` entry point on tiny presets and the small toy world."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import yaml

from common.cli import main
from tests.conftest import REPO

CONFIGS = REPO / "configs"
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def is_overlay(path: Path) -> bool:
    """Trainer presets, data overlays and sweep files stack on an experiment config; they are not one."""
    relative = path.relative_to(CONFIGS).parts
    return relative[0] in ("trainer", "sweeps") or "data" in relative[:-1]


def experiment_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if not is_overlay(p))


def _realfake_overrides(toy: Path) -> list[str]:
    rf = toy / "realfake"
    return [
        "--data.init_args.toy_world=null",
        f"--data.init_args.train_root={rf / 'train'}",
        f"--data.init_args.val_root={rf / 'val'}",
        f"--data.init_args.test_root={rf / 'test'}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ]


def _captioned_overrides(toy: Path) -> list[str]:
    return [
        "--data.init_args.toy_world=null",
        f"--data.init_args.manifest={toy / 'parts' / 'manifest.jsonl'}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ]


# datamodule class_path -> CLI overrides pointing it at the small toy world with cheap settings
DATA_OVERRIDES: dict[str, Callable[[Path], list[str]]] = {
    "common.data.RealFakeFolder": _realfake_overrides,
    "common.data.CaptionedParts": _captioned_overrides,
    "common.data.captioned.CaptionedParts": _captioned_overrides,
    "projects.fg_guidance.data.FineGrainedPairs": _captioned_overrides,
}

# model class_path -> CLI overrides that keep a tiny preset cheap beyond `preset=tiny` (sizes, steps, and no
# fitted base weights: fitting the toy diffusion model takes a minute)
MODEL_OVERRIDES: dict[str, list[str]] = {
    "projects.fg_guidance.module.FineGrainedGuidance": [
        "--model.init_args.base_weights=null",
        "--model.init_args.image_size=32",
        "--model.init_args.num_inference_steps=3",
        "--model.init_args.grad_steps=1",
    ],
}


def tiny_overrides(config: Path, toy: Path) -> list[str]:
    """Arguments that turn a shipped config into a tiny offline run: tiny model preset, small toy world."""
    data = yaml.safe_load(config.read_text())
    args: list[str] = []
    model_args = (data.get("model") or {}).get("init_args") or {}
    if "preset" in model_args:
        args.append("--model.init_args.preset=tiny")
    args += MODEL_OVERRIDES.get((data.get("model") or {}).get("class_path"), [])
    data_class = (data.get("data") or {}).get("class_path")
    if data_class:
        args += DATA_OVERRIDES[data_class](toy)
    return args


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Call the console entry point in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue(), err.getvalue()
