"""Paper 003 probe costs on CPU, measured in one run: inpainting images/s of each inpainter (tiny presets at
256 px; the diffusion inpainter at 64 px, since its tiny VAE attends over every pixel at 256 px), the paper-size
networks for reference, NIQE and FID time per 100 images, and our Fréchet distance against torchmetrics'
FrechetInceptionDistance on the same features (the ratio is why the probe computes FID per bucket itself).

    python benchmarks/inpaint_probe.py [--images 8] [--size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from projects.inpaint_probe.diffusion_inpainter import DiffusionInpainter
from projects.inpaint_probe.fid import RandomConvFeatures, extract_features, frechet_distance
from projects.inpaint_probe.inpainters import DeepFillV2Inpainter, PartialConvInpainter
from projects.inpaint_probe.masks import MaskConfig, mask_rng, sample_mask, to_tensor
from projects.inpaint_probe.niqe import niqe


def _inputs(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=generator)
    holes = torch.stack([to_tensor(sample_mask(size, size, MaskConfig(), mask_rng(0, i))) for i in range(n)])
    return images, holes


def _rate(inpainter, n: int, size: int, batch: int = 4) -> float:
    images, holes = _inputs(n, size)
    inpainter.inpaint(images[:1], holes[:1])  # warm-up: allocator, oneDNN primitives
    start = time.perf_counter()
    for i in range(0, n, batch):
        inpainter.inpaint(images[i : i + batch], holes[i : i + batch])
    return n / (time.perf_counter() - start)


class _PassThrough(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    n, size = args.images, args.size

    rows = []
    pconv = _rate(PartialConvInpainter(preset="tiny").eval(), n, size)
    rows.append(("partial conv, tiny", size, pconv))
    deepfill = _rate(DeepFillV2Inpainter(preset="tiny").eval(), n, size)
    rows.append(("DeepFill v2, tiny", size, deepfill))
    rows.append(
        (
            "SD inpainting, tiny (2 steps, no CFG)",
            64,
            _rate(DiffusionInpainter(preset="tiny", steps=2, guidance_scale=1.0), 4, 64, 2),
        )
    )
    rows.append(
        (
            "partial conv, paper size (random)",
            size,
            _rate(PartialConvInpainter(preset="random").eval(), 1, size, 1),
        )
    )
    rows.append(
        (
            "DeepFill v2, paper size (random)",
            size,
            _rate(DeepFillV2Inpainter(preset="random").eval(), 1, size, 1),
        )
    )
    print(f"inpainting on CPU ({args.threads} threads), images/s")
    print("| inpainter | px | images/s |")
    print("|---|---|---|")
    for name, px, rate in rows:
        print(f"| {name} | {px} | {rate:.2f} |")
    print(f"ratio DeepFill v2 / partial conv (tiny, {size} px): {deepfill / pconv:.2f}")

    images, _ = _inputs(20, size)
    arrays = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images]
    niqe(arrays[0])
    start = time.perf_counter()
    for array in arrays:
        niqe(array)
    niqe_100 = (time.perf_counter() - start) / len(arrays) * 100
    extractor = RandomConvFeatures()
    extract_features(extractor, images[:2])
    start = time.perf_counter()
    features = extract_features(extractor, images)
    extract_100 = (time.perf_counter() - start) / len(images) * 100

    generator = torch.Generator().manual_seed(1)
    real = torch.randn(100, 2048, generator=generator, dtype=torch.float64)
    fake = torch.randn(100, 2048, generator=generator, dtype=torch.float64) + 0.1
    start = time.perf_counter()
    ours = frechet_distance(real, fake)
    ours_s = time.perf_counter() - start
    metric = FrechetInceptionDistance(feature=_PassThrough(2048))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    start = time.perf_counter()
    theirs = float(metric.compute())
    theirs_s = time.perf_counter() - start
    print(f"\nmetrics per 100 images of {size} px")
    print("| step | seconds per 100 images |")
    print("|---|---|")
    print(f"| NIQE (ours, numpy/scipy) | {niqe_100:.2f} |")
    print(f"| FID features, substitute random conv ({features.shape[1]}-d) | {extract_100:.2f} |")
    print(f"| Fréchet distance 100 vs 100 at 2048-d: ours | {ours_s:.3f} |")
    print(
        f"| Fréchet distance 100 vs 100 at 2048-d: torchmetrics FrechetInceptionDistance | {theirs_s:.3f} |"
    )
    print(f"ratio torchmetrics / ours: {theirs_s / ours_s:.1f}x (values {theirs:.4f} vs {ours:.4f})")


if __name__ == "__main__":
    main()
