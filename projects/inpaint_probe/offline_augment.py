"""Paper 003 Sec. 5.1, Algorithm 1: the generated training images are augmented once, offline ("on the 7,000
images generated dataset for training, we randomly applied augmentation techniques to produce a total of 3,000
images"), and the classifier trains on the originals plus the augmented copies; real images are not augmented.

`OfflineAugmentedRealFake` is `RealFakeFolder` with that protocol: at setup it writes `count` augmented copies
of the generated training images (default `fraction` 3/7 of them, the paper's 3,000 per 7,000) into a cache
folder keyed by the sources, the seed and the parameters, and appends them to the training split with label 1
and their source's generator. The copies are a function of (seed, copy index): the same on every run and rank.

Algorithm 1 is only an image in the paper; what we read from the text: each copy starts from a generated
training image (sources drawn without replacement, then again if more copies than images are asked for), and
each technique of Sec. 4's list (`common.transforms.paper_augmentations`: rotation, Gaussian noise,
brightness/contrast, colour jitter) is applied in that order with probability `p`, at least one per copy (a copy
identical to its source would only duplicate it). Copies are saved as PNG at the source's resolution; the
datamodule's resize then treats them like every other image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from common.backbones.presets import seeded
from common.data.images import ImageDecodeError, load_rgb
from common.data.realfake import RealFakeFolder
from common.data.samples import Sample
from common.errors import ConfigError
from common.io import save_image, write_json
from common.transforms import AugmentConfig, paper_augmentations

log = logging.getLogger("forgelab.data")

PAPER_FRACTION = 3000 / 7000  # Sec. 5.1: 3,000 augmented copies of 7,000 generated training images
_VERSION = 1  # bump when the way copies are made changes: old caches are then not reused


def _paper_augment() -> AugmentConfig:
    return AugmentConfig(horizontal_flip=False)


@dataclass(frozen=True)
class OfflineAugment:
    """The paper's offline augmentation of the generated class.

    fraction: copies per generated training image (3/7: the paper's 3,000 per 7,000); `count` overrides it.
    seed: fixes the sources and the augmentations of every copy.
    cache_dir: where the copies are written (a sub-folder per sources + settings; reused when complete).
    augment: the techniques' parameters and the probability `p` of each (horizontal_flip is not used).
    """

    fraction: float = PAPER_FRACTION
    count: int | None = None
    seed: int = 0
    cache_dir: str = "data/cache/inpaint_probe_offline_augment"
    augment: AugmentConfig = field(default_factory=_paper_augment)

    def __post_init__(self) -> None:
        if self.fraction < 0:
            raise ConfigError(f"offline_augment.fraction must be >= 0, got {self.fraction}")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"offline_augment.count must be >= 0, got {self.count}")
        if self.augment.p <= 0 or not paper_augmentations(self.augment):
            raise ConfigError("offline_augment.augment: p must be > 0 and at least one technique enabled")

    def copies(self, n_generated: int) -> int:
        return self.count if self.count is not None else round(self.fraction * n_generated)


def copy_sources(n_generated: int, count: int, seed: int) -> list[int]:
    """Index of the source image of each copy: a seeded permutation of the generated images, repeated."""
    if n_generated <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(n_generated, generator=generator).tolist()
    return order[:count]


def augment_copy(image: torch.Tensor, augment: AugmentConfig, seed: int) -> tuple[torch.Tensor, list[str]]:
    """One augmented copy of a [0, 1] (3, H, W) image and the names of the techniques applied, in the paper's
    order; each with probability `p`, at least one; deterministic in `seed`."""
    ops = paper_augmentations(augment)
    with seeded(seed):  # torchvision's random transforms draw from torch's global RNG
        chosen = (torch.rand(len(ops)) < augment.p).tolist()
        if not any(chosen):
            chosen[int(torch.randint(len(ops), ()))] = True
        applied = []
        for (name, op), keep in zip(ops, chosen, strict=True):
            if keep:
                image = op(image)
                applied.append(name)
    return image.clamp(0, 1), applied


def _cache_key(sources: Sequence[Sample], settings: OfflineAugment, count: int) -> str:
    digest = hashlib.sha1()
    for sample in sources:
        stat = os.stat(sample.path)
        digest.update(f"{sample.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    settings_text = json.dumps(
        {"v": _VERSION, "count": count, "seed": settings.seed, **asdict(settings.augment)}
    )
    digest.update(settings_text.encode())
    return digest.hexdigest()[:16]


def write_augmented_copies(
    sources: Sequence[Sample], settings: OfflineAugment
) -> tuple[list[Sample], dict[str, Any]]:
    """Write (or reuse) the augmented copies of `sources` (generated training images); returns their samples
    and a summary. The folder appears complete or not at all (written aside, then renamed). A source that no
    longer decodes is skipped and counted."""
    sources = sorted(sources, key=lambda s: s.path)
    count = settings.copies(len(sources))
    key = _cache_key(sources, settings, count)
    folder = Path(settings.cache_dir) / key
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        tmp = folder.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        rows, skipped = [], 0
        to_pil = v2.ToPILImage()
        for k, index in enumerate(copy_sources(len(sources), count, settings.seed)):
            source = sources[index]
            try:
                image = v2.functional.to_dtype(
                    v2.functional.to_image(load_rgb(source.path)), torch.float32, scale=True
                )
            except ImageDecodeError as err:
                skipped += 1
                log.warning("offline augmentation: skipped %s (%s)", source.path, err.reason)
                continue
            copy, applied = augment_copy(image, settings.augment, settings.seed * 1_000_003 + k)
            name = f"{k:06d}_{Path(source.path).stem}.png"
            save_image(tmp / name, to_pil((copy * 255).round().to(torch.uint8)))
            rows.append(
                {"file": name, "source": source.path, "generator": source.generator, "applied": applied}
            )
        write_json(
            tmp / "manifest.json", {"count": count, "seed": settings.seed, "skipped": skipped, "copies": rows}
        )
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (rank) finished the same folder first: its copies are identical
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads(manifest_path.read_text())
    samples = [Sample(str(folder / row["file"]), 1, row["generator"]) for row in manifest["copies"]]
    summary = {
        "folder": str(folder),
        "copies": len(samples),
        "sources": len(sources),
        "skipped": manifest["skipped"],
    }
    return samples, summary


class OfflineAugmentedRealFake(RealFakeFolder):
    """`common.data.RealFakeFolder` with the paper's protocol (Sec. 5.1): generated training images plus
    augmented copies of them written once (`offline_augment`), real images as they are, no online augmentation.

    Args:
        offline_augment: the copies' number, seed, cache folder and techniques; None = RealFakeFolder's behaviour.
        **kwargs: RealFakeFolder's arguments (train_root, image_size, resize, batch_size, ...). Its online
            `augment` must stay None: it would augment the real images too, which the paper does not.
    """

    def __init__(self, *args: Any, offline_augment: OfflineAugment | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if offline_augment is not None and self.augment is not None:
            raise ConfigError(
                "data: set either augment (online, both classes) or offline_augment (the paper's: generated only)"
            )
        self.offline_augment = offline_augment
        self.offline_summary: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.offline_augment is None or self.offline_summary or "train" not in self.samples:
            return
        generated = [s for s in self.samples["train"] if s.label == 1]
        copies, self.offline_summary = write_augmented_copies(generated, self.offline_augment)
        self.samples["train"] = self.samples["train"] + copies
        log.info("OfflineAugmentedRealFake: %s", self.offline_summary)
