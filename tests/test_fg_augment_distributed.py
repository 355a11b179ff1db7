"""`forgelab augment` on several ranks (`--trainer-config ddp_sim.yaml`: two CPU processes through Lightning
Fabric): the dataset equals one process's (images bitwise, manifest rows in plan order), and a rank killed
mid-run loses no finished image; a rerun on one rank completes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from projects.fg_guidance.augment import main as augment_main
from projects.fg_guidance.cycle import FineGrainedGenerator
from tests.cli_helpers import kill_one_spawned_rank
from tests.conftest import REPO

DDP_SIM = REPO / "configs" / "trainer" / "ddp_sim.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("generator")
    return FineGrainedGenerator(preset="tiny", image_size=32).save(
        root / "g", extra={"num_inference_steps": 6}
    )


def argv(generator: Path, toy: Path, out: Path, *extra: str) -> list[str]:
    # 6 batches of 2: the ranks run one process's batches (Ranks.share_batches), so the arithmetic is the same
    return [
        f"--generator={generator}",
        f"--manifest={toy / 'parts' / 'manifest.jsonl'}",
        f"--out={out}",
        "--limit=12",
        "--batch-size=2",
        *extra,
    ]


def one_thread_augment(args: list[str]) -> None:
    """As each of ddp_sim's two ranks runs on 2 cores: one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        augment_main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process(generator_dir, small_toy_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank") / "aug"
    one_thread_augment(argv(generator_dir, small_toy_world, out))
    return out


def assert_same_dataset(ours: Path, reference: Path) -> None:
    def rows(folder: Path) -> list[dict]:
        lines = (folder / "manifest.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "generation_ms"} for line in lines]

    assert rows(ours) == rows(reference) and len(rows(ours)) == 12  # the same rows, in plan order
    assert not list(ours.glob("manifest.part-*.jsonl"))  # the per-rank manifests were merged and removed
    for row in rows(reference):
        a = np.asarray(Image.open(ours / row["path"]))
        b = np.asarray(Image.open(reference / row["path"]))
        assert np.array_equal(a, b), row["path"]  # bitwise


def test_two_ranks_write_the_single_process_dataset(generator_dir, small_toy_world, single_process, tmp_path):
    out = tmp_path / "aug"
    augment_main(argv(generator_dir, small_toy_world, out, f"--trainer-config={DDP_SIM}"))
    assert_same_dataset(out, single_process)
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["ranks"] == 2 and summary["images"] == 12


def test_a_rank_killed_mid_run_loses_nothing_and_one_rank_completes_it(
    generator_dir, small_toy_world, single_process, tmp_path
):
    out = tmp_path / "aug"
    command = [sys.executable, "-m", "common.experiment.cli", "augment"]
    command += argv(generator_dir, small_toy_world, out, f"--trainer-config={DDP_SIM}")
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    parent = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished: dict[str, bytes] = {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and parent.poll() is None:
            rows = [
                json.loads(line)
                for part in out.glob("manifest.part-*.jsonl")
                for line in part.read_text().splitlines()
            ]
            if len(rows) >= 2:
                finished = {row["path"]: (out / row["path"]).read_bytes() for row in rows}
                break
            time.sleep(0.05)
        assert finished, "no image was finished before the deadline"
        kill_one_spawned_rank(parent)  # one rank dies mid-run; the launcher ends the other
    finally:
        if parent.poll() is None:
            parent.kill()
    done = [
        json.loads(line)["path"]
        for part in out.glob("manifest.part-*.jsonl")
        for line in part.read_text().splitlines()
    ]
    assert set(finished) <= set(done)  # every image finished before the kill is still listed
    stamps = {path: (out / path).stat().st_mtime_ns for path in finished}

    one_thread_augment(argv(generator_dir, small_toy_world, out))  # one rank
    assert_same_dataset(out, single_process)
    assert {path: (out / path).stat().st_mtime_ns for path in finished} == stamps  # not made again
