"""Fine-grained guidance: memory and time of a training step vs T and K, and the cycle error.

1. Training steps of projects.fg_guidance (cycle + the four loss terms + GradNorm's gradient norms + backward into
   the LoRA weights + optimiser step), each configuration in a fresh process:
   * a T sweep (T = 10, 25, 50 DDIM steps) at K = 1;
   * a K sweep (K = `grad_steps`, the last reverse DDIM steps that keep gradients, K = 1, 2, 3) at one T, with
     activation checkpointing of the K UNet calls on and off.
   The first step's peak is mostly one-time overhead (allocator growth, lazy initialisation), so it is reported
   alone and the steady state is measured from the second step on (the largest peak over steps 2..n):
   * CPU: peak resident memory above the RSS just before the step (sampled every 0.5 ms), and the activation
     bytes the autograd graph holds for backward at the end of the forward (saved-tensor hooks, parameters
     excluded, each storage once): the part that must not grow with T;
   * GPU (when present): torch.cuda.max_memory_allocated after reset_peak_memory_stats, above the memory
     allocated just before the step.
   Target: steady peak(T=50) / peak(T=10) <= 1.1 (gradients are kept for the last K steps only).
2. The cycle with no training (LoRA at zero): DDIM inversion then reconstruction of toy-world validation images,
   relative latent error ||z_hat - z|| / ||z|| and pixel MAE, at each T; the VAE's own reconstruction error is
   printed alongside (the cycle cannot beat it).

Tiny generator on the toy world (the architecture of the tiny preset with the toy world's fitted weights,
data/fg_toy_diffusion, fitted first if missing), batch of 4 images of 32 px.

    python benchmarks/fg_cycle.py [--steps 10 25 50] [--grad-steps 1 2 3] [--k-sweep-t 25] [--measure-steps 3]
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


class SavedActivations:
    """Bytes autograd saves for backward while active (each storage once, the given parameters excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.storages = exclude, {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


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


def child_step(steps: int, grad_steps: int, checkpointing: bool, measure_steps: int) -> dict:
    """One process, one (T, K, checkpointing): the first step alone, then the steady state of steps 2..n."""
    from projects.fg_guidance.module import FineGrainedGuidance
    from projects.fg_guidance.toy_diffusion import ensure_toy_diffusion

    torch.manual_seed(0)
    ensure_toy_diffusion(BASE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FineGrainedGuidance(
        preset="tiny",
        base_weights=BASE,
        image_size=32,
        num_inference_steps=steps,
        grad_steps=grad_steps,
        activation_checkpointing=checkpointing,
        captioner=None,
    ).to(device)
    optimiser = torch.optim.AdamW(model.generator.lora_parameters(), lr=1e-3)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _batch(4, 32).items()}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parameters |= {b.untyped_storage().data_ptr() for b in model.buffers()}

    def step() -> int:
        with SavedActivations(parameters) as saved:
            result = model.training_loss(batch)
        optimiser.zero_grad()
        result["loss"].backward()
        optimiser.step()
        model.gradnorm.step(result["terms"].detach(), result["norms"], result["aux"]["active"])
        return saved.bytes

    def measured() -> dict:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        before = _rss_bytes()
        start = time.perf_counter()
        with PeakRSS() as peak:
            saved = step()
            if cuda:
                torch.cuda.synchronize()
        row = {
            "rss_mb": (peak.peak - before) / 2**20,
            "saved_mb": saved / 2**20,
            "seconds": time.perf_counter() - start,
        }
        if cuda:
            row["cuda_mb"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
        return row

    first = measured()
    later = [measured() for _ in range(max(1, measure_steps - 1))]
    steady = {key: max(row[key] for row in later) for key in later[0]}
    steady["seconds"] = later[-1]["seconds"]
    return {"first": first, "steady": steady, "device": device.type}


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


def _run_child(args: argparse.Namespace, steps: int, grad_steps: int, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(steps), "--child-k", str(grad_steps)]
    command += ["--threads", str(args.threads), "--measure-steps", str(args.measure_steps)]
    command += [] if checkpointing else ["--no-checkpointing"]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _line(label: str, result: dict) -> str:
    first, steady = result["first"], result["steady"]
    text = (
        f"  {label}: first step +{first['rss_mb']:6.1f} MB RSS | steady: +{steady['rss_mb']:6.1f} MB RSS, "
        f"graph {steady['saved_mb']:6.2f} MB"
    )
    if "cuda_mb" in steady:
        text += f", CUDA peak +{steady['cuda_mb']:7.1f} MB (first {first['cuda_mb']:7.1f})"
    return text + f", step {steady['seconds']:5.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="the T sweep (at K = 1)")
    parser.add_argument("--grad-steps", type=int, nargs="+", default=[1, 2, 3], help="the K sweep")
    parser.add_argument("--k-sweep-t", type=int, default=25, help="T of the K sweep")
    parser.add_argument(
        "--measure-steps", type=int, default=3, help="steps per process (the first is warm-up)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: tiny ops are faster, and stable on a busy machine)",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-k", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        result = child_step(args.child, args.child_k, not args.no_checkpointing, args.measure_steps)
        print(json.dumps(result))
        return 0

    from projects.fg_guidance.toy_diffusion import ensure_toy_diffusion

    ensure_toy_diffusion(BASE)  # fitted once, before any timing
    device = "GPU (CUDA peaks)" if torch.cuda.is_available() else "CPU (no GPU: RSS and graph bytes)"
    print(
        f"training steps, batch 4 x 32 px, tiny generator, {device}; steady state = steps 2..{args.measure_steps}"
    )
    print("T sweep, K = 1, activation checkpointing on:")
    by_t = {}
    for steps in args.steps:
        by_t[steps] = _run_child(args, steps, 1, True)
        print(_line(f"T = {steps:3d}", by_t[steps]))
    low, high = min(args.steps), max(args.steps)
    for key, what in (("rss_mb", "steady peak RSS"), ("saved_mb", "graph bytes"), ("cuda_mb", "CUDA peak")):
        if key in by_t[low]["steady"]:
            ratio = by_t[high]["steady"][key] / max(by_t[low]["steady"][key], 1e-9)
            verdict = "OK" if ratio <= 1.1 else "ABOVE TARGET"
            print(f"  {what} ratio T={high} / T={low}: {ratio:.3f} (target <= 1.1: {verdict})")
    ratio = by_t[high]["first"]["rss_mb"] / max(by_t[low]["first"]["rss_mb"], 1e-9)
    print(f"  first-step peak RSS ratio T={high} / T={low}: {ratio:.3f}")
    time_ratio = by_t[high]["steady"]["seconds"] / by_t[low]["steady"]["seconds"]
    print(f"  step time ratio T={high} / T={low}: {time_ratio:.2f}")

    print(f"K sweep at T = {args.k_sweep_t} (K = reverse DDIM steps that keep gradients):")
    for checkpointing in (True, False):
        for k in args.grad_steps:
            if checkpointing and k == 1 and args.k_sweep_t in by_t:
                result = by_t[args.k_sweep_t]
            else:
                result = _run_child(args, args.k_sweep_t, k, checkpointing)
            print(_line(f"K = {k}, checkpointing {'on ' if checkpointing else 'off'}", result))

    print("cycle with no training (DDIM inversion + reconstruction, 16 toy validation images):")
    for row in cycle_error(args.steps):
        print(
            f"  T = {row['T']:3d}: latent relative error {row['latent_rel_error']:.4f}   pixel MAE "
            f"{row['pixel_mae']:.4f}   (VAE alone: {row['vae_only_pixel_mae']:.4f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
