"""ITEM's frozen-stage extraction on 2 ranks against 1 rank, on the same images, measured in one run:

    python benchmarks/item_distributed.py [--images 96]

Both arms are `forgelab extract` of the tiny presets of the paper's pipeline (BLIP-2 captions, Grounding DINO
objects, CLIP; configs/item_detector/tiny.yaml with the generative captioner and grounder) over the toy world's
test images into a fresh cache, one torch thread per rank: 1 rank with configs/trainer/cpu.yaml, 2 ranks with
configs/trainer/ddp_sim.yaml (Lightning Fabric starts them). The throughput is the images over the extraction's own
time (from the first rank's start to the last rank's commit: `seconds` in extract_report.json), so process
start-up and model loading are reported apart. The ranks run one process's batches (`Ranks.share_batches`), so
the two caches are compared bitwise. Target: >= 1.6x, identical features.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.item_cache import subset_manifest  # noqa: E402
from common.data.toy_world import ensure_toy_world  # noqa: E402

CONFIG = REPO / "configs" / "item_detector" / "tiny.yaml"


def extract(trainer: str, manifest: Path, work: Path, name: str) -> dict:
    """One `forgelab extract` in its own process; returns the test split's extraction stats and the wall time."""
    args = [
        sys.executable,
        "-m",
        "common.experiment.cli",
        "extract",
        "--config",
        str(REPO / "configs" / "trainer" / trainer),
        "--config",
        str(CONFIG),
        "--data.init_args.toy_world=null",
        "--data.init_args.train_root=null",
        "--data.init_args.val_root=null",
        f"--data.init_args.test_root={manifest}",
        "--data.init_args.test_perturbations=[none]",
        "--data.init_args.captioner.name=blip2",
        "--data.init_args.grounder.name=grounding_dino",
        "--data.init_args.extract_batch_size=8",
        f"--data.init_args.cache_dir={work / name / 'cache'}",
        f"--run.root={work / name / 'runs'}",
        "--splits=[test]",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    (report,) = (work / name / "runs").glob("*/extract-*/extract_report.json")
    stats = json.loads(report.read_text())["extraction"]["test/none"]
    return stats | {"wall_s": round(wall, 2), "cache": work / name / "cache"}


def same_features(a: Path, b: Path) -> bool:
    from tests.test_item_distributed import cache_contents

    x, y = cache_contents(a), cache_contents(b)
    if x.keys() != y.keys():
        return False
    import torch

    for key in x:
        for u, v in zip(x[key], y[key], strict=True):
            if isinstance(u, torch.Tensor) and not torch.equal(u, v):
                return False
            if not isinstance(u, torch.Tensor) and u != v:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="test images (half real, half generated)")
    parser.add_argument("--toy-world", default="data/toy_world")
    args = parser.parse_args()
    toy = ensure_toy_world(args.toy_world).resolve()
    work = Path(tempfile.mkdtemp(prefix="item-ddp-bench-"))
    try:
        manifest = subset_manifest(toy, "test", args.images, work)
        one = extract("cpu.yaml", manifest, work, "one")
        two = extract("ddp_sim.yaml", manifest, work, "two")
        identical = same_features(one["cache"], two["cache"])
        n = one["extracted"] + one["skipped"]
        rate_one, rate_two = n / one["seconds"], n / two["seconds"]
        print(
            f"1 rank: {rate_one:.1f} img/s ({one['seconds']:.1f} s extraction, {one['wall_s']:.1f} s with start-up)"
        )
        print(
            f"2 ranks: {rate_two:.1f} img/s ({two['seconds']:.1f} s extraction, {two['wall_s']:.1f} s with "
            f"start-up; per rank {two.get('rank_seconds')} s)"
        )
        print(
            f"extraction of {n} images, 2 ranks vs 1 rank: throughput ratio {rate_two / rate_one:.2f}x "
            f"(target >= 1.6x); features identical: {identical}; load average {os.getloadavg()[0]:.1f}"
        )
        if not identical:
            raise SystemExit("the 2-rank cache differs from the 1-rank cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
