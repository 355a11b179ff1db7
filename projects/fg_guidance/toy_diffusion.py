"""A small latent diffusion model of the toy world, so the tiny generator is a real (if small) diffusion model.

Why: the tiny preset of `create_diffusion_components` has random weights. A random VAE decodes every latent to
noise and a random UNet is not a denoiser, so DDIM inversion does not invert (the cycle's relative latent error
is over 100 %), the generated images are noise and nothing downstream (augmentation, the detectors' generated
half) would mean anything. Fitting the SAME tiny architecture on the toy world's training images for a few
hundred steps fixes that: the autoencoder reconstructs the valves (blurred, 32 px), the UNet predicts noise,
and DDIM inversion then reconstructs its input (about 12 % relative latent error at T = 10, 3 % at T = 50).
Pretrained Stable Diffusion needs none of this.

What it does, deterministically (seeded, training split only, never val/test):
1. the VAE as an autoencoder (L1 reconstruction + a small KL term, the LDM autoencoder without its GAN);
   the latent scale is then set so the latents have unit variance (what SD's 0.18215 does for SD);
2. the UNet as an epsilon-prediction denoiser on those latents (uniform timesteps of the DDIM scheduler's
   training schedule), conditioned on the captions through the frozen tiny text encoder, with 10 % of the
   captions dropped to "" so classifier-free guidance works.

The result is cached like the toy world: `ensure_toy_diffusion(root)` writes `unet.safetensors`,
`vae.safetensors` and `toy_diffusion.json` (spec, spec hash, latent scale, loss curves) atomically under a file
lock, and reuses them while the spec (and the toy world's spec) is unchanged.

    python -m projects.fg_guidance.toy_diffusion --root data/fg_toy_diffusion
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from common.backbones import create_diffusion_components
from common.data.captioned import read_captioned_manifest
from common.data.images import ImageDecodeError, load_rgb
from common.data.toy_world import ensure_toy_world

log = logging.getLogger("forgelab.fg_guidance")

FORMAT_VERSION = 1
META_FILE = "toy_diffusion.json"


@dataclass(frozen=True)
class ToyDiffusionSpec:
    """Everything the fitted weights depend on; its hash names the cached copy."""

    toy_world: str = "data/toy_world"
    image_size: int = 32
    autoencoder_steps: int = 200
    autoencoder_batch_size: int = 4
    autoencoder_lr: float = 1.5e-3
    denoiser_steps: int = 200
    denoiser_batch_size: int = 8
    denoiser_lr: float = 2e-3
    caption_dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % 2 or self.image_size < 16:
            raise ValueError(f"image_size must be an even number >= 16, got {self.image_size}")
        if (
            min(
                self.autoencoder_steps,
                self.denoiser_steps,
                self.autoencoder_batch_size,
                self.denoiser_batch_size,
            )
            < 1
        ):
            raise ValueError("steps and batch sizes must be >= 1")

    def spec_hash(self, toy_world_hash: str) -> str:
        payload = {k: v for k, v in dataclasses.asdict(self).items() if k != "toy_world"}
        payload.update(format_version=FORMAT_VERSION, toy_world_hash=toy_world_hash)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load_training_set(spec: ToyDiffusionSpec) -> tuple[torch.Tensor, list[str]]:
    """The toy world's training images at spec.image_size (antialiased bicubic), and their captions."""
    samples = [
        s
        for s in read_captioned_manifest(Path(spec.toy_world) / "parts" / "manifest.jsonl")
        if s.split == "train"
    ]
    images, captions = [], []
    for sample in samples:
        try:
            pil = load_rgb(sample.path)
        except ImageDecodeError as error:
            log.warning("toy diffusion: skipping %s (%s)", sample.path, error.reason)
            continue
        pil = pil.resize((spec.image_size, spec.image_size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
        captions.append(sample.caption)
    if len(images) < max(spec.autoencoder_batch_size, spec.denoiser_batch_size):
        raise ValueError(f"the toy world at {spec.toy_world} has only {len(images)} training images")
    return torch.stack(images), captions


def fit_toy_diffusion(
    spec: ToyDiffusionSpec,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Fit the tiny VAE, then the tiny UNet (see module docstring). Returns (unet state, vae state, metadata)."""
    images, captions = _load_training_set(spec)
    parts = create_diffusion_components(preset="tiny")
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    alphas = parts.scheduler.alphas_cumprod
    rng = torch.Generator().manual_seed(spec.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # posterior sampling inside diffusers draws from the global generator
        start = time.perf_counter()

        vae.train().requires_grad_(True)
        optimiser = torch.optim.Adam(vae.parameters(), lr=spec.autoencoder_lr)
        ae_losses = []
        for _ in range(spec.autoencoder_steps):
            batch = images[torch.randint(len(images), (spec.autoencoder_batch_size,), generator=rng)] * 2 - 1
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.l1_loss(recon, batch) + 1e-6 * posterior.kl().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            ae_losses.append(loss.item())
        vae.eval().requires_grad_(False)

        with torch.no_grad():
            latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(64)])
            latent_scale = float(1.0 / latents.std())
            latents = latents * latent_scale
            tokens = tokenizer(
                [*captions, ""],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            text = torch.cat([text_encoder(chunk)[0] for chunk in tokens.split(64)])
        conditions, empty = text[:-1], text[-1:]

        unet.train().requires_grad_(True)
        optimiser = torch.optim.AdamW(unet.parameters(), lr=spec.denoiser_lr)
        denoise_losses = []
        n = spec.denoiser_batch_size
        for _ in range(spec.denoiser_steps):
            index = torch.randint(len(latents), (n,), generator=rng)
            z0 = latents[index]
            cond = conditions[index].clone()
            dropped = torch.rand(n, generator=rng) < spec.caption_dropout
            cond[dropped] = empty
            t = torch.randint(len(alphas), (n,), generator=rng)
            noise = torch.randn(z0.shape, generator=rng)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            denoise_losses.append(loss.item())
        unet.eval().requires_grad_(False)
        seconds = time.perf_counter() - start
    meta = {
        "latent_scale": latent_scale,
        "training_images": len(images),
        "autoencoder_l1_last10": float(np.mean(ae_losses[-10:])),
        "denoiser_mse_last10": float(np.mean(denoise_losses[-10:])),
        "autoencoder_losses": ae_losses,
        "denoiser_losses": denoise_losses,
        "seconds": round(seconds, 1),
    }
    return unet.state_dict(), vae.state_dict(), meta


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _current(root: Path, spec_hash: str) -> bool:
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("spec_hash") == spec_hash and all(
        (root / n).is_file() for n in ("unet.safetensors", "vae.safetensors")
    )


def ensure_toy_diffusion(
    root: str | Path = "data/fg_toy_diffusion", spec: ToyDiffusionSpec = ToyDiffusionSpec()
) -> Path:
    """Return ``root`` holding the fitted tiny model, fitting it first when missing or stale (takes about a
    minute on 2 CPU cores; later calls return at once). Safe under concurrency (file lock, atomic replace)."""
    root = Path(root)
    toy = ensure_toy_world(spec.toy_world)
    toy_hash = json.loads((toy / "toy_world.json").read_text())["spec_hash"]
    spec_hash = spec.spec_hash(toy_hash)
    if _current(root, spec_hash):
        return root
    with _locked(root):
        if _current(root, spec_hash):
            return root
        if root.exists() and any(root.iterdir()) and not (root / META_FILE).exists():
            raise FileExistsError(f"{root} exists and is not a toy diffusion folder; refusing to replace it")
        log.info("fitting the toy world's tiny latent diffusion model into %s (spec %s)", root, spec_hash)
        unet, vae, meta = fit_toy_diffusion(spec)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in unet.items()}, str(tmp / "unet.safetensors")
            )
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in vae.items()}, str(tmp / "vae.safetensors")
            )
            record = {
                "spec": dataclasses.asdict(spec),
                "spec_hash": spec_hash,
                "toy_world_hash": toy_hash,
                **meta,
            }
            (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            if root.exists():
                os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("toy diffusion model fitted in %.0f s: %s", meta["seconds"], root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/fg_toy_diffusion")
    defaults = ToyDiffusionSpec()
    for field in dataclasses.fields(ToyDiffusionSpec):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = ToyDiffusionSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ToyDiffusionSpec)})
    root = ensure_toy_diffusion(args.root, spec)
    meta = json.loads((root / META_FILE).read_text())
    print(json.dumps({k: v for k, v in meta.items() if not k.endswith("_losses")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
