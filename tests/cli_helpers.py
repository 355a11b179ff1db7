"""Running shipped configs through the real `forgelab` entry point on tiny presets and the small toy world."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from common.experiment.cli import main
from common.io import write_text
from tests.conftest import REPO

CONFIGS = REPO / "configs"
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def is_overlay(path: Path) -> bool:
    """Trainer presets, data overlays, sweep files, benchmark files and table specs go with experiment configs; they
    are not one."""
    relative = path.relative_to(CONFIGS).parts
    return (
        relative[0] in ("trainer", "sweeps", "benchmarks")
        or "data" in relative[:-1]
        or "tables" in relative[:-1]
    )


def command_of(path: Path) -> str | None:
    """The `forgelab <command>` a YAML is for when it is not a LightningCLI config (top-level `command:` key)."""
    return (yaml.safe_load(path.read_text()) or {}).get("command")


def experiment_configs() -> list[Path]:
    """LightningCLI experiment configs (`forgelab fit|validate|test|predict --config ...`)."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if not is_overlay(p) and command_of(p) is None)


def command_configs() -> list[Path]:
    """Configs of project commands (`forgelab <command> --config ...`), e.g. the inpainting probe."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if not is_overlay(p) and command_of(p) is not None)


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


def item_subset(toy: Path, per_label: int = 1) -> Path:
    """Manifests of the small toy world cut to `per_label` real + generated images per generator and split
    (with captions and boxes, for the `dataset` oracle), written once next to it: every ITEM config extracts
    its frozen features in the CLI tests, so fewer images keep those tests within budget."""
    out = toy.parent / f"item_subset_{per_label}"
    if (out / "test.jsonl").is_file():
        return out
    out.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        rows, seen = [], Counter()
        for line in (toy / "realfake" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if seen[(row["generator"], row["label"])] < per_label:
                seen[(row["generator"], row["label"])] += 1
                rows.append(json.dumps(row | {"path": str(toy / "realfake" / row["path"])}))
        write_text(out / f"{split}.jsonl", "\n".join(rows) + "\n")
    return out


def _item_overrides(toy: Path) -> list[str]:
    """ITEM's frozen stage on a few images of the small toy world (`item_subset`), tiny models, short captions,
    clean test images only (the Fig. 4 grid's tests add it back), and one feature cache shared by every ITEM
    config of the session (configs with the same frozen stage reuse its entries)."""
    subset = item_subset(toy)  # 4 images per split: one real and one generated per generator
    return [
        "--data.init_args.toy_world=null",
        f"--data.init_args.train_root={subset / 'train.jsonl'}",
        f"--data.init_args.val_root={subset / 'val.jsonl'}",
        f"--data.init_args.test_root={subset / 'test.jsonl'}",
        f"--data.init_args.cache_dir={toy.parent / 'item_cache'}",
        "--data.init_args.preset=tiny",
        "--data.init_args.device=cpu",
        "--data.init_args.dtype=float32",
        "--data.init_args.captioner.max_new_tokens=8",
        "--data.init_args.extract_batch_size=32",
        "--data.init_args.extract_workers=0",
        "--data.init_args.batch_size=8",
        "--data.init_args.test_perturbations=[none]",
    ]


def _captioned_overrides(toy: Path) -> list[str]:
    return [
        "--data.init_args.toy_world=null",
        f"--data.init_args.manifest={toy / 'parts' / 'manifest.jsonl'}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
    ]


def _inpainting_overrides(toy: Path) -> list[str]:
    parts = toy / "parts"
    return [
        "--data.init_args.toy_world=null",
        f"--data.init_args.train_root={parts / 'train'}",
        f"--data.init_args.val_root={parts / 'val'}",
        f"--data.init_args.test_root={parts / 'test'}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--data.init_args.num_workers=0",
    ]


# datamodule class_path -> CLI overrides pointing it at the small toy world with cheap settings
DATA_OVERRIDES: dict[str, Callable[[Path], list[str]]] = {
    "common.data.RealFakeFolder": _realfake_overrides,
    "projects.inpaint_probe.offline_augment.OfflineAugmentedRealFake": lambda toy: [
        *_realfake_overrides(toy),
        f"--data.init_args.offline_augment.cache_dir={toy.parent / 'offline_augment'}",
    ],
    "projects.item_detector.data.ItemFeatures": _item_overrides,
    "common.data.CaptionedParts": _captioned_overrides,
    "common.data.captioned.CaptionedParts": _captioned_overrides,
    "projects.fg_guidance.data.FineGrainedPairs": _captioned_overrides,
    "projects.inpaint_probe.data.InpaintingImages": _inpainting_overrides,
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


def _probe_overrides(config: Path, toy: Path, checkpoints: dict[str, Path]) -> list[str]:
    """The probe on the small toy world: its sets moved there, 2 images of 32 px, substitute FID features,
    tiny diffusion (1 step), no plots (tests/test_inpaint_probe.py checks them), and the tiny inpainter
    checkpoints (by kind) trained by the test session."""
    probe = yaml.safe_load(config.read_text())["probe"]
    sets = [
        {**s, "roots": [r.replace("data/toy_world", str(toy), 1) for r in s["roots"]]} for s in probe["sets"]
    ]
    inpainters = []
    for spec in probe["inpainters"]:
        if spec["kind"] == "diffusion":
            spec = {**spec, "preset": "tiny", "model_id": None, "steps": 1, "guidance_scale": 1.0}
        else:
            spec = {**spec, "checkpoint": str(checkpoints[spec["kind"]])}
        inpainters.append(spec)
    return [
        f"--probe.sets={json.dumps(sets)}",
        f"--probe.inpainters={json.dumps(inpainters)}",
        "--probe.toy_world=null",
        "--probe.n_images=2",
        "--probe.image_size=32",
        "--probe.batch_size=2",
        "--probe.fid.features=substitute",
        "--probe.plots=false",
        "--probe.save_results=false",
    ]


# command -> CLI overrides for a config of that command (config, small toy world, tiny inpainter checkpoints)
COMMAND_OVERRIDES: dict[str, Callable[[Path, Path, dict[str, Path]], list[str]]] = {
    "probe": _probe_overrides,
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


def kill_one_spawned_rank(parent: subprocess.Popen[bytes]) -> None:
    """SIGKILL the last rank a `ddp_spawn` launcher (`parent`) started, then wait for the launcher to end the
    other ranks and fail (the kill tests of the distributed jobs)."""
    import os
    import signal

    import psutil

    children = psutil.Process(parent.pid).children(recursive=True)
    ranks = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(ranks) >= 2, [p.cmdline() for p in children]
    os.kill(ranks[-1].pid, signal.SIGKILL)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode != 0, stderr.decode()[-2000:]
