"""ITEM's feature cache at GenImage scale: a synthetic cache of 1,000,000 images (768-d, 0-8 objects each, random
embeddings) written through the real cache writer (`FeatureCache.commit`) and the real view builder
(`build_view`), in a child process; then, in this process: the time to open it (`build_view` finding the view,
`FeatureDataset` construction for the split), the peak RSS while training ITEM's head for one epoch over it
through Lightning (`ru_maxrss` of this process only; goal under 4 GB), and the images/s of that epoch.

    python benchmarks/item_stream.py [--images 1000000] [--batch-size 256] [--work /tmp]

Disk: float32 shards of 1M images with 4 objects on average take ~31 GB and the view 9.2 GB (plus as much in
staging files while it is built); the benchmark checks the free space first and deletes everything at the end.
A quick run: `--images 50000`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from projects.item_detector.cache import FeatureCache, FeatureTable  # noqa: E402
from projects.item_detector.frozen import FLAG_NAMES  # noqa: E402
from projects.item_detector.view import build_view  # noqa: E402

MAX_OBJECTS = 8


def descriptor(dim: int) -> dict:
    return {"benchmark": "item_stream", "dim": dim}


def keys_of(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def disk_needed(images: int, dim: int) -> int:
    objects = images * MAX_OBJECTS / 2
    shards = images * (2 * dim * 4 + 8 + 8 * len(FLAG_NAMES)) + objects * (2 * dim * 4 + 20)
    return int(shards + 2 * images * (3 * dim + 1) * 4 * 1.05)


def write(root: Path, images: int, dim: int, shard_images: int, chunk_rows: int) -> dict:
    """The child process: shards through FeatureCache.commit, then the view through build_view."""
    cache = FeatureCache(root, descriptor(dim))
    generator = torch.Generator().manual_seed(0)
    keys = keys_of(images)
    start = time.perf_counter()
    with cache.locked():
        for first in range(0, images, shard_images):
            n = min(shard_images, images - first)
            counts = torch.randint(0, MAX_OBJECTS + 1, (n,), generator=generator)
            m = int(counts.sum())
            flags = torch.zeros(n, len(FLAG_NAMES), dtype=torch.int64)
            flags[:, FLAG_NAMES.index("no_objects")] = (counts == 0).long()
            table = FeatureTable(
                keys=keys[first : first + n],
                captions=[f"a synthetic image {first + i}" for i in range(n)],
                phrases=[["object"] * int(c) for c in counts],
                global_image=torch.randn(n, dim, generator=generator),
                global_text=torch.randn(n, dim, generator=generator),
                local_image=torch.randn(m, dim, generator=generator),
                local_text=torch.randn(m, dim, generator=generator),
                boxes=torch.rand(m, 4, generator=generator),
                box_scores=torch.rand(m, generator=generator),
                offsets=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
                flags=flags,
            )
            cache.commit(table)
            del table
    shards_s = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in cache.shard_dir.iterdir())
    start = time.perf_counter()
    view = build_view(cache, keys, chunk_rows)
    view_s = time.perf_counter() - start
    view_bytes = sum(p.stat().st_size for p in view.dir.iterdir())
    return {
        "shards_s": round(shards_s, 1),
        "shard_gb": round(shard_bytes / 1e9, 2),
        "view_build_s": round(view_s, 1),
        "view_gb": round(view_bytes / 1e9, 2),
        "writer_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def train(root: Path, images: int, dim: int, chunk_rows: int, batch_size: int) -> dict:
    import lightning as L

    from common.data.samples import Sample
    from projects.item_detector.data import FeatureDataset, _identity
    from projects.item_detector.model import ItemDetector

    before_open = rss_gb()
    start = time.perf_counter()
    cache = FeatureCache(root, descriptor(dim))
    keys = keys_of(images)
    samples = [Sample(f"/synthetic/{i}.png", i % 2, "synthetic") for i in range(images)]
    view = build_view(cache, keys, chunk_rows)  # finds the view the writer built
    dataset = FeatureDataset(samples, keys, view, {}, ["synthetic"])
    open_s = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=dataset.sampler(shuffle=True, seed=0), collate_fn=_identity
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = ItemDetector(feature_dim=dim)
    after_open = rss_gb()
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    epoch_s = time.perf_counter() - start
    return {
        "open_s": round(open_s, 2),
        "epoch_s": round(epoch_s, 1),
        "images_per_s": round(images / epoch_s),
        "rss_before_open_gb": round(before_open, 2),
        "rss_after_open_gb": round(after_open, 2),
        "peak_rss_gb": round(rss_gb(), 2),
        "steps": trainer.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shard-images", type=int, default=16384, help="images per committed shard")
    parser.add_argument("--chunk-rows", type=int, default=8192, help="rows per view chunk")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", default="/tmp", help="where the temporary cache goes")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the child process: write the cache there
    args = parser.parse_args()
    if args.write:
        print(json.dumps(write(Path(args.write), args.images, args.dim, args.shard_images, args.chunk_rows)))
        return
    needed, free = disk_needed(args.images, args.dim), shutil.disk_usage(args.work).free
    if needed > free:
        raise SystemExit(
            f"item_stream: needs ~{needed / 1e9:.0f} GB in {args.work}, {free / 1e9:.0f} GB free"
        )
    root = Path(tempfile.mkdtemp(prefix="item-stream-", dir=args.work))
    try:
        child = [sys.executable, __file__, "--write", str(root), *sys.argv[1:]]
        start = time.perf_counter()
        output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        written = json.loads(output.strip().splitlines()[-1])
        print(
            f"wrote {args.images:,} images in {time.perf_counter() - start:.0f} s: {json.dumps(written)}",
            flush=True,
        )
        result = train(root, args.images, args.dim, args.chunk_rows, args.batch_size)
        print(
            f"{args.images:,} images (d={args.dim}, 0-{MAX_OBJECTS} objects): open {result['open_s']:.2f} s; one "
            f"epoch of ITEM's head through Lightning (batch {args.batch_size}): {result['epoch_s']:.1f} s, "
            f"{result['images_per_s']:,} images/s; peak RSS {result['peak_rss_gb']:.2f} GB (goal < 4 GB; "
            f"{result['rss_before_open_gb']:.2f} GB after imports, {result['rss_after_open_gb']:.2f} GB opened)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
