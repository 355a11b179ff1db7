"""Indexing a large CNNDetection-layout tree: `index_sources` (what RealFakeFolder and ItemFeatures call) and
`RealFakeFolder.setup` (index + stratified split + per-label subsample) on --files small files, against a bare
`os.scandir` walk of the same tree, measured in one run. Goal: well under a minute for 100,000 files.

    python benchmarks/indexing.py [--files 100000] [--classes 20]

Indexing reads names and sizes only (an empty file is skipped and counted; decoding happens in the loaders), so
1-byte files stand in for images. The tree is written once to a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common.data.images import SkipLog
from common.data.realfake import RealFakeFolder, index_sources


def write_tree(root: Path, files: int, classes: int) -> int:
    per_folder = files // (classes * 2)
    for c in range(classes):
        for label in ("0_real", "1_fake"):
            folder = root / f"class{c:02d}" / label
            folder.mkdir(parents=True)
            for i in range(per_folder):
                (folder / f"{i:06d}.png").write_bytes(b"x")
    return per_folder * classes * 2


def bare_walk(root: Path) -> int:
    """The unavoidable work: list every file and read its size."""
    count, stack = 0, [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.stat().st_size > 0:
                    count += 1
    return count


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="forgelab-index-"))
    try:
        n, write_s = timed(lambda: write_tree(root, args.files, args.classes))
        source = f"progan={root}"
        walked, walk_s = timed(lambda: bare_walk(root))
        samples, index_s = timed(lambda: index_sources(source, SkipLog("indexing")))

        def setup() -> RealFakeFolder:
            dm = RealFakeFolder(train_root=source, num_workers=0, max_train_per_label=4000)
            dm.setup("fit")
            return dm

        dm, setup_s = timed(setup)
        assert walked == len(samples) == n, (walked, len(samples), n)
        print(f"{n} files in {args.classes} classes x 2 labels (written in {write_s:.1f} s)")
        print(f"  bare os.scandir walk        {walk_s:6.2f} s")
        print(
            f"  index_sources               {index_s:6.2f} s  ({n / index_s:,.0f} files/s, {index_s / walk_s:.1f}x the walk)"
        )
        print(
            f"  RealFakeFolder.setup        {setup_s:6.2f} s  (index + split + 4,000 per label: "
            f"{len(dm.samples['train'])} train, {len(dm.samples['val'])} val)"
        )
        print(f"  goal: well under 60 s -> {'met' if setup_s < 30 else 'NOT met'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
