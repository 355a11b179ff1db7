"""RealFakeFolder images/s (decode + train augmentation) against a plain torchvision ImageFolder with the same
transforms, num_workers 0 and 2, measured in one run on the toy world. The ratio is what matters: the robust
decoding, skip accounting and generator bookkeeping should cost little over the bare loader.

    python benchmarks/datamodule_throughput.py [--images 512] [--image-size 224]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from common.data.realfake import RealFakeFolder
from common.data.toy_world import ensure_toy_world
from common.transforms import AugmentConfig, build_train_transform


def _rate(loader: DataLoader, n_images: int, epochs: int = 2) -> float:
    for _ in loader:  # warm-up epoch: worker start-up and page cache, excluded from the timing
        pass
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        for batch in loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            seen += images.shape[0]
    elapsed = time.perf_counter() - start
    assert seen == n_images * epochs, (seen, n_images)
    return seen / elapsed


def run(
    images: int = 512, image_size: int = 224, batch_size: int = 32, toy_world: str = "data/toy_world"
) -> list[dict]:
    torch.set_num_threads(1)
    ensure_toy_world(toy_world)
    root = Path(toy_world) / "realfake" / "train"
    augment = AugmentConfig()
    transform = build_train_transform(image_size, "resize", augment)

    generator = sorted(p for p in root.iterdir() if p.is_dir())[0]
    reference = ImageFolder(str(generator), transform=transform)
    n = min(images, len(reference))
    reference = Subset(reference, range(n))

    datamodule = RealFakeFolder(
        train_root=str(generator),
        val_fraction=0.01,
        image_size=image_size,
        augment=augment,
        batch_size=batch_size,
    )
    datamodule.setup("fit")
    datamodule.samples["train"] = sorted(
        datamodule.samples["train"] + datamodule.samples["val"], key=lambda s: s.path
    )[:n]

    results = []
    for workers in (0, 2):
        datamodule.num_workers = workers
        ours = _rate(datamodule.train_dataloader(), n)
        theirs = _rate(DataLoader(reference, batch_size=batch_size, shuffle=True, num_workers=workers), n)
        results.append(
            {"num_workers": workers, "realfakefolder": ours, "imagefolder": theirs, "ratio": ours / theirs}
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--toy-world", default="data/toy_world")
    args = parser.parse_args()
    results = run(args.images, args.image_size, toy_world=args.toy_world)
    print(f"datamodule throughput, {args.image_size}px, decode + train augmentation (images/s)")
    print("| num_workers | RealFakeFolder | ImageFolder | ratio |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['num_workers']} | {r['realfakefolder']:.1f} | {r['imagefolder']:.1f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
