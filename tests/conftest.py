"""Shared fixtures. Tests never touch the network or W&B servers and run on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_main_port():
    """Each test's DDP run picks its own free port: Lightning stores the one it picks in MASTER_PORT of the
    process that launches, and a later in-process run (or a subprocess inheriting it) would reuse a port a
    killed run's processes may still hold."""
    os.environ.pop("MASTER_PORT", None)
    yield
    os.environ.pop("MASTER_PORT", None)


def write_rgb(path: Path, size: tuple[int, int] = (40, 32), seed: int = 0, fmt: str | None = None) -> Path:
    """A small random RGB image on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def realfake_root(tmp_path: Path) -> Path:
    """<root>/<generator>/0_real|1_fake with 6 + 6 images for two generators, one with a class level."""
    root = tmp_path / "rf"
    seed = 0
    for generator, cls in (("gan", None), ("ldm", "cat")):
        for label_dir in ("0_real", "1_fake"):
            for i in range(6):
                parts = [generator] + ([cls] if cls else []) + [label_dir, f"img.{i}.v2.png"]
                write_rgb(root.joinpath(*parts), seed=seed)
                seed += 1
    return root


# One small world for every test that needs the toy world's layout (64 px, a few images per class).
SMALL_TOY_SPEC_KWARGS: dict = {
    "image_size": 64,
    "supersample": 1,
    "parts_train": 2,
    "parts_val": 1,
    "parts_test": 1,
    "realfake_train": 8,
    "realfake_val": 4,
    "realfake_test": 4,
}


def small_toy_spec():
    from common.data.toy_world import ToyWorldSpec

    return ToyWorldSpec(**SMALL_TOY_SPEC_KWARGS)


@pytest.fixture(scope="session")
def small_toy_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small toy world, generated once per test session."""
    from common.data.toy_world import generate_toy_world

    return generate_toy_world(tmp_path_factory.mktemp("toy") / "toy_world", small_toy_spec())


@pytest.fixture(scope="session")
def tiny_inpainter_checkpoints(
    small_toy_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """kind -> last.ckpt of each tiny inpainter config, trained for 2 steps through the real CLI (once)."""
    from tests.cli_helpers import CONFIGS, run_cli, tiny_overrides

    root = tmp_path_factory.mktemp("inpainters")
    checkpoints = {}
    for kind, name in (("partial_conv", "partial_conv_tiny"), ("gated_conv", "deepfill_v2_tiny")):
        config = CONFIGS / "inpaint_probe" / f"{name}.yaml"
        args = ["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"), "--config", str(config)]
        args += tiny_overrides(config, small_toy_world)
        args += ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--run.test_after_fit=false"]
        args += ["--run.wandb=false", f"--run.root={root}", f"--run.name={kind}"]
        code, _out, err = run_cli(args)
        assert code == 0, err
        checkpoints[kind] = root / "inpaint_probe" / kind / "checkpoints" / "last.ckpt"
    return checkpoints


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    """The hub-shaped cache of small random-weight checkpoints under the registry's ids (tests/hub_cache.py)."""
    from tests.hub_cache import hub_cache as build

    return build("light")


@pytest.fixture(scope="session")
def hub_cache_full() -> Path:
    """The light cache plus the real timm architectures and open_clip's CLIP RN50 (slow tests)."""
    from tests.hub_cache import hub_cache as build

    return build("full")


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch):
    """Point the Hugging Face cache (and torch hub's folder) at a fixture cache, offline: `offline_hub(cache)`."""
    from tests.hub_cache import torch_home

    def use(cache: Path) -> Path:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("TORCH_HOME", str(torch_home(cache)))
        return cache

    return use
