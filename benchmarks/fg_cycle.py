"""Fine-grained guidance: memory and time of one training step vs the number of DDIM steps T, and the cycle error.

1. One training step of projects.fg_guidance (cycle + the four loss terms + GradNorm's gradient norms + backward
   into the LoRA weights + optimiser step) at T = 10, 25, 50 with K = 1 gradient step, each T in a fresh process:
   peak resident memory above the process's footprint just before the step (RSS sampled every 0.5 ms during
   the step) and the wall time of a second step. Target: peak(T=50) / peak(T=10) <= 1.1 (gradients are kept
   for the last K steps only, with activation checkpointing, so memory must not grow with T).
2. The cycle with no training (LoRA at zero): DDIM inversion then reconstruction of toy-world validation images,
   relative latent error ||z_hat - z|| / ||z|| and pixel MAE, at T = 10, 25, 50; the VAE's own reconstruction
   error is printed alongside (the cycle cannot beat it).

Tiny generator on the toy world (the architecture of the tiny preset with the toy world's fitted weights,
data/fg_toy_diffusion, fitted first if missing), CPU, batch of 4 images of 32 px.

    python benchmarks/fg_cycle.py [--steps 10 25 50] [--grad-steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = "data/fg_toy_diffusion"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` is the largest value seen while active."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _batch(n: int, size: int) -> dict:
    from projects.fg_guidance.data import FineGrainedPairs

    data = FineGrainedPairs(
        toy_world="data/toy_world",
        manifest="data/toy_world/parts/manifest.jsonl",
        image_size=size,
        batch_size=n,
        num_workers=0,
    )
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def child_step(steps: int, grad_steps: int) -> dict:
    """One process, one T: memory of the first training step, time of the second."""
    from projects.fg_guidance.module import FineGrainedGuidance
    from projects.fg_guidance.toy_diffusion import ensure_toy_diffusion

    torch.manual_seed(0)
    ensure_toy_diffusion(BASE)
    model = FineGrainedGuidance(
        preset="tiny",
        base_weights=BASE,
        image_size=32,
        num_inference_steps=steps,
        grad_steps=grad_steps,
        captioner=None,
    )
    optimiser = torch.optim.AdamW(model.generator.lora_parameters(), lr=1e-3)
    batch = _batch(4, 32)

    def step() -> None:
        result = model.training_loss(batch)
        optimiser.zero_grad()
        result["loss"].backward()
        optimiser.step()
        model.gradnorm.step(result["terms"].detach(), result["norms"])

    before = _rss_bytes()
    with PeakRSS() as peak:
        step()
    start = time.perf_counter()
    step()
    return {"peak_mb": (peak.peak - before) / 2**20, "seconds": time.perf_counter() - start}


@torch.no_grad()
def cycle_error(steps_list: list[int]) -> list[dict]:
    from projects.fg_guidance.cycle import FineGrainedGenerator
    from projects.fg_guidance.toy_diffusion import ensure_toy_diffusion

    ensure_toy_diffusion(BASE)
    generator = FineGrainedGenerator(preset="tiny", image_size=32, base_weights=BASE).eval()
    batch = _batch(16, 32)
    x = batch["image"]
    latents = generator.encode(x)
    vae_mae = float((generator.decode(latents) - x).abs().mean())
    rows = []
    for steps in steps_list:
        out = generator.cycle(x, batch["caption"], steps, 0)
        rows.append(
            {
                "T": steps,
                "latent_rel_error": float((out["latents_hat"] - latents).norm() / latents.norm()),
                "pixel_mae": float((out["x_hat"] - x).abs().mean()),
                "vae_only_pixel_mae": vae_mae,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--grad-steps", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: tiny ops are faster, and stable on a busy machine)",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child_step(args.child, args.grad_steps)))
        return 0

    from projects.fg_guidance.toy_diffusion import ensure_toy_diffusion

    ensure_toy_diffusion(BASE)  # fitted once, before any timing
    print(f"one training step, K = {args.grad_steps}, batch 4 x 32 px, tiny generator (CPU)")
    results = {}
    for steps in args.steps:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(steps),
                "--grad-steps",
                str(args.grad_steps),
                "--threads",
                str(args.threads),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        results[steps] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"  T = {steps:3d}: peak +{results[steps]['peak_mb']:7.1f} MB   step {results[steps]['seconds']:6.2f} s"
        )
    low, high = min(args.steps), max(args.steps)
    ratio = results[high]["peak_mb"] / max(results[low]["peak_mb"], 1e-9)
    verdict = "OK" if ratio <= 1.1 else "ABOVE TARGET"
    print(f"peak memory ratio T={high} / T={low}: {ratio:.3f} (target <= 1.1: {verdict})")
    print(f"step time ratio T={high} / T={low}: {results[high]['seconds'] / results[low]['seconds']:.2f}")

    print("cycle with no training (DDIM inversion + reconstruction, 16 toy validation images):")
    for row in cycle_error(args.steps):
        print(
            f"  T = {row['T']:3d}: latent relative error {row['latent_rel_error']:.4f}   pixel MAE "
            f"{row['pixel_mae']:.4f}   (VAE alone: {row['vae_only_pixel_mae']:.4f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
